"""invoke tasks: the lab's front door (`invoke --list`, `invoke --help <task>`).

Thin on purpose: the logic lives in shared/lab/ (netns placement, topology) and shared/cli.py,
where the tests can reach it.
"""

from __future__ import annotations

import json as jsonlib
import shutil
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

from invoke import Context, Exit, task

from shared.lab.bench.options import HELP as BENCH_HELP
from shared.lab.paper.__main__ import HELP as PAPER_HELP

TOPOLOGY_HELP = (
    "topology YAML (default: the running lab's, else shared/lab/topologies/default.yaml)"
)


def _lab_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn lab/topology errors into a clean message and exit status instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pyroute2 import NetlinkError

        from shared.lab.errors import LabError
        from shared.lab.topology import TopologyError

        try:
            return fn(*args, **kwargs)
        except (LabError, TopologyError) as exc:
            raise Exit(f"error: {exc}", code=1) from None
        except (NetlinkError, OSError) as exc:  # e.g. EPERM, EEXIST from the kernel
            raise Exit(f"error: {type(exc).__name__}: {exc}", code=1) from None

    return wrapper


@task(help={
    "no_vm": "netns placement: each guest is a network namespace on this host (no QEMU)",
    "topology": TOPOLOGY_HELP,
    "timeout": "seconds to wait for every netfront/netback to reach Connected (default 30)",
})
@_lab_errors
def up(c: Context, no_vm: bool = False, topology: str | None = None, timeout: int = 30):
    """Bring the lab up: bridge, wire peer with iperf3, guests, netback+netfront per guest."""
    import time

    from shared.lab import deps
    from shared.lab.netns import Lab
    from shared.lab.state import refuse_if_up, resolve_topology

    t0 = time.monotonic()
    ok = False
    try:
        topo = resolve_topology(topology)
        refuse_if_up(topo)  # before anything slow: apt, the image, a boot
        deps.ensure(["iperf3", "iproute2", "procps"] if no_vm else None)
        print(f"topology {topo.source}", flush=True)
        if no_vm:
            Lab(topo).up(timeout=timeout)
        else:
            from shared.lab.vms import VmLab

            VmLab(topo).up(timeout=max(timeout, 120))
        ok = True
    finally:  # the wall time of the whole command: apt, image, boot, Connected (or failure)
        print(f"invoke up: {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s "
              "(total wall time)", flush=True)


@task(help={"topology": TOPOLOGY_HELP})
@_lab_errors
def down(c: Context, topology: str | None = None):
    """Remove everything `up` made (also after a crash or a half-finished up). Idempotent."""
    from shared.lab.state import resolve_topology
    from shared.lab.vms import VmLab

    VmLab(resolve_topology(topology)).down()


@task(help={
    "time": "seconds per iperf3 run (default 5)",
    "json": "print iperf3's raw JSON result per path instead of the table",
    "udp": "UDP (-u -b BITRATE) instead of TCP",
    "bitrate": "UDP target bitrate for iperf3 -b (default 0 = unlimited)",
    "topology": TOPOLOGY_HELP,
})
@_lab_errors
def iperf(c: Context, time: int = 5, json: bool = False, udp: bool = False, bitrate: str = "0",
          topology: str | None = None):
    """iperf3 each guest <-> wire and guest <-> guest, both directions; Gbit/s per path."""
    from shared.lab.guest_handles import SshRunner, running_vms
    from shared.lab.iperf import format_iperf, iperf_paths, run_iperf
    from shared.lab.state import resolve_topology

    topo = resolve_topology(topology)
    results = []
    runner = SshRunner(topo) if running_vms(topo) else None
    try:
        for path in iperf_paths(topo):
            if not json:
                print(f"iperf3 {path.label} ({time} s) ...", file=sys.stderr, flush=True)
            if runner is None:
                results.append(run_iperf(path, time, udp, bitrate))
            else:
                results.append(run_iperf(path, time, udp, bitrate, runner=runner))
    finally:
        if runner is not None:
            runner.close()
    if json:
        print(jsonlib.dumps({r.path.label: r.raw if r.raw else {"error": r.error} for r in results},
                         indent=1))
    else:
        print(format_iperf(results, udp))
    if any(r.error for r in results):
        raise Exit(code=1)


@task(help={
    "json": "print the raw stats list as JSON",
    "watch": "redraw every second with per-second rates until Ctrl-C",
    "topology": TOPOLOGY_HELP,
})
def stats(c: Context, json: bool = False, watch: bool = False, topology: str | None = None):
    """Show every netfront/netback's counters, paired per guest (same as `pvnet stats`)."""
    from shared.cli import main
    from shared.lab.state import resolve_topology

    argv = ["stats", "--dir", str(resolve_topology(topology).state_dir)]
    argv += ["--json"] if json else []
    argv += ["--watch"] if watch else []
    code = main(argv)
    if code:
        raise Exit(code=code)


@task(help={"fast": 'only the fast tier (-m "not full": no root/netns/TAP/QEMU needed)'})
def test(c: Context, fast: bool = False):
    """Run the test suite (pytest -q tests/); fails on test failures and on 'no tests ran'."""
    marker = ' -m "not full"' if fast else ""
    # warn=True so a pytest exit status (including 5 = no tests collected) becomes ours.
    result = c.run(f"{sys.executable} -m pytest -q tests/{marker}", warn=True, pty=False)
    if result is None or result.exited != 0:
        code = result.exited if result is not None else 1
        raise Exit(f"pytest exited with status {code}" + (" (no tests ran)" if code == 5 else ""),
                   code=code or 1)


@task
def lint(c: Context):
    """ruff check . (style, rules in pyproject.toml) and lint-imports (the import contracts in
    pyproject.toml: which package may import which). Both run; either failing fails the task."""
    here = Path(__file__).resolve().parent
    # the interpreter's own lint-imports (a venv's bin/) before any other on PATH
    beside = Path(sys.executable).with_name("lint-imports")
    linter = str(beside) if beside.exists() else shutil.which("lint-imports") or "lint-imports"
    failed = []
    with c.cd(str(here)):
        for name, cmd in (("ruff", f"{sys.executable} -m ruff check ."),
                          # --no-cache: leave nothing in the checkout (the graph takes < 1 s)
                          ("lint-imports", f"{linter} --no-cache --no-logo")):
            result = c.run(cmd, warn=True, pty=False)
            if result is None or result.exited != 0:
                failed.append(name)
    if failed:
        raise Exit(f"lint failed: {', '.join(failed)}", code=1)


@task(help={"name": "guest name", "cmd": "command to run (default: an interactive hint)",
            "topology": TOPOLOGY_HELP})
@_lab_errors
def ssh(c: Context, name: str, cmd: str = "", topology: str | None = None):
    """Run a command in a QEMU guest over its management ssh (127.0.0.1 only):
    `invoke ssh g1 -- ip addr` (or --cmd 'ip addr')."""
    from shared.lab.guest_handles import SshRunner, load_handles
    from shared.lab.state import resolve_topology

    topo = resolve_topology(topology)
    cmd = cmd or getattr(c, "remainder", "") or ""
    if not cmd:
        h = load_handles(topo).get(name)
        port = h.ssh_port if h else "?"
        from shared.lab.ssh import DEFAULT_KEY_DIR

        print(f"ssh -p {port} -i {DEFAULT_KEY_DIR / 'id_ed25519'} root@127.0.0.1 "
              f"(or: invoke ssh {name} --cmd 'ip addr')")
        return
    runner = SshRunner(topo)
    try:
        rc, out, err = runner(name, cmd, 600)
    finally:
        runner.close()
    sys.stdout.write(out)
    sys.stderr.write(err)
    if rc:
        raise Exit(code=rc)


@task(help={"name": "guest name", "lines": "how many lines from the end (0: all)",
            "topology": TOPOLOGY_HELP})
@_lab_errors
def logs(c: Context, name: str, lines: int = 0, topology: str | None = None):
    """Show a guest's console (QEMU placement) or a data process's log (any placement)."""
    from shared.lab.guest_handles import load_handles
    from shared.lab.state import resolve_topology

    topo = resolve_topology(topology)
    h = load_handles(topo).get(name)
    path = h.console if h else topo.log_path(name)
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise Exit(f"no log for {name!r} ({path}: {exc.strerror})", code=1) from None
    print("\n".join(text[-lines:] if lines else text))


@task(help={"force": "rebuild even if the recipe and kernel did not change",
            "json": "print the image description as JSON"})
def image(c: Context, force: bool = False, json: bool = False):
    """Build (or reuse) the QEMU guest image from Debian packages; prints its size."""
    from shared.lab.image.cli import main

    argv = (["--force"] if force else []) + (["--json"] if json else [])
    code = main(argv)
    if code:
        raise Exit(code=code)


@task
def accel(c: Context):
    """Which QEMU accelerator the lab uses: KVM only if it really boots the guest, else TCG."""
    from shared.lab.accel import main

    code = main()
    if code:
        raise Exit(code=code)


@task(help=BENCH_HELP)
def bench(c: Context, quick: bool = False, seconds: float | None = None,
          rounds: int | None = None, paths: str | None = None, modes: str | None = None,
          workloads: str | None = None, json: str | None = None, results: str | None = None,
          no_plot: bool = False, prefix: str | None = None, profile_hz: int | None = None):
    """Benchmark every path (veth, pvnet-netns modes, ...): table, targets, JSON, plot."""
    from shared.lab.bench.runner import config_from, run_bench

    code = run_bench(config_from(quick=quick, seconds=seconds, rounds=rounds, paths=paths,
                                 modes=modes, workloads=workloads, json=json, results=results,
                                 no_plot=no_plot, prefix=prefix, profile_hz=profile_hz))
    if code:
        raise Exit(code=code)


@task(help=PAPER_HELP)
def paper(c: Context, rows: str | None = None, quick: bool = False, rounds: int | None = None,
          seconds: float | None = None, json: str | None = None, results: str | None = None,
          no_plot: bool = False, prefix: str | None = None, placement: str | None = None):
    """The published results on pvnet's mechanisms beside pvnet's own, in one run: table
    (theirs, ours with 95 % intervals, cost shares, the cost model, verdicts), JSON, PNG."""
    from shared.lab.paper.__main__ import main

    given = {"rows": rows, "rounds": rounds, "seconds": seconds, "json": json,
             "results": results, "prefix": prefix, "placement": placement}
    argv = [*(["--quick"] if quick else []), *(["--no-plot"] if no_plot else []),
            *(a for k, v in given.items() if v is not None for a in (f"--{k}", str(v)))]
    code = main(argv)
    if code:
        raise Exit(code=code)


@task(help={
    "minutes": "how long to soak (default 10)",
    "json": "also write the report as JSON to this file",
    "restart_every": "seconds between two SIGKILL+respawn steps (default 20)",
    "queues": "queues per guest (default 1; 2: a worker process per queue at each end)",
})
def soak(c: Context, minutes: float = 10.0, json: str | None = None,
         restart_every: float = 20.0, queues: int = 1):
    """Verified traffic while frontends and backends are SIGKILLed and respawned; leak report.

    Runs on its own private lab (pvs-*, 10.86.0.0/24) beside any other; prints a progress
    line per minute and the JSON report (connections_lost, bytes_verified, leaks per kind).
    """
    from dataclasses import asdict

    from shared.lab import deps
    from shared.lab.soak import Soak, SoakConfig

    deps.ensure(["iperf3", "iproute2", "procps"])
    report = Soak(SoakConfig(minutes=minutes, json_path=json, restart_every=restart_every,
                             queues=int(queues)),
                  say=lambda line: print(line, flush=True)).run()
    print(jsonlib.dumps(asdict(report), indent=1))
    if not report.ok:
        raise Exit("soak: leaks, failed transfers or errors (see the report)", code=1)
