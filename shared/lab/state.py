"""What a namespace lab leaves on disk (state.json) and which topology a command acts on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
