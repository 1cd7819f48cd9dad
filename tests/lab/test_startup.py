"""Fast tier: what `invoke up` recognises as a start-up failure, and which host directories a
guest must see at their own paths to run the lab's interpreter (shared/lab/startup.py,
shared/lab/machine/guest_env.py). The QEMU side of both is in tests/lab/test_first_run.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared.lab.machine.guest_env import interpreter_paths
from shared.lab.startup import console_failure, guest_failure, process_failure

BOOT = """\
[    0.000000] Linux version 6.1.0-28-amd64
pvnet-init: stage 1 at 0.91s, kernel 6.1.0-28-amd64
pvnet-guest: [9.12] sshd listening on port 22
"""


def test_a_run_command_that_cannot_start_is_the_reported_line() -> None:
    line = ("run[0] /tmp/x/venv/bin/python3 -m frontend --name g1: cannot start: "
            "[Errno 2] No such file or directory: '/tmp/x/venv/bin/python3'")
    text = BOOT + f"pvnet-guest: [9.30] {line}\npvnet-guest: [9.31] ready at 9.31s\n"
    assert console_failure(text) == line


def test_a_run_command_that_exited_is_reported_with_its_last_line() -> None:
    line = ("run[0] /usr/bin/python3 -m frontend: exited (status 1): "
            "ModuleNotFoundError: No module named 'frontend'")
    assert console_failure(BOOT + f"pvnet-guest: [12.0] {line}\r\n") == line


def test_init_failure_reports_the_fatal_line_not_the_marker() -> None:
    text = BOOT + ("pvnet-guest: [9.2] FATAL: RuntimeError: no interface with MAC 02:00\n"
                   "PVNET-INIT-FAILED\n")
    assert console_failure(text) == "FATAL: RuntimeError: no interface with MAC 02:00"
    assert console_failure(BOOT + "Kernel panic - not syncing: VFS\n") == \
        "Kernel panic - not syncing: VFS"


def test_a_healthy_boot_is_no_failure() -> None:
    text = BOOT + "pvnet-guest: [9.3] run[0] pid 312: /usr/bin/python3 -m frontend\n"
    assert console_failure(text) is None
    assert console_failure("") is None


def test_guest_failure_names_the_guest_and_a_dead_qemu(tmp_path: Path) -> None:
    console, qlog = tmp_path / "console.log", tmp_path / "qemu.log"
    console.write_text(BOOT)
    qlog.write_text("qemu-system-x86_64: -device ivshmem-plain: bad size\n\n")
    assert guest_failure("g1", console, True, qlog) is None
    assert guest_failure("g1", console, False, qlog) == \
        "guest g1: QEMU exited: qemu-system-x86_64: -device ivshmem-plain: bad size"
    console.write_text(BOOT + "pvnet-guest: [1.0] run[1] iperf3 -s: exited (status 1): "
                       "iperf3: error - unable to start listener\n")
    assert guest_failure("g1", console, True, qlog) == \
        "guest g1: run[1] iperf3 -s: exited (status 1): iperf3: error - unable to start listener"


def test_process_failure_quotes_the_last_log_line(tmp_path: Path) -> None:
    log = tmp_path / "vif1.0.log"
    log.write_text("--- 2026-12-02 argv\nTraceback ...\nOSError: [Errno 19] No such device\n")
    assert process_failure("netback", "vif1.0", "", log) is None
    assert process_failure("netback", "vif1.0", "status 1", log) == \
        "netback vif1.0 exited (status 1): OSError: [Errno 19] No such device"


def test_interpreter_paths_cover_a_venv_under_tmp() -> None:
    """A venv under /tmp: its prefix (pyvenv.cfg) is what the guest must see at its own path;
    the base interpreter's dirs outside /tmp and /run need no mapping."""
    venv = Path("/tmp") / f"pvnet-test-venv-{os.getpid()}"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        paths = interpreter_paths(str(venv / "bin" / "python3"))
        assert str(venv) in paths and (venv / "pyvenv.cfg").is_file()
        assert all(p.startswith(("/tmp/", "/run/")) for p in paths)
    finally:
        subprocess.run(["rm", "-rf", str(venv)], check=True)


def test_interpreter_paths_skip_what_the_guest_sees_anyway() -> None:
    assert interpreter_paths("/usr/bin/python3") == []
