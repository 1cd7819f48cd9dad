"""Decoding one line of JSON from a peer that is not trusted (a frontend, a guest, a client).

``json.loads`` recurses once per nesting level: a few KB of ``[[[[`` raise RecursionError -
not a ValueError - and kill whichever thread parsed them, or get booked as our own internal
error. ``loads`` refuses deep nesting before the parser sees it, so every bad line is a
ValueError: the peer's malformed input.

Every step is linear in the line's size and runs in C (a regular expression that never
backtracks and never restarts inside a string - an unterminated one runs to the end of the
line -, ``bytes.translate``, a running sum): a hostile line costs what reading it costs, 1 MiB
in tens of milliseconds. (The guard it replaces restarted its string scan at every quote: a
32 KiB line of escaped quotes cost 4-5 s of CPU.)
"""

from __future__ import annotations

import gc
import json
import re
from array import array
from itertools import accumulate
from typing import Any

from shared.faults import PeerFault

#: deepest nesting accepted (stats replies are 4 levels deep; requests 1)
MAX_DEPTH = 32
#: a JSON string, or an unterminated one to the end of the line (possessive: no backtracking)
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?')
#: every byte but the brackets (deleted by ``translate``), and the brackets as +1 / -1
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


class TooDeep(PeerFault, ValueError):
    """JSON nested deeper than MAX_DEPTH."""


def depth(line: bytes) -> int:
    """The deepest nesting of brackets outside strings (an upper bound for malformed input)."""
    brackets = _STRING.sub(b"", line).translate(None, _NOT_BRACKETS)
    return max(accumulate(array("b", brackets.translate(_SIGNS))), default=0)


def loads(line: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, with nesting capped: every failure is a ValueError."""
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line)
    if raw.count(b"[") + raw.count(b"{") > max_depth and depth(raw) > max_depth:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
    # json.loads builds no cycles, but each container it makes counts towards the cyclic
    # collector's thresholds: a line of 390,000 small lists set off collections that walk the
    # whole heap each time (0.5 s for 1 MiB in a big process, 20x its parse); off while parsing
    enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw)
    except RecursionError as e:  # belt and braces: never let the parser's recursion escape
        raise TooDeep("JSON nested too deeply for the parser") from e
    finally:
        if enabled:
            gc.enable()
