"""The `veth` path: two namespaces joined by a veth pair -- the host stack's ceiling.

Both ends are created fresh for every session so their offloads are the kernel's defaults
(recorded in the records' `note`: TSO/GSO on, GRO off on this kernel); only the no-GSO session
switches TSO, GSO and GRO off on both ends with ethtool, to match what pvnet does with
--no-gso (MTU-sized frames end to end).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from pyroute2 import netns as pnetns

from shared.lab import deps, procs
from shared.lab.bench.measure import Sample
from shared.lab.bench.paths import (
    IPERF_PORT,
    Endpoints,
    NetnsEndpoint,
    Path,
    PathContext,
)
from shared.lab.plumbing import rtnl

DEV = "eth0"


def ensure_ethtool() -> None:
    """apt-get install ethtool if it is missing (deps.ensure: --no-install-recommends)."""
    deps.ensure(["ethtool"])


def ethtool(ns: str, *args: str) -> str:
    p = subprocess.run(["ip", "netns", "exec", ns, "ethtool", *args], capture_output=True,
                       text=True, timeout=10, check=True)
    return p.stdout


def offload_summary(ns: str, dev: str) -> str:
    """'tso on, gso on, gro off' for a device, from `ethtool -k` (what the run really had)."""
    feats = {}
    for line in ethtool(ns, "-k", dev).splitlines():
        key, _, value = line.partition(":")
        feats[key.strip()] = value.split()[0] if value.split() else "?"
    names = {"tcp-segmentation-offload": "tso", "generic-segmentation-offload": "gso",
             "generic-receive-offload": "gro"}
    return ", ".join(f"{short} {feats.get(long, '?')}" for long, short in names.items())


def offloads_off(ns: str, dev: str) -> str:
    """TSO, GSO and GRO off on ``dev`` in ``ns`` (a no-GSO session's MTU frames end to end);
    what it then has, as ``offload_summary`` says it."""
    ensure_ethtool()
    ethtool(ns, "-K", dev, "tso", "off", "gso", "off", "gro", "off")
    return offload_summary(ns, dev)


def wait_listening(ns: str, port: int, timeout: float = 5.0) -> None:
    """Wait until a TCP socket listens on `port` in `ns` (/proc/net/tcp{,6} seen from inside;
    iperf3 listens on a dual-stack IPv6 socket)."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/tcp", "/proc/net/tcp6"],
                           capture_output=True, text=True, timeout=5, check=False)
        if any(want in line and line.split()[3] == "0A" for line in p.stdout.splitlines()
               if len(line.split()) > 3):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} in netns {ns} after {timeout:g} s")


def link_frames(ns: str, dev: str, counter: str = "rx_packets") -> int:
    """A packet counter of `dev` in namespace `ns` (IFLA_STATS64); any path may use it."""
    with rtnl(ns) as h:
        link = h.get_links(h.link_lookup(ifname=dev)[0])[0]
        return int(link.get_attr("IFLA_STATS64")[counter])


@dataclass
class VethPath:
    """Guest namespace <prefix>-va and peer <prefix>-vb, each with an `eth0` end of one veth."""

    ctx: PathContext
    path: str = "veth"
    mode: str = "-"
    note: str = ""
    _stop: list = field(default_factory=list)

    @property
    def guest_ns(self) -> str:
        return f"{self.ctx.prefix}-va"

    @property
    def peer_ns(self) -> str:
        return f"{self.ctx.prefix}-vb"

    def setup(self, gso: bool) -> Endpoints:
        self.teardown()  # a crashed earlier run may have left our namespaces behind
        g, p = self.guest_ns, self.peer_ns
        for ns in (g, p):
            pnetns.create(ns)
            _ip(ns, "link", "set", "lo", "up")
            _no_ipv6(ns)
        _ip(g, "link", "add", DEV, "type", "veth", "peer", "name", DEV, "netns", p)
        for ns, host in ((g, 11), (p, 1)):
            _ip(ns, "addr", "add", f"{self.ctx.ip(host)}/24", "dev", DEV)
            _ip(ns, "link", "set", DEV, "up")
        if not gso:
            for ns in (g, p):
                offloads_off(ns, DEV)
        if shutil.which("ethtool"):
            self.note = offload_summary(g, DEV)
        else:
            self.note = "offloads: kernel defaults"
        self.ctx.state_dir.mkdir(parents=True, exist_ok=True)
        pidfile = self.ctx.state_dir / f"{self.ctx.prefix}-veth-iperf3.pid"
        procs.spawn(["ip", "netns", "exec", p, "iperf3", "-s", "-p", str(IPERF_PORT)],
                    log=self.ctx.state_dir / "veth-iperf3.log", pidfile=pidfile)
        wait_listening(p, IPERF_PORT)
        self.ctx.log(f"veth: {g}:{DEV} <-> {p}:{DEV} up ({self.note}), iperf3 -s in {p}")
        return Endpoints(NetnsEndpoint(g, self.ctx.ip(11)), NetnsEndpoint(p, self.ctx.ip(1)))

    def sample(self) -> Sample:
        return Sample(frames={"tx": link_frames(self.peer_ns, DEV),
                              "rx": link_frames(self.guest_ns, DEV)})

    def teardown(self) -> None:
        procs.stop_pidfile(self.ctx.state_dir / f"{self.ctx.prefix}-veth-iperf3.pid")
        existing = set(pnetns.listnetns())
        for ns in (self.guest_ns, self.peer_ns):
            if ns in existing:
                procs.terminate(procs.pids_in_netns(ns))
                with contextlib.suppress(OSError):
                    pnetns.remove(ns)  # takes the veth with it


def _no_ipv6(ns: str) -> None:
    """Before the veth exists, so it inherits it: no IPv6 autoconf/ND in the frame counters."""
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1"], check=False)


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)


def veth_paths(ctx: PathContext) -> list[Path]:
    return [VethPath(ctx)]
