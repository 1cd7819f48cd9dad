"""Soak: verified traffic through a namespace lab while its netfronts and netbacks are killed
(SIGKILL) and respawned with the same command line, checking after every restart that
nothing leaked.

Built from three parts, each usable alone (the restart and leak tests use them too):
``Chaos`` (shared/lab/chaos.py) kills and respawns one end; ``Inspector`` (shared/lab/leaks.py)
counts what each end holds; ``Agents`` (shared/lab/transfers.py) run sha256-verified TCP
transfers inside the namespaces. ``Soak`` here runs, per guest, a stream of verified transfers
alternating direction, a chaos loop, a progress line per minute and a JSON report.

``invoke soak --minutes N [--json FILE]`` runs it on a private topology (pvs-*, 10.86.0.0/24).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.lab.chaos import Chaos
from shared.lab.leaks import Inspector, Leaks, rss_kb
from shared.lab.netns import Lab
from shared.lab.topology import Guest, Topology, loads
from shared.lab.transfers import STALL_TIMEOUT, Agents

SOAK_TOPOLOGY = """\
bridge: {p}br0
host_netns: {p}-host
state_dir: {state}
wire: {{netns: {p}-wire, ip: {net}.1/24, iperf_server: false, host_if: {p}br0-wire}}
guests:
  - {{name: {p}-g1, domid: 61, mac: "02:00:00:00:06:01", ip: {net}.11/24, tx_mode: lazy{q}}}
  - {{name: {p}-g2, domid: 62, mac: "02:00:00:00:06:02", ip: {net}.12/24, tx_mode: map,
     persistent: true{q}}}
"""


def soak_topology(prefix: str = "pvs", net: str = "10.86.0",
                  state_dir: str | Path | None = None, queues: int = 1) -> Topology:
    """The soak's own lab: private names and subnet, so it runs beside a real lab; both
    guests with ``queues`` queues. Its processes' logs stay in ``<state_dir>/log`` (default
    /run/<prefix>-soak) after it ends."""
    state = Path(state_dir) if state_dir else Path("/run") / f"{prefix}-soak"
    q = f", queues: {queues}" if queues > 1 else ""
    return loads(SOAK_TOPOLOGY.format(p=prefix, net=net, state=state, q=q), state_dir=state)


@dataclass
class SoakConfig:
    minutes: float = 10.0
    #: seconds between two restarts (alternating guest, and frontend/backend)
    restart_every: float = 20.0
    transfer_bytes: int = 48 << 20
    json_path: str | None = None
    prefix: str = "pvs"
    net: str = "10.86.0"
    state_dir: str | None = None
    #: queues per guest (2: a worker process per queue at each end, killed with its end)
    queues: int = 1


@dataclass
class SoakReport:
    minutes: float = 0.0
    transfers: int = 0
    transfers_verified: int = 0
    transfers_failed: int = 0
    bytes_verified: int = 0
    connections_lost: int = 0
    corrupt: int = 0
    restarts: dict[str, int] = field(default_factory=lambda: {"frontend": 0, "backend": 0})
    reconnect_seconds_max: float = 0.0
    leaks: dict[str, int] = field(default_factory=dict)
    leak_details: list[str] = field(default_factory=list)
    rss_kb: dict[str, list[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not sum(self.leaks.values()) and not self.transfers_failed
                and self.transfers_verified > 0 and not self.errors)


class Soak:
    """Traffic + chaos + leak checks for ``cfg.minutes``; returns a SoakReport."""

    def __init__(self, cfg: SoakConfig, say: Callable[[str], None] = print,
                 topo: Topology | None = None) -> None:
        self.cfg = cfg
        self.say = say
        self.topo = topo or soak_topology(cfg.prefix, cfg.net, cfg.state_dir, cfg.queues)
        self.lab = Lab(self.topo, say=lambda _line: None)
        self.report = SoakReport()
        self.leaks = Leaks()
        self.inspector = Inspector(self.topo)
        self.chaos = Chaos(self.topo)
        self.agents = Agents(self.topo)
        self.stop = threading.Event()
        names = [g.name for g in self.topo.guests]
        self.paused = {n: threading.Event() for n in names}  # chaos asks a worker to hold
        self.idle_ok = {n: threading.Event() for n in names}  # the worker says it holds
        self.lock = threading.Lock()

    def run(self) -> SoakReport:
        t0 = time.monotonic()
        try:
            self.lab.down()
            self.lab.up(timeout=60)
            self.agents.start()
            self.inspector.learn()
            self._note_rss()
            workers = [threading.Thread(target=self._traffic, args=(g, i), daemon=True)
                       for i, g in enumerate(self.topo.guests)]
            for w in workers:
                w.start()
            self._chaos_loop(t0)
            self.stop.set()
            for w in workers:
                w.join(STALL_TIMEOUT * 3)
            for g in self.topo.guests:
                self._merge(self.inspector.idle(g))
                self._merge(self.inspector.connected(g))
            self._note_rss()
        except Exception as e:  # noqa: BLE001 - the report says what went wrong
            self.report.errors.append(f"{type(e).__name__}: {e}")
        finally:
            self.stop.set()
            self.agents.stop()
            try:
                self.lab.down()
                self._merge(self.inspector.down())
            except Exception as e:  # noqa: BLE001
                self.report.errors.append(f"down: {type(e).__name__}: {e}")
        r = self.report
        r.minutes = round((time.monotonic() - t0) / 60, 2)
        r.leaks = self.leaks.counts()
        r.leak_details = self.leaks.details[:50]
        if self.cfg.json_path:
            Path(self.cfg.json_path).write_text(json.dumps(asdict(r), indent=1) + "\n")
        return r

    def _merge(self, leaks: Leaks) -> None:
        with self.lock:
            self.leaks.merge(leaks)
        for d in leaks.details:
            self.say(f"  leak: {d}")

    def _note_rss(self) -> None:
        for g in self.topo.guests:
            for role in ("back", "front"):
                pid = self.inspector.pid(g, role)
                kb = rss_kb(pid) if pid else None
                if kb:
                    self.report.rss_kb.setdefault(f"{role}:{g.name}", []).append(kb)

    def _traffic(self, g: Guest, index: int) -> None:
        """Transfers to and from the wire, alternating, until the soak ends."""
        wire_ip, guest_ip = str(self.topo.wire.ip.ip), str(g.ip.ip)
        n = 0
        while not self.stop.is_set():
            if self.paused[g.name].is_set():
                self.idle_ok[g.name].set()
                time.sleep(0.05)
                continue
            seed = index * 1_000_000 + n
            if n % 2 == 0:
                res = self.agents.transfer(g.netns, wire_ip, self.cfg.transfer_bytes, seed)
            else:
                res = self.agents.transfer(self.topo.wire.netns, guest_ip,
                                           self.cfg.transfer_bytes, seed)
            n += 1
            with self.lock:
                r = self.report
                r.transfers += 1
                if res["ok"]:
                    r.transfers_verified += 1
                    r.bytes_verified += res["bytes"]
                else:
                    r.transfers_failed += 1
                    r.connections_lost += int(res.get("lost", False))
                    r.corrupt += int(res.get("corrupt", False))
                    r.errors.append(f"{g.name} transfer {seed}: {res['error']}")
            if not res["ok"]:
                self.say(f"  {g.name}: transfer {seed} failed: {res['error']}")

    def _quiesce(self, g: Guest) -> None:
        """Let the current transfer of ``g`` finish and hold the next one."""
        self.idle_ok[g.name].clear()
        self.paused[g.name].set()
        self.idle_ok[g.name].wait(STALL_TIMEOUT * 2)

    def _resume(self, g: Guest) -> None:
        self.paused[g.name].clear()

    def _chaos_loop(self, t0: float) -> None:
        end = t0 + self.cfg.minutes * 60
        next_restart = time.monotonic() + min(self.cfg.restart_every, 10.0)
        next_progress = t0 + 60
        k = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_progress:
                self._progress(now - t0)
                next_progress += 60
            if now >= next_restart and now + 15 < end:
                g = self.topo.guests[k % len(self.topo.guests)]
                role = "front" if (k // len(self.topo.guests)) % 2 == 0 else "back"
                self._restart(g, role)
                k += 1
                next_restart = time.monotonic() + self.cfg.restart_every
            time.sleep(0.2)
        self._progress(time.monotonic() - t0)

    def _restart(self, g: Guest, role: str) -> None:
        """One chaos step, checked: kill mid-transfer, look at what the survivor holds,
        respawn, wait for Connected, look again; then an idle check between transfers."""
        self.chaos.kill(g, role)
        self.report.restarts["frontend" if role == "front" else "backend"] += 1
        if role == "front":
            self._merge(self.inspector.released(g))
        else:
            self._merge(self.inspector.devices(g, expect=0))  # its vif went with it
        t = time.monotonic()
        self.chaos.respawn(g, role)
        took = self.chaos.wait_connected(g, timeout=60)
        self.report.reconnect_seconds_max = max(self.report.reconnect_seconds_max,
                                                round(took, 2))
        self._merge(self.inspector.connected(g))
        self._quiesce(g)
        self._merge(self.inspector.idle(g))
        self._resume(g)
        self.say(f"  restart {role}end of {g.name}: Connected again in "
                 f"{time.monotonic() - t:.1f}s")

    def _progress(self, elapsed: float) -> None:
        r = self.report
        self.say(f"soak {elapsed / 60:4.1f}/{self.cfg.minutes:g} min: "
                 f"{r.bytes_verified / 1e6:8.0f} MB verified in {r.transfers_verified} "
                 f"transfers, {r.transfers_failed} failed, {r.connections_lost} connections "
                 f"lost, restarts {r.restarts['frontend']} front / {r.restarts['backend']} "
                 f"back, leaks {self.leaks.total}")



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.lab.soak")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="the soak itself")
    run.add_argument("--minutes", type=float, default=10.0)
    run.add_argument("--json")
    run.add_argument("--restart-every", type=float, default=20.0)
    a = p.parse_args(argv)
    report = Soak(SoakConfig(minutes=a.minutes, json_path=a.json,
                             restart_every=a.restart_every)).run()
    print(json.dumps(asdict(report), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
