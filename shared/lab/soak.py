"""Soak: verified traffic through a namespace lab while its netfronts and netbacks are killed
(SIGKILL) and respawned with the same command line, checking after every restart that
nothing leaked.

Three parts, each usable alone (the restart and leak tests use the first two):

* ``Chaos``: kill one end of a guest's pair and start it again from its pidfile's argv, as a
  supervisor would; wait for both ends to reach Connected again.
* ``Inspector``: what each end holds, seen from outside: fds and memfd mappings from /proc,
  maps/grants/slots from the stats, vifs/TAPs/namespaces from netlink. It turns "nothing
  leaks" into numbers: ``Leaks`` counts per kind (fds, maps, grants, devices, processes).
* ``Soak``: per guest, a stream of sha256-verified TCP transfers alternating direction
  (``python -m shared.lab.soak recv|send`` agents inside the namespaces), a chaos loop,
  a progress line per minute and a JSON report.

``invoke soak --minutes N [--json FILE]`` runs it on a private topology (pvs-*, 10.86.0.0/24).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared.control import ControlError, query
from shared.lab import procs
from shared.lab.commands import REPO_ROOT
from shared.lab.netns import Lab
from shared.lab.plumbing import netns_exec, rtnl
from shared.lab.topology import Guest, Topology, loads

CHUNK = 64 * 1024
RECV_PORT = 5998
#: a transfer whose connection moves no byte for this long counts as a lost connection
STALL_TIMEOUT = 60.0

SOAK_TOPOLOGY = """\
bridge: {p}br0
host_netns: {p}-host
state_dir: {state}
wire: {{netns: {p}-wire, ip: {net}.1/24, iperf_server: false, host_if: {p}br0-wire}}
guests:
  - {{name: {p}-g1, domid: 61, mac: "02:00:00:00:06:01", ip: {net}.11/24, tx_mode: lazy}}
  - {{name: {p}-g2, domid: 62, mac: "02:00:00:00:06:02", ip: {net}.12/24, tx_mode: map,
     persistent: true}}
"""


def soak_topology(prefix: str = "pvs", net: str = "10.86.0",
                  state_dir: str | Path | None = None) -> Topology:
    """The soak's own lab: private names and subnet, so it runs beside a real lab. Its
    processes' logs stay in ``<state_dir>/log`` (default /run/<prefix>-soak) after it ends."""
    state = Path(state_dir) if state_dir else Path("/run") / f"{prefix}-soak"
    return loads(SOAK_TOPOLOGY.format(p=prefix, net=net, state=state), state_dir=state)


# --- seeing what a process holds ------------------------------------------------------------
def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def memfd_maps(pid: int) -> int | None:
    """Distinct memfd files a process maps (a grant region is one)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return len({line.split()[4] for line in f if "/memfd:" in line})
    except OSError:
        return None


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def settle(read: Callable[[], int | None], want: int, timeout: float = 3.0) -> int | None:
    """Re-read until ``read()`` equals ``want`` or ``timeout`` passes; the last value. A count
    taken while the process is still closing something (a control client) must not be
    reported as a leak, a count that stays wrong must."""
    end = time.monotonic() + timeout
    while True:
        v = read()
        if v == want or time.monotonic() > end:
            return v
        time.sleep(0.05)


@dataclass
class Leaks:
    """What was left behind, per kind. Every field must be 0."""

    fds: int = 0
    maps: int = 0
    grants: int = 0
    devices: int = 0
    processes: int = 0
    details: list[str] = field(default_factory=list)

    def add(self, kind: str, n: int, why: str) -> None:
        if n:
            setattr(self, kind, getattr(self, kind) + n)
            self.details.append(f"{kind} +{n}: {why}")

    def merge(self, other: Leaks) -> None:
        for k in ("fds", "maps", "grants", "devices", "processes"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.details.extend(other.details)

    @property
    def total(self) -> int:
        return self.fds + self.maps + self.grants + self.devices + self.processes

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "details"}


@dataclass
class Inspector:
    """Leak checks on a running namespace lab, from /proc, the stats and netlink."""

    topo: Topology
    #: fd counts of each end when connected: (role, guest) -> n, learnt at the first look
    baseline: dict[tuple[str, str], int] = field(default_factory=dict)

    def stats(self, g: Guest, role: str, timeout: float = 2.0) -> dict:
        ctl = self.topo.backend_ctl(g) if role == "back" else self.topo.frontend_ctl(g)
        return query(str(ctl), {"cmd": "stats"}, timeout=timeout)

    def pid(self, g: Guest, role: str) -> int | None:
        rec = procs.read_pidfile(self.topo.pidfile(g.vif if role == "back" else g.name))
        return rec.pid if rec is not None and rec.alive() else None

    def learn(self) -> None:
        """Take the fd baselines now (every pair Connected and quiet)."""
        for g in self.topo.guests:
            for role in ("back", "front"):
                pid = self.pid(g, role)
                seen = []
                for _ in range(5 if pid else 0):  # the lowest: not a control client's fd
                    seen.append(fd_count(pid))
                    time.sleep(0.02)
                if seen and None not in seen:
                    self.baseline[(role, g.name)] = min(seen)

    def connected(self, g: Guest) -> Leaks:
        """Both ends Connected: fds as at the baseline, exactly one region mapped each, one
        process per end, one vif and one guest TAP."""
        leaks = Leaks()
        for role in ("back", "front"):
            pid = self.pid(g, role)
            if pid is None:
                leaks.add("processes", 1, f"{role} of {g.name} is not running")
                continue
            base = self.baseline.get((role, g.name))
            if base is not None:
                n = settle(lambda p=pid: fd_count(p), base)
                if n is not None and n > base:
                    leaks.add("fds", n - base, f"{role} {g.name} has {n} fds, {base} at start")
            m = settle(lambda p=pid: memfd_maps(p), 1)
            if m is not None and m > 1:
                leaks.add("maps", m - 1, f"{role} {g.name} maps {m} memfd regions")
            rm = self.stats(g, role).get("regions_mapped", 1)
            if rm > 1:
                leaks.add("maps", rm - 1, f"{role} {g.name} says regions_mapped={rm}")
        leaks.merge(self.processes(g, expect=1))
        leaks.merge(self.devices(g, expect=1))
        return leaks

    def released(self, g: Guest, timeout: float = 10.0) -> Leaks:
        """The backend after its frontend died: back to waiting, holding nothing of it."""
        leaks = Leaks()
        end = time.monotonic() + timeout
        while True:
            s = self.stats(g, "back")
            if s["state"] != "Connected" or time.monotonic() > end:
                break
            time.sleep(0.05)
        if s["state"] == "Connected":
            leaks.add("processes", 1, f"backend of {g.name} never noticed its frontend died")
            return leaks
        for ring in ("tx", "rx"):
            r = s["rings"][ring]
            for key, kind in (("maps_outstanding", "maps"), ("grants_in_use", "grants"),
                              ("grants_active", "grants"), ("slots_in_flight", "grants")):
                if r.get(key, 0):
                    leaks.add(kind, abs(r[key]), f"backend {g.name} {ring} {key}={r[key]}")
        if s.get("regions_mapped", 0):
            leaks.add("maps", s["regions_mapped"], f"backend {g.name} still maps the region")
        pid = self.pid(g, "back")
        if pid is not None:
            m = settle(lambda: memfd_maps(pid), 0)
            if m:
                leaks.add("maps", m, f"backend {g.name} /proc maps {m} memfds with no frontend")
        leaks.merge(self.devices(g, expect=1, guest_tap=None))
        return leaks

    def idle(self, g: Guest, timeout: float = 10.0) -> Leaks:
        """Traffic stopped: nothing in flight, no map outstanding, no header slot held."""
        leaks = Leaks()
        end = time.monotonic() + timeout
        while True:
            s = {role: self.stats(g, role) for role in ("back", "front")}
            busy = [s[r]["rings"][x]["slots_in_flight"] for r in s for x in ("tx", "rx")]
            busy.append(s["front"]["rings"]["tx"].get("header_slots_in_use", 0))
            if not any(busy) or time.monotonic() > end:
                break
            time.sleep(0.1)
        for role in s:
            for ring in ("tx", "rx"):
                r = s[role]["rings"][ring]
                if r["slots_in_flight"]:
                    leaks.add("grants", 1, f"{role} {g.name} {ring} slots_in_flight="
                                           f"{r['slots_in_flight']} at idle")
                if r.get("maps_outstanding", 0) and not (role == "back" and g.persistent):
                    leaks.add("maps", r["maps_outstanding"],
                              f"{role} {g.name} {ring} maps_outstanding at idle")
        if s["front"]["rings"]["tx"].get("header_slots_in_use", 0):
            leaks.add("grants", 1, f"front {g.name} header slots in use at idle")
        btx = s["back"]["rings"]["tx"]
        if btx["slots_consumed"] != btx["slots_released"]:
            leaks.add("grants", 1, f"back {g.name} tx slots consumed {btx['slots_consumed']} "
                                   f"!= released {btx['slots_released']}")
        return leaks

    def processes(self, g: Guest, expect: int) -> Leaks:
        """Exactly ``expect`` live processes per end (found by their unique --ctl argument)."""
        leaks = Leaks()
        for ctl in (self.topo.backend_ctl(g), self.topo.frontend_ctl(g)):
            pids = [p for p in procs.pids_with_args("--ctl", str(ctl))
                    if (st := procs.proc_stat(p)) is not None and st.state != "Z"]
            if len(pids) > expect:
                leaks.add("processes", len(pids) - expect, f"{len(pids)} processes serve {ctl}")
        return leaks

    def devices(self, g: Guest, expect: int, guest_tap: int | None = 1,
                timeout: float = 3.0) -> Leaks:
        """The vif in the host namespace and eth0 in the guest's: at most ``expect`` vifs
        and ``guest_tap`` TAPs (a device of a dead process may take a moment to go)."""
        leaks = Leaks()
        t = self.topo
        for ns, name, want in ((t.host_netns, g.vif, expect), (g.netns, "eth0", guest_tap)):
            if want is None:
                continue

            def count(ns=ns, name=name) -> int:
                with rtnl(ns) as h:
                    return len(h.link_lookup(ifname=name))

            n = settle(count, want, timeout)
            if n is not None and n > want:
                leaks.add("devices", n - want, f"{n} links {name} in {ns}")
        return leaks

    def down(self) -> Leaks:
        """After `down`: no namespace, process, socket or pidfile of this topology."""
        from pyroute2 import netns as pnetns

        leaks = Leaks()
        t = self.topo
        left = set(t.namespaces) & set(pnetns.listnetns())
        leaks.add("devices", len(left), f"namespaces left: {sorted(left)}")
        for g in t.guests:
            leaks.merge(self.processes(g, expect=0))
        socks = [p for p in t.state_dir.glob("*") if p.is_socket() or p.suffix == ".pid"] \
            if t.state_dir.is_dir() else []
        leaks.add("devices", len(socks), f"files left: {[str(p) for p in socks]}")
        return leaks


# --- killing and respawning one end ---------------------------------------------------------
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


# --- verified transfers -------------------------------------------------------------------
def pattern(seed: int) -> memoryview:
    """2 MiB of seeded random bytes; a transfer's chunk k is a 64 KiB window into it, so any
    reordering, loss or corruption changes the sha256 of the stream."""
    block = random.Random(seed).randbytes(1 << 20)
    return memoryview(block + block)


def stream(seed: int, nbytes: int):
    """The chunks of transfer ``seed``: deterministic, so both ends can hash them."""
    pat = pattern(seed)
    sent, k = 0, 0
    while sent < nbytes:
        n = min(CHUNK, nbytes - sent)
        off = (k * 40_961) % (1 << 20)
        yield pat[off:off + n]
        sent += n
        k += 1


def serve_receiver(port: int) -> None:
    """Agent in a namespace: hash every connection's bytes until EOF, answer "n digest"."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    print("ready", flush=True)

    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(STALL_TIMEOUT * 2)
            h, n = hashlib.sha256(), 0
            try:
                while True:
                    b = conn.recv(1 << 16)
                    if not b:
                        break
                    h.update(b)
                    n += len(b)
                conn.sendall(f"{n} {h.hexdigest()}\n".encode())
            except OSError:
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def send_one(host: str, port: int, nbytes: int, seed: int) -> dict:
    """One verified transfer: send the seeded stream, compare the receiver's count and sha256
    with our own. Never raises: the result says what happened."""
    t0 = time.monotonic()
    h = hashlib.sha256()
    sent = 0
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.settimeout(STALL_TIMEOUT)
            for chunk in stream(seed, nbytes):
                s.sendall(chunk)
                h.update(chunk)
                sent += len(chunk)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while not reply.endswith(b"\n"):
                b = s.recv(256)
                if not b:
                    break
                reply += b
        n, digest = reply.decode().split()
        ok = int(n) == nbytes and digest == h.hexdigest()
        return {"ok": ok, "bytes": int(n), "lost": False, "corrupt": not ok,
                "seconds": round(time.monotonic() - t0, 3),
                "error": "" if ok else f"receiver got {n} bytes / {digest[:12]}"}
    except (OSError, ValueError) as e:
        return {"ok": False, "bytes": sent, "lost": True, "corrupt": False,
                "seconds": round(time.monotonic() - t0, 3), "error": f"{type(e).__name__}: {e}"}


def sender_agent() -> None:
    """Agent in a namespace: one JSON command per stdin line, one JSON result per line."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        print(json.dumps(send_one(cmd["host"], cmd["port"], cmd["bytes"], cmd["seed"])),
              flush=True)


@dataclass
class Agents:
    """Receivers in every namespace and one sender per namespace, started and stopped
    together, so that any direction can be asked for a transfer."""

    topo: Topology
    port: int = RECV_PORT
    receivers: list[subprocess.Popen] = field(default_factory=list)
    senders: dict[str, subprocess.Popen] = field(default_factory=dict)
    lock: dict[str, threading.Lock] = field(default_factory=dict)

    def start(self) -> None:
        spaces = [self.topo.wire.netns, *(g.netns for g in self.topo.guests)]
        for ns in spaces:
            rx = self._agent(ns, "recv")
            if rx.stdout.readline().strip() != "ready":
                raise RuntimeError(f"receiver in {ns} did not start")
            self.receivers.append(rx)
            tx = self._agent(ns, "send")
            if not json.loads(tx.stdout.readline()).get("ready"):
                raise RuntimeError(f"sender in {ns} did not start")
            self.senders[ns] = tx
            self.lock[ns] = threading.Lock()

    def _agent(self, ns: str, what: str) -> subprocess.Popen:
        argv = [*netns_exec(ns), sys.executable, "-m", "shared.lab.soak", what,
                "--port", str(self.port)]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=REPO_ROOT, start_new_session=True)

    def transfer(self, src_ns: str, dst_ip: str, nbytes: int, seed: int) -> dict:
        """Ask the sender in ``src_ns`` for one verified transfer to ``dst_ip``."""
        p = self.senders[src_ns]
        with self.lock[src_ns]:
            p.stdin.write(json.dumps({"host": dst_ip, "port": self.port, "bytes": nbytes,
                                      "seed": seed}) + "\n")
            p.stdin.flush()
            line = p.stdout.readline()
        if not line:
            return {"ok": False, "bytes": 0, "lost": True, "corrupt": False,
                    "error": f"sender agent in {src_ns} died"}
        return json.loads(line)

    def stop(self) -> None:
        for p in [*self.receivers, *self.senders.values()]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(5)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    with contextlib.suppress(Exception):
                        f.close()
        self.receivers.clear()
        self.senders.clear()


# --- the soak -----------------------------------------------------------------------------
@dataclass
class SoakConfig:
    minutes: float = 10.0
    #: seconds between two restarts (alternating guest, and frontend/backend)
    restart_every: float = 20.0
    transfer_bytes: int = 48 << 20
    json_path: str | None = None
    prefix: str = "pvs"
    net: str = "10.86.0"
    state_dir: str | None = None


@dataclass
class SoakReport:
    minutes: float = 0.0
    transfers: int = 0
    transfers_verified: int = 0
    transfers_failed: int = 0
    bytes_verified: int = 0
    connections_lost: int = 0
    corrupt: int = 0
    restarts: dict[str, int] = field(default_factory=lambda: {"frontend": 0, "backend": 0})
    reconnect_seconds_max: float = 0.0
    leaks: dict[str, int] = field(default_factory=dict)
    leak_details: list[str] = field(default_factory=list)
    rss_kb: dict[str, list[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not sum(self.leaks.values()) and not self.transfers_failed
                and self.transfers_verified > 0 and not self.errors)


class Soak:
    """Traffic + chaos + leak checks for ``cfg.minutes``; returns a SoakReport."""

    def __init__(self, cfg: SoakConfig, say: Callable[[str], None] = print,
                 topo: Topology | None = None) -> None:
        self.cfg = cfg
        self.say = say
        self.topo = topo or soak_topology(cfg.prefix, cfg.net, cfg.state_dir)
        self.lab = Lab(self.topo, say=lambda _line: None)
        self.report = SoakReport()
        self.leaks = Leaks()
        self.inspector = Inspector(self.topo)
        self.chaos = Chaos(self.topo)
        self.agents = Agents(self.topo)
        self.stop = threading.Event()
        names = [g.name for g in self.topo.guests]
        self.paused = {n: threading.Event() for n in names}  # chaos asks a worker to hold
        self.idle_ok = {n: threading.Event() for n in names}  # the worker says it holds
        self.lock = threading.Lock()

    def run(self) -> SoakReport:
        t0 = time.monotonic()
        try:
            self.lab.down()
            self.lab.up(timeout=60)
            self.agents.start()
            self.inspector.learn()
            self._note_rss()
            workers = [threading.Thread(target=self._traffic, args=(g, i), daemon=True)
                       for i, g in enumerate(self.topo.guests)]
            for w in workers:
                w.start()
            self._chaos_loop(t0)
            self.stop.set()
            for w in workers:
                w.join(STALL_TIMEOUT * 3)
            for g in self.topo.guests:
                self._merge(self.inspector.idle(g))
                self._merge(self.inspector.connected(g))
            self._note_rss()
        except Exception as e:  # noqa: BLE001 - the report says what went wrong
            self.report.errors.append(f"{type(e).__name__}: {e}")
        finally:
            self.stop.set()
            self.agents.stop()
            try:
                self.lab.down()
                self._merge(self.inspector.down())
            except Exception as e:  # noqa: BLE001
                self.report.errors.append(f"down: {type(e).__name__}: {e}")
        r = self.report
        r.minutes = round((time.monotonic() - t0) / 60, 2)
        r.leaks = self.leaks.counts()
        r.leak_details = self.leaks.details[:50]
        if self.cfg.json_path:
            Path(self.cfg.json_path).write_text(json.dumps(asdict(r), indent=1) + "\n")
        return r

    def _merge(self, leaks: Leaks) -> None:
        with self.lock:
            self.leaks.merge(leaks)
        for d in leaks.details:
            self.say(f"  leak: {d}")

    def _note_rss(self) -> None:
        for g in self.topo.guests:
            for role in ("back", "front"):
                pid = self.inspector.pid(g, role)
                kb = rss_kb(pid) if pid else None
                if kb:
                    self.report.rss_kb.setdefault(f"{role}:{g.name}", []).append(kb)

    def _traffic(self, g: Guest, index: int) -> None:
        """Transfers to and from the wire, alternating, until the soak ends."""
        wire_ip, guest_ip = str(self.topo.wire.ip.ip), str(g.ip.ip)
        n = 0
        while not self.stop.is_set():
            if self.paused[g.name].is_set():
                self.idle_ok[g.name].set()
                time.sleep(0.05)
                continue
            seed = index * 1_000_000 + n
            if n % 2 == 0:
                res = self.agents.transfer(g.netns, wire_ip, self.cfg.transfer_bytes, seed)
            else:
                res = self.agents.transfer(self.topo.wire.netns, guest_ip,
                                           self.cfg.transfer_bytes, seed)
            n += 1
            with self.lock:
                r = self.report
                r.transfers += 1
                if res["ok"]:
                    r.transfers_verified += 1
                    r.bytes_verified += res["bytes"]
                else:
                    r.transfers_failed += 1
                    r.connections_lost += int(res.get("lost", False))
                    r.corrupt += int(res.get("corrupt", False))
                    r.errors.append(f"{g.name} transfer {seed}: {res['error']}")
            if not res["ok"]:
                self.say(f"  {g.name}: transfer {seed} failed: {res['error']}")

    def _quiesce(self, g: Guest) -> None:
        """Let the current transfer of ``g`` finish and hold the next one."""
        self.idle_ok[g.name].clear()
        self.paused[g.name].set()
        self.idle_ok[g.name].wait(STALL_TIMEOUT * 2)

    def _resume(self, g: Guest) -> None:
        self.paused[g.name].clear()

    def _chaos_loop(self, t0: float) -> None:
        end = t0 + self.cfg.minutes * 60
        next_restart = time.monotonic() + min(self.cfg.restart_every, 10.0)
        next_progress = t0 + 60
        k = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_progress:
                self._progress(now - t0)
                next_progress += 60
            if now >= next_restart and now + 15 < end:
                g = self.topo.guests[k % len(self.topo.guests)]
                role = "front" if (k // len(self.topo.guests)) % 2 == 0 else "back"
                self._restart(g, role)
                k += 1
                next_restart = time.monotonic() + self.cfg.restart_every
            time.sleep(0.2)
        self._progress(time.monotonic() - t0)

    def _restart(self, g: Guest, role: str) -> None:
        """One chaos step, checked: kill mid-transfer, look at what the survivor holds,
        respawn, wait for Connected, look again; then an idle check between transfers."""
        self.chaos.kill(g, role)
        self.report.restarts["frontend" if role == "front" else "backend"] += 1
        if role == "front":
            self._merge(self.inspector.released(g))
        else:
            self._merge(self.inspector.devices(g, expect=0))  # its vif went with it
        t = time.monotonic()
        self.chaos.respawn(g, role)
        took = self.chaos.wait_connected(g, timeout=60)
        self.report.reconnect_seconds_max = max(self.report.reconnect_seconds_max,
                                                round(took, 2))
        self._merge(self.inspector.connected(g))
        self._quiesce(g)
        self._merge(self.inspector.idle(g))
        self._resume(g)
        self.say(f"  restart {role}end of {g.name}: Connected again in "
                 f"{time.monotonic() - t:.1f}s")

    def _progress(self, elapsed: float) -> None:
        r = self.report
        self.say(f"soak {elapsed / 60:4.1f}/{self.cfg.minutes:g} min: "
                 f"{r.bytes_verified / 1e6:8.0f} MB verified in {r.transfers_verified} "
                 f"transfers, {r.transfers_failed} failed, {r.connections_lost} connections "
                 f"lost, restarts {r.restarts['frontend']} front / {r.restarts['backend']} "
                 f"back, leaks {self.leaks.total}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.lab.soak")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv", help="agent: verify incoming transfers")
    r.add_argument("--port", type=int, default=RECV_PORT)
    s = sub.add_parser("send", help="agent: run transfers asked for on stdin")
    s.add_argument("--port", type=int, default=RECV_PORT)
    run = sub.add_parser("run", help="the soak itself")
    run.add_argument("--minutes", type=float, default=10.0)
    run.add_argument("--json")
    run.add_argument("--restart-every", type=float, default=20.0)
    a = p.parse_args(argv)
    if a.cmd == "recv":
        serve_receiver(a.port)
        return 0
    if a.cmd == "send":
        sender_agent()
        return 0
    report = Soak(SoakConfig(minutes=a.minutes, json_path=a.json,
                             restart_every=a.restart_every)).run()
    print(json.dumps(asdict(report), indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
