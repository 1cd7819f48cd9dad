"""Decoding one line of JSON from a peer that is not trusted (a frontend, a guest, a client).

``json.loads`` recurses once per nesting level: a few KB of ``[[[[`` raise RecursionError -
not a ValueError - and kill whichever thread parsed them, or get booked as our own internal
error. ``loads`` refuses deep nesting before the parser sees it, so every bad line is a
ValueError: the peer's malformed input.
"""

from __future__ import annotations

import json
import re
from typing import Any

from shared.faults import PeerFault

#: deepest nesting accepted (stats replies are 4 levels deep; requests 1)
MAX_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


class TooDeep(PeerFault, ValueError):
    """JSON nested deeper than MAX_DEPTH."""


def depth(line: bytes) -> int:
    """The deepest nesting of brackets outside strings (an upper bound for malformed input)."""
    d = deepest = 0
    for m in _BRACKETS.finditer(_STRING.sub(b'""', line)):
        if m.group() in (b"[", b"{"):
            d += 1
            deepest = max(deepest, d)
        else:
            d -= 1
    return deepest


def loads(line: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, with nesting capped: every failure is a ValueError."""
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line)
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth(raw) > max_depth:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except RecursionError as e:  # belt and braces: never let the parser's recursion escape
        raise TooDeep("JSON nested too deeply for the parser") from e
