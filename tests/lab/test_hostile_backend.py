"""A lying backend against a real netfront process (full tier: root, a network namespace,
the frontend's TAP).

The netfront runs as the lab runs it (``python -m frontend`` inside namespace pvb-g1,
10.88.0.0/24, its own TAP eth0); the test process plays its backend with
``HostileBackend``. For every lie the process must say why it gave up (Closing + error, the
``broken`` counter, ``last_error``), stay the same process, and come back with a fresh
handshake the moment it is let in again. The namespace and the process go at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import netns as pnetns

from shared.lab import procs
from shared.lab.commands import REPO_ROOT
from shared.lab.leaks import fd_count, memfd_maps, settle
from shared.lab.plumbing import rtnl
from shared.plumbing.control.client import query
from tests.hostile import BACKEND_LIES, HostileBackend

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 for a namespace and a TAP"),
]

NS = "pvb-g1"
PEER = "10.88.0.1"
PEER_MAC = "02:00:00:00:88:01"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    d = Path(tmp_path_factory.mktemp("pvb"))
    ev, ctl = d / "ev", d / "front.ctl"
    if NS in pnetns.listnetns():
        pnetns.remove(NS)
    pnetns.create(NS)
    hb = HostileBackend(str(ev), domid=9)
    proc = None
    try:
        argv = ["ip", "netns", "exec", NS, sys.executable, "-m", "frontend", "--name", NS,
                "--domid", "9", "--connect", str(ev), "--tap", "eth0", "--ip", "10.88.0.11/24",
                "--ctl", str(ctl)]
        proc = procs.spawn(argv, log=d / "front.log", pidfile=d / "front.pid", cwd=REPO_ROOT,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        hb.accept(timeout=20)
        _wait(lambda: _stats(ctl)["state"] == "Connected", 10)
        # the peer's MAC is known, so a datagram goes straight out as IP frames (no ARP)
        subprocess.run(["ip", "netns", "exec", NS, "ip", "neigh", "replace", PEER, "lladdr",
                        PEER_MAC, "dev", "eth0", "nud", "permanent"], check=True)
        yield hb, proc, ctl, d
    finally:
        hb.close()
        if proc is not None:
            procs.terminate([proc.pid])
            proc.wait(5)
        if NS in pnetns.listnetns():
            pnetns.remove(NS)


def _stats(ctl: Path) -> dict:
    return query(str(ctl), {"cmd": "stats"})


def _wait(cond, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - e.g. the control socket not there yet
            pass
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def _ping() -> None:
    """A 3000-byte UDP datagram: two IP fragments, each a header slot plus a granted page."""
    subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c",
                      "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                      f".sendto(b'x' * 3000, ('{PEER}', 9))"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_every_lie_marks_the_device_broken_and_it_reconnects(rig):
    hb, proc, ctl, d = rig
    pid = _stats(ctl)["pid"]
    fds = fd_count(pid)
    with rtnl(NS) as h:
        (tap,) = h.link_lookup(ifname="eth0")
    for lie in BACKEND_LIES:
        before = _stats(ctl)["counters"]
        want = lie(hb, _ping)
        hb.push()
        why = hb.wait_closed(10)
        assert want in why, (lie.__name__, why)
        s = _stats(ctl)
        assert s["pid"] == pid and proc.poll() is None
        assert s["counters"]["broken"] == before["broken"] + 1, lie.__name__
        assert want in s["counters"]["last_error"]
        assert s["counters"]["internal_errors"] == 0
        hb.drop()
        hb.accept(timeout=10)  # it is back, with a fresh handshake and region
        _wait(lambda: _stats(ctl)["state"] == "Connected", 10)
        _wait(lambda: memfd_maps(pid) == 1 and _stats(ctl)["regions_mapped"] == 1, 5)
    with rtnl(NS) as h:
        assert h.link_lookup(ifname="eth0") == [tap]  # the guest's NIC never went away
    assert settle(lambda: fd_count(pid), fds) <= fds  # (our own queries come and go)
    log = (d / "front.log").read_text()
    assert log.count("device broken") == len(BACKEND_LIES)
    assert "Traceback" not in log
