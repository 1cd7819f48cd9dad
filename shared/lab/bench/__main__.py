"""`python -m shared.lab.bench [--quick] ...`: the same as `invoke bench`, without invoke."""

from __future__ import annotations

import argparse
import sys

from shared.lab.bench.runner import config_from, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.lab.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one round of 3 s runs")
    p.add_argument("--seconds", type=float, help="seconds per run (default 10, quick 3)")
    p.add_argument("--rounds", type=int, help="repetitions; the median is kept (default 3)")
    p.add_argument("--paths", help="comma list: veth,pvnet-netns (default: all registered)")
    p.add_argument("--modes", help="comma list of pvnet modes (default: all five)")
    p.add_argument("--workloads", help="comma list: tcp,tcp-nogso,udp64,rr (default: all)")
    p.add_argument("--json", help="also write the records to this file")
    p.add_argument("--results", help="results directory (default results/bench-<timestamp>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--prefix", help="name prefix of the bench's namespaces (default pvb)")
    a = p.parse_args(argv)
    return run_bench(config_from(**vars(a)))


if __name__ == "__main__":
    sys.exit(main())
