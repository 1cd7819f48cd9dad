"""Kill one end of a guest's pair and start it again, as a supervisor would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from shared.lab import procs
from shared.lab.commands import REPO_ROOT
from shared.lab.topology import Guest, Topology
from shared.plumbing.control.client import ControlError, query


@dataclass
class Chaos:
    """SIGKILL one end of a guest's pair and start it again, as a supervisor would."""

    topo: Topology
    children: list[subprocess.Popen] = field(default_factory=list)

    def name(self, g: Guest, role: str) -> str:
        return g.vif if role == "back" else g.name

    def kill(self, g: Guest, role: str, sig: int = signal.SIGKILL) -> int:
        """Kill that end; returns its pid once it is gone (reaped if it was our child)."""
        rec = procs.read_pidfile(self.topo.pidfile(self.name(g, role)))
        if rec is None or not rec.alive():
            raise RuntimeError(f"{role} of {g.name} is not running")
        os.kill(rec.pid, sig)
        for child in self.children:
            if child.pid == rec.pid:
                child.wait(10)
        if procs.wait_gone([rec.pid], 10.0):
            raise RuntimeError(f"{role} of {g.name} (pid {rec.pid}) survived signal {sig}")
        return rec.pid

    def respawn(self, g: Guest, role: str,
                argv: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> int:
        """Start that end again with the command line its pidfile recorded (or ``argv``)."""
        name = self.name(g, role)
        pidfile = self.topo.pidfile(name)
        rec = procs.read_pidfile(pidfile)
        if argv is None:
            if rec is None:
                raise RuntimeError(f"no pidfile for {name}")
            argv = list(rec.argv)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child = procs.spawn(argv, log=self.topo.log_path(name), pidfile=pidfile, cwd=REPO_ROOT,
                            env=env, pass_fds=pass_fds)
        self.children.append(child)
        self.children = [c for c in self.children if c.poll() is None]
        return child.pid

    def wait_connected(self, g: Guest, timeout: float = 30.0) -> float:
        """Seconds until both ends of ``g`` say Connected (raises on timeout)."""
        t0 = time.monotonic()
        states: dict[str, str] = {}
        while True:
            for role, ctl in (("back", self.topo.backend_ctl(g)),
                              ("front", self.topo.frontend_ctl(g))):
                try:
                    states[role] = str(query(str(ctl), {"cmd": "stats"}, timeout=1.0)["state"])
                except ControlError as e:
                    states[role] = f"unreachable ({e})"
            if all(s == "Connected" for s in states.values()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{g.name} not Connected after {timeout:g}s: {states}")
            time.sleep(0.05)

