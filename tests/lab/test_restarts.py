"""Crashes and restarts in the namespace placement (full tier): real netback and netfront
processes, SIGKILLed mid-traffic and respawned with the command line their pidfile recorded.

Private topology (pvr-*, 10.83.0.0/24) so it runs beside a real lab and the other modules:
pvr-g1 lazy, pvr-g2 map mode with persistent grants (so a dying frontend leaves grants in
use that the backend must release), pvr-g3 lazy with the smallest region that works, for the
long transfer that makes the frontend stop on a full ring thousands of times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pyroute2 import netns as pnetns

from shared.lab import procs
from shared.lab.leaks import Leaks, memfd_maps
from shared.lab.transfers import Agents
from tests.lab.labs import chaos_lab

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]

GUESTS = [{"domid": 211, "tx_mode": "lazy"},
          {"domid": 212, "tx_mode": "map", "persistent": True},
          {"domid": 213, "tx_mode": "lazy", "region_size": "1280K"}]
WIRE = "10.83.0.1"
REPO = Path(__file__).resolve().parents[2]
#: bytes per direction through pvr-g3's 1280K region (52 TX pages, three 64 KB frames: the
#: queue stops constantly)
LONG_BYTES = int(os.environ.get("PVNET_LONG_BYTES", str(3 << 30)))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with chaos_lab(tmp_path_factory, "pvr", "10.83.0", GUESTS) as got:
        yield got


def no_leaks(leaks: Leaks) -> None:
    assert leaks.total == 0, leaks.details


class Iperf:
    """An iperf3 run against a one-off server of its own (``-s -1`` on a fresh port in the
    wire namespace): a client that died mid-test leaves the lab's shared server busy for a
    while, which must not fail the next test."""

    _port = 5400

    def __init__(self, ns: str, reverse: bool = False, seconds: int = 5,
                 nbytes: int | None = None) -> None:
        Iperf._port += 1
        self.port = Iperf._port
        self.server = subprocess.Popen(["ip", "netns", "exec", "pvr-wire", "iperf3", "-s", "-1",
                                        "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        wait_listening("pvr-wire", self.port)
        what = ["-n", str(nbytes)] if nbytes else ["-t", str(seconds)]
        self.argv = ["ip", "netns", "exec", ns, "iperf3", "-c", WIRE, "-p", str(self.port),
                     *what, "-J", "-i", "1", "--connect-timeout", "3000"]
        self.argv += ["-R"] if reverse else []
        self.limit = 600 if nbytes else seconds + 30
        self.raw: dict = {}
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            p = subprocess.run(self.argv, capture_output=True, text=True, timeout=self.limit)
            self.raw = json.loads(p.stdout or "{}")
        except (subprocess.TimeoutExpired, ValueError) as e:
            self.raw = {"error": f"{type(e).__name__}: {e}"}

    def result(self) -> dict:
        """Wait for the client (bounded), stop the server; iperf3's JSON."""
        self.thread.join(self.limit + 5)
        self.server.kill()
        self.server.wait()
        return self.raw


def wait_listening(ns: str, port: int, timeout: float = 10.0) -> None:
    """Until a TCP socket listens on `port` in namespace `ns` (the iperf3 server is up)."""
    end = time.monotonic() + timeout
    while True:
        out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{port}"],
                             capture_output=True, text=True).stdout
        if out.strip():
            return
        assert time.monotonic() < end, f"nothing listens on {ns}:{port} after {timeout:g} s"
        time.sleep(0.05)


def wait_flowing(insp, g, end: str, frames: int = 2000, timeout: float = 20.0) -> None:
    """Until `frames` more packets crossed `end`'s TX and RX rings: traffic is in full flow
    (what a fixed sleep after starting iperf3 only hoped for)."""
    def moved() -> int:
        rings = insp.stats(g, end)["rings"]
        return int(rings["tx"]["tx_packets"]) + int(rings["rx"]["rx_packets"])

    start, deadline = moved(), time.monotonic() + timeout
    while moved() - start < frames:
        assert time.monotonic() < deadline, f"no traffic through {g.name} ({end})"
        time.sleep(0.05)


def intervals(raw: dict) -> list[int]:
    """Bytes per one-second interval of an iperf3 run."""
    return [int(i["sum"]["bytes"]) for i in raw["intervals"]]


def received_bps(raw: dict) -> float:
    return float(raw["end"]["sum_received"]["bits_per_second"])


@pytest.mark.parametrize("guest", ["pvr-g1", "pvr-g2"])
def test_frontend_sigkill_mid_traffic_backend_releases_all_and_takes_the_next(lab, guest):
    topo, insp, chaos = lab
    g = topo.guest(guest)
    back = insp.stats(g, "back")
    traffic = Iperf(g.netns, seconds=8)
    wait_flowing(insp, g, "back")
    mid = insp.stats(g, "back")
    assert mid["state"] == "Connected"
    if g.persistent:  # the frontend dies holding grants: there is something to release
        assert mid["rings"]["rx"]["grants_in_use"] + mid["rings"]["tx"]["grants_in_use"] > 0
    vif_index = _ifindex(topo.host_netns, g.vif)
    chaos.kill(g, "front")
    no_leaks(insp.released(g))
    after = insp.stats(g, "back")
    assert after["pid"] == back["pid"] and after["carrier"] is False
    assert after["counters"]["malformed"] == back["counters"]["malformed"]
    assert after["counters"]["internal_errors"] == 0
    assert _ifindex(topo.host_netns, g.vif) == vif_index  # the vif survived its frontend
    chaos.respawn(g, "front")
    chaos.wait_connected(g)
    no_leaks(insp.connected(g))
    traffic.result()  # the stream that spanned the kill: bounded, whatever it says
    assert received_bps(Iperf(g.netns, seconds=3).result()) > 50e6
    s = insp.stats(g, "back")
    assert s["counters"]["connects"] == back["counters"]["connects"] + 1
    assert s["carrier"] is True
    no_leaks(insp.idle(g))


@pytest.mark.parametrize("reverse", [False, True], ids=["guest->wire", "wire->guest"])
def test_backend_sigkill_mid_stream_tcp_stream_completes(lab, reverse):
    """The frontend goes back to the handshake, reconnects to the respawned backend, and one
    iperf3 TCP connection spanning the restart finishes with no long stall."""
    topo, insp, chaos = lab
    g = topo.guest("pvr-g1")
    front = insp.stats(g, "front")
    traffic = Iperf(g.netns, reverse, seconds=10)
    wait_flowing(insp, g, "back")
    chaos.kill(g, "back")
    no_leaks(insp.devices(g, expect=0))  # the vif went with its process; eth0 stayed
    chaos.respawn(g, "back")
    took = chaos.wait_connected(g)
    raw = traffic.result()
    assert not raw.get("error"), raw.get("error")
    iv = intervals(raw)
    assert len(iv) >= 9 and all(b > 0 for b in iv[-3:]), iv  # it recovered, and kept going
    assert sum(1 for b in iv if b == 0) <= 4, iv  # at most a few seconds of stall
    assert took < 10
    f = insp.stats(g, "front")
    assert f["pid"] == front["pid"]  # the same frontend, reconnected
    assert f["counters"]["connects"] == front["counters"]["connects"] + 1
    assert f["counters"]["internal_errors"] == 0
    no_leaks(insp.connected(g))
    pid = insp.pid(g, "front")
    assert memfd_maps(pid) == 1  # the old region is unmapped, the new one mapped


def test_long_transfer_small_region_never_loses_a_wakeup(lab):
    """Several GB each way through a 1280K region: the TX queue stops on a full ring over and
    over. A lost notification would stall the flow until the 1 s safety timer: each
    sha256-verified transfer must deliver every byte in bounded time, and both ends count 0
    lost wake-ups (a timer wake-up that found work no notification announced)."""
    topo, insp, _chaos = lab
    g = topo.guest("pvr-g3")
    before = {r: insp.stats(g, r) for r in ("back", "front")}
    agents = Agents(topo)
    try:
        agents.start()
        for src, dst in ((g.netns, WIRE), (topo.wire.netns, str(g.ip.ip))):
            t0 = time.monotonic()
            res = agents.transfer(src, dst, LONG_BYTES, seed=len(src))
            assert res["ok"] and res["bytes"] == LONG_BYTES, res
            # "never a hang": a lost wake-up would cost >= 1 s per stop, thousands of stops
            assert time.monotonic() - t0 < LONG_BYTES / 20e6, res
    finally:
        agents.stop()
    after = {r: insp.stats(g, r) for r in ("back", "front")}
    assert after["front"]["rings"]["tx"]["queue_stops"] - \
        before["front"]["rings"]["tx"]["queue_stops"] > 1000
    for role in ("back", "front"):
        assert after[role]["counters"]["lost_wakeups"] == 0, role
    no_leaks(insp.idle(g))


def test_invoke_down_leaves_nothing(lab):
    """Runs last: the user's `invoke down` on this module's lab, then nothing of it exists:
    no process (not even a zombie), namespace, device, socket or pidfile."""
    topo, insp, _chaos = lab
    pids = [insp.pid(g, r) for g in topo.guests for r in ("back", "front")]
    r = subprocess.run([sys.executable, "-m", "invoke", "down", "--topology", topo.source],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    no_leaks(insp.down())
    assert None not in pids
    # they were our children (the lab was brought up in this process): reap, then none is left
    assert procs.wait_gone(pids, 5.0) == []
    assert [p for p in pids if procs.proc_stat(p) is not None] == []
    assert not set(topo.namespaces) & set(pnetns.listnetns())


def _ifindex(ns: str, name: str) -> int:
    from shared.lab.plumbing import rtnl

    with rtnl(ns) as h:
        (idx,) = h.link_lookup(ifname=name)
    return idx
