"""The bench's options, written once: their defaults and their help.

``invoke bench`` (tasks.py) and ``python -m shared.lab.bench`` both take their ``--help`` from
``HELP`` and the runner its defaults from the constants below, so the three cannot drift apart;
the path, workload and mode lists in the texts are read from their registries.
"""

from __future__ import annotations

from shared.lab.bench.modes import help_text as modes_help
from shared.lab.bench.plan import DEFAULT_PATHS
from shared.lab.bench.profiler import DEFAULT_HZ
from shared.lab.bench.registry import REGISTRY
from shared.lab.bench.workloads import WORKLOADS

#: a full run: SECONDS-second runs, ROUNDS rounds interleaved over the paths (medians)
SECONDS, ROUNDS = 5.0, 3
#: ``--quick``: one round of short runs, every path and workload (a smoke test)
QUICK_SECONDS, QUICK_ROUNDS = 2.0, 1

HELP: dict[str, str] = {
    "quick": f"one round of {QUICK_SECONDS:g} s runs over every path and workload",
    "seconds": f"seconds per run (default {SECONDS:g}; quick {QUICK_SECONDS:g})",
    "rounds": f"repetitions, interleaved over the paths; the median is reported, with a 95 % "
              f"interval over them (default {ROUNDS}; quick {QUICK_ROUNDS})",
    "paths": f"comma list of paths, of {','.join(REGISTRY)} (default: "
             f"{','.join(DEFAULT_PATHS)})",
    "modes": modes_help(),
    "workloads": "comma list of workloads, run on every path and mode (default: each its "
                 "plan, shared/lab/bench/plan.py: every workload on veth and the reference "
                 "mode, the ones where a mechanism or option differs elsewhere): "
                 + "; ".join(f"{w.name}: {w.what}" for w in WORKLOADS.values()),
    "json": "also write the records as a JSON list to this file",
    "results": "results directory (default results/bench-<timestamp>/)",
    "no_plot": "skip the PNG plot",
    "prefix": "name prefix of the bench's namespaces and devices (default pvb)",
    "profile_hz": f"py-spy samples per second per end for the stage breakdown (default "
                  f"{DEFAULT_HZ}; 0: none)",
}
"""Every option of the bench command, by its Python name (``no_plot`` is ``--no-plot``)."""
