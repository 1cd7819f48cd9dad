"""The no-VM placement: the lab built from network namespaces on this host.

`Lab.up()` builds the lab (docs/lab.md) with a namespace standing in for each guest: the
bridge (in `host_netns`, see default.yaml for why), the wire peer behind a veth with an iperf3
server, one namespace per guest with its own iperf3 server, then one netback per guest on the
host side and one netfront inside the guest namespace, and waits until both ends say
Connected. Every step is idempotent and prints one line. `Lab.down()` removes all of it --
also after a crash or a half-finished `up` -- sweeping by topology names, state.json, pidfiles,
argv and namespace membership, and never touching a name the topology does not own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import netns as pnetns

from shared.lab import procs
from shared.lab.commands import REPO_ROOT, CommandBuilder, default_commands
from shared.lab.errors import LabError
from shared.lab.plumbing import (
    bridge_nf_on,
    disable_ipv6_on,
    ensure_addr,
    is_socket,
    link_kinds,
    netns_exec,
    rtnl,
)
from shared.lab.state import LabState
from shared.lab.topology import Guest, Topology
from shared.plumbing.control.client import ControlError, query

LOG_TAIL_LINES = 25

Say = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"  (no log at {path})"
    body = "\n".join(f"  | {ln}" for ln in text[-lines:]) or "  | (empty)"
    return f"  last {min(lines, len(text))} lines of {path}:\n{body}"


class Lab:
    """The namespace lab for one topology. `commands` builds the data-process command lines."""

    def __init__(self, topo: Topology, *, commands: CommandBuilder = default_commands,
                 say: Say = _say, kill_timeout: float = 5.0) -> None:
        self.topo = topo
        self.commands = commands
        self.say = say
        self.kill_timeout = kill_timeout
        self.state = LabState.load(topo.state_file)
        self._spawned: dict[str, subprocess.Popen[bytes]] = {}

    # -- up --------------------------------------------------------------------------------
    def up(self, *, processes: bool = True, timeout: float = 30.0,
           guest_netns: bool = True) -> None:
        """Create everything (idempotently); with `processes`, start the data path and wait.
        Without `guest_netns` only the host side is made (the QEMU placement's guests are VMs)."""
        _require_root()
        t = self.topo
        for g in t.guests if guest_netns else ():
            if g.nic != "pvnet":
                raise LabError(f"guest {g.name}: nic {g.nic} needs the QEMU placement "
                               "(invoke up without --no-vm)")
            if g.event == "doorbell":  # an ivshmem device: there is none without QEMU
                raise LabError(f"guest {g.name}: event doorbell needs the QEMU placement "
                               "(invoke up without --no-vm)")
        t.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(t.state_dir, 0o755)
        (t.state_dir / "log").mkdir(exist_ok=True)
        self.state.data.update(topology=t.source, state_dir=str(t.state_dir))
        self.state.save()
        self.say(f"state dir {t.state_dir}: ready")
        if t.host_netns:
            self._netns(t.host_netns, bridge_host=True)
        elif bridge_nf_on(None):
            self.say("note: bridge-nf-call-iptables=1 in the root namespace: the bridge will trim "
                     "Ethernet padding (host_netns keeps frames bit for bit)")
        self._bridge()
        self._netns(t.wire.netns)
        self._wire()
        if t.wire.iperf_server:
            self._iperf_server(t.wire.netns)
        for g in t.guests if guest_netns else ():
            self._netns(g.netns)
            self._iperf_server(g.netns)
        if processes:
            for g in t.guests:
                self._start_pair(g, timeout)
            self._wait_connected(timeout)

    def _netns(self, name: str, *, bridge_host: bool = False) -> None:
        self.state.add("netns", name)
        existed = name in pnetns.listnetns()
        if not existed:
            pnetns.create(name)
        with rtnl(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        settings = []
        if not self.topo.ipv6:
            # Before any device exists, so TAPs/veths created later inherit it: no IPv6
            # autoconf/ND chatter in the counters.
            settings += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        if bridge_host:
            # br_netfilter is on by default in *every* namespace on this kernel (new namespaces
            # are said to have 0; measured 1 on 6.18) and then trims Ethernet padding off
            # bridged IPv4 frames. These sysctls are per namespace: ours only.
            settings += [f"net.bridge.bridge-nf-call-{x}=0"
                         for x in ("iptables", "ip6tables", "arptables")]
        if settings:
            subprocess.run([*netns_exec(name), "sysctl", "-qw", *settings], check=False)
        if bridge_host and bridge_nf_on(name):
            raise LabError(f"netns {name}: could not turn off bridge-nf-call-iptables")
        extra = ", bridge-nf off" if bridge_host else ""
        self.say(f"netns {name}: {'exists' if existed else 'created'}, lo up{extra}")

    def _bridge(self) -> None:
        t = self.topo
        where = f" (netns {t.host_netns})" if t.host_netns else ""
        self.state.add("links", [t.host_netns, t.bridge, "bridge"])
        with rtnl(t.host_netns) as h:
            links = link_kinds(h)
            if t.bridge in links:
                if links[t.bridge][1] != "bridge":
                    raise LabError(f"{t.bridge}{where} exists but is a {links[t.bridge][1]}, "
                                   "not a bridge; pvnet will not touch it")
                verb = "exists"
            else:
                h.link("add", ifname=t.bridge, kind="bridge")
                verb = "created"
            idx = h.link_lookup(ifname=t.bridge)[0]
            h.link("set", index=idx, state="up")
            if not t.ipv6 and not t.host_netns:
                disable_ipv6_on(t.bridge)
        self.say(f"bridge {t.bridge}{where}: {verb}, up")

    def _wire(self) -> None:
        t, w = self.topo, self.topo.wire
        self.state.add("links", [t.host_netns, w.host_if, "veth"])
        with rtnl(t.host_netns) as h:
            links = link_kinds(h)
            if w.host_if in links and links[w.host_if][1] != "veth":
                raise LabError(f"{w.host_if} exists but is not a veth; pvnet will not touch it")
            created = w.host_if not in links
            if created:
                with rtnl(w.netns) as wn:
                    if w.dev in link_kinds(wn):
                        raise LabError(f"netns {w.netns} already has a {w.dev} that is not ours")
                h.link("add", ifname=w.host_if, kind="veth",
                       peer={"ifname": w.dev, "net_ns_fd": w.netns})
            if not t.ipv6 and not t.host_netns:
                disable_ipv6_on(w.host_if)
            br = h.link_lookup(ifname=t.bridge)[0]
            h.link("set", index=h.link_lookup(ifname=w.host_if)[0], master=br, state="up")
        with rtnl(w.netns) as wn:
            found = wn.link_lookup(ifname=w.dev)
            if not found:
                raise LabError(f"veth {w.host_if} exists but its peer is not {w.netns}:{w.dev}; "
                               "run down first")
            ensure_addr(wn, found[0], w.ip)
            wn.link("set", index=found[0], state="up")
        self.say(f"wire veth {w.host_if} (on {t.bridge}) <-> {w.netns}:{w.dev} {w.ip}: "
                 f"{'created' if created else 'exists'}, up")

    def _iperf_server(self, ns: str) -> None:
        name = f"iperf3-{ns}"
        pidfile = self.topo.pidfile(name)
        self.state.add("pidfiles", str(pidfile))
        rec = procs.read_pidfile(pidfile)
        if rec is not None and rec.alive():
            self.say(f"iperf3 server in {ns}: running (pid {rec.pid})")
            return
        if shutil.which("iperf3") is None:
            raise LabError("iperf3 not found (apt-get install iperf3)")
        proc = procs.spawn([*netns_exec(ns), "iperf3", "-s"], log=self.topo.log_path(name),
                           pidfile=pidfile)
        self._spawned[name] = proc
        self.say(f"iperf3 server in {ns}: started (pid {proc.pid})")

    # -- data path processes ---------------------------------------------------------------
    def _spawn_data(self, role: str, name: str, argv: list[str], ctl: Path,
                    pass_fds: tuple[int, ...] = ()) -> None:
        pidfile = self.topo.pidfile(name)
        self.state.add("pidfiles", str(pidfile))
        self.state.add("sockets", str(ctl))
        rec = procs.read_pidfile(pidfile)
        if rec is not None and rec.alive():
            self.say(f"{role} {name}: running (pid {rec.pid})")
            return
        with contextlib.suppress(FileNotFoundError):
            if is_socket(ctl):
                ctl.unlink()  # left behind by a crashed run; the new process must bind it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = self.topo.log_path(name)
        self._spawned[name] = procs.spawn(argv, log=log, pidfile=pidfile, cwd=REPO_ROOT, env=env,
                                          pass_fds=pass_fds)
        self.say(f"{role} {name}: started (pid {self._spawned[name].pid}, log {log})")

    def _start_pair(self, g: Guest, timeout: float) -> None:
        t = self.topo
        back, front = self.commands(t, g)
        ev = t.event_socket(g)
        self.state.add("sockets", str(ev))
        rec = procs.read_pidfile(t.pidfile(g.vif))
        if (rec is None or not rec.alive()) and is_socket(ev):
            ev.unlink()  # left by a crashed netback; the new one must bind it
        self._spawn_data("netback", g.vif, back, t.backend_ctl(g))
        self.say(f"netback {g.vif}: waiting for its control socket")
        self._wait(lambda: _ping(t.backend_ctl(g)), timeout, [g.vif],
                   f"netback {g.vif} did not open {t.backend_ctl(g)}")
        self._spawn_data("netfront", g.name, front, t.frontend_ctl(g))

    def _wait_connected(self, timeout: float) -> None:
        ends = [(g.vif, self.topo.backend_ctl(g)) for g in self.topo.guests] + [
            (g.name, self.topo.frontend_ctl(g)) for g in self.topo.guests]
        self.say(f"waiting for {len(ends)} ends to reach Connected (timeout {timeout:g} s)")
        start = time.monotonic()
        states: dict[str, str] = {}

        def all_connected() -> bool:
            for name, ctl in ends:
                try:
                    states[name] = str(query(ctl, {"cmd": "stats"}, timeout=1.0).get("state"))
                except ControlError as exc:
                    states[name] = f"unreachable ({exc})"
            return all(s == "Connected" for s in states.values())

        self._wait(all_connected, timeout, [n for n, _ in ends], "not all ends reached Connected",
                   states)
        self.say(f"all {len(ends)} ends Connected ({time.monotonic() - start:.1f} s)")

    def _wait(self, ready: Callable[[], bool], timeout: float, names: list[str], what: str,
              states: dict[str, str] | None = None) -> None:
        """Poll `ready` until true; fail early if a process we started dies, or at timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            for name in names:
                if self._dead(name):
                    raise LabError(self._failure(f"{name} exited ({self._dead(name)}) — {what}",
                                                 names, states))
            if time.monotonic() >= deadline:
                raise LabError(self._failure(f"timeout after {timeout:g} s: {what}", names,
                                             states))
            time.sleep(0.1)

    def _dead(self, name: str) -> str:
        """Non-empty reason if process `name` is not running."""
        proc = self._spawned.get(name)
        if proc is not None:
            rc = proc.poll()
            return "" if rc is None else f"status {rc}"
        rec = procs.read_pidfile(self.topo.pidfile(name))
        return "" if rec is not None and rec.alive() else "not running"

    def _failure(self, headline: str, names: list[str], states: dict[str, str] | None) -> str:
        lines = [headline]
        for name in names:
            if states and name in states:
                lines.append(f"  {name}: state {states[name]}")
        for name in names:
            if states is None or states.get(name) != "Connected" or self._dead(name):
                lines.append(log_tail(self.topo.log_path(name)))
        lines.append("the lab is left as it is for inspection; `invoke down` removes it")
        return "\n".join(lines)

    # -- down ------------------------------------------------------------------------------
    def down(self) -> None:
        """Remove every process, device, namespace, socket and pidfile of this topology."""
        _require_root()
        t, removed = self.topo, []

        def did(msg: str) -> None:
            removed.append(msg)
            self.say(msg)

        namespaces = list(dict.fromkeys([*t.namespaces, *self.state.data.get("netns", [])]))
        existing_ns = set(pnetns.listnetns())
        pidfiles = {Path(p) for p in self.state.data.get("pidfiles", [])}
        if t.state_dir.is_dir():
            pidfiles |= set(t.state_dir.glob("*.pid"))
        # frontends first (a clean disconnect for the backends), then backends, then the rest
        rank = {**{g.name: 0 for g in t.guests}, **{g.vif: 1 for g in t.guests}}
        for pf in sorted(pidfiles, key=lambda p: (rank.get(p.stem, 2), p.name)):
            existed, rec = pf.exists(), procs.read_pidfile(pf)
            pids = procs.stop_pidfile(pf, self.kill_timeout)
            if pids and rec is not None:
                more = f", {len(pids)} processes in its group" if len(pids) > 1 else ""
                did(f"stopped {pf.stem} (pid {rec.pid}{more}), removed {pf}")
            elif existed:
                did(f"removed stale pidfile {pf}")
        strays: set[int] = set()
        for ctl in self._socket_paths():
            strays.update(procs.pids_with_args("--ctl", str(ctl)))
        for ns in namespaces:
            if ns in existing_ns:
                strays.update(procs.pids_in_netns(ns))
        strays.discard(os.getpid())
        if strays:
            procs.terminate(strays, self.kill_timeout)
            did(f"stopped {len(strays)} stray processes ({', '.join(map(str, sorted(strays)))})")
        self._remove_links(namespaces, existing_ns, did)
        for ns in namespaces:
            if ns in existing_ns:
                with rtnl(ns) as h:
                    inside = [f"{kind or 'link'} {name}"
                              for name, (_, kind) in link_kinds(h).items() if name != "lo"]
                pnetns.remove(ns)
                did(f"removed netns {ns}" + (f" (with {', '.join(inside)})" if inside else ""))
        for path in self._socket_paths():
            if is_socket(path):
                path.unlink()
                did(f"removed socket {path}")
        for path in (t.state_file, t.state_file.with_suffix(".tmp")):
            if path.exists():
                path.unlink()
                did(f"removed {path}")
        if not removed:
            self.say("nothing to remove")

    def _socket_paths(self) -> list[Path]:
        t = self.topo
        paths = [p for g in t.guests for p in (t.event_socket(g), t.backend_ctl(g),
                                               t.frontend_ctl(g))]
        paths += [Path(p) for p in self.state.data.get("sockets", [])]
        return list(dict.fromkeys(paths))

    def _remove_links(self, namespaces: list[str], existing_ns: set[str],
                      did: Callable[[str], None]) -> None:
        """Delete our links in the host namespace, checking kinds; netns removal does the rest."""
        t = self.topo
        wanted = {(t.host_netns, t.bridge, "bridge"), (t.host_netns, t.wire.host_if, "veth")}
        wanted |= {(t.host_netns, g.vif, "tun") for g in t.guests}
        wanted |= {tuple(x) for x in self.state.data.get("links", [])}  # type: ignore[misc]
        for ns, ifname, kind in sorted(wanted, key=lambda x: (x[0] or "", x[2] == "bridge")):
            if ns is not None and (ns in namespaces or ns not in existing_ns):
                continue  # goes away with its namespace (or is already gone)
            with rtnl(ns) as h:
                links = link_kinds(h)
                if ifname in links and links[ifname][1] == kind:
                    h.link("del", index=links[ifname][0])
                    did(f"removed {kind} {ifname}")
                elif ifname in links:
                    self.say(f"left {ifname} alone: it is a {links[ifname][1]}, not our {kind}")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the netns lab needs root (network namespaces, bridges, TAPs)")


def _ping(ctl: Path) -> bool:
    try:
        query(ctl, {"cmd": "ping"}, timeout=0.5)
        return True
    except ControlError:
        return False

