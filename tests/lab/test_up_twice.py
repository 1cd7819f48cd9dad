"""`invoke up` on a lab that is already up refuses at once (issue 22, item 3): what runs is
named, and `invoke down`. Fast: the check itself, on a state dir with live and stale pidfiles.
Full: the real thing, `invoke up` twice on a private namespace lab, then `invoke up` for QEMU
guests on it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from shared.lab import procs
from shared.lab.errors import LabError
from shared.lab.state import refuse_if_up, running
from tests.lab.labs import invoke, topology_yaml, write_topology

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iperf3") is None, reason="needs root and iperf3")


def test_a_state_dir_with_a_live_process_is_up(tmp_path: Path) -> None:
    _f, topo = write_topology(tmp_path, topology_yaml("pvu", "10.93.0", [{"domid": 931}],
                                                     state_dir=tmp_path / "state"))
    refuse_if_up(topo)  # no state dir yet: not up
    topo.state_dir.mkdir()
    procs.write_pidfile(topo.pidfile("vif931.0"), os.getpid(), ["netback"])
    stale = procs.write_pidfile(topo.pidfile("pvu-g1"), os.getpid(), ["netfront"])
    topo.pidfile("pvu-g1").write_text(
        f'{{"pid": {stale.pid}, "start": {stale.start + 1}, "argv": []}}')  # pid reused
    assert running(topo) == [f"vif931.0 (pid {os.getpid()})"]
    with pytest.raises(LabError) as e:
        refuse_if_up(topo)
    msg = str(e.value)
    assert "already up (namespaces" in msg and f"vif931.0 (pid {os.getpid()})" in msg
    assert f"`invoke down --topology {topo.source}`" in msg
    procs.write_pidfile(topo.pidfile("qemu-pvu-g1"), os.getpid(), ["qemu"])
    with pytest.raises(LabError, match=r"already up \(QEMU guests"):
        refuse_if_up(topo)


@pytest.mark.full
@needs_root
def test_invoke_up_twice_refuses_within_2_s_naming_what_runs(tmp_path: Path) -> None:
    state = tmp_path / "state"
    f, topo = write_topology(tmp_path, topology_yaml("pvu", "10.93.0", [{"domid": 931}],
                                                     iperf_server=True, state_dir=state))
    try:
        r = invoke("up", "--no-vm", "--topology", str(f), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all 2 ends Connected" in r.stdout, r.stdout
        before = running(topo)
        assert len(before) >= 3  # netback, netfront, iperf3 servers
        for placement in (["--no-vm"], []):  # either placement, on a namespace lab
            t = time.monotonic()
            r = invoke("up", *placement, "--topology", str(f), timeout=30)
            took = time.monotonic() - t
            out = r.stdout + r.stderr
            assert r.returncode == 1, out
            assert took < 2.0, f"refused after {took:.1f} s"
            assert "the lab is already up (namespaces" in out and "invoke down" in out, out
            assert "vif931.0 (pid" in out and "pvu-g1 (pid" in out, out
            assert "accelerator" not in out and "starting QEMU" not in out, out
        assert running(topo) == before  # nothing started again, nothing stopped
    finally:
        down = invoke("down", "--topology", str(f), timeout=120)
        print(down.stdout, down.stderr)
    assert running(topo) == []
