"""The cost model: pvnet's ratio for a row predicted before the row is measured.

Inputs, all fixed in advance or measured in the same ``invoke paper`` run, nothing fitted
per row:

- per-operation costs (µs) from ``python -m backend.opbench`` run in the same lock hold:
  ``map``, ``unmap``, ``grant_copy`` (per copy) and ``grant_copy_kb`` (per KiB beyond),
  ``notify``;
- operation counts per packet from each mode's own counters in the run (the bench record's
  ``maps_per_pkt``, ``unmaps_per_pkt``, ``copies_per_pkt``, ``gcopy_bytes_per_pkt``,
  ``notify_per_pkt``);
- one base cost per path, workload and direction: the reference mode's (``rows.REFERENCE``)
  CPU µs per frame for each end, minus the operations it did itself.

A mode's cost per frame is then ``base + sum(count x cost)`` for the netback, and the base
alone for the netfront (the mechanisms compared here work in the netback); the path moves
frames at the pace of its slower end, so the predicted ratio is
``max(front, back_before) / max(front, back_after)``. The share of per-frame cost a mechanism
removes follows from any ratio r as ``1 - 1/r`` (for ours, theirs and the prediction).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.lab.bench.record import Record

#: (record field, op cost key, multiplier from the field to operations)
OPS = (("maps_per_pkt", "map", 1.0), ("unmaps_per_pkt", "unmap", 1.0),
       ("copies_per_pkt", "grant_copy", 1.0), ("gcopy_bytes_per_pkt", "grant_copy_kb", 1 / 1024),
       ("notify_per_pkt", "notify", 1.0))
#: a prediction within this share of the measured ratio is a hit (issue 21: 20 %)
HIT = 0.20


@dataclass
class Prediction:
    ratio: float
    back_before: float
    back_after: float
    front: float

    def hit(self, measured: float | None) -> bool | None:
        if measured is None or measured <= 0:
            return None
        return abs(self.ratio - measured) / measured <= HIT


def op_cost(rec: Record, costs: dict[str, float]) -> float:
    """µs of counted grant operations per frame in one mode's record."""
    total = 0.0
    for field, key, mult in OPS:
        n = getattr(rec, field)
        if n and costs.get(key) is not None:
            total += n * mult * costs[key]
    return total


def removed_share(ratio: float | None) -> float | None:
    """The share of the per-frame cost that a speed-up of ``ratio`` removes (1 - 1/r)."""
    return None if not ratio else 1 - 1 / ratio


def predict(ref: Record, before: Record, after: Record,
            costs: dict[str, float]) -> Prediction | None:
    """after/before predicted from the reference mode's base cost and each mode's counts."""
    if ref.cpu_back_us_per_frame is None or ref.cpu_front_us_per_frame is None:
        return None
    base = max(0.0, ref.cpu_back_us_per_frame - op_cost(ref, costs))
    front = ref.cpu_front_us_per_frame
    b = base + op_cost(before, costs)
    a = base + op_cost(after, costs)
    den = max(front, a)
    if den <= 0:
        return None
    return Prediction(max(front, b) / den, round(b, 2), round(a, 2), round(front, 2))
