"""Everything measured around one workload run, from outside the data path.

In order: the path's counters (``Path.sample``), the ends pinned to the workload's cores
(placement.py), the whole machine's CPU and load (hostcpu.py), one py-spy per Python end
(profiler.py); then the workload; then all of it again. What comes out is the run's result
and the record fields derived from the samples: CPU per GB, per packet and per frame for
each end and the machine, the stage shares of each end's CPU, the load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.lab.bench import hostcpu
from shared.lab.bench.measure import derive
from shared.lab.bench.paths import Endpoints, Path
from shared.lab.bench.placement import pin_ends
from shared.lab.bench.profiler import Profiler
from shared.lab.bench.workloads import RunResult, Workload


@dataclass
class Observation:
    result: RunResult
    fields: dict[str, Any] = field(default_factory=dict)  # Record attribute -> value
    notes: list[str] = field(default_factory=list)


def observe(path: Path, ends: Endpoints, w: Workload, direction: str, seconds: float,
            profile_hz: int) -> Observation:
    """Run `w` once in `direction` and measure it; exceptions of the path propagate."""
    before = path.sample()
    pids = {role: p.pid for role, p in before.procs.items() if p is not None and p.pid}
    cpus = pin_ends(pids, w.placement, {role: p.workers for role, p in before.procs.items()
                                        if p is not None and p.workers})
    profiler = Profiler(profile_hz)
    m0 = hostcpu.sample()
    profiler.start(pids, seconds)
    try:
        res = w.run(ends, direction, seconds)
    finally:
        prof = profiler.finish()
    after = path.sample()
    m1 = hostcpu.sample()
    obs = Observation(res, {"cpus": cpus})
    if res.error is not None:
        return obs
    delivered = res.fps * res.seconds if res.offered_fps is not None and res.fps else None
    fields = derive(before, after, direction, res.payload_bytes, res.seconds, delivered)
    frames = fields.pop("frames", None)
    if res.fps is not None:
        fields.pop("fps", None)  # delivered at the receiver beats counted on the path
    fields.update(hostcpu.derive(m0, m1, frames, prof.cpu_s))
    if res.gen_cpu_s is not None and frames:
        fields["cpu_gen_us_per_frame"] = round(1e6 * res.gen_cpu_s / frames, 2)
    if prof.shares:
        fields["stages"], fields["stage_samples"] = prof.shares, prof.samples
    if prof.error:
        obs.notes.append(prof.error)
    elif pids and profile_hz and not profiler.available:
        obs.notes.append("no stages: py-spy is not installed (pip install -e '.[lab]')")
    obs.fields.update(fields)
    return obs
