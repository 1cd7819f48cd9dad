"""The device model, measured: what a frame costs the sender on each way into a bridge.

``python -m shared.lab.bench.devices`` answers the per-frame issue's device question ("batch
the device I/O: AF_PACKET with mmap'ed rings, or io_uring, moves many frames per system call")
for this kernel, before any data path is rewritten around it. It builds what the vif sees in
the namespace placement - a bridge, a veth "test NIC" whose peer is an address in a namespace
of its own, nothing listening - and sends the same 64-byte UDP frame into it, one sender at a
time, pinned to one core:

  tap        ``writev`` of virtio-net header + frame on a TAP on the bridge (the vif today)
  sendto     ``send`` on an AF_PACKET socket bound to a veth on the bridge, one frame per call
  tx-ring    a TPACKET_V2 TX ring on that veth: ``BATCH`` frames written into the mapped ring,
             then one ``send`` (the batched device I/O the issue names)

For each it reports the sender's user and system µs per frame, the whole machine's busy µs per
frame (softirqs included: the receiving stack runs inline, in the sender's system call), and
the frames the receiving namespace's UDP counters saw. Rounds are interleaved, as in the bench.
On this machine the receiving stack's work, not the system call, is most of a frame's cost,
and the TX ring's extra veth hop takes back what its batching saves (docs/performance.md).
Needs root; creates its namespace, bridge, TAP and veths under a prefix and removes them,
failure or not.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as pnetns

from shared.lab.bench.hostcpu import parse_stat
from shared.lab.bench.pps import udp_seen
from shared.lab.plumbing import netns_exec
from shared.plumbing.tap import open_tap

SOL_PACKET, PACKET_VERSION, PACKET_TX_RING = 263, 10, 13
TPACKET_V2 = 1
TP_STATUS_SEND_REQUEST = 1
TPACKET2_HDRLEN = 32  # sizeof(struct tpacket2_hdr), where a TPACKET_V2 frame's data starts
RING_FRAME, RING_FRAMES, RING_BLOCK = 2048, 512, 4096
BATCH = 64
SENDERS = ("tap", "sendto", "tx-ring")
SUBNET = "10.87.0"


@dataclass
class DeviceCost:
    """One sender's run: µs per frame (its user and system time, the machine's busy time)
    and the frames the receiving stack counted."""

    sender: str
    round: int
    frames: int
    delivered: int
    user_us: float
    sys_us: float
    machine_us: float
    wall_us: float


def udp_frame(dst_mac: bytes) -> bytes:
    """A 64-byte Ethernet/IPv4/UDP frame to SUBNET.2 port 9, checksummed."""
    src, dst = bytes(map(int, f"{SUBNET}.1".split("."))), bytes(map(int, f"{SUBNET}.2".split(".")))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 50, 0, 0x4000, 64, 17, 0, src, dst))
    s = sum(struct.unpack("!10H", ip))
    s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", ip, 10, ~s & 0xFFFF)
    frame = dst_mac + bytes.fromhex("020000000001") + b"\x08\x00" + bytes(ip) \
        + struct.pack("!HHHH", 9, 9, 30, 0) + bytes(22)
    assert len(frame) == 64
    return frame


class Bench:
    """Two namespaces under ``prefix``: the host (bridge, TAP, veths; bridge netfilter off, as
    the lab's host namespace) and the receiver; built by ``__enter__`` - the process then
    runs in the host namespace - and removed, with every device in them, by ``__exit__``."""

    def __init__(self, prefix: str = "pvd") -> None:
        self.host, self.ns, self.br = f"{prefix}-host", f"{prefix}-peer", f"{prefix}br"
        self.wire, self.wire_peer = f"{prefix}w0", f"{prefix}w1"
        self.tap, self.pk, self.pk_peer = f"{prefix}tap", f"{prefix}p0", f"{prefix}p1"
        self.tap_fd = -1
        self.sockets: list[socket.socket] = []
        self.pushed = False

    def __enter__(self) -> Bench:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        for name in (self.host, self.ns):
            pnetns.create(name)
        subprocess.run([*netns_exec(self.host), "sysctl", "-qw",
                        *(f"net.bridge.bridge-nf-call-{x}=0"
                          for x in ("iptables", "ip6tables", "arptables"))], check=False)
        pnetns.pushns(self.host)  # the TAP and the packet sockets are the host namespace's
        self.pushed = True
        with IPRoute() as ip:
            ip.link("add", ifname=self.br, kind="bridge")
            br = ip.link_lookup(ifname=self.br)[0]
            ip.link("add", ifname=self.wire, kind="veth",
                    peer={"ifname": self.wire_peer, "net_ns_fd": self.ns})
            ip.link("add", ifname=self.pk, kind="veth", peer={"ifname": self.pk_peer})
            (self.tap_fd,) = open_tap(self.tap)
            for name in (self.wire, self.tap, self.pk_peer):
                ip.link("set", index=ip.link_lookup(ifname=name)[0], master=br, state="up")
            for name in (self.br, self.pk):
                ip.link("set", index=ip.link_lookup(ifname=name)[0], state="up")
        with NetNS(self.ns, flags=0) as ns:
            idx = ns.link_lookup(ifname=self.wire_peer)[0]
            ns.addr("add", index=idx, address=f"{SUBNET}.2", prefixlen=24)
            ns.link("set", index=idx, state="up")
            self.dst_mac = bytes.fromhex(
                ns.get_links(idx)[0].get_attr("IFLA_ADDRESS").replace(":", ""))

    def __exit__(self, *exc: object) -> None:
        for s in self.sockets:
            s.close()
        if self.tap_fd >= 0:
            os.close(self.tap_fd)
            self.tap_fd = -1
        if self.pushed:
            pnetns.popns()
            self.pushed = False
        have = pnetns.listnetns()
        for name in (self.host, self.ns):  # their devices go with them
            if name in have:
                pnetns.remove(name)

    def delivered(self) -> int:
        """UDP datagrams the receiving namespace saw (InDatagrams + NoPorts + InErrors)."""
        return udp_seen(subprocess.run([*netns_exec(self.ns), "cat", "/proc/net/snmp"],
                                       check=True, capture_output=True, text=True).stdout)

    def senders(self, frame: bytes) -> dict[str, Callable[[int], None]]:
        """Each way in, as ``send(n)``: n frames."""
        vnet = bytes(12)
        tap_fd = self.tap_fd

        def tap(n: int) -> None:
            for _ in range(n):
                os.writev(tap_fd, [vnet, frame])

        plain = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        plain.bind((self.pk, 0))
        ring_sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        ring_sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        ring_sock.setsockopt(SOL_PACKET, PACKET_TX_RING,
                             struct.pack("IIII", RING_BLOCK, RING_FRAME * RING_FRAMES // RING_BLOCK,
                                         RING_FRAME, RING_FRAMES))
        ring_sock.bind((self.pk, 0))
        self.sockets += [plain, ring_sock]
        ring = mmap.mmap(ring_sock.fileno(), RING_FRAME * RING_FRAMES)
        view = memoryview(ring)
        at = [0]
        size = len(frame)

        def sendto(n: int) -> None:
            for _ in range(n):
                plain.send(frame)

        def tx_ring(n: int) -> None:
            i = at[0]
            while n > 0:
                for _ in range(min(BATCH, n)):
                    off = i * RING_FRAME
                    if struct.unpack_from("I", ring, off)[0]:  # still the kernel's
                        ring_sock.send(b"")
                    view[off + TPACKET2_HDRLEN:off + TPACKET2_HDRLEN + size] = frame
                    struct.pack_into("II", ring, off + 4, size, size)  # tp_len, tp_snaplen
                    struct.pack_into("I", ring, off, TP_STATUS_SEND_REQUEST)
                    i = (i + 1) % RING_FRAMES
                    n -= 1
                ring_sock.send(b"")  # one system call for the batch
            at[0] = i

        return {"tap": tap, "sendto": sendto, "tx-ring": tx_ring}


def measure(send: Callable[[int], None], bench: Bench, name: str, rnd: int,
            frames: int) -> DeviceCost:
    """One sender: ``frames`` frames, timed; the receiver's count once it stops growing."""
    # getrusage, not os.times: the latter counts in clock ticks (10 ms), and 3000 frames
    # through a TAP take about that long on a fast machine, so they read as no CPU at all
    d0, b0, w0 = bench.delivered(), _busy_s(), time.perf_counter()
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    send(frames)
    wall = time.perf_counter() - w0
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    deadline, last = time.monotonic() + 5, -1
    while time.monotonic() < deadline:  # frames still in queues count
        got = bench.delivered() - d0
        if got == last:
            break
        last = got
        time.sleep(0.1)
    b1 = _busy_s()
    per = 1e6 / frames
    return DeviceCost(name, rnd, frames, last, round((t1.ru_utime - t0.ru_utime) * per, 2),
                      round((t1.ru_stime - t0.ru_stime) * per, 2), round((b1 - b0) * per, 2),
                      round(wall * per, 2))


def _busy_s() -> float:
    """The whole machine's busy CPU seconds so far (``hostcpu.parse_stat``, as the bench)."""
    return parse_stat(Path("/proc/stat").read_text())[0]


def run(frames: int, rounds: int, prefix: str, cpu: int | None,
        say: Callable[[str], None]) -> list[DeviceCost]:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    out = []
    with Bench(prefix) as bench:
        send = bench.senders(udp_frame(bench.dst_mac))
        time.sleep(0.2)
        for rnd in range(1, rounds + 1):
            for name in SENDERS:
                cost = measure(send[name], bench, name, rnd, frames)
                say(f"round {rnd}/{rounds} {name:8s} delivered {cost.delivered}/{frames}: "
                    f"user {cost.user_us} sys {cost.sys_us} machine {cost.machine_us} "
                    "µs/frame")
                out.append(cost)
    return out


def summary(costs: list[DeviceCost]) -> dict[str, dict[str, float]]:
    """Per sender, the median over rounds of each figure."""
    out = {}
    for name in SENDERS:
        mine = [c for c in costs if c.sender == name]
        if mine:
            out[name] = {k: sorted(getattr(c, k) for c in mine)[len(mine) // 2]
                         for k in ("user_us", "sys_us", "machine_us", "wall_us")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m shared.lab.bench.devices",
        description="Per-frame cost of a 64-byte frame into a bridge through a TAP, an "
                    "AF_PACKET socket and a TPACKET_V2 TX ring (batched), rounds "
                    "interleaved; needs root.")
    ap.add_argument("--frames", type=int, default=100_000, help="frames per sender per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--cpu", type=int, default=1, help="core to pin the sender to (-1: none)")
    ap.add_argument("--prefix", default="pvd", help="name prefix of the devices (default pvd)")
    ap.add_argument("--json", action="store_true", help="print the records and medians as JSON")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("devices: needs root (namespaces, a bridge, a TAP)", file=sys.stderr)
        return 2
    costs = run(a.frames, a.rounds, a.prefix, None if a.cpu < 0 else a.cpu,
                (lambda s: print(s, file=sys.stderr)) if a.json else print)
    med = summary(costs)
    if a.json:
        print(json.dumps({"records": [asdict(c) for c in costs], "median": med}, indent=1))
    else:
        print("median µs/frame: " + "; ".join(
            f"{k} user {v['user_us']} sys {v['sys_us']} machine {v['machine_us']}"
            for k, v in med.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
