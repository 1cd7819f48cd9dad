"""The whole machine around a run: CPU time from /proc/stat, the load, and who else used it.

Why the whole machine: a TAP write runs the receiving stack in the writer's context, softirqs
run wherever they are raised, and work moved into kernel threads leaves the processes'
counters. /proc/stat sees all of it. Busy = user + nice + system + irq + softirq (the
kernel's ``guest`` time is already inside ``user`` and ``guest_nice`` inside ``nice``, so
adding them would count a guest twice); idle, iowait and steal are not busy.

"Outside" is the busy CPU that is neither ours nor the kernel's threads: the machine's busy
time minus the CPU time of this process and everything it started (its live descendants,
and its reaped children through cutime/cstime, which is where a finished iperf3 or trafgen
ends up) and minus the kernel threads' (children of kthreadd: ksoftirqd may be running our
own softirqs, so they are reported apart, as kthreads). What remains is the neighbours'
processes on this shared machine, plus interrupts that arrived while a CPU was idle.

So a run gets two CPU-per-frame figures: the whole machine's (what the issue asks for: every
busy tick, softirq and kernel threads included, but also whatever the neighbours did), and
ours (our processes and the kernel threads: the same minus the neighbours, and minus
softirqs that ran in an idle CPU's context). On a quiet machine the two agree; when
outside_pct is high, ours is the one to compare across runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY_FIELDS = (0, 1, 2, 5, 6)  # user nice system irq softirq (cpu line, after the label)
STEAL_FIELD = 7


@dataclass(frozen=True)
class MachineSample:
    """Cumulative CPU seconds at one instant (all CPUs) and the 1-minute load average."""

    t: float
    busy_s: float
    total_s: float
    steal_s: float
    ours_s: float
    kthreads_s: float
    load1: float
    ncpu: int = field(default=1)


def parse_stat(text: str) -> tuple[float, float, float, int]:
    """/proc/stat -> (busy s, total s, steal s, CPUs) from the aggregate ``cpu`` line."""
    ncpu = 0
    busy = total = steal = 0.0
    for line in text.splitlines():
        name, *values = line.split()
        if name == "cpu":
            ticks = [int(v) for v in values]
            busy = sum(ticks[i] for i in BUSY_FIELDS if i < len(ticks)) / CLK_TCK
            steal = (ticks[STEAL_FIELD] if len(ticks) > STEAL_FIELD else 0) / CLK_TCK
            total = sum(ticks[:8]) / CLK_TCK  # guest fields are inside user/nice already
        elif name.startswith("cpu") and name[3:].isdigit():
            ncpu += 1
    return busy, total, steal, max(ncpu, 1)


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # [0] is field 3 (state)


def tree_cpu_s(root: int) -> tuple[float, float]:
    """(CPU seconds of `root` and its live descendants plus their reaped children, CPU
    seconds of the kernel threads)."""
    children: dict[int, list[int]] = {}
    fields: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(entry)
        if f is None:
            continue
        fields[int(entry)] = f
        children.setdefault(int(f[1]), []).append(int(entry))
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in fields:
            continue
        seen.add(pid)
        f = fields[pid]
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
        todo.extend(children.get(pid, ()))
    kernel = sum(int(fields[p][11]) + int(fields[p][12])
                 for p in (KTHREADD, *children.get(KTHREADD, ())) if p in fields)
    return total / CLK_TCK, kernel / CLK_TCK


KTHREADD = 2  # the parent of every kernel thread


def sample(root: int | None = None) -> MachineSample:
    busy, total, steal, ncpu = parse_stat(Path("/proc/stat").read_text())
    load1 = float(Path("/proc/loadavg").read_text().split()[0])
    ours, kthreads = tree_cpu_s(os.getpid() if root is None else root)
    return MachineSample(time.monotonic(), busy, total, steal, ours, kthreads, load1, ncpu)


def derive(before: MachineSample, after: MachineSample, frames: float | None,
           profiler_s: float = 0.0) -> dict[str, float | None]:
    """The record's machine fields for one run.

    cpu_machine_us_per_frame: busy CPU of the whole machine per data frame, the samplers'
    own CPU taken out (a cost of measuring, not of the path); cpu_ours_us_per_frame: ours
    and the kernel threads' per frame, the samplers taken out. busy_pct / outside_pct /
    kthreads_pct / steal_pct: shares of all CPUs over the run's wall time. load1: the
    1-minute load average at the end of the run.
    """
    wall = after.t - before.t
    capacity = wall * after.ncpu
    busy = max(0.0, after.busy_s - before.busy_s - profiler_s)
    ours = max(0.0, after.ours_s - before.ours_s - profiler_s)
    kthreads = max(0.0, after.kthreads_s - before.kthreads_s)
    out: dict[str, float | None] = {"load1": after.load1}
    if capacity > 0:
        out["busy_pct"] = round(100 * busy / capacity, 1)
        out["outside_pct"] = round(100 * max(0.0, busy - ours - kthreads) / capacity, 1)
        out["kthreads_pct"] = round(100 * kthreads / capacity, 1)
        out["steal_pct"] = round(100 * (after.steal_s - before.steal_s) / capacity, 1)
    out["cpu_machine_us_per_frame"] = round(1e6 * busy / frames, 2) if frames else None
    out["cpu_ours_us_per_frame"] = round(1e6 * (ours + kthreads) / frames, 2) if frames else None
    return out
