"""What a measured path is: the two small interfaces a path implements, and its endpoints.

A *path* is one way frames get from a guest to the wire peer (a veth pair, pvnet in namespaces
in one mode, later a QEMU guest with virtio-net or pvnet). The runner only ever calls

    ends = path.setup(gso)      # bring it up; returns the guest and peer `Endpoint`s
    path.sample()               # cumulative counters now (see measure.Sample)
    path.teardown()             # remove everything setup made; safe after a failed setup

and runs workloads between `ends.guest` and `ends.peer`. Workloads run their clients on the
guest end (`run`, blocking, bounded) and their servers on the peer end (`start`); the peer
serves iperf3 on `IPERF_PORT` for as long as the path is up.

Adding a path is writing a factory that returns one `Path` per mode and naming it in
``shared.lab.bench.registry`` (the one module that imports every path module; nothing imports
it back but the runner). A QEMU path is about this much (names below are illustrative):

    def virtio_paths(ctx: PathContext) -> list[Path]:
        return [VirtioNet(ctx)]

    @dataclass
    class VirtioNet:
        ctx: PathContext
        path: str = "virtio-net"
        mode: str = "-"
        note: str = ""
        vm: Any = None

        def setup(self, gso: bool) -> Endpoints:
            self.lab = Lab(wire_only_topology(self.ctx), say=self.ctx.log)  # bridge + wire peer
            self.lab.up(processes=False)
            self.vm = Machine(MachineConfig(..., taps=[TapNic(bridge=..., ...)]))
            self.vm.launch(); self.vm.wait_ssh()
            if not gso:
                self.vm.ssh("ethtool -K eth1 tso off gso off gro off", check=True)
            return Endpoints(SshEndpoint(self.vm, "10.81.0.11"),
                             NetnsEndpoint(wire_ns, "10.81.0.1"))

        def sample(self) -> Sample:
            return Sample(frames={"tx": veth.link_frames(wire_ns, "eth0"),
                                  "rx": veth.link_frames(host_ns, tap, "tx_packets")},
                          procs={"back": read_proc(self.vm.pid)})  # QEMU is the backend

        def teardown(self) -> None:
            if self.vm: self.vm.shutdown()
            self.lab.down()
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, Protocol

from shared.lab import procs
from shared.lab.bench.measure import Sample

IPERF_PORT = 5201

Log = Callable[[str], None]


@dataclass(frozen=True)
class CmdResult:
    rc: int
    out: str
    err: str


class Endpoint(Protocol):
    """One end of a path as a workload sees it: an address and a place to run programs."""

    ip: str
    python: str  # interpreter at that end (runs rr.py by path)

    def run(self, argv: Sequence[str], timeout: float) -> CmdResult:
        """Run a client to completion (killed after `timeout`)."""
        ...

    def start(self, argv: Sequence[str]) -> Callable[[], None]:
        """Start a server in the background; returns the function that stops it."""
        ...


@dataclass
class NetnsEndpoint:
    """An end that is a network namespace on this host (veth, pvnet-netns, every wire peer)."""

    netns: str
    ip: str
    python: str = sys.executable

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], timeout: float) -> CmdResult:
        try:
            p = subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return CmdResult(124, _text(exc.stdout), f"timed out after {timeout:g} s")
        return CmdResult(p.returncode, p.stdout, p.stderr)

    def start(self, argv: Sequence[str]) -> Callable[[], None]:
        proc = subprocess.Popen(self._argv(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

        return lambda: procs.stop_group(proc)


@dataclass
class SshEndpoint:
    """A guest end reached over ssh: anything with `ssh(cmd, timeout) -> (rc, out, err)`.

    Fits shared/lab/machine.Machine. Only `run` is needed on a guest end (servers run on the
    peer), so `start` is left out on purpose.
    """

    machine: Any
    ip: str
    python: str = "python3"

    def run(self, argv: Sequence[str], timeout: float) -> CmdResult:
        try:
            rc, out, err = self.machine.ssh(list(argv), timeout=timeout)
        except Exception as exc:  # an ssh failure is a failed run, not a crashed bench
            return CmdResult(255, "", f"ssh: {exc}")
        return CmdResult(rc, out, err)

    def start(self, argv: Sequence[str]) -> Callable[[], None]:
        raise NotImplementedError("servers run on the peer end")


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


@dataclass(frozen=True)
class Endpoints:
    guest: Endpoint
    peer: Endpoint


class Path(Protocol):
    """One measured path (one mode). `path`/`mode` go into every record it yields."""

    path: str
    mode: str
    note: str  # set by setup: what was configured (offloads...), copied into the records

    def setup(self, gso: bool) -> Endpoints: ...

    def sample(self) -> Sample: ...

    def teardown(self) -> None: ...


@dataclass
class PathContext:
    """What every path factory gets: unique names, a state dir, a log, where to keep logs."""

    prefix: str = "pvb"  # namespaces/devices are named <prefix>-...; tests use their own
    subnet: str = "10.81.0"  # a /24; peer .1, guest .11
    state_dir: FsPath = FsPath("/run/pvnet-bench")
    results: FsPath | None = None  # lab logs are copied here on teardown
    modes: tuple[str, ...] | None = None  # restrict multi-mode paths (None: all)
    log: Log = field(default=lambda line: None)

    def ip(self, host: int) -> str:
        return f"{self.subnet}.{host}"


Factory = Callable[[PathContext], list[Path]]
"""What a path module offers: one `Path` per mode of it. ``shared.lab.bench.registry`` names
them; this module imports no path module (they import it)."""
