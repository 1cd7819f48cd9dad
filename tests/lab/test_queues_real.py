"""Multi-queue in the namespace placement (full tier): a guest with 2 queues, real netback
and netfront processes with a worker process per queue, multi-queue TAPs on both sides.

The kernel's flow steering spreads flows over the TAP queues (the guest's TAP for TX, the
vif for RX), so eight TCP streams each way must cross both queues; ``pvnet stats --json``
shows each queue's rings and the vif's sum. A SIGKILLed queue worker takes the vif down,
the connection comes back with two fresh workers, and nothing is left over.

Private topology (pvmq-*, 10.89.0.0/24) so it runs beside a real lab and the other modules.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.lab.labs import chaos_lab
from tests.lab.test_restarts import received_bps, wait_listening

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]

GUESTS = [{"domid": 241, "tx_mode": "lazy", "queues": 2}]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with chaos_lab(tmp_path_factory, "pvmq", "10.89.0", GUESTS) as got:
        yield got


PORT = [5600]


def flows(ns: str, reverse: bool, seconds: int = 2, streams: int = 4) -> dict:
    """TCP streams (``iperf3 -P``) against a one-off server on a fresh port in the
    wire namespace; iperf3's JSON (it must have worked)."""
    PORT[0] += 1
    server = subprocess.Popen(["ip", "netns", "exec", "pvmq-wire", "iperf3", "-s", "-1", "-p",
                               str(PORT[0])], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_listening("pvmq-wire", PORT[0])
        out = subprocess.run(["ip", "netns", "exec", ns, "iperf3", "-c", "10.89.0.1", "-p",
                              str(PORT[0]), "-t", str(seconds), "-P", str(streams), "-J",
                              "--connect-timeout", "3000", *(["-R"] if reverse else [])],
                             capture_output=True, text=True, timeout=seconds + 30)
    finally:
        server.kill()
        server.wait()
    raw = json.loads(out.stdout or "{}")
    assert raw and not raw.get("error"), (raw.get("error"), out.stderr)
    return raw


def pvnet_stats(topo) -> list[dict]:
    """What the user reads: ``pvnet stats --json`` over the lab's state dir."""
    out = subprocess.run([sys.executable, "-m", "shared.cli", "stats", "--json", "--dir",
                          str(topo.state_dir)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def queue_packets(end: dict, ring: str, counter: str) -> list[int]:
    return [int(q["rings"][ring][counter]) for q in sorted(end["queues"],
                                                           key=lambda q: q["queue"])]


@pytest.mark.parametrize("reverse", [False, True], ids=["guest->wire", "wire->guest"])
def test_four_flows_cross_both_queues_and_stats_show_each_and_the_sum(lab, reverse):
    topo, insp, _chaos = lab
    g = topo.guest("pvmq-g1")
    ring, counter = ("rx", "rx_packets") if reverse else ("tx", "tx_packets")
    tries = []
    for _attempt in range(3):  # 8 flows hashed onto 2 queues all land on one 1 in 128 times
        before = queue_packets(insp.stats(g, "back"), ring, counter)
        raw = flows(g.netns, reverse, streams=8)
        assert received_bps(raw) > 20e6
        after = insp.stats(g, "back")
        tries.append([a - b for a, b in zip(queue_packets(after, ring, counter), before,
                                            strict=True)])
        if min(tries[-1]) > 100:
            break
    assert len(tries[-1]) == 2 and min(tries[-1]) > 100, tries  # the kernel used both
    ends = {e.get("socket"): e for e in pvnet_stats(topo)}
    back, front = ends[str(topo.backend_ctl(g))], ends[str(topo.frontend_ctl(g))]
    for end in (back, front):
        assert len(end["queues"]) == 2 and len(end["pids"]) == 3  # the end and 2 workers
        for r, c in (("tx", "tx_packets"), ("rx", "rx_packets")):
            assert int(end["rings"][r][c]) == sum(queue_packets(end, r, c)), (r, end["rings"])
    text = subprocess.run([sys.executable, "-m", "shared.cli", "stats", "--dir",
                           str(topo.state_dir)], capture_output=True, text=True,
                          timeout=30).stdout
    for title in ("ring tx (all queues)", "queue 0 ring rx", "queue 1 ring tx"):
        assert title in text, text


@pytest.mark.parametrize("role", ["back", "front"])
def test_a_killed_queue_worker_takes_the_vif_down_and_it_reconnects(lab, role):
    topo, insp, chaos = lab
    g = topo.guest("pvmq-g1")
    s0 = insp.stats(g, role)
    pid, old = s0["pid"], s0["pids"][1:]
    assert len(old) == 2
    os.kill(old[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the same end, connected again, with two workers that are new
        s = insp.stats(g, role)
        if (s["state"] == "Connected" and len(s.get("pids", [])) == 3
                and not set(s["pids"][1:]) & set(old)):
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    chaos.wait_connected(g)
    assert s["pid"] == pid  # the end survived its worker
    c0, c = s0["counters"], s["counters"]
    assert c["faults_os"] == c0["faults_os"] + 1 and c["disconnects"] == c0["disconnects"] + 1
    assert c["internal_errors"] == 0
    b = insp.stats(g, "back")["counters"]
    assert b["malformed"] == 0  # nobody blames the frontend for a worker of ours
    assert received_bps(flows(g.netns, reverse=False)) > 20e6
    assert insp.connected(g).total == 0, insp.connected(g).details
    for p in old:  # reaped by their end (a zombie would still have its /proc entry)
        assert not os.path.exists(f"/proc/{p}"), f"worker {p} left behind"
