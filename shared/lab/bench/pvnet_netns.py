"""The `pvnet-netns` path: one guest namespace behind netfront/netback, traffic to the wire peer.

Each mode is a one-guest topology of its own brought up with `Lab` (private names and state
dir, so it can run beside a user's lab or the tests). The topology has no key for GSO, so the
no-GSO session wraps the lab's command builder and appends `--no-gso` to the netfront's argv,
and switches TSO/GSO/GRO off on the wire peer's veth (as the veth path does on both ends).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from shared.lab.bench.measure import Sample, read_end
from shared.lab.bench.modes import parse, select
from shared.lab.bench.paths import Endpoints, NetnsEndpoint, Path, PathContext
from shared.lab.bench.veth import offloads_off
from shared.lab.commands import default_commands
from shared.lab.netns import Lab
from shared.lab.topology import Guest, Topology, loads
from shared.plumbing.control.client import query


def topology_yaml(ctx: PathContext, mode: str | None = None) -> str:
    """A one-guest topology in `ctx`'s names and subnet, with `mode`'s guest keys
    (``shared.lab.bench.modes``: a mechanism and its options; none without a mode, for a
    path that puts something else between the two TAPs)."""
    pre = ctx.prefix
    keys = parse(mode).guest_yaml() if mode else ""
    return (f"bridge: {pre}br0\nhost_netns: {pre}-host\n"
            f"wire: {{netns: {pre}-wire, ip: {ctx.ip(1)}/24, iperf_server: true, "
            f"host_if: {pre}br0-wire}}\n"
            f"guests:\n  - {{name: {pre}-g1, domid: 211, mac: \"02:00:00:00:b2:11\", "
            f"ip: {ctx.ip(11)}/24{keys}}}\n")


def no_gso_commands(topo: Topology, g: Guest) -> tuple[list[str], list[str]]:
    """The lab's command lines with `--no-gso` for the netfront (no topology key for it)."""
    back, front = default_commands(topo, g)
    return back, [*front, "--no-gso"]


@dataclass
class PvnetNetnsPath:
    ctx: PathContext
    mode: str
    path: str = "pvnet-netns"
    note: str = ""
    _lab: Lab | None = None
    _ends: dict[str, FsPath] = field(default_factory=dict)
    _session: int = 0
    _gso: bool = True
    _capture: subprocess.Popen | None = None

    def _topology(self) -> Topology:
        state = self.ctx.state_dir / f"{self.ctx.prefix}-pvnet"
        return loads(topology_yaml(self.ctx, self.mode), state_dir=state)

    def setup(self, gso: bool) -> Endpoints:
        topo = self._topology()
        commands = default_commands if gso else no_gso_commands
        self._lab = Lab(topo, commands=commands, say=self.ctx.log)
        self._lab.down()  # sweep whatever a crashed earlier run left under our names
        shutil.rmtree(topo.state_dir / "log", ignore_errors=True)  # logs of this session only
        self._session += 1
        self._gso = gso
        self._lab.up(timeout=30)
        g = topo.guests[0]
        self._ends = {"front": topo.frontend_ctl(g), "back": topo.backend_ctl(g)}
        self.note = "gso on"
        if not gso:
            # Like veth's "both ends": the peer sends MTU frames too, so the RX ring sees MTU
            # frames whatever the bridge and the vif TAP would otherwise hand the backend.
            self.note = ("gso off: netfront --no-gso; peer "
                         + offloads_off(topo.wire.netns, topo.wire.dev))
        if parse(self.mode).capture is not None:  # a reader for the whole session, to set
            self._start_capture(topo, g)           # the cost of a capture beside the same mode
        return Endpoints(NetnsEndpoint(g.netns, str(g.ip.ip)),
                         NetnsEndpoint(topo.wire.netns, str(topo.wire.ip.ip)))

    def _start_capture(self, topo: Topology, g: Guest) -> None:
        """A real reader on the vif, writing pcapng to /dev/null, attached before traffic."""
        self._capture = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "capture", g.vif, "--dir", str(topo.state_dir),
             "-s", str(parse(self.mode).capture), "--buffer-kb", "8192", "-w", os.devnull],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while query(str(topo.backend_ctl(g)), {"cmd": "stats"})["counters"].get(
                "capture_readers") != 1:
            if time.monotonic() > deadline or self._capture.poll() is not None:
                raise RuntimeError("pvnet capture did not attach")
            time.sleep(0.05)
        self.note += f"; capture -s {parse(self.mode).capture}"

    def _stop_capture(self) -> None:
        cap, self._capture = self._capture, None
        if cap is None:
            return
        cap.send_signal(signal.SIGINT)
        try:
            _, err = cap.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            cap.kill()
            _, err = cap.communicate()
        lines = err.strip().splitlines()
        self.ctx.log(f"{self.mode}: pvnet capture: {lines[-1] if lines else '(no summary)'}")

    def sample(self) -> Sample:
        s = Sample()
        for end, ctl in self._ends.items():
            reply = query(str(ctl), {"cmd": "stats"}, timeout=3.0)
            s.rings[end] = reply["rings"]
            s.procs[end] = read_end(reply)
        back = s.rings["back"]
        s.frames = {"tx": int(back["tx"]["tx_packets"]), "rx": int(back["rx"]["rx_packets"])}
        return s

    def teardown(self) -> None:
        if self._lab is None:
            return
        lab, self._lab = self._lab, None
        try:
            self._stop_capture()
            self._keep_logs(lab.topo)
        finally:
            lab.down()

    def _keep_logs(self, topo: Topology) -> None:
        """Copy the netback/netfront logs next to the results, one dir per session."""
        src = topo.state_dir / "log"
        if self.ctx.results is None or not src.is_dir():
            return
        dst = self.ctx.results / "logs" / f"{self.mode}-{'gso' if self._gso else 'nogso'}"
        shutil.copytree(src, dst.with_name(f"{dst.name}-{self._session}"), dirs_exist_ok=True)


def pvnet_netns_paths(ctx: PathContext) -> list[Path]:
    return [PvnetNetnsPath(ctx, m.name) for m in select(ctx.modes)]
