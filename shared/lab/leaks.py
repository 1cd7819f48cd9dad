"""Leak checks on a running namespace lab, seen from outside each end.

What each end holds: fds and memfd mappings from /proc, maps/grants/slots from its stats,
vifs/TAPs/namespaces from netlink. `Inspector` turns "nothing leaks" into numbers; `Leaks`
counts them per kind. Used by the soak and by the restart and hostile-peer tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.lab import procs
from shared.lab.plumbing import rtnl
from shared.lab.topology import Guest, Topology
from shared.plumbing.control.client import query


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def memfd_maps(pid: int) -> int | None:
    """Distinct memfd files a process maps (a grant region is one)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return len({line.split()[4] for line in f if "/memfd:" in line})
    except OSError:
        return None


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def settle(read: Callable[[], int | None], want: int, timeout: float = 3.0) -> int | None:
    """Re-read until ``read()`` equals ``want`` or ``timeout`` passes; the last value. A count
    taken while the process is still closing something (a control client) must not be
    reported as a leak, a count that stays wrong must."""
    end = time.monotonic() + timeout
    while True:
        v = read()
        if v == want or time.monotonic() > end:
            return v
        time.sleep(0.05)


#: what can leak, in the order reports list them
LEAK_KINDS = ("fds", "maps", "grants", "devices", "processes")


@dataclass
class Leaks:
    """What was left behind, per kind (LEAK_KINDS). Every count must be 0."""

    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEAK_KINDS, 0))
    details: list[str] = field(default_factory=list)

    def add(self, kind: str, n: int, why: str) -> None:
        if n:
            self.by_kind[kind] += n
            self.details.append(f"{kind} +{n}: {why}")

    def merge(self, other: Leaks) -> None:
        for kind, n in other.by_kind.items():
            self.by_kind[kind] += n
        self.details.extend(other.details)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def counts(self) -> dict[str, int]:
        return dict(self.by_kind)


@dataclass
class Inspector:
    """Leak checks on a running namespace lab, from /proc, the stats and netlink."""

    topo: Topology
    #: fd counts of each end when connected: (role, guest) -> n, learnt at the first look
    baseline: dict[tuple[str, str], int] = field(default_factory=dict)

    def stats(self, g: Guest, role: str, timeout: float = 2.0) -> dict:
        ctl = self.topo.backend_ctl(g) if role == "back" else self.topo.frontend_ctl(g)
        return query(str(ctl), {"cmd": "stats"}, timeout=timeout)

    def pid(self, g: Guest, role: str) -> int | None:
        rec = procs.read_pidfile(self.topo.pidfile(g.vif if role == "back" else g.name))
        return rec.pid if rec is not None and rec.alive() else None

    def learn(self) -> None:
        """Take the fd baselines now (every pair Connected and quiet)."""
        for g in self.topo.guests:
            for role in ("back", "front"):
                pid = self.pid(g, role)
                seen = []
                for _ in range(5 if pid else 0):  # the lowest: not a control client's fd
                    seen.append(fd_count(pid))
                    time.sleep(0.02)
                if seen and None not in seen:
                    self.baseline[(role, g.name)] = min(seen)

    def connected(self, g: Guest) -> Leaks:
        """Both ends Connected: fds as at the baseline, exactly one region mapped each, one
        process per end, one vif and one guest TAP."""
        leaks = Leaks()
        for role in ("back", "front"):
            pid = self.pid(g, role)
            if pid is None:
                leaks.add("processes", 1, f"{role} of {g.name} is not running")
                continue
            base = self.baseline.get((role, g.name))
            if base is not None:
                n = settle(lambda p=pid: fd_count(p), base)
                if n is not None and n > base:
                    leaks.add("fds", n - base, f"{role} {g.name} has {n} fds, {base} at start")
            m = settle(lambda p=pid: memfd_maps(p), 1)
            if m is not None and m > 1:
                leaks.add("maps", m - 1, f"{role} {g.name} maps {m} memfd regions")
            rm = self.stats(g, role).get("regions_mapped", 1)
            if rm > 1:
                leaks.add("maps", rm - 1, f"{role} {g.name} says regions_mapped={rm}")
        leaks.merge(self.processes(g, expect=1, workers=g.queues if g.queues > 1 else 0))
        leaks.merge(self.devices(g, expect=1))
        return leaks

    def released(self, g: Guest, timeout: float = 10.0) -> Leaks:
        """The backend after its frontend died: back to waiting, holding nothing of it."""
        leaks = Leaks()
        end = time.monotonic() + timeout
        while True:
            s = self.stats(g, "back")
            if s["state"] != "Connected" or time.monotonic() > end:
                break
            time.sleep(0.05)
        if s["state"] == "Connected":
            leaks.add("processes", 1, f"backend of {g.name} never noticed its frontend died")
            return leaks
        for ring in ("tx", "rx"):
            r = s["rings"][ring]
            for key, kind in (("maps_outstanding", "maps"), ("grants_in_use", "grants"),
                              ("grants_active", "grants"), ("slots_in_flight", "grants")):
                if r.get(key, 0):
                    leaks.add(kind, abs(r[key]), f"backend {g.name} {ring} {key}={r[key]}")
        if s.get("regions_mapped", 0):
            leaks.add("maps", s["regions_mapped"], f"backend {g.name} still maps the region")
        pid = self.pid(g, "back")
        if pid is not None:
            m = settle(lambda: memfd_maps(pid), 0)
            if m:
                leaks.add("maps", m, f"backend {g.name} /proc maps {m} memfds with no frontend")
        leaks.merge(self.devices(g, expect=1, guest_tap=None))
        return leaks

    def idle(self, g: Guest, timeout: float = 10.0) -> Leaks:
        """Traffic stopped: nothing in flight, no map outstanding, no header slot held."""
        leaks = Leaks()
        end = time.monotonic() + timeout
        while True:
            s = {role: self.stats(g, role) for role in ("back", "front")}
            busy = [s[r]["rings"][x]["slots_in_flight"] for r in s for x in ("tx", "rx")]
            busy.append(s["front"]["rings"]["tx"].get("header_slots_in_use", 0))
            if not any(busy) or time.monotonic() > end:
                break
            time.sleep(0.1)
        for role in s:
            for ring in ("tx", "rx"):
                r = s[role]["rings"][ring]
                if r["slots_in_flight"]:
                    leaks.add("grants", 1, f"{role} {g.name} {ring} slots_in_flight="
                                           f"{r['slots_in_flight']} at idle")
                if r.get("maps_outstanding", 0) and not (role == "back" and g.persistent):
                    leaks.add("maps", r["maps_outstanding"],
                              f"{role} {g.name} {ring} maps_outstanding at idle")
        if s["front"]["rings"]["tx"].get("header_slots_in_use", 0):
            leaks.add("grants", 1, f"front {g.name} header slots in use at idle")
        btx = s["back"]["rings"]["tx"]
        if btx["slots_consumed"] != btx["slots_released"]:
            leaks.add("grants", 1, f"back {g.name} tx slots consumed {btx['slots_consumed']} "
                                   f"!= released {btx['slots_released']}")
        return leaks

    def processes(self, g: Guest, expect: int, workers: int | None = None) -> Leaks:
        """Exactly ``expect`` live processes per end (found by their unique --ctl argument),
        not counting its queue workers (children of one of them); with ``workers``, at most
        that many of those each. A worker whose end died (an orphan) counts as a process."""
        leaks = Leaks()
        for ctl in (self.topo.backend_ctl(g), self.topo.frontend_ctl(g)):
            stats = [st for p in procs.pids_with_args("--ctl", str(ctl))
                     if (st := procs.proc_stat(p)) is not None and st.state != "Z"]
            ends = {st.pid for st in stats}
            tops = [st for st in stats if st.ppid not in ends]
            if len(tops) > expect:
                leaks.add("processes", len(tops) - expect, f"{len(tops)} processes serve {ctl}")
            kids = len(stats) - len(tops)
            if workers is not None and kids > workers:
                leaks.add("processes", kids - workers, f"{kids} queue workers serve {ctl}")
        return leaks

    def devices(self, g: Guest, expect: int, guest_tap: int | None = 1,
                timeout: float = 3.0) -> Leaks:
        """The vif in the host namespace and eth0 in the guest's: at most ``expect`` vifs
        and ``guest_tap`` TAPs (a device of a dead process may take a moment to go)."""
        leaks = Leaks()
        t = self.topo
        for ns, name, want in ((t.host_netns, g.vif, expect), (g.netns, "eth0", guest_tap)):
            if want is None:
                continue

            def count(ns=ns, name=name) -> int:
                with rtnl(ns) as h:
                    return len(h.link_lookup(ifname=name))

            n = settle(count, want, timeout)
            if n is not None and n > want:
                leaks.add("devices", n - want, f"{n} links {name} in {ns}")
        return leaks

    def down(self) -> Leaks:
        """After `down`: no namespace, process, socket or pidfile of this topology."""
        from pyroute2 import netns as pnetns

        leaks = Leaks()
        t = self.topo
        left = set(t.namespaces) & set(pnetns.listnetns())
        leaks.add("devices", len(left), f"namespaces left: {sorted(left)}")
        for g in t.guests:
            leaks.merge(self.processes(g, expect=0))
        socks = [p for p in t.state_dir.glob("*") if p.is_socket() or p.suffix == ".pid"] \
            if t.state_dir.is_dir() else []
        leaks.add("devices", len(socks), f"files left: {[str(p) for p in socks]}")
        return leaks

