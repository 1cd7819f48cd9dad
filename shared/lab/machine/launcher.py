"""The QEMU launcher: one `Machine` per guest, used as a context manager.

`launch()` = `_pre_launch()` (run dir, guest JSON, command line) + start QEMU +
`_post_launch()` (QMP connected); `shutdown()` asks the guest to power off over QMP (ACPI power
button) and kills QEMU when it does not within the timeout; `kill()` kills at once. Used as a
context manager, the machine is launched on enter and shut down on exit. Every failure is a
MachineError carrying the command line, QEMU's exit code and the log tails.

Files in the run dir (one per machine, chosen by the caller; under /run/pvnet/<name> in the
lab, which the guest can read back at /host/run/pvnet/<name>): see RunFiles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Sequence

import paramiko

from shared.lab import ssh as lab_ssh
from shared.lab.accel import Accel, detect_accel
from shared.lab.machine.cmdline import guest_config, qemu_argv
from shared.lab.machine.config import MachineConfig, RunFiles
from shared.lab.machine.failure import MachineError
from shared.lab.machine.qmp import SyncQMP
from shared.lab.procs import tail_lines

READY_MARKER = "PVNET-GUEST-READY"
FAIL_PATTERN = r"PVNET-INIT-FAILED|Kernel panic|end Kernel panic"
UNIX_PATH_MAX = 107


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



class Machine:
    """One QEMU guest. Not thread-safe; one owner drives launch/ssh/shutdown."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.files = RunFiles.at(config.run_dir, config.guest_json)
        self.run_dir = self.files.run_dir  # the guest reads it as /host/<this path>
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
            return self.files.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def error(self, message: str) -> MachineError:
        """A MachineError for this machine with its command line and log tails."""
        code = self._proc.poll() if self._proc else None
        return MachineError(message, argv=self.argv, exitcode=code,
                            qemu_log="\n".join(tail_lines(self.files.qemu_log, 20)),
                            console="\n".join(tail_lines(self.files.console, 40)))

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
        if len(str(self.files.qmp)) > UNIX_PATH_MAX:
            raise MachineError(f"run dir path too long for a unix socket: {self.files.qmp}")
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
        for p in (self.files.qmp, self.files.console, self.files.qemu_log):
            p.unlink(missing_ok=True)
        self._keypair = lab_ssh.ensure_keypair()
        if cfg.write_guest_json:
            self.files.guest_json.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.files.guest_json.with_suffix(".tmp")
            conf = guest_config(cfg, self._keypair.public_line)
            tmp.write_text(json.dumps(conf, indent=2) + "\n")
            tmp.rename(self.files.guest_json)
        self.argv = qemu_argv(cfg, self.files, self.accel, self.ssh_port)

    def _launch(self) -> None:
        pass_fds = tuple(shm.fd for shm in self.config.shm) + tuple(
            nic.fd for nic in self.config.nics if nic.fd is not None)
        self._t_launch = time.monotonic()
        with open(self.files.qemu_log, "wb") as log:
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
            if self.files.qmp.exists():
                try:
                    qmp.connect(self.files.qmp, timeout=max(0.5, deadline - time.monotonic()))
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
        self._close_links()
        self._proc = None
        return pid

    def kill(self) -> int | None:
        """SIGKILL QEMU now (no guest shutdown)."""
        if self._proc is not None:
            _kill_quietly(self._proc)
            self.graceful_shutdown = False
        self._teardown()
        return self.exitcode

    def _close_links(self) -> None:
        """Drop our ssh and QMP connections and the kill-on-collect finalizer; QEMU itself is
        left alone (detach) or killed by the caller (teardown)."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def _teardown(self) -> None:
        self._close_links()
        if self._proc is not None:
            _kill_quietly(self._proc)
            self.exitcode = self._proc.returncode
        self.files.qmp.unlink(missing_ok=True)
