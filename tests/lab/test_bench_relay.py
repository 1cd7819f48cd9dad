"""The bench's `tap-relay` path (shared/lab/bench/tap_relay.py): the floor under pvnet's
per-frame cost.

Fast tier: the relay loop between two pairs of message sockets (frames whole, bit for bit,
both ways, each way counted; a stop is seen within its poll). Full tier: a real bench over
veth, tap-relay and pvnet-netns with MTU and 64-byte frames: the relay's records are complete,
its process is pinned and measured, its MTU frames are MTU frames, nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shared.lab.bench import placement, tap_relay
from shared.lab.bench.paths import PathContext
from shared.lab.bench.registry import build_paths
from tests.lab.labs import tiny_bench

REPO = Path(__file__).resolve().parents[2]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setblocking(False)
    return a, b


def test_relay_moves_every_frame_whole_both_ways_and_counts_them():
    guest, guest_tap = _pair()  # the guest's stack <-> the guest TAP the relay reads
    vif, bridge = _pair()  # the vif the relay writes <-> the bridge's side
    relay = tap_relay.Relay(guest_tap.fileno(), vif.fileno(), budget=8, poll_s=0.02)
    t = threading.Thread(target=relay.run)
    t.start()
    try:
        big = [bytes([i % 251]) * n for i, n in enumerate((12, 60, 1514, 9000, 65000, 13) * 5)]
        got_big = []
        for f in big:  # one at a time: a socket buffer holds only a few 64 KB frames
            guest.send(f)
            got_big.append(_recv(bridge))
        small = [bytes([i]) * 60 for i in range(100)]  # a burst: more than one turn's budget
        back = [bytes([i]) * (14 + i) for i in range(30)]
        for f in small:
            guest.send(f)
        for f in back:
            bridge.send(f)
        got_out = got_big + [_recv(bridge) for _ in small]
        got_back = [_recv(guest) for _ in back]
        out = big + small
    finally:
        relay.stop = True
        t.join(5)
    assert not t.is_alive()  # the stop was seen within a poll
    assert got_out == out and got_back == back  # whole, in order, bit for bit
    assert relay.counts == {"to_vif": len(out), "to_guest": len(back), "dropped": 0}


def _recv(s: socket.socket) -> bytes:
    s.settimeout(5)
    return s.recv(0x20000)


def test_relay_counts_a_frame_the_other_device_refuses_as_dropped():
    guest, guest_tap = _pair()
    vif, bridge = _pair()
    vif.shutdown(socket.SHUT_WR)  # the device refuses every write (EPIPE)
    relay = tap_relay.Relay(guest_tap.fileno(), vif.fileno(), poll_s=0.02)
    t = threading.Thread(target=relay.run)
    t.start()
    for _ in range(3):
        guest.send(b"x" * 60)
    try:
        end = time.monotonic() + 5
        while relay.counts["to_vif"] < 3 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        relay.stop = True
        t.join(5)
    assert relay.counts == {"to_vif": 3, "to_guest": 0, "dropped": 3}


def test_the_relay_path_is_registered_after_veth_and_has_help():
    paths = build_paths(["pvnet-netns", "tap-relay", "veth"], PathContext(modes=("lazy",)))
    assert [(p.path, p.mode) for p in paths] == [
        ("veth", "-"), ("tap-relay", "-"), ("pvnet-netns", "lazy")]
    out = subprocess.run([sys.executable, "-m", "shared.lab.bench.tap_relay", "--help"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--no-gso" in out and "floor" in out


@pytest.mark.full
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("trafgen") is None
                    or shutil.which("iperf3") is None,
                    reason="the bench needs root, iperf3 and trafgen")
def test_real_bench_measures_the_relay_beside_veth_and_pvnet(tmp_path: Path):
    data = tiny_bench(tmp_path, ["pps64", "tcp-nogso"], "pvbr",
                      paths=("veth", "tap-relay", "pvnet-netns"))
    relay = {(d["workload"], d["direction"]): d for d in data if d["path"] == "tap-relay"}
    assert set(relay) == {(w, d) for w in ("pps64", "tcp-nogso") for d in ("tx", "rx")}
    guest, host = placement.cpus()
    for (workload, _), d in relay.items():
        assert d["error"] is None and d["fps"] > 0 and d["vs_veth"] > 0
        assert d["cpu_back_us_per_frame"] > 0 and d["cpu_machine_us_per_frame"] > 0
        assert d["cpu_front_us_per_frame"] is None  # one process: no second end
        if workload == "tcp-nogso":
            # MTU frames really went through it (payload per frame; the bench refuses above)
            assert d["gbps"] * 1e9 / 8 / d["fps"] <= 1500
            assert d["cpus"].startswith(f"back {host}")
        else:
            assert d["cpus"].startswith(f"back {host}") and f"generator {guest}" in d["cpus"]
    assert any(d["path"] == "pvnet-netns" and d["error"] is None for d in data)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pvbr-" not in left
    ps = subprocess.run(["pgrep", "-f", "shared.lab.bench.tap_relay"], capture_output=True,
                        text=True).stdout
    assert not ps.strip()  # the relay process is gone with its path


def test_the_report_sets_pvnet_against_the_floor_in_the_same_run():
    from shared.lab.bench import report
    from shared.lab.bench.record import Record

    recs = [Record("tap-relay", "-", "pps64", "tx", fps=250e3, cpu_machine_us_per_frame=6.0),
            Record("pvnet-netns", "lazy", "pps64", "tx", fps=100e3,
                   cpu_machine_us_per_frame=16.0),
            Record("pvnet-netns", "lazy", "pps64", "rx", fps=90e3),  # no relay record: no line
            Record("pvnet-netns", "copy", "pps64", "tx", fps=80e3)]  # only the reference mode
    lines = report.floor_lines(recs)
    assert lines == ["pvnet-netns lazy against the tap-relay floor (same run):",
                     "- pps64 tx: 0.40x the relay; CPU per frame, whole machine, 16.0 vs 6.0 µs "
                     "(the split driver: +10.0 µs)"]
    assert lines[1] in report.targets_text(recs)
