"""What a namespace lab leaves on disk (state.json) and which topology a command acts on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.lab import procs
from shared.lab.errors import LabError
from shared.lab.topology import DEFAULT_STATE_DIR, Topology, TopologyError, load


@dataclass
class LabState:
    """state.json: everything `up` made, written after every step so a crash leaves a trail."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> LabState:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        return cls(path, data if isinstance(data, dict) else {})

    def add(self, kind: str, item: Any) -> None:
        items = self.data.setdefault(kind, [])
        if item not in items:
            items.append(item)
            self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)



def resolve_topology(path: str | None) -> Topology:
    """The topology to act on: `path`, else $PVNET_TOPOLOGY, else the one the running lab was
    brought up with, else the default. (The environment variable lets a test run the README's
    commands word for word on a private topology that cannot collide with a real lab.)"""
    path = path or os.environ.get("PVNET_TOPOLOGY") or None
    if path:
        return load(path)
    state = LabState.load(DEFAULT_STATE_DIR / "state.json").data
    recorded = state.get("topology")
    if recorded and Path(recorded).is_file():
        try:
            return load(recorded)
        except TopologyError:
            pass
    return load()


def running(topo: Topology) -> list[str]:
    """What of `topo`'s lab runs now: "<name> (pid N)" for each live process its state dir
    has a pidfile of (netbacks, netfronts, QEMU guests, iperf3 servers). Reads files only."""
    if not topo.state_dir.is_dir():
        return []
    out = []
    for pidfile in sorted(topo.state_dir.glob("*.pid")):
        rec = procs.read_pidfile(pidfile)
        if rec is not None and rec.alive():
            out.append(f"{pidfile.stem} (pid {rec.pid})")
    return out


def refuse_if_up(topo: Topology) -> None:
    """`up` on a lab that is up (either placement) would start its processes again over the
    running ones: refuse, saying what runs and how to take it down (LabError)."""
    up = running(topo)
    if up:
        placement = "QEMU guests" if any(u.startswith("qemu-") for u in up) else "namespaces"
        # `invoke down` finds a lab in the default state dir by itself (resolve_topology)
        more = f" --topology {topo.source}" if topo.state_dir != DEFAULT_STATE_DIR else ""
        raise LabError(f"the lab is already up ({placement}, state dir {topo.state_dir}): "
                       f"{', '.join(up)}; run `invoke down{more}` first")
