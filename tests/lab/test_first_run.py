"""The first run as a new user (and CI) makes it, and `invoke up` failing fast (full tier).

- The README's set-up lines (pip, `invoke up`), read from the README and run word for word in
  a fresh `git clone` of HEAD under /tmp with a fresh venv under /tmp (CI's clone lives in a
  temporary directory): the guest's tmpfs on /tmp hides both unless its init maps them, so
  this is the case that broke. The lab it brings up is a private one-guest topology (pvf-*,
  10.93.0.0/24, via $PVNET_TOPOLOGY) so it cannot collide with a real lab or another test;
  `invoke down` runs whatever happens. The clone must be as git has it afterwards (item 5 of
  issue 12).
- A guest whose netfront cannot start (a missing interpreter) or exits at once (/bin/false):
  `invoke up` must stop within 10 s of the guest's console saying so, naming the guest and
  quoting the guest's own line, not after the 120 s Connected timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from shared.plumbing.control.client import query
from tests.lab.labs import run_state_dir, topology_yaml, write_topology
from tests.lab.marks import REPO, needs_qemu
from tests.readme_setup import setup_commands

pytestmark = [pytest.mark.full, needs_qemu]

def readme_setup_line() -> str:
    """The README's pip line and `invoke up` line (its set-up block, read as CI reads it),
    joined as one shell line: the venv is this test's own, under /tmp."""
    cmds = setup_commands()
    pip = [c for c in cmds if c.startswith("pip install")]
    assert pip and "invoke up" in cmds, f"the README's set-up block lacks pip or up: {cmds}"
    return f"{pip[0]} && invoke up"


def run_sh(line: str, cwd: Path, env: dict[str, str], timeout: float
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


@pytest.fixture(scope="module")
def first_run():
    """Clone HEAD and make a venv under /tmp, then run the README's line in the clone."""
    base = Path(tempfile.mkdtemp(prefix="pvnet-first-", dir="/tmp"))
    clone, venv = base / "pvnet", base / "venv"
    state = run_state_dir("pvf")
    topo_file, topo = write_topology(base, topology_yaml(
        "pvf", "10.93.0", [{"domid": 93, "memory": 384}], state_dir=state))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}:{env['PATH']}", VIRTUAL_ENV=str(venv),
               PVNET_TOPOLOGY=str(topo_file), PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        t0 = time.monotonic()
        result = run_sh(readme_setup_line(), clone, env, timeout=900)
        print(f"--- README set-up line: {time.monotonic() - t0:.1f} s (pip + up), output tail:\n"
              + result.stdout[-2500:])
        yield clone, venv, topo, result
    finally:
        if (venv / "bin" / "invoke").exists():
            down = run_sh("invoke down", clone, env, timeout=300)
            print(down.stdout)
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_readme_setup_line_from_a_clone_and_venv_in_tmp_reaches_connected(first_run) -> None:
    clone, venv, topo, result = first_run
    assert result.returncode == 0, result.stdout[-6000:]
    assert "all 2 ends Connected" in result.stdout
    assert re.search(r"invoke up: done in \d+\.\d s \(total wall time\)", result.stdout)
    g = topo.guests[0]
    for ctl in (topo.backend_ctl(g), topo.frontend_ctl(g)):
        assert query(ctl, {"cmd": "stats"}, timeout=5.0)["state"] == "Connected"
    console = (topo.state_dir / g.name / "console.log").read_text(errors="replace")
    # the guest ran the venv's interpreter from the clone, both under the host's /tmp
    assert f"host path {venv} mapped from /host{venv}" in console
    assert f"host path {clone} mapped from /host{clone}" in console
    # ... by whichever of its names ran `invoke up` (python, python3, python3.11: pip's
    # shebang names the one pip ran under), each the venv's own interpreter
    ran = re.search(rf"run\[0\] pid \d+: ({re.escape(str(venv))}/bin/python[0-9.]*) -m frontend",
                    console)
    assert ran, console[-3000:]
    assert os.path.realpath(ran.group(1)) == os.path.realpath(venv / "bin" / "python3")


def test_up_leaves_the_clone_as_git_has_it(first_run) -> None:
    """Nothing `up` installs or builds (image, keys, state) lands in the checkout: git sees no
    change, and the only ignored files are pip's and Python's own."""
    clone, _venv, _topo, result = first_run
    assert result.returncode == 0, result.stdout[-3000:]
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=clone,
                            text=True, capture_output=True, check=True).stdout.splitlines()
    unexpected = [s for s in status
                  if not re.fullmatch(r"!! (.*/)?(__pycache__/|[^/]*\.egg-info/)", s)]
    assert unexpected == []


def watch_console(path: Path, pattern: str, seen: dict[str, float], stop: threading.Event
                  ) -> None:
    """Record when `pattern` first appears in the console (host clock)."""
    rx = re.compile(pattern)
    while not stop.is_set():
        try:
            if rx.search(path.read_text(errors="replace")):
                seen["at"] = time.monotonic()
                return
        except OSError:
            pass
        stop.wait(0.1)


@pytest.mark.parametrize("python, reported", [
    ("/nonexistent/pvnet/python3", r"run\[0\] /nonexistent/pvnet/python3 -m frontend .*: "
                                   r"cannot start: \[Errno 2\] No such file or directory"),
    ("/bin/false", r"run\[0\] /bin/false -m frontend .*: exited \(status 1\)"),
], ids=["cannot-start", "exits-at-once"])
def test_up_fails_within_10_s_of_a_guest_reporting_its_netfront_did_not_start(
        tmp_path, python: str, reported: str) -> None:
    state = run_state_dir("pvx")
    topo_file, topo = write_topology(tmp_path, topology_yaml(
        "pvx", "10.94.0", [{"domid": 94, "memory": 384}], state_dir=state))
    console = topo.state_dir / topo.guests[0].name / "console.log"
    env = dict(os.environ, PVNET_GUEST_PYTHON=python, PVNET_TOPOLOGY=str(topo_file))
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_console, args=(console, reported, seen, stop))
    watcher.start()
    try:
        r = subprocess.run([sys.executable, "-m", "invoke", "up"], cwd=REPO, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        ended = time.monotonic()
    finally:
        stop.set()
        watcher.join()
        subprocess.run([sys.executable, "-m", "invoke", "down"], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
        shutil.rmtree(state, ignore_errors=True)
    assert r.returncode != 0, r.stdout[-3000:]
    assert "at" in seen, f"the guest never reported {reported!r}:\n{r.stdout[-3000:]}"
    assert ended - seen["at"] < 10.0, r.stdout[-3000:]
    # the error names the guest and quotes the guest's own line, as its last words
    error = [ln for ln in r.stdout.splitlines() if ln.startswith("error: ")]
    assert error and re.match(rf"error: guest pvx-g1: {reported}", error[0]), r.stdout[-3000:]
    assert re.search(r"invoke up: FAILED in \d+\.\d s", r.stdout)


def test_bench_qemu_path_fails_fast_naming_the_guest_and_its_line(tmp_path) -> None:
    """`invoke bench`'s QEMU path is brought up by the same VmLab: a netfront that cannot
    start is a 'setup failed' naming the guest and quoting its line, seconds after boot, not
    after the 180 s Connected timeout."""
    env = dict(os.environ, PVNET_GUEST_PYTHON="/nonexistent/pvnet/python3")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "invoke", "bench", "--paths", "pvnet-qemu",
                        "--modes", "lazy", "--workloads", "tcp", "--rounds", "1",
                        "--seconds", "1", "--no-plot", "--results", str(tmp_path / "res")],
                       cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=600)
    took = time.monotonic() - t0
    assert re.search(r"setup failed: guest \S+: run\[0\] /nonexistent/pvnet/python3 -m frontend"
                     r" .*: cannot start: \[Errno 2\] No such file or directory", r.stdout), \
        r.stdout[-3000:]
    # boot (~25-40 s under TCG) plus the report, far below the 180 s Connected timeout
    assert took < 150, f"{took:.0f} s: the bench waited for a timeout\n{r.stdout[-3000:]}"
