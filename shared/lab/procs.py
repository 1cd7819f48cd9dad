"""Spawning and reaping the lab's long-running processes, with pidfiles that survive a crash.

Every daemon the lab starts (netback, netfront, iperf3 servers) gets its own session/process
group, its own log file and a pidfile recording pid *and* kernel start time. `down` may run
long after `up` crashed, in another process, when the pid could have been reused (pid_max is
32768 here): the start time is what lets it kill our process group and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PidRecord:
    """What a pidfile holds: enough to recognise the process again."""

    pid: int
    start: int  # /proc/<pid>/stat field 22: start time in clock ticks since boot
    argv: tuple[str, ...] = ()

    def alive(self) -> bool:
        """True if this very process (not a reuse of its pid) still runs (zombies don't count)."""
        info = proc_stat(self.pid)
        return info is not None and info.start == self.start and info.state != "Z"


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    pgrp: int
    start: int
    ppid: int = 0


def proc_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat (the comm field may contain spaces and parentheses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3]
    return ProcStat(pid=pid, state=rest[0], pgrp=int(rest[2]), start=int(rest[19]),
                    ppid=int(rest[1]))


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def read_pidfile(path: Path) -> PidRecord | None:
    """Return the record, or None if the file is missing or unreadable (treated as no process)."""
    try:
        data = json.loads(path.read_text())
        return PidRecord(int(data["pid"]), int(data["start"]), tuple(data.get("argv", ())))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_pidfile(path: Path, pid: int, argv: Sequence[str]) -> PidRecord:
    info = proc_stat(pid)
    rec = PidRecord(pid, info.start if info else 0, tuple(argv))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"pid": rec.pid, "start": rec.start, "argv": list(rec.argv)}))
    os.replace(tmp, path)
    return rec


def spawn(argv: Sequence[str], *, log: Path, pidfile: Path, cwd: str | Path | None = None,
          env: dict[str, str] | None = None,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start `argv` detached (new session), stdout+stderr appended to `log`, and record it.

    The caller keeps the Popen so it can notice an early exit while it waits for readiness;
    once the caller exits the daemon is re-parented to init and `down` finds it by pidfile.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=cwd, env=env, pass_fds=tuple(pass_fds),
        )
    write_pidfile(pidfile, proc.pid, argv)
    return proc


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for pid in all_pids():
        info = proc_stat(pid)
        if info is not None and info.pgrp == pgid and info.state != "Z":
            out.append(pid)
    return out


def _targets(rec: PidRecord) -> list[int]:
    """Pids to signal for `rec`: its group if the leader is ours or gone, never a reused pid."""
    leader = proc_stat(rec.pid)
    if leader is not None and leader.start != rec.start:
        return []  # the pid now belongs to someone else; so does any group it leads
    return group_members(rec.pid)  # leader (if alive) plus any children it left behind


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _reap(pids: Iterable[int]) -> None:
    """Collect those of `pids` that are our exited children, so they don't linger as zombies.

    Only the given pids: waitpid(-1) would steal exit statuses from unrelated Popen objects.
    """
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs (zombies count as gone); return the survivors."""
    pending = {p: proc_stat(p) for p in pids}
    deadline = time.monotonic() + timeout
    while True:
        _reap(pending)
        for pid, info in list(pending.items()):
            now = proc_stat(pid)
            if now is None or now.state == "Z" or (info and now.start != info.start):
                del pending[pid]
        if not pending or time.monotonic() >= deadline:
            return sorted(pending)
        time.sleep(0.05)


def terminate(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGTERM, wait up to `timeout`, then SIGKILL whatever is left; return the killed pids."""
    pids = sorted(set(pids))
    if not pids:
        return []
    _signal(pids, signal.SIGTERM)
    survivors = wait_gone(pids, timeout)
    if survivors:
        _signal(survivors, signal.SIGKILL)
        wait_gone(survivors, 2.0)
    return survivors


def stop_group(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    """Stop a child we started in a session of its own (``start_new_session``) with all its
    group: SIGTERM, SIGKILL after ``timeout``; reaped either way."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_pidfile(path: Path, timeout: float = 5.0) -> list[int]:
    """Stop the process group a pidfile names and remove the file; return the pids signalled."""
    rec = read_pidfile(path)
    pids = _targets(rec) if rec is not None else []
    terminate(pids, timeout)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return pids


def pids_in_netns(name: str) -> list[int]:
    """Processes whose network namespace is /run/netns/<name> (like `ip netns pids`)."""
    try:
        st = os.stat(f"/run/netns/{name}")
    except OSError:
        return []
    want = f"net:[{st.st_ino}]"
    out = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/net") == want:
                info = proc_stat(pid)
                if info is not None and info.state != "Z":
                    out.append(pid)
    return out


def pids_with_args(*needles: str) -> list[int]:
    """Processes whose argv contains every string of `needles` as whole arguments, in order.

    The crash sweep: a data process whose pidfile never got written is still recognisable by
    its unique `--ctl <state>/<name>.ctl` pair.
    """
    out = []
    n = len(needles)
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if any(tuple(args[i : i + n]) == needles for i in range(len(args) - n + 1)):
            out.append(pid)
    return out


def tail_lines(path: Path, n: int) -> list[str]:
    """The last `n` lines of a process's log or a guest's console ([] if it cannot be read):
    what a failure message quotes so that nobody has to re-run to see why."""
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []
