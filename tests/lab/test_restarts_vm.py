"""Crashes and restarts in the QEMU placement (full tier: root, QEMU, iperf3).

The netback SIGKILLed mid-stream is respawned with the guest's memory (the memfd QEMU holds,
reopened through /proc) and reconnects to QEMU's chardev socket; the netfront inside the guest
sees its virtio-serial port hang up, goes back to the handshake and re-initialises the
ivshmem region; an iperf3 TCP stream spanning all of it completes. Then the netfront is
killed inside the guest and started again: the backend sees a new hello on the same stream
and starts a new connection. Private topology (pvk-*, 10.87.0.0/24), one guest.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import threading
import time

import pytest
from pyroute2 import netns as pnetns

from shared.lab import procs
from shared.lab.chaos import Chaos
from shared.lab.commands import backend_argv, frontend_argv
from shared.lab.guest_handles import SshRunner, guest_view, load_handles
from shared.lab.leaks import memfd_maps
from shared.lab.topology import loads
from shared.lab.vms import VmLab
from shared.plumbing.control.client import query
from tests.lab.labs import run_state_dir, topology_yaml
from tests.lab.marks import REPO, needs_qemu

pytestmark = [pytest.mark.full, needs_qemu]
TOPOLOGY = topology_yaml("pvk", "10.87.0", [{"domid": 41, "memory": 384}], iperf_server=True)


@pytest.fixture(scope="module")
def vm(guest_image, qemu_available):
    state = run_state_dir("pvk")
    topo = loads(TOPOLOGY, state_dir=state)
    lab = VmLab(topo, say=lambda _line: None)
    runner = None
    try:
        lab.up(timeout=180)
        runner = SshRunner(topo)
        yield topo, runner, Chaos(topo)
    finally:
        if runner is not None:
            runner.close()
        lab.down()
        shutil.rmtree(state, ignore_errors=True)


def stats(topo, g, role: str) -> dict:
    ctl = topo.backend_ctl(g) if role == "back" else topo.frontend_ctl(g)
    return query(str(ctl), {"cmd": "stats"}, timeout=5)


def wait_flowing(topo, g, frames: int = 1000, timeout: float = 30.0) -> None:
    """Until `frames` more packets crossed the backend's rings: iperf3 is in full flow."""
    def moved() -> int:
        rings = stats(topo, g, "back")["rings"]
        return int(rings["tx"]["tx_packets"]) + int(rings["rx"]["rx_packets"])

    start, deadline = moved(), time.monotonic() + timeout
    while moved() - start < frames:
        assert time.monotonic() < deadline, f"no traffic through {g.name} in {timeout:g} s"
        time.sleep(0.1)


def guest_memfd(topo, g) -> int:
    """Reopen the guest's grant region (a memfd QEMU holds) for a new netback."""
    qemu = load_handles(topo)[g.name].pid
    for fd in os.listdir(f"/proc/{qemu}/fd"):
        try:
            target = os.readlink(f"/proc/{qemu}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:pvnet-{g.name}"):
            return os.open(f"/proc/{qemu}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    raise AssertionError(f"QEMU (pid {qemu}) holds no memfd for {g.name}")


def iperf_in_guest(runner, ns: str, seconds: int, out: dict) -> threading.Thread:
    def run() -> None:
        rc, stdout, err = runner(ns, ["iperf3", "-c", "10.87.0.1", "-t", str(seconds), "-J",
                                      "-i", "1", "--connect-timeout", "5000"], seconds + 60)
        try:
            out["raw"] = json.loads(stdout)
        except ValueError:
            out["raw"] = {"error": err or f"iperf3 exit {rc}"}

    t = threading.Thread(target=run)
    t.start()
    return t


def test_backend_sigkill_mid_stream_frontend_reinitialises_and_tcp_completes(vm):
    topo, runner, chaos = vm
    g = topo.guests[0]
    front0 = stats(topo, g, "front")
    out: dict = {}
    t = iperf_in_guest(runner, g.name, 16, out)
    wait_flowing(topo, g)
    chaos.kill(g, "back")
    fd = guest_memfd(topo, g)
    try:
        chaos.respawn(g, "back", argv=backend_argv(topo, g, fd), pass_fds=(fd,))
    finally:
        os.close(fd)
    took = chaos.wait_connected(g, timeout=60)
    t.join(120)
    raw = out.get("raw", {"error": "iperf3 did not finish"})
    assert not raw.get("error"), raw.get("error")
    iv = [int(i["sum"]["bytes"]) for i in raw["intervals"]]
    assert len(iv) >= 15 and all(b > 0 for b in iv[-3:]), iv  # it came back and went on
    assert sum(1 for b in iv if b == 0) <= 6, iv
    front = stats(topo, g, "front")
    assert front["pid"] == front0["pid"]  # the same netfront, back from the handshake
    assert front["counters"]["connects"] == front0["counters"]["connects"] + 1
    assert front["counters"]["internal_errors"] == 0
    back = stats(topo, g, "back")
    assert back["state"] == "Connected" and back["regions_mapped"] == 1
    assert memfd_maps(back["pid"]) == 1
    print(f"backend restart: Connected again in {took:.1f} s; iperf3 intervals {iv}")


def test_frontend_killed_in_the_guest_and_restarted_gets_a_new_connection(vm):
    topo, runner, chaos = vm
    g = topo.guests[0]
    back0 = stats(topo, g, "back")
    front0 = stats(topo, g, "front")
    rc, _out, err = runner(g.name, f"kill -9 {front0['pid']}", 30)
    assert rc == 0, err
    gone = (f"for i in $(seq 200); do kill -0 {front0['pid']} 2>/dev/null || exit 0; "
            "sleep 0.05; done; exit 1")
    rc, _out, err = runner(g.name, gone, 30)  # a deadline of 10 s inside the guest
    assert rc == 0, f"the killed netfront is still there: {err}"
    argv = shlex.join(frontend_argv(g))
    cmd = (f"cd {shlex.quote(guest_view(REPO))} && (setsid {argv} > /run/pvk-front2.log 2>&1 "
           f"< /dev/null &)")
    rc, _out, err = runner(g.name, cmd, 30)
    assert rc == 0, err
    chaos.wait_connected(g, timeout=60)
    end = time.monotonic() + 30
    while stats(topo, g, "front")["pid"] == front0["pid"] and time.monotonic() < end:
        time.sleep(0.5)
    back = stats(topo, g, "back")
    assert back["pid"] == back0["pid"]
    assert back["counters"]["frontend_restarts"] == back0["counters"]["frontend_restarts"] + 1
    assert back["counters"]["internal_errors"] == 0
    for ring in ("tx", "rx"):  # what the dead frontend's connection held went with it
        assert back["rings"][ring]["maps_outstanding"] == 0
    rc, out, err = runner(g.name, ["iperf3", "-c", "10.87.0.1", "-t", "3", "-J",
                                   "--connect-timeout", "5000"], 60)
    assert rc == 0, err
    # traffic flows (TCG on a shared machine); how fast is the bench's question
    assert json.loads(out)["end"]["sum_received"]["bits_per_second"] > 2e6


def test_down_leaves_nothing(vm):
    topo, _runner, _chaos = vm
    pids = [h.pid for h in load_handles(topo).values()]
    VmLab(topo, say=lambda _line: None).down()
    assert not set(topo.namespaces) & set(pnetns.listnetns())
    for pid in pids:  # gone, or a zombie only its parent (this process) has not reaped yet
        info = procs.proc_stat(pid)
        assert info is None or info.state == "Z"
    left = [p for p in topo.state_dir.glob("*") if p.is_socket() or p.suffix == ".pid"]
    assert left == []
    assert sys.executable  # (the fixture's own down then finds nothing to do)
