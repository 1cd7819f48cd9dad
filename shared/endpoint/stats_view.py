"""`pvnet stats`, the view: collect every end's counters, pair each netfront with its netback,
render one table per guest and ring with the two ends side by side.

That side-by-side view is where the counters' invariants ("slots consumed == released + in
flight", "sent == success + fail") can be checked by eye. Rendering is pure functions over the
stats dicts so the tests need no running processes; every reply is treated as untrusted data
(a guest's netfront writes what it likes). The command itself is in shared/cli.py.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

from shared.plumbing.control.client import ControlError, query
from shared.text import printable

CANONICAL = (
    "tx_packets tx_bytes rx_packets rx_bytes tx_header_slot_packets tx_zerocopy_sent "
    "tx_zerocopy_success tx_zerocopy_fail tx_frag_overflow grant_maps grant_maps_avoided "
    "maps_outstanding grants_in_use grants_active copy_bytes slots_in_flight notify_sent "
    "notify_suppressed queue_stops drops req_prod req_cons req_event rsp_prod rsp_event"
).split()
"""The canonical counter order; anything else a process reports follows, sorted."""

ENDS = ("netfront", "netback")
FAULTS = {"faults_peer": "peer", "faults_own": "own", "faults_os": "OS"}
"""Fault counters by kind (shared/faults.py), shown on a line of their own, not in the table."""
Rates = dict[tuple[str, str, str], float]  # (socket, section, counter) -> per second


# -- collecting ------------------------------------------------------------------------------


def find_sockets(sockets: Sequence[str] | None, directory: str) -> list[str]:
    return list(sockets) if sockets else sorted(glob.glob(os.path.join(directory, "*.ctl")))


#: sections that must be objects (rings: an object of objects); anything else is dropped
_OBJECTS = ("features", "counters")
escape = printable


def _clean(value: Any) -> Any:
    """A reply value with every string (keys too) escaped; nesting is already bounded by
    the control client's depth cap."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def untrusted(reply: dict[str, Any], path: str) -> dict[str, Any]:
    """A control reply as data to print, never to obey: a guest's netfront (and a netback
    speaking for a guest) writes what it likes. Strings are escaped, sections of the wrong
    shape are dropped (so rendering cannot trip over them), and ``socket`` is ours."""
    out = _clean(reply)
    for key in _OBJECTS:
        if key in out and not isinstance(out[key], dict):
            out.pop(key)
    rings = out.get("rings")
    if rings is not None:
        out["rings"] = ({k: v for k, v in rings.items() if isinstance(v, dict)}
                        if isinstance(rings, dict) else {})
    out["socket"] = path
    return out


def collect(paths: Sequence[str], timeout: float = 2.0) -> list[dict[str, Any]]:
    """Stats from each socket; an unreachable one becomes {"socket", "error"}, never a raise.
    Every reply goes through ``untrusted``."""
    out = []
    for path in paths:
        try:
            out.append(untrusted(query(path, {"cmd": "stats"}, timeout=timeout), path))
        except ControlError as exc:
            out.append({"socket": path, "error": escape(str(exc))})
    return out


def _named_as_socket(e: dict[str, Any]) -> bool:
    """Does the name an end reports match its socket's file name (``<name>.ctl``, which the
    lab chose)? A reply claiming another end's name does not."""
    sock = e.get("socket")
    return sock is None or os.path.basename(str(sock)) == f"{e.get('name')}.ctl"


def pair(entries: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, Any] | None]]:
    """Group reachable entries into {"netfront": e|None, "netback": e|None}. A pair needs the
    netback's ``peer`` (the name its own frontend gave) to be the netfront's name, both names
    to match their sockets, the netfront's ``peer`` (if any) to be that netback, and only one
    such netback: a reply cannot pair itself with another guest's end by what it claims."""
    ok = [e for e in entries if "error" not in e]
    fronts = [e for e in ok if e.get("role") == "netfront"]
    backs = [e for e in ok if e.get("role") == "netback"]
    others = [e for e in ok if e.get("role") not in ENDS]
    groups: list[dict[str, dict[str, Any] | None]] = []
    for f in fronts:
        cands = [b for b in backs if b.get("peer") == f.get("name") and _named_as_socket(b)
                 and f.get("peer") in (None, "", b.get("name"))]
        match = cands[0] if len(cands) == 1 and _named_as_socket(f) else None
        if match is not None:
            backs.remove(match)
        groups.append({"netfront": f, "netback": match})
    groups += [{"netfront": None, "netback": b} for b in backs]
    groups += [{"netfront": None, "netback": e} for e in others]  # unknown role: still shown
    return groups


# -- rendering -------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "-"
    if isinstance(value, dict | list) or value == "":
        return escape(json.dumps(value, separators=(",", ":")))
    return escape(str(value))


def _rate(name: str, per_s: float) -> str:
    """Human rate: bytes as bit/s (what iperf3 prints), everything else as x/s."""
    value, unit = (per_s * 8, " bit/s") if name.endswith("_bytes") else (per_s, "/s")
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit.strip()}"
    return f"{value:.0f}{unit}"


def _order(keys: set[str]) -> list[str]:
    return [k for k in CANONICAL if k in keys] + sorted(keys - set(CANONICAL))


def _title(end: str, e: dict[str, Any] | None) -> str:
    if e is None:
        return f"{end}: (no control socket)"
    mode = "".join(f", {k} {_fmt(e[k])}" for k in ("tx_mode", "rx_mode") if e.get(k))
    odd = "" if _named_as_socket(e) else f" [socket {escape(os.path.basename(str(e['socket'])))}]"
    return (f"{_fmt(e.get('name', '?'))}{odd} ({end}, pid {_fmt(e.get('pid', '?'))}, "
            f"{_fmt(e.get('state', '?'))}{mode})")


def render_group(group: dict[str, dict[str, Any] | None], rates: Rates | None = None) -> str:
    """One guest: header, features, then a table per section (rings tx/rx, process counters)."""
    front, back = group["netfront"], group["netback"]
    lines = [f"== {_title('netfront', front)}  <->  {_title('netback', back)}"]
    feats = sorted({k for e in (front, back) if e for k in (e.get("features") or {})})
    if feats:
        def mark(e: dict[str, Any] | None, k: str) -> str:
            return _fmt((e.get("features") or {}).get(k)) if e else "-"
        lines.append("   features: " + ", ".join(
            f"{escape(k)} {mark(front, k)}/{mark(back, k)}" for k in feats))
    lines += [f"   faults ({end}): {line}" for end, e in zip(ENDS, (front, back), strict=True)
              if (line := faults_line(e))]
    rows: list[tuple[str, str, str] | str] = []  # a str is a section title
    for title, section, where in _sections(front, back):
        cols = [_table(front, where), _table(back, where)]
        names = _order((set(cols[0]) | set(cols[1])) - (set(FAULTS) if where == () else set()))
        if names:
            rows.append(title)
            rows += [(n, *(_cell(n, c, e, section, rates)
                           for c, e in zip(cols, (front, back), strict=True))) for n in names]
    return "\n".join(lines + _layout(rows))


def _queues(e: dict[str, Any] | None) -> list[dict[str, Any]]:
    """An end's per-queue sections (multi-queue), each an object with an int ``queue``."""
    qs = (e or {}).get("queues")
    return [q for q in qs if isinstance(q, dict) and isinstance(q.get("queue"), int)] \
        if isinstance(qs, list) else []


def _table(e: dict[str, Any] | None, where: tuple) -> dict[str, Any]:
    """The counters at ``where`` in an end's reply: ("ring", r), ("queue", q, r) or ()."""
    if not e:
        return {}
    if not where:
        got = e.get("counters")
    elif where[0] == "ring":
        got = (e.get("rings") or {}).get(where[1])
    else:
        q = next((q for q in _queues(e) if q["queue"] == where[1]), {})
        got = (q.get("rings") or {}).get(where[2]) if isinstance(q.get("rings"), dict) \
            else None
    return got if isinstance(got, dict) else {}


def _sections(front: dict[str, Any] | None, back: dict[str, Any] | None) -> list[tuple]:
    """(title, rate key, where) of every table: the device's rings (with several queues,
    their sum), each queue's rings, then the process counters."""
    rings: list[str] = []
    for e in (front, back):
        for ring in (e or {}).get("rings") or {}:
            if ring not in rings:
                rings.append(ring)
    rings.sort(key=lambda r: ({"tx": 0, "rx": 1}.get(r, 2), r))
    several = bool(_queues(front) or _queues(back))
    out = [(f"ring {r}{' (all queues)' if several else ''}", r, ("ring", r)) for r in rings]
    for q in sorted({q["queue"] for e in (front, back) for q in _queues(e)}):
        out += [(f"queue {q} ring {r}", f"queue {q} {r}", ("queue", q, r)) for r in ("tx", "rx")]
    return [*out, ("counters", "counters", ())]


def faults_line(e: dict[str, Any] | None) -> str:
    """``peer N, own N, OS N``: whose fault this end's errors were (counters, or top level);
    empty for an end that does not count them."""
    if not e:
        return ""
    counters = e.get("counters") or {}
    got = {k: counters.get(k, e.get(k)) for k in FAULTS}
    if all(v is None for v in got.values()):
        return ""
    return ", ".join(f"{label} {_fmt(got[k]) if got[k] is not None else '-'}"
                     for k, label in FAULTS.items())


def _cell(name: str, col: dict[str, Any], e: dict[str, Any] | None, section: str,
          rates: Rates | None) -> str:
    text = _fmt(col.get(name)) if name in col else "-"
    key = (str((e or {}).get("socket")), section, name)
    if rates is not None and key in rates:
        text += f" ({_rate(name, rates[key])})"
    return text


def _layout(rows: list[tuple[str, str, str] | str]) -> list[str]:
    """Align all tables of one guest on shared column widths, so the eye can run down them."""
    rows = [r if isinstance(r, str) else (escape(r[0]), r[1], r[2]) for r in rows]
    cells = [r for r in rows if isinstance(r, tuple)]
    if not cells:
        return []
    w0 = max(max(len(r[0]) for r in cells) + 2,  # a section's title ends a column earlier
             *(len(escape(r)) for r in rows if isinstance(r, str)))
    w1 = max(len(ENDS[0]), *(len(r[1]) for r in cells))
    w2 = max(len(ENDS[1]), *(len(r[2]) for r in cells))
    out = []
    for r in rows:
        if isinstance(r, str):
            out.append(f"   {escape(r):<{w0 + 2}}{ENDS[0]:>{w1}}   {ENDS[1]:>{w2}}")
        else:
            out.append(f"     {r[0]:<{w0}}{r[1]:>{w1}}   {r[2]:>{w2}}")
    return out


def render(entries: Sequence[dict[str, Any]], rates: Rates | None = None) -> str:
    """The whole `pvnet stats` screen: one block per guest, then unreachable sockets."""
    blocks = [render_group(g, rates) for g in pair(entries)]
    blocks += [f"!! {escape(str(e['error']))}" for e in entries if "error" in e]
    return "\n\n".join(blocks) if blocks else "no control sockets found"


def compute_rates(prev: Sequence[dict[str, Any]], cur: Sequence[dict[str, Any]],
                  dt: float) -> Rates:
    """Per-second deltas of *_packets / *_bytes counters between two snapshots."""
    rates: Rates = {}
    if dt <= 0:
        return rates
    before = {e.get("socket"): e for e in prev if "error" not in e}
    for e in cur:
        old = before.get(e.get("socket"))
        if old is None or "error" in e or old.get("pid") != e.get("pid"):
            continue  # restarted process: counters reset, no meaningful rate
        pairs = [(ring, (e.get("rings") or {}).get(ring) or {},
                  (old.get("rings") or {}).get(ring) or {}) for ring in e.get("rings") or {}]
        pairs += [(f"queue {q['queue']} {r}", _table(e, ("queue", q["queue"], r)),
                   _table(old, ("queue", q["queue"], r))) for q in _queues(e) for r in ("tx", "rx")]
        pairs.append(("counters", e.get("counters") or {}, old.get("counters") or {}))
        for section, now, then in pairs:
            for name, value in now.items():
                if not name.endswith(("_packets", "_bytes")):
                    continue
                was = then.get(name)
                if isinstance(value, int | float) and isinstance(was, int | float) \
                        and value >= was:
                    rates[(str(e.get("socket")), section, name)] = (value - was) / dt
    return rates
