"""`pvnet capture` on real vifs (full tier, root): both placements, two readers at once.

Per guest, our capture and a reference tcpdump on the same vif (in the backend's namespace)
run side by side while the guest sends and receives frames of many sizes and kinds (UDP from
1 byte to 65000 bytes -- IP fragments --, ICMP errors back, a TCP stream in 64 KB GSO frames).
Every IPv4 frame between the guest and the wire must be in our pcap exactly once and
byte-identical to what tcpdump saw on the vif, with the right direction; `tcpdump -r` must read
our file. Frames of other hosts (a fresh interface's IGMP reports, multicast the bridge floods
to the vif) are left out of the comparison: they may come at any moment, also in the instant
between the two readers' stops, where one of them still records and the other no longer does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from shared.lab.guest_handles import SshRunner
from shared.lab.topology import Topology, loads
from shared.plumbing.control.client import query
from tests.lab.labs import invoked_lab, netns_lab, run_state_dir, topology_yaml, write_topology
from tests.lab.marks import REPO, needs_qemu
from tests.lab.test_pair import RECEIVER
from tests.pcapread import read_frames

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tcpdump") is None,
                       reason="capturing on real vifs needs root and tcpdump"),
]
TOPOLOGY = topology_yaml("pvc", "10.81.0", [
    {"domid": 41, "tx_mode": "lazy"}, {"domid": 42, "tx_mode": "copy", "header_slots": False}])
TRAFFIC = textwrap.dedent("""\
    import socket, sys
    dst = sys.argv[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in (1, 18, 100, 500, 1000, 1472, 1473, 3000, 8000, 20000, 65000):
        u.sendto(bytes([n % 251]) * n, (dst, 9))
    c = socket.create_connection((dst, 5999), timeout=30)
    c.sendall(bytes(range(256)) * 4096)
    c.close()
""")


class Pair:
    """Our capture and a reference tcpdump on one vif."""

    def __init__(self, topo: Topology, name: str, tmp: Path) -> None:
        self.g = topo.guest(name)
        self.hosts = {self.g.ip.ip.packed, topo.wire.ip.ip.packed}
        self.ctl = str(topo.backend_ctl(self.g))
        self.ours, self.ref = tmp / f"{name}.pcapng", tmp / f"{name}.ref.pcap"
        self.tcpdump = subprocess.Popen(
            ["ip", "netns", "exec", topo.host_netns, "tcpdump", "-i", self.g.vif, "-s", "0",
             "-B", "32768", "--immediate-mode", "-U", "-w", str(self.ref), "ip"],
            stderr=subprocess.PIPE, text=True)
        self.capture = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "capture", self.g.vif, "--dir",
             str(topo.state_dir), "--buffer-kb", "8192", "-w", str(self.ours)],
            cwd=REPO, stderr=subprocess.PIPE, text=True)
        assert "listening on" in self.tcpdump.stderr.readline()
        deadline = time.monotonic() + 10
        while query(self.ctl, {"cmd": "stats"})["counters"]["capture_readers"] != 1:
            assert time.monotonic() < deadline, "capture did not attach"
            time.sleep(0.05)

    def packets(self) -> int:
        r = query(self.ctl, {"cmd": "stats"})["rings"]
        return r["tx"]["tx_packets"] + r["rx"]["rx_packets"]

    def stop(self) -> str:
        for p in (self.capture, self.tcpdump):
            p.send_signal(signal.SIGINT)
        _, err = self.capture.communicate(timeout=15)
        self.tcpdump.communicate(timeout=15)
        assert self.capture.returncode == 0, err
        return err

    def between(self, frame: bytes) -> bool:
        """An IPv4 frame of the test's own traffic: guest <-> wire, either way."""
        return frame[12:14] == b"\x08\x00" and {frame[26:30], frame[30:34]} == self.hosts

    def check(self, gso_over: int = 20000) -> None:
        """``gso_over``: the largest frame must exceed it (a GSO frame, unsegmented; a TCG
        guest's TCP builds only small ones)."""
        ours = read_frames(self.ours)
        mac = bytes.fromhex(self.g.mac.replace(":", ""))
        for data, outbound in ours:
            assert outbound == (data[6:12] == mac), "direction"
        ip = Counter(d for d, _ in ours if self.between(d))
        ref = Counter(d for d, _ in read_frames(self.ref) if self.between(d))
        assert sum(ref.values()) > 20
        assert ip == ref  # exactly once each, bit for bit
        assert max(len(d) for d in ip if d[23] == 6) > gso_over  # TCP in GSO frames, whole
        text = subprocess.run(["tcpdump", "-nn", "-r", str(self.ours)], capture_output=True,
                              text=True, check=True).stdout
        assert len(text.splitlines()) == len(ours)


def wait_quiet(pairs: list[Pair], timeout: float = 10.0) -> None:
    """Until no vif has moved a frame for half a second (the trailing ACKs are in)."""
    deadline = time.monotonic() + timeout
    last = [p.packets() for p in pairs]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = [p.packets() for p in pairs]
        if now == last:
            return
        last = now


def receiver(ns: str) -> subprocess.Popen:
    rx = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", RECEIVER],
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    return rx


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    topo = loads(TOPOLOGY, state_dir=tmp_path_factory.mktemp("pvc-state"))
    with netns_lab(topo):
        yield topo


def test_netns_two_readers_at_once_every_frame_once_and_identical(lab, tmp_path) -> None:
    pairs = [Pair(lab, "pvc-g1", tmp_path), Pair(lab, "pvc-g2", tmp_path)]
    try:
        for p in pairs:
            rx = receiver("pvc-wire")
            subprocess.run(["ip", "netns", "exec", p.g.netns, "python3", "-c", TRAFFIC,
                            "10.81.0.1"], check=True, timeout=60)
            assert rx.stdout.readline().split()[0] == str(256 * 4096)
            rx.wait(10)
        wait_quiet(pairs)
    finally:
        errs = [p.stop() for p in pairs]
    for p, err in zip(pairs, errs, strict=True):
        assert err.strip().splitlines()[-1].endswith(" captured, 0 dropped by producer")
        p.check()
    for p in pairs:
        c = query(p.ctl, {"cmd": "stats"})["counters"]
        assert c["capture_readers"] == 0 and c["capture_drops"] == 0
    g1 = query(pairs[0].ctl, {"cmd": "stats"})["rings"]["tx"]
    assert g1["grant_maps_on_touch"] > 0 and g1["maps_outstanding"] == 0  # lazy: maps shown


def test_netns_count_and_pipe_to_tcpdump(lab) -> None:
    g = lab.guest("pvc-g1")
    p = subprocess.Popen(f"{sys.executable} -m shared.cli capture {g.vif} --dir "
                         f"{lab.state_dir} -c 4 -s 128 -w - | tcpdump -n -r - 2>/dev/null",
                         shell=True, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    ctl = str(lab.backend_ctl(g))
    deadline = time.monotonic() + 10
    while query(ctl, {"cmd": "stats"})["counters"]["capture_readers"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rx = receiver("pvc-wire")
    subprocess.run(["ip", "netns", "exec", g.netns, "python3", "-c", TRAFFIC, "10.81.0.1"],
                   check=True, timeout=60)
    rx.wait(10)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert len(out.splitlines()) == 4 and "4 captured, 0 dropped by producer" in err


@pytest.fixture(scope="module")
def vmlab(tmp_path_factory):
    state = run_state_dir("pvcq")
    f, topo = write_topology(tmp_path_factory.mktemp("pvcq"), topology_yaml(
        "pvcq", "10.82.0", [{"domid": 43, "memory": 384}], state_dir=state))
    with invoked_lab(f, state, ends=2):
        runner = SshRunner(topo)
        yield topo, runner
        runner.close()


@needs_qemu
def test_qemu_guest_every_frame_once_and_identical(vmlab, tmp_path) -> None:
    topo, runner = vmlab
    pair = Pair(topo, "pvcq-g1", tmp_path)
    try:
        rx = receiver("pvcq-wire")
        rc, _out, err = runner("pvcq-g1", ["python3", "-c", TRAFFIC, "10.82.0.1"], 120)
        assert rc == 0, err
        assert rx.stdout.readline().split()[0] == str(256 * 4096)
        rx.wait(10)
        wait_quiet([pair])
    finally:
        err = pair.stop()
    assert err.strip().splitlines()[-1].endswith(" captured, 0 dropped by producer")
    pair.check(gso_over=1514)  # 2962 B seen: a two-segment GSO frame
