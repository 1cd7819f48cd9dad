"""Why a lab did not come up, found while `up` still waits: the fail-fast half of `invoke up`.

A guest that cannot start its netfront says so on its console within seconds of boot
(vm-images/guest/guest_runs.py prints "run[i] ...: cannot start: ..." or "run[i] ...: exited
(status N): <its last line>"; stage 1 and 2 print PVNET-INIT-FAILED after a FATAL line); a
netback that dies leaves its last words in its log. Waiting for the Connected timeout after
such a report only hides it: `up` polls these every half second and stops with the one line
that names the component and says what went wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

#: a run command of the guest's init that failed: its own line names the command and why
RUN_FAILED = re.compile(r"run\[\d+\] .*: (?:cannot start: .*|exited \(status -?\d+\).*)")
#: the guest's init gave up, or the kernel did (the FATAL line before it says why)
INIT_FAILED = re.compile(r"PVNET-INIT-FAILED|Kernel panic")
FATAL = re.compile(r"FATAL: .*")


def last_line(path: Path) -> str:
    """The last non-empty line of a log: a dead process's own error line."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return f"(no log at {path})"
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else f"(empty log {path})"


def console_failure(text: str) -> str | None:
    """The line of a guest console that reports a start-up failure, or None.

    A failed run command wins (it is the component's own line); else the init's FATAL line;
    else the failure marker itself."""
    lines = [ln.strip() for ln in text.replace("\r", "").splitlines()]
    for line in lines:
        m = RUN_FAILED.search(line)
        if m:
            return m.group(0)
    marker = next((ln for ln in lines if INIT_FAILED.search(ln)), None)
    if marker is None:
        return None
    fatal = [m.group(0) for ln in lines if (m := FATAL.search(ln))]
    return fatal[-1] if fatal else marker


def guest_failure(name: str, console: Path, qemu_alive: bool, qemu_log: Path) -> str | None:
    """'guest NAME: <why>' if the guest reported a start-up failure or QEMU is gone."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        text = ""
    line = console_failure(text)
    if line is not None:
        return f"guest {name}: {line}"
    if not qemu_alive:
        return f"guest {name}: QEMU exited: {last_line(qemu_log)}"
    return None


def process_failure(role: str, name: str, dead: str, log: Path) -> str | None:
    """'ROLE NAME exited (REASON): <its last log line>' when `dead` (a reason) is non-empty."""
    if not dead:
        return None
    return f"{role} {name} exited ({dead}): {last_line(log)}"
