"""The config's ``run`` commands: started in the background from a supervisor that outlives
the init script and reports on the console when one cannot start or exits.

(Standard library only: the guest runs it with the host's python3 -I -S, see guest_init.py.)
"""

import os
import shlex
import subprocess

from guest_base import BB, STATE, say


def start_runs(run, env, cwd):
    """Start each command in the background; its output goes to the console and to a file.

    Returns [(i, argv, command Popen, tee Popen)] of those that started. The output is piped
    through busybox tee (detached), so the lab on the host sees it on the console. A command
    that cannot start is reported as "run[i] ...: cannot start: <why>" on the console: the lab
    fails on that line.
    """
    full_env = dict(os.environ)
    full_env.update({k: str(v) for k, v in env.items()})
    workdir = cwd if cwd and os.path.isdir(cwd) else "/"
    started = []
    for i, argv in enumerate(run):
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        log = os.path.join(STATE, f"{i}.log")
        with open(log, "ab") as f:
            f.write(f"# run[{i}]: {shlex.join(argv)}\n".encode())
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=full_env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as e:
            say(f"run[{i}] {shlex.join(argv)}: cannot start: {e}")
            with open(log, "a") as f:
                f.write(f"cannot start: {e}\n")
            continue
        with open("/dev/console", "wb") as console:
            tee = subprocess.Popen([BB, "tee", "-a", log], stdin=proc.stdout, stdout=console,
                                   start_new_session=True)
        proc.stdout.close()
        with open(os.path.join(STATE, f"{i}.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        say(f"run[{i}] pid {proc.pid}: {shlex.join(argv)}")
        started.append((i, argv, proc, tee))
    return started


def last_line(path):
    """The last non-empty line of a run's log: the component's own error line when it died."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def supervise(started):
    """Wait for the run commands and report each exit on the console, with its last line.

    The lab on the host watches the console for "run[i] ... exited": a netfront that dies at
    start-up (an import error, a bad argument) fails `invoke up` at once, not at its timeout.
    """
    pending = {proc.pid: (i, argv, tee) for i, argv, proc, tee in started}
    while pending:
        try:
            pid, raw = os.wait()  # in whatever order they end (tees are reaped here too)
        except ChildProcessError:
            return
        if pid not in pending:
            continue
        i, argv, tee = pending.pop(pid)
        try:  # tee ends at the pipe's EOF: then the log holds the command's last words
            tee.wait(2.0)
        except subprocess.TimeoutExpired:
            pass  # a child of the command still holds the pipe: report what is there
        say(f"run[{i}] {shlex.join(argv)}: exited (status {os.waitstatus_to_exitcode(raw)}): "
            f"{last_line(os.path.join(STATE, f'{i}.log'))}")


def start_supervised(run, env, cwd):
    """Start the run commands from a forked supervisor that outlives this script (which must
    exit: busybox init waits for its sysinit action) and reports their exits; return once
    every command was started (or failed to)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the supervisor
        os.close(r)
        try:
            os.setsid()
            started = start_runs(run, env, cwd)
        finally:
            os.write(w, b"1")
            os.close(w)
        try:
            supervise(started)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)

