"""Hostile peers against a real netback process (full tier: root, netns, TAP, iperf3).

Private topology (pvh-*, 10.84.0.0/24). pvh-g1's netfront is replaced by hostile ones for
the whole module (its backend runs with --rx-stall-timeout 2); pvh-g2 is the bystander, a
real pair carrying iperf3 while pvh-g1's backend is fuzzed, flooded and stalled, and whose
own backend's control socket is hammered. The backend process must survive all of it (same
pid at the end), disconnect each hostile frontend with a reason and a counter, hold nothing
of it afterwards (/proc fds and memfd maps, stats maps/grants), keep its memory bounded, and
serve a real frontend again at the end.

``PVNET_FUZZ_EXAMPLES=5000 pytest -m full tests/lab/test_hostile.py -k fuzz`` runs a long
campaign (add ``PVNET_FUZZ_RANDOM=1`` for new cases each run).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.lab.chaos import Chaos
from shared.lab.commands import default_commands
from shared.lab.leaks import Inspector, fd_count, memfd_maps, rss_kb
from shared.lab.plumbing import rtnl
from shared.lab.topology import loads
from shared.plumbing.control.client import query
from shared.protocol.netif import PAGE_SIZE
from shared.protocol.ring import RSP_PROD
from tests.hostile import BASIC, GrantEntry, HostileFrontend, ops
from tests.lab.labs import netns_lab, topology_yaml

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]

TOPOLOGY = topology_yaml("pvh", "10.84.0", [
    {"domid": 221, "tx_mode": "lazy"}, {"domid": 222, "tx_mode": "map", "persistent": True}],
    iperf_server=True)
WIRE = "10.84.0.1"
STALL = 2.0
EXAMPLES = int(os.environ.get("PVNET_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                derandomize="PVNET_FUZZ_RANDOM" not in os.environ,
                suppress_health_check=list(HealthCheck))


def commands(topo, g):
    back, front = default_commands(topo, g)
    if g.name == "pvh-g1":
        back += ["--rx-stall-timeout", str(STALL)]
    return back, front


class Ctx:
    """What the tests share: the topology, the victim and bystander, the backend's pid."""

    def __init__(self, topo) -> None:
        self.topo = topo
        self.insp = Inspector(topo)
        self.chaos = Chaos(topo)
        self.g1, self.g2 = topo.guest("pvh-g1"), topo.guest("pvh-g2")
        self.ev = str(topo.event_socket(self.g1))
        self.ctl = str(topo.backend_ctl(self.g1))
        self.pid = self.back()["pid"]
        self.idle_fds = 0

    def back(self) -> dict:
        return query(self.ctl, {"cmd": "stats"})

    def wait_idle_backend(self, timeout: float = 10.0) -> dict:
        """Until pvh-g1's backend has no frontend (and has released it)."""
        end = time.monotonic() + timeout
        while True:
            s = self.back()
            if s["state"] != "Connected" or time.monotonic() > end:
                return s
            time.sleep(0.02)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    topo = loads(TOPOLOGY, state_dir=tmp_path_factory.mktemp("pvh-state"))
    with netns_lab(topo, commands=commands):
        c = Ctx(topo)
        c.insp.learn()
        c.chaos.kill(c.g1, "front")  # the slot is the hostile frontends' from now on
        c.wait_idle_backend()
        # the baseline is the backend at rest: region unmapped and its fd count unchanged
        # for 0.5 s (the killed frontend's sockets close a little after the region goes)
        end, last, since = time.monotonic() + 15, None, time.monotonic()
        while True:
            now, seen = time.monotonic(), (fd_count(c.pid), memfd_maps(c.pid))
            if seen != last:
                last, since = seen, now
            elif seen[1] == 0 and now - since >= 0.5:
                break
            assert now < end, f"backend never settled: fds, memfd maps = {seen}"
            time.sleep(0.02)
        c.idle_fds = last[0]
        yield c


class Bystander:
    """pvh-g2 -> wire iperf3, 4 s runs back to back until stopped: the other guest's
    traffic that must go on while pvh-g1's backend is abused."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.results: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            p = subprocess.run(["ip", "netns", "exec", self.ns, "iperf3", "-c", WIRE, "-t", "4",
                                "-J", "--connect-timeout", "3000"], capture_output=True,
                               text=True, timeout=40)
            try:
                self.results.append(json.loads(p.stdout))
            except ValueError:
                self.results.append({"error": p.stderr.strip() or "no output"})

    def finish(self) -> list[float]:
        """Stop after the current run; every run's receiver Gbit/s (asserting none failed)."""
        self.stop.set()
        self.thread.join(60)
        assert self.results, "the bystander never finished a run"
        errors = [r["error"] for r in self.results if r.get("error")]
        assert not errors, errors
        return [r["end"]["sum_received"]["bits_per_second"] / 1e9 for r in self.results]


def settle(c: Ctx, h: HostileFrontend) -> str | None:
    """Until the backend disconnects us (its reason) or its rings and counters stop moving."""
    same, last = 0, None
    end = time.monotonic() + 5.0
    while same < 3 and time.monotonic() < end:
        why = h.closed_within(0.02)
        if why is not None:
            return why
        s = c.back()
        now = (s["state"], json.dumps(s["counters"]),
               [s["rings"][r].get(k) for r in ("tx", "rx") for k in ("req_cons", "rsp_prod_pvt")])
        same = same + 1 if now == last else 0
        last = now
    return None


def released(c: Ctx) -> None:
    s = c.wait_idle_backend()
    assert s["state"] != "Connected"
    for ring in ("tx", "rx"):
        r = s["rings"][ring]
        assert r["maps_outstanding"] == 0 and r["grants_in_use"] == 0, (ring, r)
        assert r["grants_active"] == 0 and r["slots_in_flight"] == 0
    assert s["rings"]["tx"]["slots_consumed"] == s["rings"]["tx"]["slots_released"]
    assert s["regions_mapped"] == 0
    end = time.monotonic() + 3
    while (fd_count(c.pid), memfd_maps(c.pid)) != (c.idle_fds, 0) and time.monotonic() < end:
        time.sleep(0.05)
    assert memfd_maps(c.pid) == 0
    assert fd_count(c.pid) == c.idle_fds


def test_fuzzed_frontends_are_disconnected_alone_and_leave_nothing(ctx):
    c = ctx
    start = c.back()
    rss0 = rss_kb(c.pid)
    log0 = c.topo.log_path(c.g1.vif).read_text().count("disconnecting frontend fuzz")
    seen: dict[str, int] = {"closed": 0, "kept": 0}
    bystander = Bystander(c.g2.netns)
    try:
        _fuzz(c, seen)
    finally:
        rates = bystander.finish()
    end = c.back()
    assert end["pid"] == c.pid
    assert end["counters"]["internal_errors"] == 0, end["counters"]["last_error"]
    malformed = end["counters"]["malformed"] - start["counters"]["malformed"]
    assert malformed >= seen["closed"] > 0
    log = c.topo.log_path(c.g1.vif).read_text().count("disconnecting frontend fuzz") - log0
    assert log == malformed  # one clear line per disconnected frontend
    growth = rss_kb(c.pid) - rss0
    assert growth < 8 * 1024 + EXAMPLES * 2, f"netback VmRSS grew {growth} KiB"
    assert min(rates) > 0.05, rates  # Gbit/s: the other guest was served throughout
    print(f"fuzz: {EXAMPLES} cases, {seen}, bystander Gbit/s {rates}, rss +{growth} KiB")


def _fuzz(c: Ctx, seen: dict[str, int]) -> None:
    @FUZZ
    @given(case=ops(), persistent=st.booleans(), header_slots=st.booleans())
    def one(case, persistent, header_slots):
        before = c.back()["counters"]
        h = HostileFrontend(c.ev, "fuzz", c.g1.domid)
        try:
            h.connect(dict(BASIC, **{"feature-persistent": persistent,
                                     "feature-header-slots": header_slots}))
            for op in case:
                op.apply(h)
            h.push()
            why = settle(c, h)
        finally:
            h.close()
        released(c)
        after = c.back()["counters"]
        assert after["internal_errors"] == before["internal_errors"], after["last_error"]
        if why is not None:
            assert after["malformed"] == before["malformed"] + 1, (why, after)
        seen["closed" if why else "kept"] += 1
        own = {op.ref for op in case if isinstance(op, GrantEntry) and op.flags & 0x18}
        flags = h.region.grants.flags
        assert [r for r in range(h.region.grants.count)
                if flags[r * 4] & 0x18 and r not in own] == []

    one()


def test_notification_storm_is_deferred_and_costs_the_backend_little(ctx):
    c = ctx
    h = HostileFrontend(c.ev, "storm", c.g1.domid)
    try:
        h.connect()
        cpu0, t0 = _cpu(c.pid), time.monotonic()
        sent = h.storm(3.0)
        cpu, wall = _cpu(c.pid) - cpu0, time.monotonic() - t0
        s = c.back()
        assert sent > 100_000
        assert s["counters"]["events_deferred"] > 0
        assert cpu < 0.4 * wall, f"netback used {cpu:.2f} s of CPU in a {wall:.2f} s storm"
        assert s["state"] == "Connected"  # rate-limited, not disconnected
    finally:
        h.close()
    released(c)


def test_rx_stall_turns_the_vif_carrier_off_and_buffers_turn_it_on(ctx):
    c = ctx
    h = HostileFrontend(c.ev, "stall", c.g1.domid)
    try:
        h.connect()
        stalls = c.back()["counters"]["rx_stalls"]
        assert _carrier(c) == 1
        _wait(lambda: _carrier(c) == 0, STALL + 3, "carrier off")
        s = c.back()
        assert s["carrier"] is False and s["counters"]["rx_stalls"] == stalls + 1
        assert "carrier off" in c.topo.log_path(c.g1.vif).read_text()
        h.post_rx(64)
        h.push()
        _wait(lambda: _carrier(c) == 1, 3, "carrier on")
        assert c.back()["carrier"] is True
    finally:
        h.close()
    released(c)
    assert _carrier(c) == 0  # and off again with no frontend at all


def test_revoking_a_grant_the_backend_holds_is_refused_until_it_lets_go(ctx):
    """Persistent grants stay in use (GTF_reading/GTF_writing) from first use to disconnect:
    the frontend's end_access is refused meanwhile; a frontend that then just exits leaves the
    backend to release all of them, and the in-use bits clear in the frontend's memory."""
    c = ctx
    h = HostileFrontend(c.ev, "revoker", c.g1.domid)
    try:
        h.connect(dict(BASIC, **{"feature-persistent": True}))
        h.packet(2 * PAGE_SIZE + 500, persistent=True)  # header slot + 3 persistent pages
        h.post_rx(20, persistent=True)
        h.push()
        _wait(lambda: h.tx.idx[RSP_PROD] >= 4, 5, "the packet's responses")
        s = c.back()
        assert s["rings"]["tx"]["grants_in_use"] == 3
        assert s["rings"]["rx"]["grants_in_use"] == 20
        from shared.protocol.grant import RESERVED_REFS

        tx_refs = [RESERVED_REFS + 300 + p for p in range(3)]
        for ref in tx_refs:
            assert h.region.grants.in_use(ref)
            assert h.region.grants.end_access(ref) is False  # refused: the backend holds it
        rx_in_use = [r for r in range(RESERVED_REFS, RESERVED_REFS + 256)
                     if h.region.grants.in_use(r)]
        assert len(rx_in_use) == 20
        assert not any(h.region.grants.end_access(r) for r in rx_in_use)
    finally:
        h.close()  # exits with every one of them still in use
    released(c)
    for ref in tx_refs + rx_in_use:
        assert not h.region.grants.in_use(ref)
        assert h.region.grants.end_access(ref) is True


def test_control_socket_under_fire_answers_right_and_the_data_path_holds(ctx):
    """0600; malformed, oversized and unknown requests get error replies; clients that never
    finish a line or never read do not block anyone; 32 concurrent readers are all served;
    iperf3 through the same backend does not collapse meanwhile."""
    c = ctx
    ctl = str(c.topo.backend_ctl(c.g2))
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    baseline = _iperf(c.g2.netns, 5)
    stop = threading.Event()
    tally = {"ok": 0, "bad": [], "slowest": 0.0}
    lock = threading.Lock()
    hogs = [_hog(ctl, kind) for kind in ("partial", "partial", "deaf", "deaf")]
    workers = [threading.Thread(target=_hammer, args=(ctl, stop, tally, lock, i))
               for i in range(32)]
    for w in workers:
        w.start()
    try:
        end = time.monotonic() + 10  # under fire from every reader before measuring
        while tally["ok"] < len(workers) and time.monotonic() < end:
            time.sleep(0.01)
        assert tally["ok"] >= len(workers), tally
        hammered = _iperf(c.g2.netns, 5)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
        for s in hogs:
            s.close()
    assert tally["bad"] == [], tally["bad"][:5]
    assert tally["ok"] > 500, tally
    assert tally["slowest"] < 2.0, tally
    # not starved: the hammering clients share the 2 cores with iperf3 and both ends (seen
    # 0.47-0.9x on this machine); a starved data path would be near 0
    assert hammered > 0.3 * baseline, (hammered, baseline)
    assert query(ctl, {"cmd": "stats"})["state"] == "Connected"
    print(f"control hammer: {tally['ok']} replies, slowest {tally['slowest']:.3f} s, "
          f"iperf3 {baseline:.2f} -> {hammered:.2f} Gbit/s")


def test_after_all_of_it_a_real_frontend_is_served(ctx):
    c = ctx
    c.chaos.respawn(c.g1, "front")
    c.chaos.wait_connected(c.g1)
    assert _iperf(c.g1.netns, 3) > 0.05
    s = c.back()
    assert s["pid"] == c.pid and s["counters"]["internal_errors"] == 0
    leaks = c.insp.connected(c.g1)
    leaks.merge(c.insp.idle(c.g1))
    assert leaks.total == 0, leaks.details


# --- helpers ------------------------------------------------------------------------------
REQUESTS = [  # (line, check of the reply)
    (b'{"cmd":"stats"}\n', lambda r: r.get("ok") is True and "rings" in r),
    (b'{"cmd":"ping"}\n', lambda r: r.get("ok") is True and r.get("pong") is True),
    (b'{"cmd":"nope"}\n', lambda r: r.get("ok") is False and "unknown" in r["error"]),
    (b"{not json\n", lambda r: r.get("ok") is False and "malformed" in r["error"]),
    (b"[1,2]\n", lambda r: r.get("ok") is False and "object" in r["error"]),
    (b"x" * (100 * 1024) + b"\n", lambda r: r.get("ok") is False and "longer" in r["error"]),
]


def _hammer(ctl: str, stop: threading.Event, tally: dict, lock: threading.Lock,
            seed: int) -> None:
    k = seed
    while not stop.is_set():
        line, check = REQUESTS[k % len(REQUESTS)]
        k += 1
        t0 = time.monotonic()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(ctl)
                s.sendall(line)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
            reply = json.loads(buf)
            good = check(reply)
        except (OSError, ValueError) as e:
            good, reply = False, {"exception": repr(e)}
        took = time.monotonic() - t0
        with lock:
            tally["slowest"] = max(tally["slowest"], took)
            if good:
                tally["ok"] += 1
            else:
                tally["bad"].append((line[:30], reply))


def _hog(ctl: str, kind: str) -> socket.socket:
    """A client that sends half a line and waits, or asks a lot and never reads."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ctl)
    s.setblocking(False)
    try:
        s.send(b'{"cmd": "sta' if kind == "partial" else b'{"cmd":"stats"}\n' * 20000)
    except BlockingIOError:
        pass
    return s


def _iperf(ns: str, seconds: int) -> float:
    p = subprocess.run(["ip", "netns", "exec", ns, "iperf3", "-c", WIRE, "-t", str(seconds),
                        "-J", "--connect-timeout", "3000"], capture_output=True, text=True,
                       timeout=seconds + 30)
    raw = json.loads(p.stdout)
    assert not raw.get("error"), raw["error"]
    return raw["end"]["sum_received"]["bits_per_second"] / 1e9


def _cpu(pid: int) -> float:
    raw = open(f"/proc/{pid}/stat").read()
    rest = raw[raw.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def _carrier(c: Ctx) -> int:
    with rtnl(c.topo.host_netns) as h:
        (idx,) = h.link_lookup(ifname=c.g1.vif)
        return int(h.get_links(idx)[0].get_attr("IFLA_CARRIER"))


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        time.sleep(0.05)
