"""The QEMU placement: the lab's main job. Each topology guest is a QEMU VM whose netfront talks
to a netback on the host; the bridge and the test NIC are the namespace lab's.

Per guest: a sealed memfd is the grant region, handed to QEMU as an ivshmem-plain device and
to the netback as an inherited fd; the event channel is a virtio-serial port whose host end
is a unix socket (QEMU listens, the netback connects, so a restarted netback just connects
again); a second port carries the frontend's control protocol, so `pvnet stats` reads the
guest's end on the host like any other. Guests are managed over ssh on 127.0.0.1 only
(QEMU user networking), never over the pvnet path.

A guest with ``event: doorbell`` moves only the kicks to ivshmem-doorbell
(shared/plumbing/doorbell/__init__.py): the lab first starts our ivshmem server for it
(shared/lab/ivshmem_server.py, which must listen before QEMU starts) on the same memfd; QEMU gets
ivshmem-doorbell (chardev to the server, MSI-X) instead of ivshmem-plain, plus q35's intel-iommu so
that the netfront can drive the device through VFIO; both programs get --doorbell. Messages stay on
the serial port.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from shared.lab import deps, procs, startup
from shared.lab.accel import detect_accel
from shared.lab.commands import (
    CTL_PORT,
    DOORBELL_VECTORS,
    EVENT_PORT,
    GUEST_TAP,
    REPO_ROOT,
    backend_argv,
    doorbell_sockets,
    guest_spec,
    ivshmem_doorbell_args,
)
from shared.lab.errors import LabError
from shared.lab.guest_handles import GuestHandle, handles_file, load_handles, save_handle
from shared.lab.image.build import build_image
from shared.lab.image.store import ImageInfo, cached_image
from shared.lab.machine.config import MachineConfig, SerialPort, ShmDevice, TapNic
from shared.lab.machine.failure import MachineError
from shared.lab.machine.launcher import Machine
from shared.lab.machine.qmp import SyncQMP
from shared.lab.netns import Lab
from shared.lab.procs import tail_lines
from shared.lab.topology import Guest, Topology
from shared.plumbing.control.client import ControlError, query
from shared.plumbing.tap import configure, open_tap
from shared.plumbing.transport import create_memfd, queue_channel


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
                          SerialPort(CTL_PORT, t.frontend_ctl(g)),
                          *(SerialPort(queue_channel(EVENT_PORT, q), path)
                            for q, path in enumerate(t.queue_sockets(g)))),
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
        for sock in (t.event_socket(g), t.frontend_ctl(g), *t.queue_sockets(g)):
            self.net.state.add("sockets", str(sock))
        save_handle(t, GuestHandle(g.name, pid, machine.ssh_port, run_dir.resolve()))
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
                               + "\n".join(tail_lines(log, 20)))
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
        save_handle(t, GuestHandle(g.name, pid, machine.ssh_port, run_dir.resolve()))
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
                tail = "\n".join(tail_lines(h.console, 30) or ["(no console log)"])
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
            handles_file(self.topo).unlink()


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
            (fd,) = open_tap(name, offload=0)
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

