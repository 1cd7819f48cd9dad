"""The QEMU placement: the lab's main job. Each topology guest is a QEMU VM whose netfront talks
to a netback on the host; the bridge and the test NIC are the namespace lab's.

Per guest: a sealed memfd is the grant region, handed to QEMU as an ivshmem-plain device and
to the netback as an inherited fd; the event channel is a virtio-serial port whose host end
is a unix socket (QEMU listens, the netback connects, so a restarted netback just connects
again); a second port carries the frontend's control protocol, so `pvnet stats` reads the
guest's end on the host like any other. Guests are managed over ssh on 127.0.0.1 only
(QEMU user networking), never over the pvnet path.

A guest with ``event: doorbell`` moves only the kicks to ivshmem-doorbell (shared/doorbell.py):
the lab first starts our ivshmem server for it (shared/lab/ivshmem_server.py, which must
listen before QEMU starts) on the same memfd; QEMU gets ivshmem-doorbell (chardev to the
server, MSI-X) instead of ivshmem-plain, plus q35's intel-iommu so that the netfront can drive
the device through VFIO; both programs get --doorbell. Messages stay on the serial port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shared.control import ControlError, query
from shared.lab import deps, procs, startup
from shared.lab.accel import detect_accel
from shared.lab.image.build import build_image
from shared.lab.image.store import ImageInfo, cached_image
from shared.lab.machine import (
    GuestSpec,
    Machine,
    MachineConfig,
    MachineError,
    SerialPort,
    ShmDevice,
    SyncQMP,
    TapNic,
    guest_python,
)
from shared.lab.netns import REPO_ROOT, Lab, LabError, netns_exec
from shared.lab.topology import Guest, Topology
from shared.tap import configure, open_tap
from shared.transport import create_memfd

EVENT_PORT = "pvnet-event"
DOORBELL_VECTORS = 1  # MSI-X vectors per peer: one event channel needs one
CTL_PORT = "pvnet-ctl"
GUEST_TAP = "pv0"


@dataclass(frozen=True)
class GuestHandle:
    """What a running guest left in the state dir for later commands (ssh, logs, down)."""

    name: str
    pid: int
    ssh_port: int
    run_dir: Path

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"


def guest_view(path: str | Path) -> str:
    """Where a guest finds host path `path`: the same path. The guest's init bind-mounts the
    interpreter's and the checkout's directories from /host where its own tmpfs (/tmp, /run)
    would hide them (vm-images/guest/guest_init.py), so a CI clone in /tmp works as it is."""
    return str(path)


#: guest stack tuning, the same for every guest whatever its NIC: TSO frames of at least 44
#: segments (~64 KB) however low the socket's pacing rate. Linux sizes TSO frames to ~1 ms of
#: the pacing rate (tcp_tso_autosize); a slow path thus gets small frames, and a NIC whose cost
#: is per frame (pvnet's Python netfront under TCG, ~1 ms per frame) stays slow. virtio-net
#: frames are ~54 KB here already. Issue 13 measured pvnet TX 53-68 -> 255-262 Mbit/s.
GUEST_MIN_TSO_SEGS = 44


#: the stack tuning every guest gets, whatever its NIC (written by the guest's init)
GUEST_SYSCTLS = {"net.ipv4.tcp_min_tso_segs": str(GUEST_MIN_TSO_SEGS)}


def guest_runs(g: Guest) -> tuple[tuple[str, ...], ...]:
    """What a guest's init starts: the netfront (pvnet guests) and iperf3 -s."""
    front = () if g.nic == "virtio-net" else (tuple(frontend_argv(g)),)
    return (*front, ("iperf3", "-s"))


def guest_spec(g: Guest, env: dict[str, str] | None = None) -> GuestSpec:
    """What a guest of either NIC does after boot: the same tuning (GUEST_SYSCTLS) and
    iperf3 -s for both, a netfront for pvnet guests, so the comparison stays fair."""
    return GuestSpec(hostname=g.name, cwd=str(REPO_ROOT), env=dict(env or {}),
                     run=guest_runs(g), sysctls=dict(GUEST_SYSCTLS))


def frontend_argv(g: Guest) -> list[str]:
    """The netfront command line inside the guest: the lab's interpreter (guest_python), which
    the guest sees at its host path."""
    argv = [guest_python(), "-m", "frontend", "--name", g.name, "--domid", str(g.domid),
            "--channel", f"/dev/virtio-ports/{EVENT_PORT}", "--region", "pci",
            "--tap", GUEST_TAP, "--mac", g.mac, "--ip", str(g.ip),
            "--ctl-port", f"/dev/virtio-ports/{CTL_PORT}"]
    if not g.header_slots:
        argv.append("--no-header-slots")
    if g.persistent:
        argv.append("--persistent")
    if not g.gso:
        argv.append("--no-gso")
    if g.event == "doorbell":
        argv.append("--doorbell")
    if g.poll_us is not None:
        argv += ["--poll-us", str(g.poll_us)]
    return argv


def backend_argv(topo: Topology, g: Guest, region_fd: int) -> list[str]:
    argv = [*netns_exec(topo.host_netns), sys.executable, "-m", "backend", "--vif", g.vif,
            "--domid", str(g.domid), "--bridge", topo.bridge,
            "--connect", str(topo.event_socket(g)), "--region-fd", str(region_fd),
            "--ctl", str(topo.backend_ctl(g)), "--tx-mode", g.tx_mode]
    for rule in g.filters:
        argv += ["--filter", rule]
    if g.event == "doorbell":
        argv += ["--doorbell", str(doorbell_sockets(topo, g)[1])]
    return argv


def doorbell_sockets(topo: Topology, g: Guest) -> tuple[Path, Path]:
    """The ivshmem server's two sockets for a doorbell guest: QEMU's and the netback's."""
    return (topo.state_dir / f"{g.vif}.ivshmem", topo.state_dir / f"{g.vif}.ivshmem-be")


def ivshmem_doorbell_args(topo: Topology, g: Guest) -> tuple[str, ...]:
    """QEMU: ivshmem-doorbell on the server (which hands QEMU the memfd) instead of -plain."""
    return ("-chardev", f"socket,id=ivshmem0,path={doorbell_sockets(topo, g)[0]}",
            "-device", f"ivshmem-doorbell,id=bell0,chardev=ivshmem0,vectors={DOORBELL_VECTORS}")


def _handles_file(topo: Topology) -> Path:
    return topo.state_dir / "guests.json"


def load_handles(topo: Topology) -> dict[str, GuestHandle]:
    try:
        raw = json.loads(_handles_file(topo).read_text())
    except (OSError, ValueError):
        return {}
    return {n: GuestHandle(n, int(h["pid"]), int(h["ssh_port"]), Path(h["run_dir"]))
            for n, h in raw.items()}


def _save_handle(topo: Topology, h: GuestHandle) -> None:
    handles = {n: {"pid": x.pid, "ssh_port": x.ssh_port, "run_dir": str(x.run_dir)}
               for n, x in load_handles(topo).items()}
    handles[h.name] = {"pid": h.pid, "ssh_port": h.ssh_port, "run_dir": str(h.run_dir)}
    _handles_file(topo).write_text(json.dumps(handles, indent=1) + "\n")


class VmLab:
    """`up`/`down` for the QEMU placement; the network side is delegated to `Lab`."""

    def __init__(self, topo: Topology, say=print, virtio_nics: dict[str, TapNic] | None = None
                 ) -> None:
        self.topo = topo
        self.say = say
        self.net = Lab(topo, say=say)
        self.virtio_nics = virtio_nics or {}
        self._booted: set[str] = set()  # guests this `up` started: their consoles are news

    def up(self, timeout: float = 120.0) -> None:
        deps.ensure()
        t0 = time.monotonic()
        image = build_image(progress=True)
        accel = detect_accel(image)
        self.say(f"accelerator: {accel}" + (" (KVM cannot run this guest here)"
                                            if accel == "tcg" and os.path.exists("/dev/kvm")
                                            else ""))
        self.net.up(processes=False, guest_netns=False)
        precompile()
        for g in self.topo.guests:
            self._start_guest(g, image, accel)
        self._wait_connected(timeout)
        self.say(f"lab up in {time.monotonic() - t0:.1f} s: "
                 + ", ".join(f"{h.name} (ssh 127.0.0.1:{h.ssh_port})"
                             for h in load_handles(self.topo).values()))

    def _start_guest(self, g: Guest, image: ImageInfo, accel: str) -> None:
        t = self.topo
        existing = load_handles(t).get(g.name)
        if existing is not None and procs.proc_stat(existing.pid) is not None:
            self.say(f"guest {g.name}: running (pid {existing.pid})")
            return
        if g.nic == "virtio-net":
            self._start_virtio_guest(g, image, accel)
            return
        size = g.region_size
        if size & (size - 1):
            raise LabError(f"{g.name}: region_size {size} must be a power of two "
                           "(it becomes an ivshmem PCI BAR)")
        fd, mem = create_memfd(size, f"pvnet-{g.name}")
        mem.close()  # QEMU and the netback map it; we only hand the fd on
        doorbell = g.event == "doorbell"
        if doorbell:
            try:
                self._start_ivshmem_server(g, fd)
            except BaseException:
                os.close(fd)
                raise
        run_dir = t.state_dir / g.name
        nics = (self.virtio_nics[g.name],) if g.name in self.virtio_nics else ()
        guest = guest_spec(g, env={"PYTHONUNBUFFERED": "1"})
        cfg = MachineConfig(
            name=g.name, run_dir=run_dir, image=image, accel=accel, memory_mib=g.memory,
            guest=guest, shm=() if doorbell else (ShmDevice(fd, size),),
            serial_ports=(SerialPort(EVENT_PORT, t.event_socket(g)),
                          SerialPort(CTL_PORT, t.frontend_ctl(g))),
            nics=nics, die_with_parent=False, machine_type="q35", iommu=doorbell,
            extra_args=ivshmem_doorbell_args(t, g) if doorbell else ())
        machine = Machine(cfg)
        self.say(f"guest {g.name}: starting QEMU ({accel}, {g.memory} MiB"
                 + (", kicks over ivshmem-doorbell)" if doorbell else ")"))
        try:
            machine.launch()
        except MachineError as e:
            os.close(fd)
            raise LabError(str(e)) from e
        pid = machine.detach()
        assert pid is not None
        procs.write_pidfile(t.pidfile(f"qemu-{g.name}"), pid, machine.argv)
        self.net.state.add("pidfiles", str(t.pidfile(f"qemu-{g.name}")))
        for sock in (t.event_socket(g), t.frontend_ctl(g)):
            self.net.state.add("sockets", str(sock))
        _save_handle(t, GuestHandle(g.name, pid, machine.ssh_port, run_dir.resolve()))
        self._booted.add(g.name)
        self.say(f"guest {g.name}: QEMU pid {pid}, console {run_dir / 'console.log'}")
        self.net._spawn_data("netback", g.vif, backend_argv(t, g, fd), t.backend_ctl(g),
                             pass_fds=(fd,))
        os.close(fd)

    def _start_ivshmem_server(self, g: Guest, region_fd: int, timeout: float = 10.0) -> None:
        """Start the guest's ivshmem server on its region memfd and wait until it listens
        (QEMU reads the server's first messages at start-up and fails without them).

        A server still running from an earlier QEMU of this guest serves a stale memfd: it is
        replaced, since the QEMU about to start gets a fresh region."""
        t = self.topo
        name = f"ivshmem-{g.name}"
        pidfile = t.pidfile(name)
        qemu_sock, backend_sock = doorbell_sockets(t, g)
        self.net.state.add("pidfiles", str(pidfile))
        for sock in (qemu_sock, backend_sock):
            self.net.state.add("sockets", str(sock))
        if procs.stop_pidfile(pidfile):
            self.say(f"guest {g.name}: stopped a stale ivshmem server")
        qemu_sock.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "shared.lab.ivshmem_server", "--socket", str(qemu_sock),
                "--backend-socket", str(backend_sock), "--shm-fd", str(region_fd),
                "--vectors", str(DOORBELL_VECTORS)]
        log = t.log_path(name)
        proc = procs.spawn(argv, log=log, pidfile=pidfile, cwd=REPO_ROOT,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, pass_fds=(region_fd,))
        deadline = time.monotonic() + timeout
        while not qemu_sock.exists():  # the server renames it into place once listening
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited ({proc.returncode})" if proc.poll() is not None
                       else f"not listening after {timeout:g} s")
                raise LabError(f"ivshmem server for {g.name} {why}:\n"
                               + "\n".join(_tail(log, 20)))
            time.sleep(0.02)
        self.say(f"guest {g.name}: ivshmem server pid {proc.pid} on {qemu_sock}")

    def _start_virtio_guest(self, g: Guest, image: ImageInfo, accel: str) -> None:
        """The baseline: the same guest type with QEMU's virtio-net on a TAP on the bridge
        (userspace backend: no vhost-net here) instead of pvnet."""
        t = self.topo
        tap = f"tap{g.domid}.0"
        fd = open_tap_in(t.host_netns, tap, t.bridge)
        self.net.state.add("links", [t.host_netns, tap, "tun"])
        run_dir = t.state_dir / g.name
        cfg = MachineConfig(
            name=g.name, run_dir=run_dir, image=image, accel=accel, memory_mib=g.memory,
            guest=guest_spec(g),
            nics=(TapNic(tap, g.mac, fd=fd, guest_name=GUEST_TAP, addresses=(str(g.ip),)),),
            die_with_parent=False)
        machine = Machine(cfg)
        self.say(f"guest {g.name}: starting QEMU ({accel}, {g.memory} MiB, virtio-net on {tap})")
        try:
            machine.launch()
        except MachineError as e:
            raise LabError(str(e)) from e
        finally:
            os.close(fd)
        pid = machine.detach()
        assert pid is not None
        procs.write_pidfile(t.pidfile(f"qemu-{g.name}"), pid, machine.argv)
        self.net.state.add("pidfiles", str(t.pidfile(f"qemu-{g.name}")))
        _save_handle(t, GuestHandle(g.name, pid, machine.ssh_port, run_dir.resolve()))
        self._booted.add(g.name)

    def _wait_ssh(self, g: Guest, timeout: float) -> None:
        from shared.lab import ssh as lab_ssh

        h = load_handles(self.topo)[g.name]
        image = cached_image()
        self.say(f"guest {g.name}: waiting for ssh on 127.0.0.1:{h.ssh_port}")
        client = lab_ssh.wait_ssh(h.ssh_port, timeout, key=lab_ssh.ensure_keypair(),
                                  host_key_pub=image.host_key_pub if image else None)
        client.close()

    def _startup_failure(self) -> str | None:
        """The first start-up failure a guest or a netback reported, or None (see startup.py).
        Only the consoles of guests this `up` booted are read: an older guest's console may
        tell of a netfront someone has restarted by hand since."""
        t = self.topo
        handles = load_handles(t)
        for g in t.guests:
            h = handles.get(g.name)
            if h is not None:
                info = procs.proc_stat(h.pid)
                alive = info is not None and info.state != "Z"
                if g.name in self._booted:
                    why = startup.guest_failure(g.name, h.console, alive, h.run_dir / "qemu.log")
                elif not alive:
                    why = f"guest {g.name}: QEMU (pid {h.pid}) is gone"
                else:
                    why = None
                if why:
                    return why
            if g.nic == "pvnet":
                why = startup.process_failure("netback", g.vif, self.net._dead(g.vif),
                                              t.log_path(g.vif))
                if why:
                    return why
        return None

    def _wait_connected(self, timeout: float) -> None:
        """Poll every end's state until all are Connected; stop at once (within a poll, 0.5 s)
        when a guest or a netback reports that something could not start."""
        t = self.topo
        pv = [g for g in t.guests if g.nic == "pvnet"]
        ends = [(g.vif, t.backend_ctl(g)) for g in pv] + [
            (g.name, t.frontend_ctl(g)) for g in pv]
        for g in t.guests:
            if g.nic != "pvnet":
                self._wait_ssh(g, timeout)
        self.say(f"waiting for {len(ends)} ends to reach Connected (guests boot first; "
                 f"timeout {timeout:g} s)")
        start = time.monotonic()
        states: dict[str, str] = {}
        last_print = 0.0
        failure: str | None = None
        while True:
            for name, ctl in ends:
                try:
                    states[name] = str(query(ctl, {"cmd": "stats"}, timeout=1.0).get("state"))
                except ControlError:
                    states[name] = "not answering yet"
            if all(s == "Connected" for s in states.values()):
                self.say(f"all {len(ends)} ends Connected ({time.monotonic() - start:.1f} s)")
                return
            failure = self._startup_failure()
            now = time.monotonic()
            if failure or now - start > timeout:
                break
            if now - last_print > 5:
                self.say(f"  {now - start:4.0f} s: " + ", ".join(f"{n} {s}"
                                                              for n, s in states.items()))
                last_print = now
            time.sleep(0.5)
        detail = []
        for g in t.guests:
            h = load_handles(t).get(g.name)
            if h and states.get(g.name) != "Connected":
                tail = "\n".join(_tail(h.console, 30))
                detail.append(f"--- console of {g.name} ({h.console}):\n{tail}")
        headline = (f"{failure} (after {time.monotonic() - start:.1f} s)" if failure
                    else f"not every end reached Connected in {timeout:g} s")
        raise LabError(headline + "\n  states: "
                       + ", ".join(f"{n}: {s}" for n, s in states.items()) + "\n"
                       + "\n".join(detail) + f"\n{headline}")

    def down(self) -> None:
        """Power guests off through QMP (kill after 10 s), then everything `Lab.down` does."""
        for h in load_handles(self.topo).values():
            if procs.proc_stat(h.pid) is None:
                continue
            self.say(f"guest {h.name}: powering off (QMP system_powerdown)")
            qmp = SyncQMP(h.name)
            try:
                qmp.connect(h.qmp, timeout=3)
                qmp.execute("system_powerdown", timeout=3)
            except Exception as e:  # noqa: BLE001 - a dead monitor ends in a kill below
                self.say(f"guest {h.name}: QMP failed ({e}); killing")
            finally:
                with contextlib.suppress(Exception):
                    qmp.close()
            if procs.wait_gone([h.pid], 10.0):
                procs.terminate([h.pid], 3.0)
                self.say(f"guest {h.name}: killed")
            else:
                self.say(f"guest {h.name}: powered off")
        self.net.down()
        with contextlib.suppress(FileNotFoundError):
            _handles_file(self.topo).unlink()


def precompile() -> None:
    """Byte-compile the packages guests import (into their __pycache__, which git ignores).

    The guest reads the checkout over read-only 9p, so it can never cache bytecode itself,
    and a host with PYTHONDONTWRITEBYTECODE (or a fresh clone never imported) has none: each
    boot would then compile every module under TCG, seconds of emulated CPU before Connected.
    """
    import compileall

    for pkg in ("frontend", "shared", "backend"):
        with contextlib.suppress(OSError):
            compileall.compile_dir(REPO_ROOT / pkg, quiet=2, workers=1)


def open_tap_in(ns: str | None, name: str, bridge: str) -> int:
    """Create TAP `name` inside namespace `ns` (on `bridge`, up) and return its fd, for QEMU
    running in the root namespace (where its ssh forward must listen). setns changes only
    the calling thread's namespace, so a short-lived thread does it."""
    from pyroute2.netns import setns

    result: dict[str, object] = {}

    def work() -> None:
        try:
            if ns:
                setns(ns, flags=0)
            fd = open_tap(name, offload=0)
            configure(name, master=bridge)
            result["fd"] = fd
        except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    th = threading.Thread(target=work)
    th.start()
    th.join()
    if "error" in result:
        raise LabError(f"cannot create TAP {name} in {ns or 'the root namespace'}: "
                       f"{result['error']}")
    return int(result["fd"])  # type: ignore[arg-type]


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ["(no console log)"]


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
