"""The packet-rate workloads (pps64, pps1496): fixed-size UDP frames from Debian's trafgen.

Like pktgen in the papers the paper-table issue reproduces: frames of one size on the wire
(64 or 1496 bytes from the Ethernet header to the end of the payload; no FCS exists on these
software links), offered from one end and counted at the other.

- Generator: ``trafgen`` (netsniff-ng) at the sending end, in its namespace or in a QEMU
  guest (the host's userland over 9p), one worker (``--cpus 1``, which trafgen pins to CPU 0
  itself), one ``sendto`` per frame (``--gap 0ns`` selects that path), through the device's
  qdisc (``--qdisc-path``: a full TAP queue then drops the frame, as a NIC's queue would,
  instead of pushing back on the generator), without touching the system's socket memory or
  IRQ settings (``--no-sock-mem --notouch-irq``: this machine is shared).
- Unshaped: trafgen's pacing costs a timer per frame (``--gap``: nanosleep; a tbf qdisc: an
  hrtimer), measured at 20-35 µs per frame on this VM's paravirtualised timers, which is more
  than pvnet's own cost; its ``--rate`` shaper sends a second's frames in one burst. So the
  generator runs as fast as its one core lets it, and the bench gives it that core alone
  (``placement.PATH``): the path keeps the other.
- Offered: the frames trafgen handed to the device (its own count) over its send loop's time.
- Delivered: the UDP datagrams the receiving stack saw (``/proc/net/snmp`` Udp InDatagrams +
  NoPorts + InErrors in the receiving namespace or guest; nothing listens on the port, so
  each one costs the receiver its stack and an occasional rate-limited ICMP), read again
  until it stops growing once the generator has stopped (frames still in queues count).
- Frame size on the wire: the receiving device's rx_bytes / rx_packets over the run.
- The generator's CPU: the shell around it reports its reaped children's time (cutime +
  cstime of trafgen and its worker), so it is known in a guest too.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass

from shared.lab.bench.paths import Endpoint, Endpoints

ETH_IP_UDP = 14 + 20 + 8
UDP_PORT = 9  # discard: nothing listens
SIZES = {"pps64": 64, "pps1496": 1496, "pps64-f4": 64}
#: the multi-flow packet-rate workloads: flows, by source port (9, 10, ...: trafgen's dinc)
FLOWS = {"pps64-f4": 4}
SLACK_S = 20.0
SETTLE_S = 0.3  # the receiver's count is final once it has not moved for this long
SETTLE_MAX_S = 5.0
CLK_TCK = 100  # USER_HZ: what /proc/<pid>/stat's times count in, in every Linux userland


@dataclass
class PpsResult:
    seconds: float
    sent: int
    delivered: int
    frame_bytes: float | None
    gen_cpu_s: float | None

    @property
    def offered_fps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    @property
    def fps(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def loss_pct(self) -> float | None:
        return round(100 * max(0, self.sent - self.delivered) / self.sent, 2) if self.sent else None


def packet(dst_mac: str, dst_ip: str, frame_len: int, flows: int = 1) -> str:
    """trafgen's packet for one frame of `frame_len` bytes to `dst_ip` at `dst_mac`; the
    source MAC and IP are the sending device's, checksums are trafgen's; with several
    `flows` the source port steps through that many ports, frame by frame."""
    fill = frame_len - ETH_IP_UDP
    if fill < 0 or not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", dst_mac):
        raise ValueError(f"bad frame: {frame_len} bytes to {dst_mac!r}")
    sport = UDP_PORT if flows == 1 else f"dinc({UDP_PORT}, {UDP_PORT + flows - 1})"
    return (f"{{ eth(da={dst_mac}, type=0x0800), ipv4(da={dst_ip}, ttl=64, df), "
            f"udp(sp={sport}, dp={UDP_PORT}), fill(0x00, {fill}) }}")


def generator_argv(dev: str, pkt: str, seconds: float) -> list[str]:
    """trafgen for `seconds` (SIGINT: it prints its counts), then the shell's own stat line,
    whose cutime/cstime are trafgen's CPU once it is reaped. From /tmp: trafgen writes the
    packet description to a temporary file in its working directory, and a QEMU guest sees
    a checkout under /tmp (bind-mounted from the host) read-only."""
    trafgen = ["trafgen", "--dev", dev, "--cpus", "1", "--gap", "0ns", "--qdisc-path",
               "--no-sock-mem", "--notouch-irq", pkt]
    secs = f"{max(1.0, seconds):g}"
    return ["sh", "-c",
            f"cd /tmp && timeout -s INT {secs} {shlex.join(trafgen)}; cat /proc/$$/stat"]


def parse_generator(out: str) -> tuple[int, float, float | None]:
    """trafgen's summary and the shell's stat line -> (frames sent, loop seconds, CPU s)."""
    sent = re.search(r"(\d+) packets outgoing", out)
    loop = re.search(r"(\d+) sec, (\d+) usec on CPU", out)
    if sent is None or loop is None:
        raise RuntimeError("trafgen printed no summary")
    cpu = None
    for line in out.splitlines():
        if _STAT_LINE.match(line):
            fields = line[line.rindex(")") + 2:].split()
            if len(fields) > 14:
                cpu = (int(fields[13]) + int(fields[14])) / CLK_TCK
    return int(sent[1]), int(loop[1]) + int(loop[2]) / 1e6, cpu


_STAT_LINE = re.compile(r"^\d+ \(.*\) [A-Za-z] ")


def udp_seen(snmp: str) -> int:
    """/proc/net/snmp -> the UDP datagrams the stack saw (InDatagrams + NoPorts + InErrors:
    nothing listens, so most are NoPorts)."""
    udp = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Udp:")]
    if len(udp) < 2:
        raise RuntimeError("no Udp lines in /proc/net/snmp")
    row = dict(zip(udp[0], (int(v) for v in udp[1]), strict=False))
    return row.get("InDatagrams", 0) + row.get("NoPorts", 0) + row.get("InErrors", 0)


def parse_counters(out: str) -> tuple[int, int, int]:
    """``cat /proc/net/snmp rx_packets rx_bytes`` -> (UDP datagrams seen, rx packets, bytes)."""
    seen = udp_seen(out)
    tail = [line for line in out.splitlines() if line.strip().isdigit()]
    if len(tail) < 2:
        raise RuntimeError("no rx counters of the receiving device")
    return seen, int(tail[-2]), int(tail[-1])


def _run(end: Endpoint, argv: list[str], timeout: float = 30.0) -> str:
    res = end.run(argv, timeout=timeout)
    if res.rc != 0:
        raise RuntimeError(f"{argv[0]}: {(res.err.strip().splitlines() or [res.rc])[-1]}")
    return res.out


def device_of(end: Endpoint) -> tuple[str, str]:
    """(device, MAC) that carries the end's address."""
    line = _run(end, ["ip", "-o", "-4", "addr", "show", "to", end.ip]).split()
    if len(line) < 2:
        raise RuntimeError(f"no device has {end.ip}")
    dev = line[1].split("@")[0]
    return dev, _run(end, ["cat", f"/sys/class/net/{dev}/address"]).strip()


def counters(end: Endpoint, dev: str) -> tuple[int, int, int]:
    stats = f"/sys/class/net/{dev}/statistics"
    return parse_counters(_run(end, ["cat", "/proc/net/snmp", f"{stats}/rx_packets",
                                     f"{stats}/rx_bytes"]))


def settled(end: Endpoint, dev: str) -> tuple[int, int, int]:
    """The receiver's counters once frames still queued on the path have arrived."""
    deadline = time.monotonic() + SETTLE_MAX_S
    last = counters(end, dev)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        now = counters(end, dev)
        if now[0] == last[0]:
            return now
        last = now
    return last


def run_pps(ends: Endpoints, direction: str, seconds: float, frame_len: int,
            flows: int = 1) -> PpsResult:
    """Offer `frame_len`-byte frames guest->peer ("tx") or peer->guest ("rx") for `seconds`."""
    snd, rcv = (ends.guest, ends.peer) if direction == "tx" else (ends.peer, ends.guest)
    sdev, _ = device_of(snd)
    rdev, mac = device_of(rcv)
    before = counters(rcv, rdev)
    res = snd.run(generator_argv(sdev, packet(mac, rcv.ip, frame_len, flows), seconds),
                  timeout=seconds + SLACK_S)
    try:
        sent, loop_s, cpu = parse_generator(res.out)
    except RuntimeError as exc:
        tail = res.err.strip().splitlines()
        raise RuntimeError(f"{exc}{': ' + tail[-1] if tail else ''} (exit {res.rc})") from None
    after = settled(rcv, rdev)
    packets, nbytes = after[1] - before[1], after[2] - before[2]
    return PpsResult(loop_s, sent, after[0] - before[0],
                     round(nbytes / packets, 1) if packets > 0 else None, cpu)
