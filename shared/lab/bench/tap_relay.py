"""The `tap-relay` path: pvnet's topology with the split driver replaced by the least a Python
driver over the same two TAPs can do - the floor under pvnet's per-frame cost.

pvnet's ends spend a frame's CPU in three places: the kernel's work in their TAP system calls
(in a TAP write the receiving stack runs inline), the interpreter's minimum per frame (a
system call from Python, a loop turn), and everything the split driver adds (rings, grants,
header slots, the mechanisms). Only the last is pvnet's to cut. This path measures the first
two together: one process, started in the guest's namespace, opens the guest's TAP (the
netfront's: same name, MAC, address, GSO cap, offloads) and then, in the host namespace, the
vif TAP on the bridge (the netback's), and copies every frame from one to the other with one
``readv`` and one ``write`` - virtio_net headers passed through as read, no ring, no grant, no
second process. Whatever pvnet-netns costs beyond this path, the split driver costs; a goal
below this path's figure is out of reach of any Python driver on these devices.

Run by the bench (`--paths tap-relay`); the process itself is ``python -m
shared.lab.bench.tap_relay --help``. Frames are counted by the vif's link counters (a frame
written into the vif is its ``rx_packets``, one read from it its ``tx_packets``), as a
netback's ring counters count them on the pvnet path.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path as FsPath

from shared.lab import procs
from shared.lab.bench.measure import Sample, read_proc
from shared.lab.bench.paths import Endpoints, NetnsEndpoint, Path, PathContext
from shared.lab.bench.pvnet_netns import topology_yaml
from shared.lab.bench.veth import link_frames, offloads_off
from shared.lab.netns import Lab
from shared.lab.topology import Topology, loads
from shared.plumbing.netdev import VIF_MAC, NetDevice, offload_flags
from shared.protocol.netif import GSO_MAX_SIZE

#: frames moved from one TAP per turn before the other gets its turn (the ends' budget)
BUDGET = 64
READY = "ready"


# --- the relay process ------------------------------------------------------------------------
class Relay:
    """The loop: ``run`` copies frames both ways, at most ``budget`` from one TAP per turn,
    until ``stop`` is set (a signal handler sets it; ``poll_s`` bounds how late it is seen)."""

    def __init__(self, guest_fd: int, vif_fd: int, budget: int = BUDGET,
                 poll_s: float = 0.2) -> None:
        self.peer = {guest_fd: (vif_fd, "to_vif"), vif_fd: (guest_fd, "to_guest")}
        self.budget, self.poll_s = budget, poll_s
        self.counts = {"to_vif": 0, "to_guest": 0, "dropped": 0}
        self.stop = False

    def run(self) -> dict[str, int]:
        """Until ``stop``; the frames moved each way and those a device refused."""
        ep = select.epoll()
        for fd in self.peer:
            ep.register(fd, select.EPOLLIN)
        buf = bytearray(0x10000 + 64)  # a vnet header and the largest GSO frame
        iov, mv = [buf], memoryview(buf)
        readv, write = os.readv, os.write
        peer, budget, counts = self.peer, self.budget, self.counts
        try:
            while not self.stop:
                for src_fd, _ in ep.poll(self.poll_s):
                    dst_fd, key = peer[src_fd]
                    moved = 0
                    while moved < budget:
                        try:
                            n = readv(src_fd, iov)
                        except BlockingIOError:
                            break
                        try:
                            write(dst_fd, mv[:n])
                        except OSError:
                            counts["dropped"] += 1  # a full or downed device: the frame is lost
                        moved += 1
                    counts[key] += moved
        finally:
            ep.close()
        return counts


def open_ends(args: argparse.Namespace) -> tuple[NetDevice, NetDevice]:
    """The guest's TAP here (the process starts in the guest's namespace), then the vif in
    the host namespace: a TAP's fd keeps the namespace it was created in."""
    offload = offload_flags(args.gso, args.gso, csum=True)
    guest = NetDevice.open(args.guest_tap, mac=args.mac, ip=args.ip,
                           gso_max_size=GSO_MAX_SIZE)
    guest.set_offload(offload)
    if args.host_netns:
        from pyroute2.netns import setns

        setns(args.host_netns, flags=0)
    vif = NetDevice.open(args.vif, mac=VIF_MAC, master=args.bridge)
    vif.set_offload(offload)
    return guest, vif


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m shared.lab.bench.tap_relay",
        description="Copy frames between a guest's TAP and a vif TAP on a bridge, one readv "
                    "and one write per frame: the bench's tap-relay path (the floor of a "
                    "Python split driver over TAPs). Start it inside the guest's namespace "
                    "(ip netns exec); it prints 'ready' once both TAPs are up and stops on "
                    "SIGTERM or SIGINT, printing the frames it moved.")
    p.add_argument("--guest-tap", default="eth0", help="the guest's TAP (default eth0)")
    p.add_argument("--mac", required=True, help="the guest TAP's MAC")
    p.add_argument("--ip", required=True, help="the guest TAP's address, a.b.c.d/len")
    p.add_argument("--vif", required=True, help="the vif TAP to create on the bridge")
    p.add_argument("--bridge", required=True, help="the bridge the vif joins")
    p.add_argument("--host-netns", default="", help="the bridge's namespace (default: this one)")
    p.add_argument("--no-gso", dest="gso", action="store_false",
                   help="offer no TSO on either TAP (MTU frames both ways, as netfront --no-gso)")
    args = p.parse_args(argv)
    try:
        guest, vif = open_ends(args)
    except (OSError, ValueError) as exc:  # not root, a name taken, no such bridge or netns
        print(f"tap-relay: cannot set up {args.guest_tap} and {args.vif}: {exc}",
              file=sys.stderr)
        return 1
    relay = Relay(guest.fd, vif.fd)

    def on_signal(_sig: int, _frame: object) -> None:
        relay.stop = True

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    print(READY, flush=True)
    try:
        counts = relay.run()
    finally:
        guest.close()
        vif.close()
    print(f"tap-relay: {counts['to_vif']} frames to the vif, {counts['to_guest']} to the "
          f"guest, {counts['dropped']} dropped", file=sys.stderr)
    return 0


# --- the path ---------------------------------------------------------------------------------
@dataclass
class TapRelayPath:
    ctx: PathContext
    path: str = "tap-relay"
    mode: str = "-"
    note: str = ""
    _lab: Lab | None = None
    _topo: Topology | None = None
    _proc: subprocess.Popen | None = None

    def setup(self, gso: bool) -> Endpoints:
        # pvnet-netns's topology (names, subnet, MAC): only the driver between the TAPs differs
        topo = self._topo = loads(topology_yaml(self.ctx),
                                  state_dir=self.ctx.state_dir / f"{self.ctx.prefix}-relay")
        self._lab = Lab(topo, say=self.ctx.log)
        self._lab.down()  # sweep whatever a crashed earlier run left under our names
        self._lab.up(processes=False)
        g = topo.guests[0]
        argv = ["ip", "netns", "exec", g.netns, sys.executable, "-m", "shared.lab.bench.tap_relay",
                "--mac", g.mac, "--ip", str(g.ip), "--vif", g.vif, "--bridge", topo.bridge,
                "--host-netns", topo.host_netns or ""]
        if not gso:
            argv.append("--no-gso")
        log = topo.state_dir / "log" / "tap-relay.log"
        with open(log, "ab") as err:
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                          stdin=subprocess.DEVNULL, text=True,
                                          start_new_session=True,
                                          cwd=FsPath(__file__).resolve().parents[3])
        self._wait_ready(log)
        self.note = "gso on"
        if not gso:  # as pvnet-netns: the peer sends MTU frames too
            self.note = "gso off: no TSO on the TAPs; peer " + offloads_off(
                topo.wire.netns, topo.wire.dev)
        self.ctx.log(f"tap-relay: {g.netns}:eth0 <-> {g.vif} on {topo.bridge} "
                     f"(pid {self._proc.pid}, {self.note})")
        return Endpoints(NetnsEndpoint(g.netns, str(g.ip.ip)),
                         NetnsEndpoint(topo.wire.netns, str(topo.wire.ip.ip)))

    def _wait_ready(self, log: FsPath, timeout: float = 15.0) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        ready = select.poll()
        ready.register(proc.stdout, select.POLLIN)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.poll(100) and proc.stdout.readline().strip() == READY:
                return
            if proc.poll() is not None:
                break
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"tap-relay did not come up within {timeout:g} s: "
                           + (" | ".join(tail) or "no output"))

    def sample(self) -> Sample:
        topo = self._topo
        assert topo is not None and self._proc is not None
        vif, ns = topo.guests[0].vif, topo.host_netns or ""
        return Sample(frames={"tx": link_frames(ns, vif, "rx_packets"),
                              "rx": link_frames(ns, vif, "tx_packets")},
                      procs={"back": read_proc(self._proc.pid)})

    def teardown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            procs.stop_group(proc, timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        lab, self._lab = self._lab, None
        if lab is not None:
            lab.down()


def tap_relay_paths(ctx: PathContext) -> list[Path]:
    return [TapRelayPath(ctx)]


if __name__ == "__main__":
    sys.exit(main())
