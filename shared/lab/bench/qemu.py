"""The QEMU paths: the same guest type with virtio-net (QEMU's userspace backend; this machine
has no vhost-net) or with pvnet (netfront in the guest on ivshmem + virtio-serial), each a
one-guest topology brought up with the lab's own `VmLab`, traffic to the wire peer. The
``-g2g`` paths are two-guest topologies of the same kind (two pvnet guests; two virtio-net
guests): guest 1 runs the clients, guest 2 (its iperf3 server, and rr.py started over ssh) is
the peer, so both guests, both backends and both QEMUs share the host's cores.

CPU: for `virtio-net` the QEMU process is the backend (its I/O thread moves the frames); for
`pvnet-qemu` the netfront runs inside the guest, so the QEMU process stands for the frontend
(guest CPU) and the netback process is the backend.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared.lab.bench.measure import Sample, read_end, read_proc
from shared.lab.bench.modes import select, yaml_keys
from shared.lab.bench.paths import (
    CmdResult,
    Endpoints,
    NetnsEndpoint,
    Path,
    PathContext,
)
from shared.lab.bench.veth import link_frames, offloads_off
from shared.lab.commands import GUEST_TAP
from shared.lab.guest_handles import SshRunner, load_handles
from shared.lab.topology import Topology, loads
from shared.lab.vms import VmLab
from shared.plumbing.control.client import query


def topology_yaml(ctx: PathContext, nic: str, keys: dict[str, object], gso: bool,
                  guests: int = 1) -> str:
    pre = ctx.prefix
    extra = yaml_keys(keys)
    text = (f"bridge: {pre}qbr0\nhost_netns: {pre}-qhost\n"
            f"wire: {{netns: {pre}-qwire, ip: {ctx.ip(1)}/24, iperf_server: true, "
            f"host_if: {pre}qbr0-wire}}\nguests:\n")
    for i in range(1, guests + 1):
        text += (f"  - {{name: {pre}-q{i}, domid: {220 + i}, mac: \"02:00:00:00:b2:2{i}\", "
                 f"ip: {ctx.ip(10 + i)}/24, nic: {nic}, gso: {str(gso).lower()}{extra}}}\n")
    return text


@dataclass
class GuestEndpoint:
    """A guest end reached over the lab's management ssh."""

    runner: SshRunner
    name: str
    ip: str
    python: str = "python3"

    def run(self, argv: Sequence[str], timeout: float) -> CmdResult:
        try:
            rc, out, err = self.runner(self.name, list(argv), timeout)
        except Exception as exc:  # noqa: BLE001 - an ssh failure is a failed run
            return CmdResult(255, "", f"ssh: {exc}")
        return CmdResult(rc, out, err)

    def start(self, argv: Sequence[str]) -> Callable[[], None]:
        """A server in the guest (the guest-to-guest paths' peer), detached from the ssh
        session; the returned function kills it."""
        cmd = f"{shlex.join(argv)} </dev/null >/dev/null 2>&1 & echo $!"
        rc, out, err = self.runner(self.name, ["sh", "-c", cmd], 30)
        if rc != 0 or not out.strip().isdigit():
            raise RuntimeError(f"cannot start {argv[0]} in {self.name}: {err.strip()}")
        pid = out.strip()

        def stop() -> None:
            with contextlib.suppress(Exception):
                self.runner(self.name, ["kill", pid], 10)

        return stop


@dataclass
class QemuPath:
    ctx: PathContext
    path: str
    mode: str
    nic: str
    keys: dict[str, object] = field(default_factory=dict)
    guests: int = 1  # 2: guest <-> guest (the peer is the second guest)
    note: str = ""
    _lab: VmLab | None = None
    _runner: SshRunner | None = None
    _topo: Topology | None = None

    def setup(self, gso: bool) -> Endpoints:
        state = self.ctx.state_dir / f"{self.ctx.prefix}-q"
        topo = self._topo = loads(topology_yaml(self.ctx, self.nic, self.keys, gso,
                                                self.guests), state_dir=state)
        self._lab = VmLab(topo, say=self.ctx.log)
        self._lab.down()  # sweep what a crashed earlier run left under our names
        self._lab.up(timeout=180)
        self._runner = SshRunner(topo)
        g = topo.guests[0]
        self.note = f"{self.nic}, gso {'on' if gso else 'off'}"
        if not gso:
            offloads_off(topo.wire.netns, topo.wire.dev)
            if self.nic == "virtio-net":
                for guest in topo.guests:
                    self._runner(guest.name, ["ethtool", "-K", GUEST_TAP, "tso", "off", "gso",
                                              "off", "gro", "off"], 30)
        ends = GuestEndpoint(self._runner, g.name, str(g.ip.ip))
        if self.guests > 1:
            peer = topo.guests[1]
            self.note += f", guest {g.name} -> guest {peer.name}"
            return Endpoints(ends, GuestEndpoint(self._runner, peer.name, str(peer.ip.ip)))
        return Endpoints(ends, NetnsEndpoint(topo.wire.netns, str(topo.wire.ip.ip)))

    def sample(self) -> Sample:
        topo = self._topo
        assert topo is not None
        g = topo.guests[0]
        s = Sample()
        qemu = load_handles(topo)[g.name].pid
        if self.nic == "virtio-net":
            tap = f"tap{g.domid}.0"
            s.frames = {"tx": link_frames(topo.host_netns, tap, "rx_packets"),
                        "rx": link_frames(topo.host_netns, tap, "tx_packets")}
            s.procs["back"] = read_proc(qemu)
            return s
        for end, ctl in (("front", topo.frontend_ctl(g)), ("back", topo.backend_ctl(g))):
            reply = query(str(ctl), {"cmd": "stats"}, timeout=5.0)
            s.rings[end] = reply["rings"]
            if end == "back":
                s.procs[end] = read_end(reply)
        s.procs["front"] = read_proc(qemu)  # the netfront runs inside the guest
        back = s.rings["back"]
        s.frames = {"tx": int(back["tx"]["tx_packets"]), "rx": int(back["rx"]["rx_packets"])}
        return s

    def teardown(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._lab is None:
            return
        lab, self._lab = self._lab, None
        try:
            self._keep_logs(lab.topo)
        finally:
            lab.down()

    def _keep_logs(self, topo: Topology) -> None:
        if self.ctx.results is None:
            return
        dst = self.ctx.results / "logs" / f"{self.path}-{self.mode}"
        for src in (topo.state_dir / "log", *(topo.state_dir / g.name for g in topo.guests)):
            if src.is_dir():
                shutil.copytree(src, dst / src.name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock", "guest.json"))


def virtio_paths(ctx: PathContext) -> list[Path]:
    return [QemuPath(ctx, "virtio-net", "-", "virtio-net")]


def pvnet_qemu_paths(ctx: PathContext) -> list[Path]:
    return [QemuPath(ctx, "pvnet-qemu", m.name, "pvnet", m.guest_keys())
            for m in select(ctx.modes, qemu=True)]


def virtio_g2g_paths(ctx: PathContext) -> list[Path]:
    return [QemuPath(ctx, "virtio-net-g2g", "-", "virtio-net", guests=2)]


def pvnet_g2g_paths(ctx: PathContext) -> list[Path]:
    return [QemuPath(ctx, "pvnet-qemu-g2g", m.name, "pvnet", m.guest_keys(), guests=2)
            for m in select(ctx.modes, qemu=True)]

