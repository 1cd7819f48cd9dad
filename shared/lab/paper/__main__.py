"""``python -m shared.lab.paper`` (``invoke paper``): the published results, reproduced."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.lab.paper import rows
from shared.lab.paper.run import (
    PLACEMENTS,
    QUICK_ROUNDS,
    QUICK_SECONDS,
    ROUNDS,
    SECONDS,
    PaperConfig,
    run_paper,
)

#: every option of ``invoke paper`` and ``python -m shared.lab.paper``, by its Python name
#: (``no_plot`` is ``--no-plot``): both take their --help from here
HELP: dict[str, str] = {
    "rows": "comma list of rows to run (default all: " + ", ".join(r.id for r in rows.ROWS) + ")",
    "quick": f"smoke test: {QUICK_ROUNDS} rounds of {QUICK_SECONDS:g} s "
             f"(default {ROUNDS} rounds of {SECONDS:g} s)",
    "rounds": "interleaved rounds (intervals need >= 2)",
    "seconds": "seconds per measurement",
    "json": "also write the result as JSON here",
    "results": "where paper.md/json/png and logs go (default results/paper-<time>/)",
    "no_plot": "no PNG",
    "prefix": "name prefix of the namespaces and devices (default pvp)",
    "placement": "where the netfront runs: " + " or ".join(PLACEMENTS)
                 + " (default netns: the namespace pair against veth; qemu: a QEMU guest "
                 "against virtio-net, TCG here, no goal)",
}


def parse(argv: list[str] | None = None) -> PaperConfig:
    p = argparse.ArgumentParser(
        prog="python -m shared.lab.paper",
        description="Every row's experiment in one run (interleaved rounds), then the table: "
                    "row, what was compared, theirs (figures, ratio), ours (figures, ratio "
                    "with its 95 % interval), the share of per-frame cost removed, the cost "
                    "model's prediction and a verdict; JSON and a PNG beside it. Needs root.")

    def h(name: str) -> str:
        return HELP[name].replace("%", "%%")

    p.add_argument("--rows", help=h("rows"))
    p.add_argument("--quick", action="store_true", help=h("quick"))
    p.add_argument("--rounds", type=int, help=h("rounds"))
    p.add_argument("--seconds", type=float, help=h("seconds"))
    p.add_argument("--json", metavar="FILE", help=h("json"))
    p.add_argument("--results", metavar="DIR", help=h("results"))
    p.add_argument("--no-plot", action="store_true", help=h("no_plot"))
    p.add_argument("--prefix", default="pvp", help=h("prefix"))
    p.add_argument("--placement", choices=sorted(PLACEMENTS), default="netns",
                   help=h("placement"))
    a = p.parse_args(argv)
    cfg = PaperConfig(rows=[x.strip() for x in a.rows.split(",") if x.strip()] if a.rows
                      else None, json_out=Path(a.json) if a.json else None,
                      results=Path(a.results) if a.results else None, plot=not a.no_plot,
                      prefix=a.prefix, placement=a.placement)
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
