"""The units a topology file is written in: sizes (``8M``) and xl's vif rates (``100Mb/s``)."""

from __future__ import annotations

import re
from typing import Any

_SIZE_RE = re.compile(r"^(\d+)\s*([KMG]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
#: xl's vif ``rate=`` syntax: <RATE>/s[@<INTERVAL>], RATE in B/KB/MB/GB or b/Kb/Mb/Gb
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]?)([Bb])/s(?:@(\d+(?:\.\d+)?)(us|ms|s))?$")
_DECIMAL = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
#: xl's default replenish interval
RATE_INTERVAL_US = 50_000


def parse_size(text: Any) -> int:
    """'8M' / '512K' / '1G' / 4096 -> bytes. Raises ValueError."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(str(text).strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError("expected a size like 8M, 512K or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_rate(text: str) -> tuple[int, int]:
    """xl's vif ``rate`` setting (``100Mb/s``, ``10MB/s@20ms``) -> Linux netback's ``rate``
    key, (credit_bytes, credit_usec): bytes per second times the replenish interval (xl's
    default 50 ms)."""
    m = _RATE_RE.match(text.strip())
    if not m:
        raise ValueError("expected a rate like 100Mb/s or 10MB/s@20ms (xl's vif rate=)")
    value, prefix, unit, ivalue, iunit = m.groups()
    per_s = float(value) * _DECIMAL[prefix] / (8 if unit == "b" else 1)
    usec = RATE_INTERVAL_US if ivalue is None else int(float(ivalue) * _SECONDS[iunit] * 1e6)
    credit = int(per_s * usec / 1e6)
    if usec <= 0 or credit <= 0:
        raise ValueError("the rate and the interval must leave at least one byte per interval")
    return credit, usec
