"""``python -m shared.lab.paper`` (``invoke paper``): the published results, reproduced."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.lab.paper import rows
from shared.lab.paper.run import (
    QUICK_ROUNDS,
    QUICK_SECONDS,
    ROUNDS,
    SECONDS,
    PaperConfig,
    run_paper,
)

ROWS_HELP = "comma list of rows to run (default all: " + ", ".join(r.id for r in rows.ROWS) + ")"


def parse(argv: list[str] | None = None) -> PaperConfig:
    p = argparse.ArgumentParser(
        prog="python -m shared.lab.paper",
        description="Every row's experiment in one run (interleaved rounds), then the table: "
                    "row, what was compared, theirs (figures, ratio), ours (figures, ratio "
                    "with its 95 % interval), the share of per-frame cost removed, the cost "
                    "model's prediction and a verdict; JSON and a PNG beside it. Needs root.")
    p.add_argument("--rows", help=ROWS_HELP.replace("%", "%%"))
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_ROUNDS} rounds of {QUICK_SECONDS:g} s "
                        f"(default {ROUNDS} rounds of {SECONDS:g} s)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (intervals need >= 2)")
    p.add_argument("--seconds", type=float, help="seconds per measurement")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON here")
    p.add_argument("--results", metavar="DIR", help="where paper.md/json/png and logs go "
                   "(default results/paper-<time>/)")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.add_argument("--prefix", default="pvp",
                   help="name prefix of the namespaces and devices (default pvp)")
    a = p.parse_args(argv)
    cfg = PaperConfig(rows=[x.strip() for x in a.rows.split(",") if x.strip()] if a.rows
                      else None, json_out=Path(a.json) if a.json else None,
                      results=Path(a.results) if a.results else None, plot=not a.no_plot,
                      prefix=a.prefix)
    if a.quick:
        cfg.rounds, cfg.seconds = QUICK_ROUNDS, QUICK_SECONDS
    if a.rounds is not None:
        cfg.rounds = a.rounds
    if a.seconds is not None:
        cfg.seconds = a.seconds
    return cfg


def main(argv: list[str] | None = None) -> int:
    return run_paper(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
