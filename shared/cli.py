"""`pvnet`: the operator's command line: `pvnet stats`, `pvnet query`, `pvnet capture`.

`stats` asks every control socket for its counters and prints them paired per guest (the view
is shared/endpoint/stats_view.py), once or redrawn with rates (--watch); `query` sends one raw
request; `capture` attaches to a netback's vif (shared/endpoint/capture.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from shared.endpoint.stats_view import collect, compute_rates, find_sockets, render
from shared.plumbing.control.client import ControlError, query

DEFAULT_DIR = "/run/pvnet"


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
    from shared.endpoint.capture import run_capture  # the capture client only when capturing

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
