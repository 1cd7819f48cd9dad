"""From the bench's rounds to the paper table: ratios with intervals, verdicts, the model.

Rounds are interleaved over the modes, so round i of ``before`` and round i of ``after`` ran
minutes apart under the same neighbours: each row's ratio is taken per round (``after_i /
before_i``) and reported as the mean with the 95 % interval of the mean over rounds
(``bench/interval.py``). The figures beside it are the median rounds' (the bench's records).

Verdicts: a measured row *agrees* when the published ratio lies inside ours +-25 %; otherwise
it says which way pvnet bends the comparison (``ours lower`` / ``ours higher``). Arithmetic
rows compare a hit rate the same way; pending rows say what they wait for.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.lab.bench.interval import ci95
from shared.lab.bench.record import Record
from shared.lab.paper.model import (
    Prediction,
    ceiling,
    op_cost,
    path_cost,
    predict,
    removed_share,
)
from shared.lab.paper.rows import REFERENCE, SOURCES, Row

#: the published ratio agrees when inside ours +- this share (the goal: 25 %)
AGREE = 0.25
PATH = "pvnet-netns"
#: the floor under PATH's per-frame cost: its topology without the split driver
FLOOR = "tap-relay"


@dataclass
class RowResult:
    """One row of the table (and of the JSON)."""

    id: str
    source: str
    compared: str
    kind: str
    unit: str
    theirs_before: float
    theirs_after: float
    theirs_ratio: float
    theirs_removed: float | None
    before_mode: str
    after_mode: str
    workload: str
    direction: str
    ours_before: float | None = None
    ours_after: float | None = None
    #: mean over rounds of after_i / before_i (arithmetic rows: the hit rate in %)
    ours: float | None = None
    ours_ci95: list[float] | None = None
    rounds: int = 0
    ours_removed: float | None = None
    #: mean over rounds of the measured path CPU per frame, before / after: the ratio the
    #: cost model predicts (frames/s differ from it by the machine's share the path got)
    ours_cpu: float | None = None
    predicted: float | None = None
    predicted_removed: float | None = None
    model_hit: bool | None = None
    model: dict[str, float | bool | None] = field(default_factory=dict)
    #: the floor's path CPU per frame (FLOOR, median round) and the ratio the model gives
    #: with it as the whole base (``model.ceiling``); ``reachable``: the row agrees, or the
    #: published ratio is not above that ceiling by more than AGREE
    floor_us: float | None = None
    ceiling: float | None = None
    reachable: bool | None = None
    verdict: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _series(raw: list[Record], mode: str, row: Row, path: str = PATH) -> list[Record]:
    """The rounds of one (mode, workload, direction) on ``path``, in the order they ran."""
    return [r for r in raw if r.path == path and r.mode == mode and r.workload == row.workload
            and r.direction == row.direction]


def _median(records: list[Record], mode: str, row: Row, path: str = PATH) -> Record | None:
    for r in records:
        if (r.path, r.mode, r.workload, r.direction) == (path, mode, row.workload, row.direction):
            return r
    return None


def _mean_ci(values: list[float]) -> tuple[float | None, list[float] | None]:
    if not values:
        return None, None
    iv = ci95(values)
    return (round(statistics.fmean(values), 3),
            [round(max(0.0, iv[0]), 3), round(iv[1], 3)] if iv else None)


def _verdict(ours: float | None, theirs: float, kind: str, note: str) -> str:
    if kind == "pending":
        return note or "pending"
    if ours is None:
        return "not measured"
    if ours * (1 - AGREE) <= theirs <= ours * (1 + AGREE):
        return "agrees"
    return "ours lower" if ours < theirs else "ours higher"


def evaluate(row: Row, records: list[Record], raw: list[Record],
             costs: dict[str, float], path: str = PATH) -> RowResult:
    """One row's result from the run's median records, its raw rounds and the op costs, on
    pvnet's ``path`` (the namespace pair, or a QEMU guest's)."""
    res = RowResult(row.id, row.source, row.compared, row.kind, row.unit, row.theirs_before,
                    row.theirs_after, round(row.theirs_ratio, 3),
                    _round(removed_share(row.theirs_ratio)), row.before, row.after,
                    row.workload, row.direction, note=row.note)
    if row.kind == "pending":
        res.verdict = _verdict(None, row.theirs_ratio, row.kind, row.note)
        return res
    after = [r for r in _series(raw, row.after, row, path) if r.error is None]
    if row.kind == "arithmetic":
        hits = [r.recycle_hit_pct for r in after if r.recycle_hit_pct is not None]
        res.ours, res.ours_ci95 = _mean_ci(hits)
        res.rounds = len(hits)
        res.verdict = _verdict(res.ours, row.theirs_after, row.kind, row.note)
        return res
    before = [r for r in _series(raw, row.before, row, path) if r.error is None]
    ratios = [a.primary / b.primary for b, a in zip(before, after, strict=False)
              if a.primary and b.primary]
    res.ours, res.ours_ci95 = _mean_ci(ratios)
    res.rounds = len(ratios)
    res.ours_removed = _round(removed_share(res.ours))
    mb, ma = _median(records, row.before, row, path), _median(records, row.after, row, path)
    res.ours_before = mb.primary if mb else None
    res.ours_after = ma.primary if ma else None
    ref = _median(records, REFERENCE, row, path)
    pred: Prediction | None = predict(ref, mb, ma, costs) if ref and mb and ma else None
    costs_b = [path_cost(b) for b, a in zip(before, after, strict=False)]
    costs_a = [path_cost(a) for b, a in zip(before, after, strict=False)]
    res.ours_cpu, _ = _mean_ci([b / a for b, a in zip(costs_b, costs_a, strict=True)
                                if b and a])
    if pred is not None:
        res.predicted = round(pred.ratio, 3)
        res.predicted_removed = _round(removed_share(pred.ratio))
        res.model_hit = pred.hit(res.ours)
        # predicted against measured CPU per frame: where a miss comes from
        res.model = {"cost_before_us": pred.cost_before, "cost_after_us": pred.cost_after,
                     "measured_cost_before_us": _round(path_cost(mb)),
                     "measured_cost_after_us": _round(path_cost(ma)),
                     "ops_before_us": round(op_cost(mb, costs), 2),
                     "ops_after_us": round(op_cost(ma, costs), 2)}
    res.verdict = _verdict(res.ours, row.theirs_ratio, row.kind, row.note)
    floor = _median(records, "-", row, FLOOR) if path == PATH else None
    if floor is not None and mb and ma:
        res.floor_us = _round(path_cost(floor))
        ceil = ceiling(floor, mb, ma, costs)
        res.ceiling = _round(ceil)
        # a row that agrees is within reach whatever the model says (it errs by up to HIT)
        res.reachable = None if ceil is None else (
            res.verdict == "agrees" or row.theirs_ratio <= ceil * (1 + AGREE))
    return res


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _ratio_cell(r: RowResult) -> str:
    iv = f" [{r.ours_ci95[0]:.2f}-{r.ours_ci95[1]:.2f}]" if r.ours_ci95 else " [no interval]"
    return "-" if r.ours is None else f"{r.ours:.2f}x{iv}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def markdown(results: list[RowResult]) -> str:
    """The table: row, what was compared, theirs, ours, cost shares, model, verdict."""
    lines = ["| row | compared | theirs | ours (median frames) | ours ratio [95 % CI] | "
             "share removed ours / theirs | model (measured CPU ratio; ceiling) | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.kind == "arithmetic":
            ours = "-" if r.ours is None else f"{r.ours:.0f} %" + (
                f" [{r.ours_ci95[0]:.0f}-{r.ours_ci95[1]:.0f}]" if r.ours_ci95 else "")
            lines.append(f"| {r.id} | {r.compared} (arithmetic) | {r.theirs_after:.0f} % reused "
                         f"| `{r.after_mode}` {r.workload} {r.direction} | {ours} | - | - | "
                         f"{r.verdict} |")
            continue
        theirs = (f"{r.theirs_before:g} -> {r.theirs_after:g} {r.unit} "
                  f"({r.theirs_ratio:.2f}x)")
        if r.kind == "pending":
            lines.append(f"| {r.id} | {r.compared} | {theirs} | - | - | - | - | {r.verdict} |")
            continue
        unit = "kframes/s" if r.workload.startswith("pps") else "Gbit/s"
        scale = 1e-3 if unit == "kframes/s" else 1.0
        ours_fig = (f"`{r.before_mode}` {_num(_mul(r.ours_before, scale), '.3g')} -> "
                    f"`{r.after_mode}` {_num(_mul(r.ours_after, scale), '.3g')} {unit} "
                    f"({r.workload} {r.direction})")
        model = ("-" if r.predicted is None else
                 f"{r.predicted:.2f}x ({'hit' if r.model_hit else 'miss'}; CPU "
                 f"{_num(r.ours_cpu)}x)")
        if r.ceiling is not None:
            model += f"; ceiling {r.ceiling:.2f}x"
        lines.append(f"| {r.id} | {r.compared} | {theirs} | {ours_fig} | {_ratio_cell(r)} | "
                     f"{_pct(r.ours_removed)} / {_pct(r.theirs_removed)} | {model} | "
                     f"{r.verdict} |")
    return "\n".join(lines)


def _mul(x: float | None, k: float) -> float | None:
    return None if x is None else x * k


def summary(results: list[RowResult]) -> str:
    """The goal's counts: measured rows and sources, agreements, model hits."""
    measured = [r for r in results if r.kind == "measured" and r.ours is not None]
    agree = [r for r in measured if r.verdict == "agrees"]
    modeled = [r for r in measured if r.model_hit is not None]
    hits = [r for r in modeled if r.model_hit]
    arith = [r for r in results if r.kind == "arithmetic"]
    pending = [r for r in results if r.kind == "pending"]
    sources = sorted({r.source for r in measured})
    floored = [r for r in measured if r.reachable is not None]
    beyond = [r for r in floored if not r.reachable]
    return "\n".join([
        f"measured rows: {len(measured)} from {len(sources)} sources "
        f"({', '.join(sources)}); published ratio inside ours +-25 %: {len(agree)} of "
        f"{len(measured)}",
        f"cost model within 20 % of the measured ratio: {len(hits)} of {len(modeled)}"
        + (f" (misses: {', '.join(r.id for r in modeled if not r.model_hit)})"
           if len(hits) < len(modeled) else ""),
        f"arithmetic rows (apart): {', '.join(f'{r.id} {r.verdict}' for r in arith) or '-'}; "
        f"pending: {', '.join(f'{r.id} ({r.verdict})' for r in pending) or '-'}",
        *([f"within reach of this device model (published ratio at most the ceiling +25 %: "
           f"the model with the {FLOOR} floor as the whole base): {len(floored) - len(beyond)} "
           f"of {len(floored)}" + (f"; beyond it: {', '.join(r.id for r in beyond)}"
                                   if beyond else "")] if floored else []),
    ])


def sources_text(results: list[RowResult]) -> str:
    used = dict.fromkeys(r.source for r in results)
    return "\n".join(f"- {k}: {SOURCES[k].title} <{SOURCES[k].url}>" for k in used)
