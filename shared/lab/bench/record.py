"""One bench record (a row of the table, an element of the JSON list) and the logic over many.

Kept free of I/O so the fast tests can drive it with fake records: picking the median of the
repetitions, and the ratios to veth and virtio-net that make numbers from a noisy shared
machine comparable (only ratios measured side by side in one run mean anything here).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.lab.bench.interval import ci95, rounded

PRIMARY = {"tcp": "gbps", "tcp-nogso": "gbps", "udp64": "fps", "rr": "tps", "pps64": "fps",
           "pps1496": "fps", "tcp-p4": "gbps", "tcp-nogso-p4": "gbps", "pps64-f4": "fps"}
"""The higher-is-better figure each workload's ratios are taken on."""

CI_FIELDS = ("gbps", "fps", "tps", "p50_us", "cpu_front_us_per_frame", "cpu_back_us_per_frame",
             "cpu_machine_us_per_frame", "cpu_ours_us_per_frame")
"""The figures that get a 95 % interval over rounds (where the rounds have them)."""


@dataclass
class Record:
    """One (path, mode, workload, direction): the median repetition's figures.

    direction: "tx" guest->peer, "rx" peer->guest, "both" for rr.
    Per-packet figures count data frames of the measured direction on the backend's ring;
    notify_per_pkt counts every notification either end sent on either ring (ACK traffic
    included: it is the whole cost of moving those packets). op_us (pvnet only) is the mean
    time of each grant operation in the run: map/unmap (a real mmap into the CPU view and its
    undo), fault (a first-touch round trip), grant_copy_kb (per KiB grant-copied), notify.
    cpu_*_s_per_gb divides process CPU time by payload delivered; null where there is no such
    process (veth) or too little payload.

    Per frame: cpu_front/back_us_per_frame is each end's CPU per data frame of the
    run (frames counted on the path; delivered frames for pps*); cpu_machine_us_per_frame the
    whole machine's busy CPU per frame (/proc/stat, hostcpu.py), cpu_ours_us_per_frame the
    same without the neighbours' processes (ours and kernel threads); cpu_gen_us_per_frame the
    pps generator's own share of it; wait_front/back_us_per_frame the time each end spent
    runnable but waiting for a CPU (the other end, the kernel or a tool had it), per frame.
    stages: end -> stage -> share of that end's sampled CPU
    (stages.py), stage_samples the working samples behind each end's shares. load1,
    busy_pct, outside_pct, kthreads_pct, steal_pct: the machine during the run
    (hostcpu.py). cpus: where the ends and tools ran (placement.py). ci95: figure -> [low,
    high], the 95 % interval of the mean over rounds (interval.py); the figures themselves
    are the median round's.
    offered_fps / frame_bytes: pps* only (pps.py).
    """

    path: str
    mode: str
    workload: str
    direction: str
    seconds: float = 0.0
    reps: int = 0
    gbps: float | None = None
    fps: float | None = None
    tps: float | None = None
    loss_pct: float | None = None
    offered_fps: float | None = None
    frame_bytes: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    vs_veth: float | None = None
    vs_virtio: float | None = None
    cpu_front_s_per_gb: float | None = None
    cpu_back_s_per_gb: float | None = None
    cpu_front_pct: float | None = None
    cpu_back_pct: float | None = None
    notify_per_pkt: float | None = None
    maps_per_pkt: float | None = None
    copies_per_pkt: float | None = None
    copy_bytes_per_pkt: float | None = None
    #: the paper's cost model: the backend's grant operations per packet on both rings (maps,
    #: unmaps, grant copies and their bytes, first touches, bytes copied by the CPU through a
    #: mapping) and transient TX grants held
    #: (measure.py); the
    #: netfront's grant recycling hit rate in % (null without recycling)
    op_maps_per_pkt: float | None = None
    op_unmaps_per_pkt: float | None = None
    op_copies_per_pkt: float | None = None
    #: of op_copies_per_pkt, the header pulls out of a fragment the packet holds
    op_pulls_per_pkt: float | None = None
    #: header pulls by a CPU copy out of a kept mapping (persistent, staging grants)
    op_staged_pulls_per_pkt: float | None = None
    op_gcopy_bytes_per_pkt: float | None = None
    op_holds_per_pkt: float | None = None
    op_touches_per_pkt: float | None = None
    op_cpu_copy_bytes_per_pkt: float | None = None
    recycle_hit_pct: float | None = None
    rss_front_mb: float | None = None
    rss_back_mb: float | None = None
    cpu_front_us_per_frame: float | None = None
    cpu_back_us_per_frame: float | None = None
    cpu_machine_us_per_frame: float | None = None
    cpu_ours_us_per_frame: float | None = None
    cpu_gen_us_per_frame: float | None = None
    #: runnable but waiting for a CPU, per frame (schedstat run_delay; placement.py)
    wait_front_us_per_frame: float | None = None
    wait_back_us_per_frame: float | None = None
    stages: dict[str, dict[str, float]] | None = None
    stage_samples: dict[str, int] | None = None
    load1: float | None = None
    busy_pct: float | None = None
    outside_pct: float | None = None
    kthreads_pct: float | None = None
    steal_pct: float | None = None
    cpus: str = ""
    ci95: dict[str, list[float]] | None = None
    #: mean µs per operation (map, unmap, fault, grant_copy_kb, notify; null: none done)
    op_us: dict[str, float | None] | None = None
    spread_pct: float | None = None  # (max - min) / median of the primary figure over reps
    note: str = ""
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.path, self.mode, self.workload, self.direction)

    @property
    def primary(self) -> float | None:
        return getattr(self, PRIMARY.get(self.workload, "gbps"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median_of(reps: list[Record]) -> Record:
    """The repetition with the median primary figure (lower middle for an even count).

    A whole record rather than per-field medians, so the CPU and per-packet figures stay the
    ones measured together with that throughput. Failed repetitions only count if all failed.
    """
    if not reps:
        raise ValueError("no repetitions")
    good = [r for r in reps if r.error is None and r.primary is not None]
    if not good:
        out = Record.from_dict(reps[-1].as_dict())
        out.reps = 0
        return out
    good.sort(key=lambda r: r.primary)  # type: ignore[arg-type, return-value]
    out = Record.from_dict(good[(len(good) - 1) // 2].as_dict())
    out.reps = len(good)
    lo, hi, mid = good[0].primary, good[-1].primary, out.primary
    out.spread_pct = round(100 * (hi - lo) / mid, 1) if len(good) > 1 and mid else None
    out.ci95 = intervals(good)
    return out


def intervals(reps: list[Record]) -> dict[str, list[float]] | None:
    """The 95 % interval over rounds of each CI_FIELDS figure every repetition has."""
    out = {}
    for name in CI_FIELDS:
        values = [getattr(r, name) for r in reps]
        if all(v is not None for v in values):
            iv = rounded(ci95(values))
            if iv is not None:
                out[name] = [max(0.0, iv[0]), iv[1]]  # every such figure is >= 0
    return out or None


def combine(runs: Iterable[Record]) -> list[Record]:
    """Group repetitions by key (first-seen order) and keep each group's median."""
    groups: dict[tuple[str, str, str, str], list[Record]] = {}
    for r in runs:
        groups.setdefault(r.key, []).append(r)
    return [median_of(g) for g in groups.values()]


def _baseline(records: list[Record], path: str) -> dict[tuple[str, str], float]:
    base: dict[tuple[str, str], float] = {}
    for r in records:
        if r.path == path and r.error is None and r.primary:
            base.setdefault((r.workload, r.direction), r.primary)
    return base


def add_ratios(records: list[Record]) -> list[Record]:
    """Fill vs_veth and vs_virtio (primary / baseline's primary, same workload and direction);
    null where the baseline path did not run or the record has no figure."""
    veth, virtio = _baseline(records, "veth"), _baseline(records, "virtio-net")
    virtio_g2g = _baseline(records, "virtio-net-g2g")  # guest <-> guest against its own kind
    for r in records:
        p = r.primary
        g2g = r.path.endswith("-g2g")
        for attr, base in (("vs_veth", None if g2g else veth),
                           ("vs_virtio", virtio_g2g if g2g else virtio)):
            if base is None:
                setattr(r, attr, None)
                continue
            b = base.get((r.workload, r.direction))
            setattr(r, attr, round(p / b, 3) if p is not None and b else None)
    return records
