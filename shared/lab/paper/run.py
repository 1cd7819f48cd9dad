"""``invoke paper``'s run: every row's experiment in one bench run, then the table.

The experiments are bench runs (``shared/lab/bench``: its paths, workloads, rounds, records):
each mode a row compares, on the workload and direction the row needs, plus the reference mode
on each of those (the cost model's base), plus veth with the pps generator (its own rate: the
generator must not be what limits pvnet), plus the ``tap-relay`` floor on every workload and
direction the rows use (the model's ceiling: ``shared/lab/paper/model.py``). ``--placement
qemu`` runs the same rows with the netfront in a QEMU guest (``pvnet-qemu``; under TCG here)
and virtio-net as the generator's reference: the generator runs inside the guest for
guest->wire rows, the receiver for wire->guest ones (the issue's "rows a generator can drive
from inside the guest"; no goal under TCG, where the guest's Python sets every ratio). Rounds
are interleaved over all of them (>= 5 by default). ``python -m backend.opbench`` runs before
the first round and after every round in the same lock hold (so the op costs meet the machine
as the rounds met it: this shared VM's map cost moved 5.9 -> 9.0 µs between a quiet and a busy
hour); the model uses the mean of its runs, and the table gives their range.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from shared.lab.bench.paths import PathContext
from shared.lab.bench.registry import build_paths
from shared.lab.bench.report import write_json
from shared.lab.bench.runner import REPO_ROOT, Bench, BenchConfig, Progress
from shared.lab.bench.workloads import WORKLOADS
from shared.lab.paper import plot, rows, table

#: the generator check: the reference path with the 64-byte frame workload, guest->peer
GENERATOR = ("pps64", "tx")
#: placement -> (the generator's reference path, pvnet's path)
PLACEMENTS = {"netns": ("veth", table.PATH), "qemu": ("virtio-net", "pvnet-qemu")}
NETNS_REF = PLACEMENTS["netns"][0]
ROUNDS, SECONDS = 5, 5.0
QUICK_ROUNDS, QUICK_SECONDS = 2, 2.0


@dataclass
class PaperConfig:
    rows: list[str] | None = None
    rounds: int = ROUNDS
    seconds: float = SECONDS
    json_out: Path | None = None
    results: Path | None = None
    plot: bool = True
    prefix: str = "pvp"
    placement: str = "netns"  # a PLACEMENTS key


def opbench(rounds: int = 5000) -> dict[str, float]:
    """One run of ``python -m backend.opbench --json`` (a process: the lab imports no
    driver)."""
    out = subprocess.run([sys.executable, "-m", "backend.opbench", "--json", "--rounds",
                          str(rounds)], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT, timeout=300)
    return json.loads(out.stdout)


def cost_line(costs: dict[str, float], runs: list[dict[str, float]]) -> str:
    """The op costs the model used (means) with each one's range over the opbench runs."""
    def spread(k: str) -> str:
        vals = [r[k] for r in runs if k in r]
        return f" ({min(vals):g}-{max(vals):g})" if len(vals) > 1 else ""
    return (f"op costs (µs, mean of {len(runs)} opbench runs, range): "
            + ", ".join(f"{k} {v}{spread(k)}" for k, v in costs.items()))


def mean_costs(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in runs for k in r)
    return {k: round(sum(r[k] for r in runs if k in r) / sum(1 for r in runs if k in r), 3)
            for k in keys}


def _todo(bench: Bench, exps: dict[str, list[tuple[str, str]]], ref: str = NETNS_REF) -> None:
    """Each path runs only what the rows need of it, one direction at a time; the reference
    path ``ref`` the generator check alone; the floor (``table.FLOOR``) what the reference
    mode runs: every workload and direction a measured row uses."""
    every = exps.get(rows.REFERENCE, [])
    for p in bench.paths:
        pairs = ([GENERATOR] if p.path == ref else every if p.path == table.FLOOR
                 else exps.get(p.mode, []))
        by_wl: dict[str, list[str]] = {}
        for wl, d in pairs:
            by_wl.setdefault(wl, []).append(d)
        bench.todo[id(p)] = [dataclasses.replace(WORKLOADS[w], directions=tuple(ds))
                             for w, ds in by_wl.items()]
    steps = sum(len(w.directions) for ws in bench.todo.values() for w in ws)
    bench.progress = Progress(bench.cfg.rounds * steps)


def run_paper(cfg: PaperConfig, out: TextIO = sys.stdout) -> int:
    if os.geteuid() != 0:
        print("error: the paper table needs root (network namespaces)", file=sys.stderr)
        return 1
    try:
        chosen = rows.select(cfg.rows)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from shared.lab import deps

    deps.ensure(["iperf3", "iproute2", "procps", "netsniff-ng"])
    ref, ours = PLACEMENTS[cfg.placement]
    exps = rows.experiments(chosen)
    results = cfg.results or REPO_ROOT / "results" / f"paper-{time.strftime('%Y%m%d-%H%M%S')}"
    results.mkdir(parents=True, exist_ok=True)
    costs_runs = []
    bench_cfg = BenchConfig(seconds=cfg.seconds, rounds=cfg.rounds, prefix=cfg.prefix,
                            results=results, plot=False, profile_hz=0)
    with open(results / "lab.log", "a") as log:
        ctx = PathContext(prefix=cfg.prefix, state_dir=bench_cfg.state_dir, results=results,
                          modes=tuple(exps),
                          log=lambda line: print(line, file=log, flush=True))
        # the floor beside the namespace pair only (a QEMU guest's TAP is QEMU's)
        floor = [table.FLOOR] if cfg.placement == "netns" else []
        paths = build_paths([ref, *floor, ours] if exps else [], ctx)
        bench = Bench(bench_cfg, paths, log)
        _todo(bench, exps, ref)
        bench.progress.line(f"paper: rows {', '.join(r.id for r in chosen)}; "
                            f"{bench.progress.total} runs of {cfg.seconds:g} s in "
                            f"{cfg.rounds} interleaved rounds over {len(exps)} modes on "
                            f"{ours} + {ref}; "
                            f"about {bench.estimate_s() / 60:.1f} min; results in {results}")
        bench.progress.line("op costs: python -m backend.opbench (before the rounds, then "
                            "after each)")
        costs_runs.append(opbench())

        def between(rnd: int) -> None:
            costs_runs.append(opbench())
            bench.progress.line(f"op costs after round {rnd}: map {costs_runs[-1]['map']} "
                                f"unmap {costs_runs[-1]['unmap']} µs")
        records = bench.run(between) if exps else []
    costs = mean_costs(costs_runs)
    res = [table.evaluate(r, records, bench.raw, costs, ours) for r in chosen]
    gen = generator_line(records, ref, ours)
    text = "\n\n".join([f"placement: {cfg.placement} ({ours}; generator reference {ref})",
                         table.markdown(res), table.summary(res),
                        cost_line(costs, costs_runs), gen,
                        "sources:\n" + table.sources_text(res)])
    print(text, file=out)
    (results / "paper.md").write_text(text + "\n")
    write_json(bench.raw, results / "raw.json")
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "placement": cfg.placement,
           "path": ours, "rounds": cfg.rounds,
           "seconds": cfg.seconds, "op_costs": costs, "op_cost_runs": costs_runs,
           "generator": gen, "rows": [r.as_dict() for r in res],
           "records": [r.as_dict() for r in records]}
    for dest in filter(None, (results / "paper.json", cfg.json_out)):
        Path(dest).write_text(json.dumps(doc, indent=1) + "\n")
    if cfg.json_out:
        print(f"\nJSON: {cfg.json_out}", file=out)
    png = plot.plot(res, results / "paper.png") if cfg.plot else None
    if cfg.plot and png is None:
        print("\nno plot: matplotlib is not installed (pip install matplotlib)", file=out)
    print(f"\nresults: {results}" + (f"\nplot: {png}" if png else ""), file=out, flush=True)
    if bench.interrupted:
        return 130
    return 1 if any(r.error for r in records) else 0


def generator_line(records, ref: str = NETNS_REF, path: str = table.PATH) -> str:
    """The generator's own rate (on the reference path ``ref``) against the best pvnet
    delivered on ``path`` on the same workload: pvnet must be well below it for the
    generator not to be its limit."""
    wl, d = GENERATOR
    gen = next((r for r in records if r.path == ref and r.workload == wl
                and r.direction == d and r.fps), None)
    ours = [r.fps for r in records if r.path == path and r.workload == wl and r.fps]
    if gen is None or not ours:
        return f"generator: not measured ({ref} {wl} {d})"
    return (f"generator: trafgen moved {gen.fps / 1e3:.1f}k frames/s on {ref} ({wl} {d}); "
            f"pvnet's best {max(ours) / 1e3:.1f}k ({max(ours) / gen.fps:.2f}x of it)")
