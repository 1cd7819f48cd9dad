"""Sampling the ends from outside during a run: one py-spy per Python end, stages per end.

py-spy (PyPI, the lab extra) reads a running interpreter's stacks through process_vm_readv;
with ``--nonblocking`` it never stops the target, so the data path runs as it would without
it. Each sampler costs CPU of its own (~5 % of a core at 100 Hz here); the bench measures it
(``Profile.cpu_s``, from wait4's rusage) and takes it out of the whole-machine CPU figure.

Only processes that run Python are sampled: a QEMU process (the guest's netfront runs inside
the guest, under TCG) is skipped, and so is everything when py-spy is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.lab.bench.stages import parse_raw, shares, stage_counts

DEFAULT_HZ = 100
"""Samples per second and end: ~250 working samples per end in a 5 s run."""
SLACK_S = 15.0  # how long py-spy may outlive the run before it is killed


def py_spy() -> str | None:
    """The py-spy next to this interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def is_python(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return Path(exe).name.startswith("python")


@dataclass
class Profile:
    """What the samplers of one run found: stage shares per end and their own CPU cost."""

    shares: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # working samples per end
    cpu_s: float = 0.0
    error: str | None = None


@dataclass
class _Sampler:
    role: str
    proc: subprocess.Popen
    out: Path
    cpu_s: float = 0.0


class Profiler:
    """Start one sampler per Python end (`start`), collect them after the run (`finish`)."""

    def __init__(self, hz: int = DEFAULT_HZ) -> None:
        self.hz = hz
        self.exe = py_spy() if hz > 0 else None
        self._samplers: list[_Sampler] = []
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def available(self) -> bool:
        return self.exe is not None

    def start(self, pids: dict[str, int], seconds: float) -> None:
        if self.exe is None:
            return
        self._dir = tempfile.TemporaryDirectory(prefix="pvnet-pyspy-")
        for role, pid in pids.items():
            if not is_python(pid):
                continue
            out = Path(self._dir.name) / f"{role}.txt"
            argv = [self.exe, "record", "--pid", str(pid), "--rate", str(self.hz),
                    "--duration", str(max(1, round(seconds))), "--format", "raw",
                    "--nonblocking", "--subprocesses", "--output", str(out)]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
            self._samplers.append(_Sampler(role, proc, out))

    def finish(self, timeout: float = SLACK_S) -> Profile:
        """Wait for every sampler (killed after `timeout`), parse and attribute its stacks."""
        prof = Profile()
        deadline = time.monotonic() + timeout
        try:
            for s in self._samplers:
                s.cpu_s = _reap(s.proc, deadline)
                prof.cpu_s += s.cpu_s
                if not s.out.exists():
                    err = (s.proc.stderr.read().decode(errors="replace").strip().splitlines()
                           if s.proc.stderr else [])
                    prof.error = f"py-spy {s.role}: {err[0] if err else 'no output'}"
                    continue
                counts = stage_counts(parse_raw(s.out.read_text().splitlines()))
                end_shares = shares(counts)
                if end_shares is not None:
                    prof.shares[s.role] = end_shares
                    prof.samples[s.role] = sum(n for k, n in counts.items() if k != "wait")
        finally:
            for s in self._samplers:
                if s.proc.stderr:
                    s.proc.stderr.close()
            self._samplers = []
            if self._dir is not None:
                self._dir.cleanup()
                self._dir = None
        return prof


def _reap(proc: subprocess.Popen, deadline: float) -> float:
    """wait4 the sampler (SIGKILL at the deadline); its user+system CPU seconds."""
    while True:
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = 0  # reaped here; keep Popen from waiting on a reused pid
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
