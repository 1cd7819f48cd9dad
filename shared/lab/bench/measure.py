"""What a path reports around a workload (`Sample`) and the per-run figures derived from two.

A path only has to say what it can see -- cumulative frame counts per direction, the pids of its
data-path processes, and (for pvnet) the raw ring counters of both ends -- and this module turns
a before/after pair into the bench's fields. Keeping the arithmetic here, away from the paths,
means a new path (QEMU) gets CPU per GB, notifications per packet and the rest for free, and the
fast tests can check the arithmetic on fake samples.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIN_BYTES_FOR_CPU_PER_GB = 1 << 20
"""Below this much payload a CPU-per-GB figure is noise (rr moves a few hundred KB)."""


@dataclass(frozen=True)
class ProcSample:
    """CPU time used so far, peak RSS and time spent runnable but waiting for a CPU, of one
    process, from /proc (None if it is gone)."""

    cpu_s: float
    hwm_kb: int
    pid: int = 0
    #: a multi-queue end's queue workers (placement.py pins them apart)
    workers: tuple[int, ...] = ()
    #: run queue wait of its threads (schedstat's run_delay): on the packet-rate path's one
    #: core, the time an end waited while the other end or the kernel ran
    wait_s: float = 0.0


def read_proc(pid: int) -> ProcSample | None:
    """utime+stime (/proc/<pid>/stat fields 14, 15) and VmHWM (/proc/<pid>/status)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # rest[0] is field 3
    ticks = int(rest[11]) + int(rest[12])
    hwm = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
            break
    return ProcSample(ticks / CLK_TCK, hwm, pid, wait_s=run_delay_s(pid))


def run_delay_s(pid: int) -> float:
    """Seconds the threads of `pid` have spent on a run queue waiting for a CPU: the second
    field of each /proc/<pid>/task/<tid>/schedstat (ns; a thread that has exited is gone
    from the sum, the ends' threads live as long as they do)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def read_end(reply: dict) -> ProcSample | None:
    """An end's processes from its stats reply: itself and its queue workers (``pids``, a
    multi-queue end), CPU and peak RSS summed (None if it is gone)."""
    pids = reply.get("pids") or [reply["pid"]]
    got = [p for p in (read_proc(int(pid)) for pid in pids) if p is not None]
    if not got:
        return None
    return ProcSample(sum(p.cpu_s for p in got), sum(p.hwm_kb for p in got), got[0].pid,
                      tuple(p.pid for p in got[1:]), sum(p.wait_s for p in got))


@dataclass
class Sample:
    """A path's cumulative view at one instant.

    `frames`: data frames seen so far per direction ("tx" guest->peer, "rx" peer->guest).
    `procs`: role ("front", "back") -> process sample, for the processes of the data path.
    `rings`: end ("front", "back") -> the stats reply's "rings" dict (pvnet paths only).
    """

    t: float = field(default_factory=time.monotonic)
    frames: dict[str, int] = field(default_factory=dict)
    procs: dict[str, ProcSample | None] = field(default_factory=dict)
    rings: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


def _rings_for(direction: str) -> tuple[str, ...]:
    """Which rings carry a direction's data: TX guest->peer, RX peer->guest, both for rr."""
    return {"tx": ("tx",), "rx": ("rx",)}.get(direction, ("tx", "rx"))


def _ring_delta(before: Sample, after: Sample, end: str, ring: str, key: str) -> int:
    try:
        return int(after.rings[end][ring][key]) - int(before.rings[end][ring][key])
    except (KeyError, TypeError, ValueError):
        return 0


def _per(num: float, den: float, digits: int = 3) -> float | None:
    return round(num / den, digits) if den > 0 else None


def derive(before: Sample, after: Sample, direction: str, payload_bytes: float,
           seconds: float, delivered: float | None = None) -> dict[str, float | None]:
    """The bench fields one run yields: fps (path counters), CPU, notify/map/copy per packet, RSS.

    `payload_bytes` is what the workload delivered (iperf3's receiver bytes), used for CPU s per
    GB; `seconds` is the workload's own duration, used for frames per second. CPU per frame
    divides by `delivered` frames when the workload counted them at the receiver (pps*), else
    by the frames the path counted in the measured direction(s).
    """
    dirs = ("tx", "rx") if direction not in ("tx", "rx") else (direction,)
    out: dict[str, float | None] = {}
    frames = delivered
    if all(d in before.frames and d in after.frames for d in dirs):
        counted = sum(after.frames[d] - before.frames[d] for d in dirs)
        out["fps"] = round(counted / seconds, 1) if seconds > 0 else None
        frames = counted if frames is None else frames
    out["frames"] = frames
    wall = after.t - before.t
    for role in ("front", "back"):
        a, b = after.procs.get(role), before.procs.get(role)
        cpu = a.cpu_s - b.cpu_s if a is not None and b is not None else None
        out[f"cpu_{role}_pct"] = round(100 * cpu / wall, 1) if cpu is not None and wall else None
        big = payload_bytes >= MIN_BYTES_FOR_CPU_PER_GB
        out[f"cpu_{role}_s_per_gb"] = (round(cpu / (payload_bytes / 1e9), 2)
                                       if cpu is not None and big else None)
        out[f"rss_{role}_mb"] = round(a.hwm_kb / 1024, 1) if a is not None else None
        out[f"cpu_{role}_us_per_frame"] = (round(1e6 * cpu / frames, 2)
                                           if cpu is not None and frames else None)
        waited = a.wait_s - b.wait_s if a is not None and b is not None else None
        out[f"wait_{role}_us_per_frame"] = (round(1e6 * waited / frames, 2)
                                            if waited is not None and frames else None)
    if before.rings and after.rings:
        rings = _rings_for(direction)
        packets = sum(_ring_delta(before, after, "back", r, f"{r}_packets") for r in rings)
        ends = tuple(after.rings)
        notify = sum(_ring_delta(before, after, e, r, "notify_sent")
                     for e in ends for r in ("tx", "rx"))
        maps = sum(_ring_delta(before, after, "back", r, "grant_maps") for r in rings)
        copies = sum(_ring_delta(before, after, "back", r, "grant_copies") for r in rings)
        copied = sum(_ring_delta(before, after, e, r, "copy_bytes") for e in ends for r in rings)
        out.update(ring_packets=packets, notify_per_pkt=_per(notify, packets),
                   maps_per_pkt=_per(maps, packets), copies_per_pkt=_per(copies, packets),
                   copy_bytes_per_pkt=_per(copied, packets, 1))
        out.update(_op_counts(before, after, rings, packets))
        out["op_us"] = op_us(before, after)
    return out


def _op_counts(before: Sample, after: Sample, rings: tuple[str, ...],
               packets: int) -> dict[str, float | None]:
    """The counts the paper table's cost model multiplies by per-operation costs, per packet
    of the measured direction: the backend's CPU-view maps and unmaps, grant copies and
    grant-copied bytes, first touches of freshly mapped pages and bytes the CPU copied through
    a mapping on both rings (the CPU view
    counts every map on the TX ring's stats,
    and a direction's frames bring the other ring's traffic with them), the transient TX
    grants it held (fragments less persistent hits); and the netfront's grant recycling hit
    rate (% of the pages named on the measured rings whose grant was reused; null: none)."""
    def back(key: str, on: tuple[str, ...] = ("tx", "rx")) -> int:
        return sum(_ring_delta(before, after, "back", r, key) for r in on)

    hits = sum(_ring_delta(before, after, "front", r, "grants_recycled") for r in rings)
    fresh = sum(_ring_delta(before, after, "front", r, "grants_fresh") for r in rings)
    holds = max(0, back("tx_frags", ("tx",)) - back("persistent_hits", ("tx",)))
    return {"op_maps_per_pkt": _per(back("grant_maps"), packets),
            "op_unmaps_per_pkt": _per(back("grant_unmaps"), packets),
            "op_copies_per_pkt": _per(back("grant_copies"), packets),
            "op_pulls_per_pkt": _per(back("grant_pulls"), packets),
            "op_staged_pulls_per_pkt": _per(back("staged_pulls"), packets),
            "op_gcopy_bytes_per_pkt": _per(back("grant_copy_bytes"), packets, 1),
            "op_holds_per_pkt": _per(holds, packets),
            "op_touches_per_pkt": _per(back("first_touches"), packets),
            "op_cpu_copy_bytes_per_pkt": _per(back("cpu_copy_bytes"), packets, 1),
            "recycle_hit_pct": _per(100 * hits, hits + fresh, 1)}


OP_US = {"map": ("map_ns", "grant_maps", 1), "unmap": ("unmap_ns", "grant_unmaps", 1),
         "fault": ("fault_ns", "faults", 1),
         "grant_copy_kb": ("grant_copy_ns", "grant_copy_bytes", 1024),
         "notify": ("notify_ns", "notify_sent", 1)}
"""op_us key -> (ns total counter, count counter, count unit): mean µs per operation."""


def op_us(before: Sample, after: Sample) -> dict[str, float | None]:
    """Mean microseconds per grant operation in the run, over both rings of every end (the
    backend maps and copies; both ends notify): null where none happened."""
    out: dict[str, float | None] = {}
    ends = tuple(after.rings)
    for key, (ns, count, unit) in OP_US.items():
        total = sum(_ring_delta(before, after, e, r, ns) for e in ends for r in ("tx", "rx"))
        n = sum(_ring_delta(before, after, e, r, count) for e in ends for r in ("tx", "rx"))
        out[key] = round(total / 1000 / (n / unit), 3) if n > 0 else None
    return out
