"""`pvnet`: the operator's command line: `pvnet stats`, `pvnet query`, `pvnet capture`.

`stats` asks every control socket for its counters, pairs each netfront with its netback and
prints one table per guest and ring with the two ends side by side -- the view in which the
invariants of DESIGN.md ("slots consumed == released + in flight", "sent == success + fail")
can be checked by eye. Rendering is pure functions over the stats dicts so the tests need no
running processes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from shared.control import ControlError, query
from shared.text import printable

DEFAULT_DIR = "/run/pvnet"

CANONICAL = (
    "tx_packets tx_bytes rx_packets rx_bytes tx_header_slot_packets tx_zerocopy_sent "
    "tx_zerocopy_success tx_zerocopy_fail tx_frag_overflow grant_maps grant_maps_avoided "
    "maps_outstanding grants_in_use grants_active copy_bytes slots_in_flight notify_sent "
    "notify_suppressed queue_stops drops req_prod req_cons req_event rsp_prod rsp_event"
).split()
"""Counter order of DESIGN.md; anything else a process reports follows, sorted."""

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
    mode = f", tx_mode {_fmt(e['tx_mode'])}" if e.get("tx_mode") else ""
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
    sections: list[tuple[str, str]] = []
    for e in (front, back):
        for ring in (e or {}).get("rings") or {}:
            if ("ring " + ring, ring) not in sections:
                sections.append(("ring " + ring, ring))
    sections.sort(key=lambda s: ({"tx": 0, "rx": 1}.get(s[1], 2), s[1]))
    sections.append(("counters", ""))
    rows: list[tuple[str, str, str] | str] = []  # a str is a section title
    for title, ring in sections:
        def table(e: dict[str, Any] | None, ring: str = ring) -> dict[str, Any]:
            if not e:
                return {}
            return ((e.get("rings") or {}).get(ring) if ring else e.get("counters")) or {}
        cols = [table(front), table(back)]
        names = _order((set(cols[0]) | set(cols[1])) - (set() if ring else set(FAULTS)))
        if names:
            rows.append(title)
            rows += [(n, *(_cell(n, c, e, ring or "counters", rates)
                           for c, e in zip(cols, (front, back), strict=True))) for n in names]
    return "\n".join(lines + _layout(rows))


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
    w0 = max(len(r[0]) for r in cells) + 2
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


# -- commands --------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    paths = find_sockets(args.socket, args.dir)
    if not paths:
        print(f"no control sockets in {args.dir} (is the lab up? `invoke up`)", file=sys.stderr)
        return 1
    if args.watch is None:
        entries = collect(paths)
        if args.json:
            print(json.dumps(entries, indent=1))
        else:
            print(render(entries))
        return 1 if any("error" in e for e in entries) else 0
    prev, t_prev = collect(paths), time.monotonic()
    try:
        while True:
            time.sleep(args.watch)
            paths = find_sockets(args.socket, args.dir) or paths
            cur, now = collect(paths), time.monotonic()
            rates = compute_rates(prev, cur, now - t_prev)
            screen = json.dumps(cur) if args.json else render(cur, rates)
            sys.stdout.write(f"\x1b[H\x1b[2Jpvnet stats  {time.strftime('%T')}  every "
                             f"{args.watch:g} s  (Ctrl-C to stop)\n\n{screen}\n")
            sys.stdout.flush()
            prev, t_prev = cur, now
    except KeyboardInterrupt:
        print()
        return 0


def cmd_query(args: argparse.Namespace) -> int:
    try:
        request = json.loads(args.request)
    except ValueError as exc:
        if not args.request.isidentifier():
            print(f"pvnet query: request is not JSON: {exc}", file=sys.stderr)
            return 2
        request = args.request
    if not isinstance(request, dict):
        request = {"cmd": str(request)}
    try:
        print(json.dumps(query(args.socket, request, timeout=args.timeout), indent=1))
    except ControlError as exc:
        print(f"pvnet query: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from shared.capture import run_capture  # the capture client only when capturing

    if not (args.vif or args.socket):
        print("pvnet capture: name a VIF (or --socket PATH)", file=sys.stderr)
        return 2
    named = args.vif or args.socket
    path = args.socket or (named if "/" in named else os.path.join(args.dir, f"{named}.ctl"))
    vif = os.path.basename(named).removesuffix(".ctl")
    request = {"snaplen": args.snaplen, "buffer_kb": args.buffer_kb,
               "direction": args.direction}
    if args.write is None:
        return run_capture(path, vif, request, None, args.count, args.format)
    if args.write == "-":
        return run_capture(path, vif, request, sys.stdout.buffer, args.count, args.format)
    with open(args.write, "wb") as out:
        return run_capture(path, vif, request, out, args.count, args.format)


def _add_capture(sub) -> None:
    c = sub.add_parser(
        "capture", help="capture the frames crossing a netback's vif (pcapng/pcap)",
        description="Attach to the netback serving VIF through its control socket and "
                    "capture the frames it writes to (out: from the guest) and reads from "
                    "(in: to the guest) the vif, through two shared zero-copy buffers. "
                    "Ctrl-C or SIGTERM flushes and exits 0; at the end it prints how many "
                    "frames were captured and how many the producer dropped.",
        epilog="example: pvnet capture vif1.0 -w - | tcpdump -n -r -")
    c.add_argument("vif", metavar="VIF", nargs="?",
                   help="vif name (its socket is DIR/VIF.ctl) or a control socket path")
    c.add_argument("-w", dest="write", metavar="FILE|-",
                   help="write frames to FILE (- for standard output) instead of one line "
                        "per frame")
    c.add_argument("-c", dest="count", type=int, default=0, metavar="COUNT",
                   help="exit after COUNT frames")
    c.add_argument("-s", dest="snaplen", type=int, default=0, metavar="SNAPLEN",
                   help="bytes kept per frame (default 0: whole frames)")
    c.add_argument("--buffer-kb", type=int, default=1024, metavar="N",
                   help="size of each of the two buffers in KiB (default %(default)s)")
    c.add_argument("--direction", choices=("in", "out", "both"), default="both",
                   help="out: frames netback writes to the vif (from the guest); in: frames "
                        "it reads from the vif (to the guest); default %(default)s")
    c.add_argument("--format", choices=("pcapng", "pcap"), default="pcapng",
                   help="pcapng carries the direction per frame (default %(default)s)")
    c.add_argument("--dir", default=DEFAULT_DIR, help="state directory (default %(default)s)")
    c.add_argument("--socket", metavar="PATH", help="control socket (overrides VIF's)")
    c.set_defaults(func=cmd_capture)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pvnet", description="Inspect running pvnet processes.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("stats", help="counters of every netfront/netback, paired per guest",
                       description="Query control sockets and show per-guest, per-ring "
                                   "counters with netfront and netback side by side.")
    s.add_argument("--socket", action="extend", nargs="+", metavar="PATH",
                   help="control socket(s) to query (repeatable; default: all *.ctl in --dir)")
    s.add_argument("--dir", default=DEFAULT_DIR, help="state directory (default %(default)s)")
    s.add_argument("--json", action="store_true", help="print the raw stats list as JSON")
    s.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                   help="redraw every SECONDS (default 1) with per-second rates, until Ctrl-C")
    s.set_defaults(func=cmd_stats)
    q = sub.add_parser("query", help="send one raw JSON request to a control socket",
                       description='e.g. pvnet query /run/pvnet/g1.ctl \'{"cmd": "ping"}\'')
    q.add_argument("socket", help="control socket path")
    q.add_argument("request", nargs="?", default='{"cmd": "ping"}',
                   help='JSON request object (default {"cmd": "ping"}); a bare word is a cmd')
    q.add_argument("--timeout", type=float, default=2.0, help="seconds (default %(default)s)")
    q.set_defaults(func=cmd_query)
    _add_capture(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "watch", None) is not None and args.watch <= 0:
        build_parser().error("--watch needs a positive number of seconds")
    if args.command == "capture" and (args.count < 0 or args.snaplen < 0):
        build_parser().error("-c and -s take non-negative numbers")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
