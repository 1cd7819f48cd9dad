"""`python -m shared.lab.bench [--quick] ...`: the same as `invoke bench`, without invoke."""

from __future__ import annotations

import argparse
import sys

from shared.lab.bench.options import HELP
from shared.lab.bench.runner import config_from, run_bench

FLAGS = ("quick", "no_plot")
NUMBERS = {"seconds": float, "rounds": int, "profile_hz": int}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.lab.bench",
                                description="Benchmark every path side by side (the same as "
                                            "`invoke bench`): table, targets, JSON, plot.")
    for name, text in HELP.items():
        flag = "--" + name.replace("_", "-")
        text = text.replace("%", "%%")  # argparse formats help with %; invoke does not
        if name in FLAGS:
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=NUMBERS.get(name, str), help=text)
    a = p.parse_args(argv)
    return run_bench(config_from(**vars(a)))


if __name__ == "__main__":
    sys.exit(main())
