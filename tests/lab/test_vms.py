"""The QEMU placement end to end (full tier: root, QEMU under KVM or TCG, whichever works).

Runs the user's commands (`invoke up` / `invoke down`) on a private topology (pvq-*,
10.80.0.0/24) so it can run beside a real lab, then drives iperf3 and file transfers through
the guests' pvnet interfaces and checks both ends' stats and what `down` leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from pyroute2 import netns as pnetns

from shared.lab.accel import CACHE_FILE
from shared.lab.guest_handles import SshRunner, load_handles
from shared.lab.image.store import cached_image
from shared.lab.iperf import IperfPath, run_iperf
from shared.plumbing.control.client import query
from tests.lab.labs import invoke, invoked_lab, run_state_dir, topology_yaml, write_topology
from tests.lab.marks import needs_qemu
from tests.lab.test_pair import RECEIVER, SENDER

pytestmark = [pytest.mark.full, needs_qemu]
#: pvq-g2 with 2 queues: a virtio-serial event port per queue, a worker process per queue in
#: the guest and on the host, a multi-queue TAP at each end
GUESTS = [{"domid": 31, "memory": 384}, {"domid": 32, "memory": 384, "queues": 2}]


@pytest.fixture(scope="module")
def vmlab(tmp_path_factory):
    state = run_state_dir("pvq")
    f, topo = write_topology(tmp_path_factory.mktemp("pvq"), topology_yaml(
        "pvq", "10.80.0", GUESTS, iperf_server=True, state_dir=state))
    with invoked_lab(f, state, ends=4):
        runner = SshRunner(topo)
        yield topo, f, runner
        runner.close()


def test_guests_boot_with_the_detected_accelerator(vmlab):
    topo, _f, runner = vmlab
    rc, out, _ = runner("pvq-g1", "uname -r", 30)
    assert rc == 0 and out.strip() == cached_image().kernel_version  # the image's kernel
    accel = json.loads(CACHE_FILE.read_text())
    assert accel  # detect_accel cached its verdict (KVM only if it really boots a guest)
    rc, out, _ = runner("pvq-g1", "ip -o addr show dev pv0", 30)
    assert rc == 0 and "10.80.0.11/24" in out


def test_tcp_through_pvnet_both_directions_and_guest_to_guest(vmlab):
    topo, _f, runner = vmlab
    paths = [IperfPath("g1->wire", "pvq-g1", "10.80.0.1", False),
             IperfPath("wire->g1", "pvq-g1", "10.80.0.1", True),
             IperfPath("g1->g2", "pvq-g1", "10.80.0.12", False),
             IperfPath("g2->g1", "pvq-g1", "10.80.0.12", True)]
    for p in paths:
        r = run_iperf(p, 3, runner=runner)
        assert r.error is None, (p.label, r.error)
        assert r.receiver_bps > 2e6, p.label  # flows (TCG, shared machine); speed: bench


def test_flows_cross_both_queues_of_the_two_queue_guest(vmlab):
    """Eight streams wire->pvq-g2 and back: the kernels' flow hashes use both queues (sixteen
    flows in all: all on one queue happens 1 in 32768 times - with four streams, 1 in 128,
    it happened once in CI, on 2026-12-08), and each end's queues add up to the vif's
    rings."""
    topo, _f, runner = vmlab
    g = topo.guest("pvq-g2")
    for reverse in (True, False):
        rc, out, err = runner("pvq-g2", ["iperf3", "-c", "10.80.0.1", "-t", "2", "-P", "8",
                                         *(["-R"] if reverse else [])], 60)
        assert rc == 0, err
    for ctl in (topo.frontend_ctl(g), topo.backend_ctl(g)):
        s = query(str(ctl), {"cmd": "stats"}, timeout=5)
        assert len(s["queues"]) == 2 and len(s["pids"]) == 3, s.get("pids")
        for ring, n in (("tx", "tx_packets"), ("rx", "rx_packets")):
            per = [q["rings"][ring][n] for q in s["queues"]]
            assert s["rings"][ring][n] == sum(per), (ctl, ring, per)
        assert min(q["rings"]["tx"]["tx_packets"] + q["rings"]["rx"]["rx_packets"]
                   for q in s["queues"]) > 100, [q["rings"] for q in s["queues"]]


def test_file_through_pvnet_keeps_its_sha256(vmlab, tmp_path: Path):
    topo, _f, runner = vmlab
    data = os.urandom(6 << 20)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    # guest -> wire: the guest reads the host file through its read-only /host view
    rx = subprocess.Popen(["ip", "netns", "exec", "pvq-wire", "python3", "-c", RECEIVER],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        rc, out, err = runner("pvq-g1", ["python3", "-c", SENDER, "10.80.0.1",
                                         f"/host{blob}"], 120)
        assert rc == 0, err
        n, digest = rx.stdout.readline().split()
    finally:
        rx.kill()
        rx.wait()
    assert (int(n), digest) == (len(data), want)
    # wire -> guest: the receiver runs in the guest
    client = runner.client("pvq-g1")
    chan = client.get_transport().open_session()
    chan.exec_command(f"python3 -c {shlex_quote(RECEIVER)}")
    buf = b""
    deadline = time.monotonic() + 30
    while b"ready" not in buf and time.monotonic() < deadline:
        if chan.recv_ready():
            buf += chan.recv(4096)
        time.sleep(0.05)
    assert b"ready" in buf
    subprocess.run(["ip", "netns", "exec", "pvq-wire", "python3", "-c", SENDER, "10.80.0.11",
                    str(blob)], check=True, timeout=120)
    while b"\n" not in buf.split(b"ready", 1)[1].lstrip(b"\n") and time.monotonic() < deadline:
        if chan.recv_ready():
            buf += chan.recv(4096)
        time.sleep(0.05)
    chan.close()
    n, digest = buf.split(b"ready", 1)[1].split()
    assert (int(n), digest.decode()) == (len(data), want)


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def test_stats_of_both_ends_show_header_slots_and_idle_rings(vmlab):
    topo, _f, _runner = vmlab
    for g in topo.guests:
        deadline = time.monotonic() + 10
        while True:
            front = query(str(topo.frontend_ctl(g)), {"cmd": "stats"}, timeout=5)
            back = query(str(topo.backend_ctl(g)), {"cmd": "stats"}, timeout=5)
            busy = front["rings"]["tx"]["slots_in_flight"] + back["rings"]["tx"][
                "slots_in_flight"]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        ftx, btx = front["rings"]["tx"], back["rings"]["tx"]
        assert front["state"] == back["state"] == "Connected"
        assert btx["tx_packets"] > 50
        assert ftx["tx_header_slot_packets"] == ftx["tx_packets"]
        assert btx["tx_header_slot_packets"] == btx["tx_packets"]
        assert btx["grant_maps"] == 0  # lazy mode
        for ring in ("tx", "rx"):
            assert front["rings"][ring]["slots_in_flight"] == 0
            assert back["rings"][ring]["slots_in_flight"] == 0
            assert back["rings"][ring]["grants_in_use"] == 0
        assert ftx["header_slots_in_use"] == 0


def test_down_leaves_nothing_behind(vmlab):
    """Runs last in this module: down, then look for anything of ours."""
    topo, f, _runner = vmlab
    pids = [h.pid for h in load_handles(topo).values()]
    r = invoke("down", "--topology", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "powered off" in r.stdout or "killed" in r.stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert not set(topo.namespaces) & set(pnetns.listnetns())
    leftovers = [p for p in topo.state_dir.glob("*") if p.is_socket() or p.suffix == ".pid"]
    assert leftovers == []
    out = subprocess.run(["pgrep", "-f", "pvq-g"], capture_output=True, text=True).stdout
    alive = [p for p in out.split() if Path(f"/proc/{p}/stat").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []  # (a zombie waiting for init to reap it is gone already)
