"""`invoke bench`: throughput, frames/s, latency and per-packet costs of every path, side by side.

Modules, each holding one thing:
  paths.py        the Path/Endpoint interfaces every path implements (imports no path)
  registry.py     every path name -> its factory, in run order (the one place a new path joins)
  veth.py         the `veth` path (host-stack ceiling)
  pvnet_netns.py  the `pvnet-netns` path in its five modes
  qemu.py         the QEMU guest paths (virtio-net, pvnet-qemu, and their guest->guest runs)
  workloads.py    tcp, tcp-nogso, udp64, rr, pps64, pps1496, and the multi-flow tcp-p4,
                  tcp-nogso-p4, pps64-f4 (the queues dimension): what runs between the ends
  rr.py           our stdlib-only 1-byte TCP ping-pong (runs in namespaces and guests by path)
  pps.py          the packet-rate workloads: trafgen frames of 64/1496 bytes (1 or 4 flows),
                  counted received
  placement.py    which core runs what (the ends, their queue workers, clients, servers,
                  the generator)
  observe.py      everything measured around one run, from outside the data path
  measure.py      /proc and counter samples -> CPU per GB and per frame, per-packet figures
  hostcpu.py      the whole machine: /proc/stat CPU per frame, load, the neighbours' share
  profiler.py     py-spy on the ends during a run
  stages.py       the stage table: a sampled stack -> ring / grant / device / notify / other
  checks.py       what a record must satisfy (no-GSO frames at most an MTU; pps sanity)
  interval.py     95 % intervals over the interleaved rounds
  record.py       the record, median of repetitions, intervals, ratios to veth and virtio-net
  report.py       markdown table, targets, JSON, plot
  perframe.py     the per-frame cost table and the per-frame goals' figures
  runner.py       the loop, progress lines, teardown on failure and Ctrl-C
  devices.py      `python -m shared.lab.bench.devices`: a frame's cost into a bridge through a
                  TAP, an AF_PACKET socket and a TPACKET_V2 TX ring (the device model)
"""
