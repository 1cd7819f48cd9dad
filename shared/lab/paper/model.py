"""The cost model: pvnet's ratio for a row predicted before the row is measured.

Inputs, all fixed in advance or measured in the same ``invoke paper`` run, nothing fitted
per row:

- per-operation costs (µs) from ``python -m backend.opbench`` run in the same lock hold:
  ``map``, ``unmap``, ``grant_copy`` (per copy) and ``grant_copy_kb`` (per KiB beyond),
  ``pull`` (a header pull's grant copy out of a fragment already held), ``staged_pull``
  (the same pull out of a page kept mapped: a lookup and a CPU copy),
  ``hold`` (a transient TX grant held and released), ``first_touch`` (the page fault of the
  first access to a freshly mapped page), ``cpu_copy_kb`` (a CPU copy out of a mapped page,
  per KiB), ``notify``;
- operation counts per packet from each mode's own counters in the run (the bench record's
  ``op_maps_per_pkt``, ``op_unmaps_per_pkt``, ``op_copies_per_pkt`` (``op_pulls_per_pkt``
  of them pulls), ``op_staged_pulls_per_pkt``,
  ``op_gcopy_bytes_per_pkt``, ``op_holds_per_pkt``, ``op_touches_per_pkt``,
  ``op_cpu_copy_bytes_per_pkt``, ``notify_per_pkt``);
- one base cost per path, workload and direction: the reference mode's (``rows.REFERENCE``)
  CPU µs per frame for each end, minus the operations it did itself.

A mode's cost per frame is the CPU the path spends on a frame: both ends, the iperf3 ends
and the kernel's work for them (the bench's ``cpu_ours_us_per_frame``, less the pps
generator's own CPU, which has a core of its own). Every run here moves frames as fast as
about one core's worth of the machine lets it, so frames/s goes as 1 / that cost, and the
predicted ratio is ``cost_before / cost_after`` with ``cost = base + sum(count x op cost)``:
the mechanisms differ in the counted operations, everything else is the base. The share of
per-frame cost a mechanism removes follows from any ratio r as ``1 - 1/r`` (for ours,
theirs and the prediction). The table also gives the measured cost ratio: where it matches
the prediction but the frame rates do not, the difference is the share of the shared
machine the path got in each run, not the mechanism.

The *ceiling* is the same arithmetic with the base replaced by the floor: the CPU per frame
of the bench's ``tap-relay`` path (one Python process copying frames between the same two
TAPs, no ring and no grant: ``shared/lab/bench/tap_relay.py``) on the row's workload and
direction, measured in the same rounds. It is the largest ratio the row's operations could
give with a split driver that cost nothing beyond the device model; a published ratio above
it (by more than the agreement margin) cannot be reached here by any per-frame lever, only by
operations dearer than they are, which no run may imitate.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.lab.bench.record import Record

#: (record field, op cost key, multiplier from the field to operations)
OPS = (("op_maps_per_pkt", "map", 1.0), ("op_unmaps_per_pkt", "unmap", 1.0),
       ("op_copies_per_pkt", "grant_copy", 1.0),
       ("op_gcopy_bytes_per_pkt", "grant_copy_kb", 1 / 1024),
       ("op_holds_per_pkt", "hold", 1.0), ("op_touches_per_pkt", "first_touch", 1.0),
       ("op_staged_pulls_per_pkt", "staged_pull", 1.0),
       ("op_cpu_copy_bytes_per_pkt", "cpu_copy_kb", 1 / 1024),
       ("notify_per_pkt", "notify", 1.0))
#: a prediction within this share of the measured ratio is a hit (the goal: 20 %)
HIT = 0.20


@dataclass
class Prediction:
    ratio: float
    cost_before: float
    cost_after: float

    def hit(self, measured: float | None) -> bool | None:
        if measured is None or measured <= 0:
            return None
        return abs(self.ratio - measured) / measured <= HIT


def path_cost(rec: Record) -> float | None:
    """µs of the path's CPU per frame in one record (the machine's, less the neighbours' and
    the pps generator's); both ends' own if the machine's is missing."""
    if rec.cpu_ours_us_per_frame is not None:
        return rec.cpu_ours_us_per_frame - (rec.cpu_gen_us_per_frame or 0.0)
    if rec.cpu_back_us_per_frame is None or rec.cpu_front_us_per_frame is None:
        return None
    return rec.cpu_back_us_per_frame + rec.cpu_front_us_per_frame


def op_cost(rec: Record, costs: dict[str, float]) -> float:
    """µs of counted grant operations per frame in one mode's record. A header pull out of
    a fragment the packet already holds (``op_pulls_per_pkt``, counted among the copies)
    is charged ``pull``, the copy alone: the grant's check, mark and unmark are the hold's,
    counted apart (a run without the ``pull`` figure charges it a whole grant copy)."""
    total = 0.0
    for field, key, mult in OPS:
        n = getattr(rec, field)
        if n and costs.get(key) is not None:
            total += n * mult * costs[key]
    pulls = rec.op_pulls_per_pkt
    if pulls and costs.get("pull") is not None and costs.get("grant_copy") is not None:
        total += pulls * (costs["pull"] - costs["grant_copy"])
    return total


def removed_share(ratio: float | None) -> float | None:
    """The share of the per-frame cost that a speed-up of ``ratio`` removes (1 - 1/r)."""
    return None if not ratio else 1 - 1 / ratio


def ceiling(floor: Record, before: Record, after: Record,
            costs: dict[str, float]) -> float | None:
    """before/after's ratio with the floor's CPU per frame as the whole base cost."""
    base = path_cost(floor)
    if base is None:
        return None
    a = base + op_cost(after, costs)
    return None if a <= 0 else (base + op_cost(before, costs)) / a


def predict(ref: Record, before: Record, after: Record,
            costs: dict[str, float]) -> Prediction | None:
    """after/before predicted from the reference mode's base cost and each mode's counts."""
    ref_cost = path_cost(ref)
    if ref_cost is None:
        return None
    base = max(0.0, ref_cost - op_cost(ref, costs))
    b = base + op_cost(before, costs)
    a = base + op_cost(after, costs)
    if a <= 0:
        return None
    return Prediction(b / a, round(b, 2), round(a, 2))
