"""`invoke bench`: throughput, frames/s, latency and per-packet costs of every path, side by side.

Modules, each holding one thing:
  paths.py        the Path/Endpoint interfaces every path implements (imports no path)
  registry.py     every path name -> its factory, in run order (the one place a new path joins)
  veth.py         the `veth` path (host-stack ceiling)
  pvnet_netns.py  the `pvnet-netns` path in its five modes
  qemu.py         the QEMU guest paths (virtio-net, pvnet-qemu, and their guest->guest runs)
  workloads.py    tcp, tcp-nogso, udp64, rr: what runs between the ends
  rr.py           our stdlib-only 1-byte TCP ping-pong (runs in namespaces and guests by path)
  measure.py      /proc and counter samples -> CPU per GB, notifications/maps/copies per packet
  record.py       the record, median of repetitions, ratios to veth and virtio-net
  report.py       markdown table, targets, JSON, plot
  runner.py       the loop, progress lines, teardown on failure and Ctrl-C
"""
