"""The interval a figure gets from the bench's interleaved rounds: a 95 % confidence interval
of the mean over rounds (Student's t, n - 1 degrees of freedom).

Why t and not a normal interval: the bench runs 3-5 rounds, and with so few the normal
interval would be far too narrow (with 3 rounds t is 4.30 where the normal is 1.96). Rounds
are interleaved over the paths, so a burst of load from a neighbour falls on one round of
every path rather than on every round of one: the rounds are as independent as this shared
machine allows. The table shows the median round's figure with this interval beside it; one
round gives no interval. Every figure it is used on is non-negative, so the record clips a
lower bound below zero to 0: such an interval says only that the rounds disagree widely.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

#: two-sided 97.5 % quantiles of Student's t by degrees of freedom (1..30; beyond: 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("an interval needs at least two values")
    return T975[df - 1] if df <= len(T975) else 1.96


def ci95(values: Sequence[float]) -> tuple[float, float] | None:
    """(low, high) of the 95 % confidence interval of the mean; None for fewer than 2."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def rounded(iv: tuple[float, float] | None, digits: int = 4) -> list[float] | None:
    """An interval as the JSON carries it: [low, high], significant digits kept."""
    if iv is None:
        return None
    return [float(f"{v:.{digits}g}") for v in iv]
