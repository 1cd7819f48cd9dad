"""Running the bench: rounds x paths x sessions x workloads, with progress and safe teardown.

Rounds are the outer loop (every path once per round, then again), so a burst of load from a
neighbour on this shared machine hits one repetition of every path rather than all repetitions
of one path; the median over rounds is reported. A path is brought up once per session (GSO on,
then GSO off for tcp-nogso) and torn down in a `finally` with SIGINT ignored, so Ctrl-C (or
SIGTERM) stops the bench between steps and still leaves nothing behind; what was measured by
then is reported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import TextIO

from shared.lab.bench import perframe, plan, report
from shared.lab.bench.checks import mtu_refusal, pps_warnings
from shared.lab.bench.observe import observe
from shared.lab.bench.options import QUICK_ROUNDS, QUICK_SECONDS, ROUNDS, SECONDS
from shared.lab.bench.paths import Endpoints, Path, PathContext
from shared.lab.bench.pps import SIZES
from shared.lab.bench.profiler import DEFAULT_HZ
from shared.lab.bench.record import Record, add_ratios, combine
from shared.lab.bench.registry import build_paths
from shared.lab.bench.workloads import WORKLOADS, Workload

REPO_ROOT = FsPath(__file__).resolve().parents[3]
STEP_OVERHEAD_S = 0.4  # per run: process start, connect, iperf3's result exchange


@dataclass
class BenchConfig:
    """Everything a run is parameterised by (the task and `python -m shared.lab.bench`)."""

    #: the default run (QEMU guests under TCG included) stays under 30 min (docs/performance.md)
    seconds: float = SECONDS
    rounds: int = ROUNDS
    paths: list[str] | None = None  # None: the default run's (``plan.DEFAULT_PATHS``)
    modes: list[str] | None = None  # None: each multi-mode path's default modes
    #: None: each path and mode its planned workloads (``shared.lab.bench.plan``)
    workloads: list[str] | None = None
    prefix: str = "pvb"
    state_dir: FsPath = FsPath("/run/pvnet-bench")
    results: FsPath | None = None  # default: <repo>/results/bench-<timestamp>/
    json_out: FsPath | None = None
    plot: bool = True
    profile_hz: int = DEFAULT_HZ  # py-spy samples per second per end; 0: no stage breakdown

    @classmethod
    def quick(cls, **kw: object) -> BenchConfig:
        """Every path and workload, one round of short runs."""
        return cls(**{"seconds": QUICK_SECONDS, "rounds": QUICK_ROUNDS, **kw})  # type: ignore[arg-type]


class Progress:
    """One line per step on stderr, prefixed with the elapsed time and the step count."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total, self.done, self.out = total, 0, out
        self.t0 = time.monotonic()

    def line(self, text: str, *, step: bool = False) -> None:
        if step:
            self.done += 1
        count = f"{self.done:>3}/{self.total} " if self.total else ""
        print(f"[{time.monotonic() - self.t0:7.1f}s] {count}{text}", file=self.out, flush=True)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Teardown must finish even if the user presses Ctrl-C again."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        restore = True
    except ValueError:  # not the main thread: nothing to protect
        old, restore = None, False
    try:
        yield
    finally:
        if restore:
            signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)


_MAIN_PID = os.getpid()


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds the bench like Ctrl-C, so the `finally` teardowns run.

    Only in the bench process itself: pyroute2 forks helpers (netns creation, NetNS) that
    inherit this handler and are stopped with SIGTERM; they must just die.
    """
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def _brief(value: object) -> str:
    lines = str(value).strip().splitlines()
    return lines[0] if lines else type(value).__name__


def _summary(r: Record) -> str:
    if r.error:
        return f"error: {r.error}"
    if r.workload == "rr":
        return f"p50 {r.p50_us:.1f} µs, p99 {r.p99_us:.1f} µs"
    if r.workload == "udp64":
        fps = f"{r.fps / 1e3:.1f}k frames/s" if r.fps is not None else "- frames/s"
        return f"{fps}, loss {r.loss_pct}%"
    if r.offered_fps is not None and r.fps is not None:
        return (f"{r.fps / 1e3:.1f}k of {r.offered_fps / 1e3:.1f}k frames/s offered, "
                f"{r.frame_bytes} B/frame")
    return f"{r.gbps:.3f} Gbit/s"


class Bench:
    """One bench run over `paths`; collects a raw record per repetition in `raw`."""

    def __init__(self, cfg: BenchConfig, paths: list[Path], log: TextIO) -> None:
        self.cfg, self.paths, self.log = cfg, paths, log
        #: what each path (and mode) measures: the plan, or the workloads asked for everywhere
        self.todo: dict[int, list[Workload]] = {
            id(p): [WORKLOADS[n] for n in (cfg.workloads or plan.workloads(p.path, p.mode))
                    if n in WORKLOADS] for p in paths}
        steps = sum(len(w.directions) for ws in self.todo.values() for w in ws)
        self.progress = Progress(cfg.rounds * steps)
        self.raw: list[Record] = []
        self.interrupted = False

    def estimate_s(self) -> float:
        setups = sum(len({w.gso for w in self.todo[id(p)]}) * plan.setup_s(p.path)
                     for p in self.paths) * self.cfg.rounds
        return self.progress.total * (self.cfg.seconds + STEP_OVERHEAD_S) + setups

    def run(self, after_round: Callable[[int], object] | None = None) -> list[Record]:
        """Run everything; Ctrl-C/SIGTERM ends early. Returns median records with ratios.
        ``after_round(n)`` runs after each round (the paper's op costs: measured between
        the rounds, on the machine as the rounds found it)."""
        try:
            for rnd in range(1, self.cfg.rounds + 1):
                for path in self.paths:
                    for gso in (True, False):
                        todo = [w for w in self.todo[id(path)] if w.gso == gso]
                        if todo:
                            self._session(path, gso, todo, rnd)
                if after_round is not None:
                    after_round(rnd)
        except KeyboardInterrupt:
            self.interrupted = True
            self.progress.line("interrupted: everything is torn down; reporting what was measured")
        return add_ratios(combine(self.raw))

    def _session(self, path: Path, gso: bool, todo: list[Workload], rnd: int) -> None:
        label = f"{path.path} {path.mode}" if path.mode != "-" else path.path
        tag = f"{label} ({'gso' if gso else 'no gso'}, round {rnd}/{self.cfg.rounds})"
        t0 = time.monotonic()
        try:
            try:
                ends = path.setup(gso)
            except Exception as exc:  # a broken path must not stop the others
                print(f"--- setup of {tag} failed:\n{exc}", file=self.log, flush=True)
                self.progress.line(f"{tag}: setup failed: {_brief(exc)} (see lab.log)")
                for w in todo:
                    for d in w.directions:
                        self.raw.append(Record(path.path, path.mode, w.name, d, note=path.note,
                                               error=f"setup failed: {_brief(exc)}"))
                        self.progress.line(f"{label} {w.name} {d}: skipped", step=True)
                return
            self.progress.line(f"{tag}: up in {time.monotonic() - t0:.1f} s ({path.note})")
            for w in todo:
                for d in w.directions:
                    rec = self._measure(path, ends, w, d)
                    self.raw.append(rec)
                    self.progress.line(f"{label} {w.name} {d}: {_summary(rec)}", step=True)
        finally:
            with _sigint_ignored():
                try:
                    path.teardown()
                except Exception as exc:
                    print(f"--- teardown of {tag} failed:\n{exc}", file=self.log, flush=True)
                    self.progress.line(f"{tag}: teardown failed: {_brief(exc)}")

    def _measure(self, path: Path, ends: Endpoints, w: Workload, direction: str) -> Record:
        rec = Record(path.path, path.mode, w.name, direction, reps=1, note=path.note)
        try:
            obs = observe(path, ends, w, direction, self.cfg.seconds, self.cfg.profile_hz)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {_brief(exc)}"
            return rec
        res = obs.result
        rec.seconds = round(res.seconds, 3)
        rec.gbps, rec.fps, rec.tps, rec.loss_pct = res.gbps, res.fps, res.tps, res.loss_pct
        rec.offered_fps, rec.frame_bytes = res.offered_fps, res.frame_bytes
        rec.p50_us, rec.p99_us, rec.error = res.p50_us, res.p99_us, res.error
        for key, value in obs.fields.items():
            if hasattr(rec, key):
                setattr(rec, key, value)
        if res.error is None:
            if not w.gso:
                rec.error = mtu_refusal(rec)
            notes = [*obs.notes, *pps_warnings(rec)]
            rec.note = "; ".join([rec.note, *notes]) if rec.note else "; ".join(notes)
        return rec


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def config_from(quick: bool = False, seconds: float | None = None, rounds: int | None = None,
                paths: str | None = None, modes: str | None = None,
                workloads: str | None = None, json: str | None = None,
                results: str | None = None, no_plot: bool = False,
                prefix: str | None = None, profile_hz: int | None = None) -> BenchConfig:
    """Command-line style options (comma lists, strings) -> BenchConfig; shared with tasks.py."""
    cfg = BenchConfig.quick() if quick else BenchConfig()
    if seconds is not None:
        cfg.seconds = float(seconds)
    if rounds is not None:
        cfg.rounds = int(rounds)
    cfg.paths, cfg.modes = _csv(paths), _csv(modes)
    cfg.workloads = _csv(workloads)
    cfg.json_out = FsPath(json) if json else None
    cfg.results = FsPath(results) if results else None
    cfg.plot = not no_plot
    if prefix:
        cfg.prefix = prefix
    if profile_hz is not None:
        cfg.profile_hz = int(profile_hz)
    return cfg


def default_results_dir() -> FsPath:
    return REPO_ROOT / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"


def run_bench(cfg: BenchConfig, out: TextIO = sys.stdout) -> int:
    """The whole command: run, print table and targets, write JSON/plot; the exit status."""
    if os.geteuid() != 0:
        print("error: the bench needs root (network namespaces)", file=sys.stderr)
        return 1
    from shared.lab import deps

    deps.ensure(["iperf3", "iproute2", "procps"]
                + (["netsniff-ng"] if any(w in SIZES for w in cfg.workloads or plan.ALL)
                   else []))
    unknown = [w for w in cfg.workloads or () if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload(s) {', '.join(unknown)} "
              f"(known: {', '.join(WORKLOADS)})", file=sys.stderr)
        return 2
    results = cfg.results or default_results_dir()
    results.mkdir(parents=True, exist_ok=True)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    old_term = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    with open(results / "lab.log", "a") as log:
        ctx = PathContext(prefix=cfg.prefix, state_dir=cfg.state_dir, results=results,
                          modes=tuple(cfg.modes) if cfg.modes else None,
                          log=lambda line: print(line, file=log, flush=True))
        try:
            paths = build_paths(cfg.paths or list(plan.DEFAULT_PATHS), ctx)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        bench = Bench(cfg, paths, log)
        bench.progress.line(
            f"{bench.progress.total} runs of {cfg.seconds:g} s over {len(paths)} paths, "
            f"{cfg.rounds} round(s); about {bench.estimate_s() / 60:.1f} min; "
            f"results in {results}")
        try:
            records = bench.run()
        finally:
            signal.signal(signal.SIGTERM, old_term)
    report.write_json(bench.raw, results / "raw.json")  # every repetition, for the curious
    return _report(records, results, cfg, bench.interrupted, out)


def _report(records: list[Record], results: FsPath, cfg: BenchConfig, interrupted: bool,
            out: TextIO) -> int:
    goals = ["Per-frame cost, the netns pair:",
               *(t.line() for t in perframe.per_frame_goals(records))]
    text = "\n\n".join([report.markdown_table(records), report.LEGEND,
                         perframe.cost_table(records), perframe.LEGEND,
                         report.targets_text(records), "\n".join(goals)])
    print(text, file=out)
    (results / "table.md").write_text(text + "\n")
    report.write_json(records, results / "results.json")
    if cfg.json_out is not None:
        report.write_json(records, cfg.json_out)
        print(f"\nJSON: {cfg.json_out}", file=out)
    png = report.plot(records, results / "bench.png") if cfg.plot else None
    if cfg.plot and png is None:
        print("\nno plot: matplotlib is not installed (pip install matplotlib)", file=out)
    print(f"\nresults: {results}" + (f"\nplot: {png}" if png else ""), file=out, flush=True)
    if interrupted:
        return 130
    return 1 if any(r.error for r in records) else 0
