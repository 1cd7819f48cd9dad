"""Private labs for the full-tier lab tests (imported, not a conftest): topologies that cannot
collide with a real lab or with each other's, and the set-up and tear-down they all share.

Each module picks its own prefix (namespaces and bridge) and /24; guest i is <prefix>-g<i> at
<net>.1<i>, the wire peer at <net>.1; a guest's MAC is made from its domid, so a module only
says what differs (domid, tx_mode, memory, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.lab.netns import Lab
from shared.lab.topology import Topology, load
from tests.lab.marks import REPO


def _scalar(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def topology_yaml(prefix: str, net: str, guests: Sequence[Mapping[str, object]], *,
                  iperf_server: bool = False, state_dir: str | Path | None = None) -> str:
    """A private topology's YAML; `guests` holds each guest's domid and its other keys."""
    lines = [f"bridge: {prefix}br0", f"host_netns: {prefix}-host"]
    if state_dir is not None:
        lines.append(f"state_dir: {state_dir}")
    lines += [f"wire: {{netns: {prefix}-wire, ip: {net}.1/24, "
              f"iperf_server: {_scalar(iperf_server)}, host_if: {prefix}br0-wire}}", "guests:"]
    for i, spec in enumerate(guests, start=1):
        domid = int(spec["domid"])  # type: ignore[call-overload]
        keys = {"name": f"{prefix}-g{i}", "domid": domid,
                "mac": f'"02:00:00:00:{domid >> 8:02x}:{domid & 0xff:02x}"',
                "ip": f"{net}.{10 + i}/24", **{k: v for k, v in spec.items() if k != "domid"}}
        lines.append("  - {" + ", ".join(f"{k}: {_scalar(v)}" for k, v in keys.items()) + "}")
    return "\n".join(lines) + "\n"


def run_state_dir(prefix: str) -> Path:
    """A QEMU lab's state dir: short, under /run (unix socket paths are limited)."""
    return Path("/run") / f"{prefix}-{os.getpid()}"


@contextlib.contextmanager
def netns_lab(topo: Topology, **lab_options: object) -> Iterator[Lab]:
    """The namespace placement of `topo`, up (30 s at most) for the block, down after it
    whatever happened."""
    lab = Lab(topo, **lab_options)  # type: ignore[arg-type]
    try:
        lab.up(timeout=30)
        yield lab
    finally:
        lab.down()


@contextlib.contextmanager
def chaos_lab(tmp_path_factory, prefix: str, net: str,
              guests: Sequence[Mapping[str, object]]) -> Iterator[tuple[Topology, Any, Any]]:
    """A private namespace lab with a wire iperf3 server and its topology written to a file
    (so that `invoke down --topology` can be run on it), up for the block: (topology, its
    leak Inspector having learnt the baseline, a Chaos to kill and respawn its ends)."""
    from shared.lab.chaos import Chaos
    from shared.lab.leaks import Inspector

    d = tmp_path_factory.mktemp(prefix)
    _f, topo = write_topology(d, topology_yaml(prefix, net, guests, iperf_server=True,
                                               state_dir=d / "state"))
    with netns_lab(topo):
        insp = Inspector(topo)
        insp.learn()
        yield topo, insp, Chaos(topo)


def invoke(*args: str, timeout: float = 300, env: Mapping[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """The user's command (`invoke up`, `invoke down`, ...) run from this checkout."""
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout,
                          env=None if env is None else dict(env))


@contextlib.contextmanager
def invoked_lab(topo_file: Path, state: Path, ends: int) -> Iterator[None]:
    """`invoke up --topology` (which must reach Connected on all `ends`) for the block;
    `invoke down` (its output printed) and the state dir removed after it, whatever happened."""
    try:
        r = invoke("up", "--topology", str(topo_file))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"all {ends} ends Connected" in r.stdout, r.stdout
        yield
    finally:
        down = invoke("down", "--topology", str(topo_file))
        print(down.stdout, down.stderr)
        shutil.rmtree(state, ignore_errors=True)


def write_topology(directory: Path, yaml: str) -> tuple[Path, Topology]:
    """The topology as a file (what `invoke --topology` and $PVNET_TOPOLOGY take), loaded."""
    path = directory / "topology.yaml"
    path.write_text(yaml)
    return path, load(path)


def tiny_bench(tmp_path: Path, workloads: list[str], prefix: str,
               paths: tuple[str, ...] = ("veth", "pvnet-netns")) -> list[dict]:
    """A real `invoke bench` of 2 s runs, one round, over `paths` (pvnet-netns in lazy mode),
    in its own namespaces (`prefix`); its JSON records. The bench's exit status must be 0:
    every record measured something and none was refused."""
    from shared.lab.bench import runner

    out = tmp_path / "bench.json"
    cfg = runner.BenchConfig(seconds=2, rounds=1, paths=list(paths), modes=["lazy"],
                             workloads=workloads, prefix=prefix, state_dir=tmp_path / "st",
                             results=tmp_path / "res", json_out=out)
    code = runner.run_bench(cfg)
    data = json.loads(out.read_text())
    assert code == 0, [(d["path"], d["workload"], d["direction"], d["error"]) for d in data]
    return data
