"""A typed QEMU launcher for pvnet guests, modelled on QEMU's python/qemu/machine (QEMUMachine).

One `Machine` per guest: `launch()` = `_pre_launch()` (run dir, guest JSON, command line) +
start QEMU + `_post_launch()` (QMP connected); `shutdown()` asks the guest to power off over QMP
(ACPI power button) and kills QEMU when it does not within the timeout; `kill()` kills at once.
Used as a context manager, the machine is launched on enter and shut down on exit.

What the guest gets (see vm-images/README.md): the image's ELF kernel + initramfs, the host root
read-only over virtio-9p, a management virtio-net NIC on QEMU user networking (isolated with
restrict=on; only the ssh hostfwd on 127.0.0.1 reaches it), a serial console logged to a file,
QMP on a unix socket, and optional devices: ivshmem-plain on a caller-owned memfd (the grant
region), virtio-serial ports on unix sockets (the event channel), virtio-net NICs on host TAPs
(the baseline), and an intel-iommu (q35) for VFIO in the guest.

Files in the run dir (one per machine, chosen by the caller; under /run/pvnet/<name> in the
lab, which the guest can read back at /host/run/pvnet/<name>):
  guest.json   the guest's config (read by the guest's init through the /host 9p view)
  console.log  the serial console: kernel messages, init progress, the "run" commands' output
  qemu.log     QEMU's own stdout/stderr
  qmp.sock     the QMP socket
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paramiko

from shared.lab import ssh as lab_ssh
from shared.lab.accel import QEMU, Accel, cpu_args, detect_accel
from shared.lab.image.store import ImageInfo

READY_MARKER = "PVNET-GUEST-READY"
FAIL_PATTERN = r"PVNET-INIT-FAILED|Kernel panic|end Kernel panic"
MGMT_MAC = "52:54:00:00:ff:01"
MGMT_ADDRESS = "10.0.2.15/24"  # QEMU user networking defaults
MGMT_GATEWAY = "10.0.2.2"
HOSTROOT_TAG = "hostroot"
#: every guest, whatever its NIC: no CPU-vulnerability mitigations. Under TCG, page-table
#: isolation makes each syscall switch CR3 twice, and each switch flushes QEMU's software TLB:
#: a guest whose data path is syscalls (pvnet's netfront) pays it per frame. Lab guests only.
GUEST_KERNEL_ARGS = ("mitigations=off",)
UNIX_PATH_MAX = 107

T = TypeVar("T")


class MachineError(RuntimeError):
    """QEMU or the guest failed; carries what is needed to see why without re-running.

    The message includes the full QEMU command line, QEMU's exit code and the tails of QEMU's
    own output and of the guest console.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        exitcode: int | None = None,
        qemu_log: str = "",
        console: str = "",
    ) -> None:
        self.message = message
        self.argv = list(argv)
        self.exitcode = exitcode
        self.qemu_log = qemu_log
        self.console = console
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.message]
        if self.argv:
            parts.append(f"command: {shlex.join(self.argv)}")
        if self.exitcode is not None:
            parts.append(f"QEMU exit code: {self.exitcode}")
        if self.qemu_log.strip():
            parts.append("QEMU output (tail):\n" + self.qemu_log.rstrip())
        if self.console.strip():
            parts.append("guest console (tail):\n" + self.console.rstrip())
        return "\n".join(parts)


VMLaunchError = MachineError  # the name QEMU's machine.py uses for launch failures


# ---------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class ShmDevice:
    """ivshmem-plain on a memfd the caller owns (the grant region).

    The fd is inherited by QEMU under the same number (pass_fds) and opened by QEMU as
    /proc/self/fd/N; share=on so host and guest see the same pages. The guest finds the device
    as PCI 1af4:1110 and maps its BAR 2 (sysfs resource2 / resource2_wc).
    """

    fd: int
    size: int  # bytes; a power of two (it becomes a PCI BAR)
    id: str = "shm0"


@dataclass(frozen=True)
class SerialPort:
    """A virtio-serial port: the guest sees /dev/virtio-ports/<name>; the host a unix socket.

    server=True: QEMU listens at `path` (server=on,wait=off): connect after launch.
    server=False: QEMU connects to `path` at start-up (someone must listen already) and, with
    reconnect > 0, tries again every `reconnect` seconds after a disconnect.
    """

    name: str
    path: Path
    server: bool = True
    reconnect: int = 0


@dataclass(frozen=True)
class TapNic:
    """A virtio-net-pci NIC on an existing host TAP (script=no): the virtio-net baseline.

    guest_name/addresses, when given, are applied by the guest's init (matched by MAC).
    """

    tap: str
    mac: str
    vhost: bool = False
    fd: int | None = None  # an open TAP fd to hand QEMU (a TAP in another namespace)
    guest_name: str | None = None
    addresses: tuple[str, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True)
class GuestSpec:
    """What the guest does after boot (written into guest.json).

    run: argv lists started in the background in the guest, each logged to the console and to
    /run/pvnet-guest/<i>.log; cwd: their working directory (and ssh sessions'); env: added to
    their environment (and ssh sessions'); PATH defaults to this Python's bin dir first, so
    `python3` in the guest is the host's python3 with its installed packages.
    """

    hostname: str | None = None
    run: tuple[tuple[str, ...], ...] = ()
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: host dirs the guest must see at their own paths (default: this interpreter's, see
    #: interpreter_paths); cwd is always added by the guest's init
    host_paths: tuple[str, ...] | None = None
    #: kernel settings the guest's init writes before it starts ``run`` ("net.ipv4.x": "44"):
    #: one-shot tuning is no run command, whose exit the lab would report as a failure
    sysctls: dict[str, str] = field(default_factory=dict)


@dataclass
class MachineConfig:
    """Everything needed to start one guest. Paths are host paths."""

    name: str
    run_dir: Path
    image: ImageInfo
    accel: Accel | None = None  # None: detect_accel() (KVM only if it really boots)
    memory_mib: int = 512
    cpus: int = 1  # FACTS: -smp 2 is slower under TCG here
    machine_type: str = "q35"
    iommu: bool = False  # intel-iommu (q35 only) + intel_iommu=on: VFIO in the guest
    kernel_args: tuple[str, ...] = ()
    guest: GuestSpec = field(default_factory=GuestSpec)
    guest_json: Path | None = None  # default: run_dir/guest.json
    write_guest_json: bool = True  # False: the caller wrote guest_json itself
    ssh_port: int | None = None  # None: a free port on 127.0.0.1
    mgmt_mac: str = MGMT_MAC
    shm: tuple[ShmDevice, ...] = ()
    serial_ports: tuple[SerialPort, ...] = ()
    nics: tuple[TapNic, ...] = ()
    extra_args: tuple[str, ...] = ()
    qemu_binary: str = QEMU
    qmp_timeout: float = 20.0  # QEMU start until QMP answers
    # PR_SET_PDEATHSIG: no orphan QEMU if the lab dies. It fires when the launching *thread*
    # exits: launch from a long-lived thread (not a short-lived pool worker) or set False.
    die_with_parent: bool = True


# ---------------------------------------------------------------------------------- QMP


class SyncQMP:
    """A blocking wrapper around qemu.qmp's asyncio QMPClient.

    Why not qemu.qmp.legacy: it runs the caller's (or a new) event loop in the calling thread,
    which breaks when called from code that already runs an asyncio loop. Here the client lives
    on a private loop in a daemon thread, so calls work from any thread or context.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client: Any = None

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, path: Path, timeout: float = 5.0) -> None:
        from qemu.qmp import QMPClient

        async def go() -> None:
            client = QMPClient(self.name)
            await client.connect(str(path))
            self._client = client

        self._call(go(), timeout)

    def execute(self, cmd: str, args: dict[str, object] | None = None,
                timeout: float = 10.0) -> object:
        if self._client is None:
            raise MachineError(f"QMP not connected ({self.name})")
        return self._call(self._client.execute(cmd, args), timeout)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._client is not None:
            try:
                self._call(self._client.disconnect(), 5.0)
            except Exception:  # noqa: BLE001 - QEMU may be gone already: nothing to close
                pass
            self._client = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()


# ---------------------------------------------------------------------------------- machine


def _pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL --` (util-linux) when available: QEMU gets SIGKILL when the
    thread that launched it dies, so a crashed or killed lab leaves no orphan guest behind.

    Why not preexec_fn + prctl: running Python code between fork and exec can deadlock when
    other threads exist (the QMP threads of other machines do).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


#: host directories the guest has a tmpfs of its own on: host files there need a bind mount
SHADOWED = ("/tmp/", "/run/")


def guest_python() -> str:
    """The interpreter guests run the netfront with: $PVNET_GUEST_PYTHON, else the one running
    the lab (a venv's python included: the guest sees it at the same path)."""
    return os.environ.get("PVNET_GUEST_PYTHON") or sys.executable


def interpreter_paths(python: str | None = None) -> list[str]:
    """Host directories the guest needs at their own paths to run `python` (default: this
    interpreter) with the same packages: its prefix (a venv: pyvenv.cfg, site-packages with
    editable-install finders and .pth files), its base prefix, the real executable's dir and
    every sys.path entry (an editable install's source tree). Only the ones under /tmp and
    /run are listed: the guest sees the rest of the host root as it is; the guest's init
    bind-mounts these from /host (vm-images/guest/guest_init.py)."""
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        python = sys.executable
        candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]
    else:
        candidates = []
    for exe in (python, os.path.realpath(python)):  # bin dir and prefix (a venv's pyvenv.cfg)
        candidates += [os.path.dirname(exe), os.path.dirname(os.path.dirname(exe))]
    out = []
    for path in candidates:
        if not path:
            continue
        real = os.path.realpath(path)
        for p in {os.path.abspath(path), real}:
            if p.startswith(SHADOWED) and os.path.isdir(p):
                out.append(p)
    return sorted(set(out))


def default_guest_path() -> str:
    """PATH for guest programs: this interpreter's bin dir first, then the usual ones."""
    std = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return f"{os.path.dirname(sys.executable)}:{std}"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Machine:
    """One QEMU guest. Not thread-safe; one owner drives launch/ssh/shutdown."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir.resolve()  # the guest reads it as /host/<this path>
        self.console_path = self.run_dir / "console.log"
        self.qemu_log_path = self.run_dir / "qemu.log"
        self.qmp_path = self.run_dir / "qmp.sock"
        self.guest_json_path = (config.guest_json or self.run_dir / "guest.json").resolve()
        self.accel: Accel | None = config.accel
        self.ssh_port: int = config.ssh_port or 0
        self.argv: list[str] = []
        self.launch_seconds: float = 0.0
        self.exitcode: int | None = None
        self.graceful_shutdown: bool | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: SyncQMP | None = None
        self._ssh: paramiko.SSHClient | None = None
        self._keypair: lab_ssh.KeyPair | None = None
        self._t_launch = 0.0
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def console_log(self) -> str:
        """The whole serial console so far (kernel, init, the guest's "run" commands)."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def error(self, message: str) -> MachineError:
        """A MachineError for this machine with its command line and log tails."""
        code = self._proc.poll() if self._proc else None
        return MachineError(message, argv=self.argv, exitcode=code,
                            qemu_log=_tail(self.qemu_log_path, 20),
                            console=_tail(self.console_path, 40))

    # ------------------------------------------------------------------ launch

    def launch(self) -> None:
        """Start QEMU and connect QMP; raise MachineError (QEMU killed) on any failure.

        With an auto-picked ssh port, a port lost to a race is retried with a new one.
        """
        if self._proc is not None:
            raise self.error(f"machine {self.config.name} was already launched")
        attempts = 1 if self.config.ssh_port else 3
        for attempt in range(attempts):
            self._pre_launch()
            try:
                self._launch()
                self._post_launch()
                return
            except MachineError as e:
                self._teardown()
                self._proc = None
                if "host forwarding" in e.qemu_log and attempt + 1 < attempts:
                    self.ssh_port = 0
                    continue
                raise
            except BaseException:
                self._teardown()
                raise

    def _pre_launch(self) -> None:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.qmp_path)) > UNIX_PATH_MAX:
            raise MachineError(f"run dir path too long for a unix socket: {self.qmp_path}")
        if not self.ssh_port:
            self.ssh_port = lab_ssh.free_port()
        if self.accel is None:
            self.accel = detect_accel(cfg.image)
        for shm in cfg.shm:
            if shm.size < 4096 or shm.size & (shm.size - 1):
                raise MachineError(f"ivshmem {shm.id}: size {shm.size} is not a power of two")
            if os.fstat(shm.fd).st_size < shm.size:
                raise MachineError(f"ivshmem {shm.id}: fd {shm.fd} is smaller than {shm.size}")
        if cfg.iommu and not cfg.machine_type.startswith("q35"):
            raise MachineError("iommu=True needs machine_type q35")
        for port in cfg.serial_ports:
            if port.server and port.path.exists():
                port.path.unlink()
        for p in (self.qmp_path, self.console_path, self.qemu_log_path):
            p.unlink(missing_ok=True)
        self._keypair = lab_ssh.ensure_keypair()
        if cfg.write_guest_json:
            self.guest_json_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.guest_json_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.guest_config(), indent=2) + "\n")
            tmp.rename(self.guest_json_path)
        self.argv = self.build_argv()

    def guest_config(self) -> dict[str, object]:
        """The guest.json content (see vm-images/guest/guest_init.py for the keys)."""
        cfg = self.config
        assert self._keypair is not None
        interfaces: list[dict[str, object]] = [
            {"mac": cfg.mgmt_mac, "addresses": [MGMT_ADDRESS], "gateway": MGMT_GATEWAY}
        ]
        for nic in cfg.nics:
            if nic.guest_name or nic.addresses or nic.mtu:
                interfaces.append({"mac": nic.mac, "name": nic.guest_name,
                                   "addresses": list(nic.addresses), "mtu": nic.mtu})
        env = {"PATH": default_guest_path(), **cfg.guest.env}
        return {
            "hostname": cfg.guest.hostname or cfg.name,
            "interfaces": interfaces,
            "ssh": {
                "sshd_dir": str(cfg.image.sshd_dir),
                "authorized_keys": [self._keypair.public_line],
                "port": 22,
            },
            "env": env,
            "cwd": cfg.guest.cwd,
            "host_paths": list(interpreter_paths(guest_python()) if cfg.guest.host_paths is None
                               else cfg.guest.host_paths),
            "sysctls": dict(cfg.guest.sysctls),
            "run": [list(argv) for argv in cfg.guest.run],
        }

    def kernel_cmdline(self) -> str:
        cfg = self.config
        args = ["console=ttyS0", "quiet", "panic=-1", f"pvnet.conf={self.guest_json_path}",
                *GUEST_KERNEL_ARGS]
        if cfg.iommu:
            args.append("intel_iommu=on")
        args.extend(cfg.kernel_args)
        return " ".join(args)

    def build_argv(self) -> list[str]:
        """The QEMU command line (also in MachineError when something fails)."""
        cfg = self.config
        assert self.accel is not None
        machine = cfg.machine_type
        if cfg.iommu and self.accel == "kvm":
            machine += ",kernel-irqchip=split"
        argv = [
            cfg.qemu_binary, "-name", cfg.name,
            "-machine", machine, "-accel", self.accel, *cpu_args(self.accel),
            "-m", str(cfg.memory_mib), "-smp", str(cfg.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(cfg.image.kernel), "-initrd", str(cfg.image.initrd),
            "-append", self.kernel_cmdline(),
            "-chardev", f"file,id=console,path={self.console_path}",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        if cfg.iommu:  # must come before the PCI devices it translates for
            argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
        argv += [
            "-virtfs",
            f"local,path=/,mount_tag={HOSTROOT_TAG},readonly=on,security_model=none,"
            "multidevs=remap",
            "-netdev",
            f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", f"virtio-net-pci,netdev=mgmt,mac={cfg.mgmt_mac},romfile=",
        ]
        for shm in cfg.shm:
            argv += [
                "-object",
                f"memory-backend-file,id={shm.id}-mem,mem-path=/proc/self/fd/{shm.fd},"
                f"size={shm.size},share=on",
                "-device", f"ivshmem-plain,id={shm.id},memdev={shm.id}-mem",
            ]
        if cfg.serial_ports:
            argv += ["-device", "virtio-serial-pci,id=vser0"]
        for i, port in enumerate(cfg.serial_ports):
            opts = f"socket,id=vport{i},path={port.path}"
            if port.server:
                opts += ",server=on,wait=off"
            elif port.reconnect:
                opts += f",reconnect={port.reconnect}"
            argv += ["-chardev", opts,
                     "-device", f"virtserialport,bus=vser0.0,chardev=vport{i},name={port.name}"]
        for i, nic in enumerate(cfg.nics):
            vhost = "on" if nic.vhost else "off"
            where = f"fd={nic.fd}" if nic.fd is not None else \
                f"ifname={nic.tap},script=no,downscript=no"
            argv += ["-netdev", f"tap,id=tap{i},{where},vhost={vhost}",
                     "-device", f"virtio-net-pci,netdev=tap{i},mac={nic.mac},romfile="]
        argv += list(cfg.extra_args)
        return argv

    def _launch(self) -> None:
        pass_fds = tuple(shm.fd for shm in self.config.shm) + tuple(
            nic.fd for nic in self.config.nics if nic.fd is not None)
        self._t_launch = time.monotonic()
        with open(self.qemu_log_path, "wb") as log:
            try:
                prefix = _pdeathsig_prefix() if self.config.die_with_parent else []
                self._proc = subprocess.Popen(
                    prefix + self.argv, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, pass_fds=pass_fds, start_new_session=True,
                )
            except OSError as e:
                raise MachineError(f"cannot start QEMU: {e} (apt-get install qemu-system-x86)",
                                   argv=self.argv) from e
        proc = self._proc
        self._finalizer = weakref.finalize(self, _kill_quietly, proc)

    def _post_launch(self) -> None:
        deadline = time.monotonic() + self.config.qmp_timeout
        qmp = SyncQMP(self.config.name)
        self._qmp = qmp
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise self.error(f"QEMU for {self.config.name} exited during start-up")
            if self.qmp_path.exists():
                try:
                    qmp.connect(self.qmp_path, timeout=max(0.5, deadline - time.monotonic()))
                    self.launch_seconds = time.monotonic() - self._t_launch
                    return
                except Exception as e:  # noqa: BLE001 - retried until the deadline
                    last = e
            time.sleep(0.05)
        raise self.error(f"QMP of {self.config.name} did not answer in "
                         f"{self.config.qmp_timeout:.0f}s (last error: {last!r})")

    # ------------------------------------------------------------------ waiting

    def wait_for_console(self, pattern: str, timeout: float = 60.0,
                         fail: str | None = FAIL_PATTERN) -> re.Match[str]:
        """Wait until the console log matches `pattern` (a regex); fail fast on `fail`."""
        rx = re.compile(pattern)
        frx = re.compile(fail) if fail else None
        deadline = time.monotonic() + timeout
        while True:
            text = self.console_log()
            m = rx.search(text)
            if m:
                return m
            if frx is not None and frx.search(text):
                raise self.error(f"guest {self.config.name} failed while waiting for "
                                 f"{pattern!r}")
            if not self.is_running():
                raise self.error(f"QEMU for {self.config.name} exited while waiting for "
                                 f"{pattern!r}")
            if time.monotonic() > deadline:
                raise self.error(f"no {pattern!r} on the console of {self.config.name} "
                                 f"after {timeout:.0f}s")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait for the guest init's ready marker; return seconds since launch."""
        self.wait_for_console(READY_MARKER, timeout)
        return time.monotonic() - self._t_launch

    def wait_ssh(self, timeout: float = 90.0) -> float:
        """Wait until a command runs over ssh; keep that connection; seconds since launch."""
        if self._ssh is None:
            self._ssh = lab_ssh.wait_ssh(
                self.ssh_port, timeout, key=self._keypair,
                host_key_pub=self.config.image.host_key_pub, alive=self.is_running,
            )
        return time.monotonic() - self._t_launch

    def ssh(self, cmd: str | Sequence[str], timeout: float = 60.0,
            check: bool = False) -> tuple[int, str, str]:
        """Run a command in the guest over the kept ssh connection: (rc, stdout, stderr)."""
        if not self.is_running():
            raise self.error(f"{self.config.name} is not running")
        transport = self._ssh.get_transport() if self._ssh else None
        if transport is None or not transport.is_active():
            if self._ssh is not None:
                self._ssh.close()
            self._ssh = None
            self.wait_ssh(min(timeout, 30.0))
        assert self._ssh is not None
        rc, out, err = lab_ssh.exec_command(self._ssh, cmd, timeout)
        if check and rc != 0:
            raise self.error(f"guest command failed ({rc}): {cmd}\nstdout: {out}\nstderr: {err}")
        return rc, out, err

    # ------------------------------------------------------------------ QMP

    def qmp(self, cmd: str, args: dict[str, object] | None = None,
            timeout: float = 10.0) -> object:
        """Execute one QMP command and return its result (qemu.qmp raises ExecuteError)."""
        if self._qmp is None:
            raise self.error(f"QMP of {self.config.name} is not connected")
        return self._qmp.execute(cmd, args, timeout)

    # ------------------------------------------------------------------ stop

    def shutdown(self, timeout: float = 30.0) -> int | None:
        """Power the guest off via QMP system_powerdown; kill QEMU if it is not gone in time.

        Returns QEMU's exit code. `graceful_shutdown` tells whether the guest powered off by
        itself. Safe to call more than once and after a failed launch.
        """
        proc = self._proc
        if proc is None:
            return self.exitcode
        if proc.poll() is None:
            graceful = False
            if self._qmp is not None:
                try:
                    self._qmp.execute("system_powerdown", timeout=min(5.0, timeout))
                    proc.wait(timeout)
                    graceful = True
                except Exception:  # noqa: BLE001 - any failure here ends in a kill
                    graceful = False
            if proc.poll() is None:
                _kill_quietly(proc)
            self.graceful_shutdown = graceful
        self._teardown()
        return self.exitcode

    def detach(self) -> int | None:
        """Leave QEMU running on its own (the lab's `up` exits; `down` powers it off later
        through the QMP socket in the run dir). Returns its pid."""
        pid = self.pid
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None
        return pid

    def kill(self) -> int | None:
        """SIGKILL QEMU now (no guest shutdown)."""
        if self._proc is not None:
            _kill_quietly(self._proc)
            self.graceful_shutdown = False
        self._teardown()
        return self.exitcode

    def _teardown(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._proc is not None:
            _kill_quietly(self._proc)
            self.exitcode = self._proc.returncode
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self.qmp_path.unlink(missing_ok=True)
