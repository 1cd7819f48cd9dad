"""Guests the QEMU placement left running: their handles in the state dir, ssh into them.

`up` detaches each QEMU and records a GuestHandle (pid, ssh port, run dir) in guests.json, so
that later commands (`invoke ssh`, `iperf`, `logs`, `down`) and the tests find the guests again.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from shared.lab import procs
from shared.lab.errors import LabError
from shared.lab.image.store import cached_image
from shared.lab.machine.config import RunFiles
from shared.lab.topology import Topology


@dataclass(frozen=True)
class GuestHandle:
    """What a running guest left in the state dir for later commands (ssh, logs, down)."""

    name: str
    pid: int
    ssh_port: int
    run_dir: Path

    @property
    def files(self) -> RunFiles:
        return RunFiles.at(self.run_dir)

    @property
    def console(self) -> Path:
        return self.files.console

    @property
    def qmp(self) -> Path:
        return self.files.qmp


def guest_view(path: str | Path) -> str:
    """Where a guest finds host path `path`: the same path. The guest's init bind-mounts the
    interpreter's and the checkout's directories from /host where its own tmpfs (/tmp, /run)
    would hide them (vm-images/guest/guest_init.py), so a CI clone in /tmp works as it is."""
    return str(path)



def handles_file(topo: Topology) -> Path:
    return topo.state_dir / "guests.json"


def load_handles(topo: Topology) -> dict[str, GuestHandle]:
    try:
        raw = json.loads(handles_file(topo).read_text())
    except (OSError, ValueError):
        return {}
    return {n: GuestHandle(n, int(h["pid"]), int(h["ssh_port"]), Path(h["run_dir"]))
            for n, h in raw.items()}


def save_handle(topo: Topology, h: GuestHandle) -> None:
    handles = {n: {"pid": x.pid, "ssh_port": x.ssh_port, "run_dir": str(x.run_dir)}
               for n, x in load_handles(topo).items()}
    handles[h.name] = {"pid": h.pid, "ssh_port": h.ssh_port, "run_dir": str(h.run_dir)}
    handles_file(topo).write_text(json.dumps(handles, indent=1) + "\n")


class SshRunner:
    """Runs commands in guests over ssh (one kept connection per guest): the QEMU placement's
    way into a guest, for `invoke iperf`, `invoke ssh` and the tests."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.clients: dict[str, object] = {}

    def client(self, name: str):
        from shared.lab import ssh as lab_ssh

        if name not in self.clients:
            h = load_handles(self.topo).get(name)
            if h is None:
                raise LabError(f"no running guest {name!r} (is the lab up with VMs?)")
            image = cached_image()
            self.clients[name] = lab_ssh.connect(
                h.ssh_port, key=lab_ssh.ensure_keypair(),
                host_key_pub=image.host_key_pub if image else None)
        return self.clients[name]

    def __call__(self, where: str | None, argv: list[str] | str,
                 timeout: float) -> tuple[int, str, str]:
        from shared.lab import ssh as lab_ssh

        if where is None or where not in {g.name for g in self.topo.guests}:
            raise LabError(f"{where!r} is not a guest of this topology")
        cmd = argv if isinstance(argv, str) else shlex.join(argv)
        return lab_ssh.exec_command(self.client(where), cmd, timeout)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()


def running_vms(topo: Topology) -> bool:
    """Is this topology's lab up in the QEMU placement?"""
    return any(procs.proc_stat(h.pid) is not None for h in load_handles(topo).values())
