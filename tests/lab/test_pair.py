"""The split driver pair end to end in the namespace placement (full tier: root, netns, TAP).

A private topology (pvp-*, 10.79.0.0/24) so it can run beside a real lab: guest pvp-g1 is
served in lazy mode, pvp-g2 in map mode. Real iperf3 TCP and UDP in both directions, then the
stats of both ends must tell the story the design promises.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shared.lab import procs
from shared.lab.iperf import IperfPath, run_iperf
from shared.lab.topology import loads
from shared.plumbing.control.client import query
from shared.protocol.netif import NETTXF_header_slot, NETTXF_more_data
from tests.hostile import HostileFrontend
from tests.lab.labs import netns_lab, topology_yaml

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]

TOPOLOGY = topology_yaml("pvp", "10.79.0", [{"domid": 201, "tx_mode": "lazy"},
                                           {"domid": 202, "tx_mode": "map"}], iperf_server=True)
WIRE = "10.79.0.1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    topo = loads(TOPOLOGY, state_dir=tmp_path_factory.mktemp("pvp-state"))
    with netns_lab(topo):
        yield topo


def stats(topo, name: str) -> dict:
    g = topo.guest(name)
    return {"front": query(str(topo.frontend_ctl(g)), {"cmd": "stats"}),
            "back": query(str(topo.backend_ctl(g)), {"cmd": "stats"})}


def wait_idle(topo, name: str, timeout: float = 5.0) -> dict:
    """Counters at rest: nothing in flight on either end (or the last reading, to assert on)."""
    end = time.monotonic() + timeout
    while True:
        s = stats(topo, name)
        busy = [s[e]["rings"]["tx"]["slots_in_flight"] for e in ("front", "back")]
        if not any(busy) or time.monotonic() > end:
            return s
        time.sleep(0.2)


def iperf(ns: str, reverse: bool = False, udp: bool = False, seconds: int = 3):
    r = run_iperf(IperfPath("t", ns, WIRE, reverse), seconds, udp=udp,
                  bitrate="100M" if udp else "0")
    assert r.error is None, r.error
    return r


@pytest.mark.parametrize("guest", ["pvp-g1", "pvp-g2"])
def test_tcp_and_udp_both_directions_then_stats_tell_the_story(lab, guest):
    before = stats(lab, guest)["back"]["rings"]["tx"]
    for reverse in (False, True):
        assert iperf(guest, reverse).receiver_bps > 50e6
        r = iperf(guest, reverse, udp=True)
        assert r.receiver_bps > 20e6 and r.lost_percent < 50  # a shared 2-core machine
    s = wait_idle(lab, guest)
    ftx, btx = s["front"]["rings"]["tx"], s["back"]["rings"]["tx"]
    frags = btx["tx_frags"] - before["tx_frags"]
    assert btx["tx_packets"] > 1000 and frags > 1000
    # every TX packet used a header slot, on both ends
    assert ftx["tx_header_slot_packets"] == ftx["tx_packets"] == btx["tx_packets"]
    assert btx["tx_header_slot_packets"] == btx["tx_packets"]
    assert btx["tx_zerocopy_sent"] == btx["tx_zerocopy_success"] + btx["tx_zerocopy_fail"]
    if s["back"]["tx_mode"] == "lazy":
        assert btx["grant_maps"] == 0  # lazy: no payload grant was ever CPU-mapped
        assert btx["grant_maps_avoided"] == btx["tx_frags"]
    else:
        assert btx["grant_maps"] - before["grant_maps"] == frags  # map: each one
    assert s["back"]["rings"]["rx"]["rx_packets"] > 1000
    # at idle nothing is in flight and no grant is held
    for end in ("front", "back"):
        for ring in ("tx", "rx"):
            r = s[end]["rings"][ring]
            assert r["slots_in_flight"] == 0, (end, ring)
            assert r.get("grants_in_use", 0) == 0 and r.get("maps_outstanding", 0) == 0
    assert ftx["header_slots_in_use"] == 0
    assert btx["slots_consumed"] == btx["slots_released"]


RECEIVER = textwrap.dedent("""\
    import hashlib, socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 5999)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        h.update(b); n += len(b)
    print(n, h.hexdigest(), flush=True)
""")
SENDER = textwrap.dedent("""\
    import socket, sys
    data = open(sys.argv[2], "rb").read()
    c = socket.create_connection((sys.argv[1], 5999), timeout=30); c.sendall(data); c.close()
""")


@pytest.mark.parametrize("direction", ["guest->wire", "wire->guest"])
def test_file_arrives_with_the_same_sha256(lab, tmp_path: Path, direction):
    data = os.urandom(24 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    src, dst, dst_ip = ("pvp-g1", "pvp-wire", WIRE) if direction == "guest->wire" else (
        "pvp-wire", "pvp-g1", "10.79.0.11")
    rx = subprocess.Popen(["ip", "netns", "exec", dst, "python3", "-c", RECEIVER],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", src, "python3", "-c", SENDER, dst_ip, str(path)],
                       check=True, timeout=60)
        n, digest = rx.stdout.readline().split()
    finally:
        rx.kill()
        rx.wait()
    assert int(n) == len(data)
    assert digest == hashlib.sha256(data).hexdigest()


def test_malformed_frontend_is_disconnected_and_the_other_guest_goes_on(lab):
    """Replace pvp-g1's netfront by a hostile one; pvp-g2's iperf3 runs meanwhile."""
    g1 = lab.guest("pvp-g1")
    rec = procs.read_pidfile(lab.pidfile("pvp-g1"))
    assert rec is not None
    procs.terminate([rec.pid])
    back_before = stats_back(lab, g1)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=iperf("pvp-g2", seconds=4)))
    t.start()
    try:
        hs, more = NETTXF_header_slot, NETTXF_more_data
        cases = [  # (requests, the fault the backend must name); a 128-byte header slot
            # plus 100 payload bytes is a 228-byte packet, so only the intended field is wrong
            ([(0, 0, hs | more, 7, 228), (8, 0, 0, 7, 100)],
             r"^ring\[1\]\.id: request id 7 reused while pending$"),
            ([(4096 * 64, 0, hs, 1, 60)],
             r"^ring\[0\]\.gref: header slot 262144\+0 len 60 is not inside a slot$"),
            ([(0, 0, hs | more, 1, 228), (99999, 0, 0, 2, 100)],
             r"^ring\[0\.\.1\]\.gref: gref 99999 outside the table \(0\.\.\d+\)$"),
        ]
        faults = []
        for reqs, fault in cases:
            bad = HostileFrontend(str(lab.event_socket(g1)), "hostile", g1.domid)
            bad.connect()
            bad.write_tx(*reqs)
            why = bad.wait_closed()
            bad.close()
            assert re.search(fault, why), (fault, why)
            faults.append(why)
    finally:
        t.join()
    assert result["r"].receiver_bps > 50e6  # the other guest's traffic went on
    after = stats_back(lab, g1)
    assert after["pid"] == back_before["pid"]  # the same backend process survived
    assert after["counters"]["malformed"] - back_before["counters"]["malformed"] == len(cases)
    assert after["rings"]["tx"]["maps_outstanding"] == 0
    log = lab.log_path(g1.vif).read_text()
    for why in faults:  # each one logged with its fault, as the malformed counter's reason
        assert re.search(rf"disconnecting frontend hostile: \w+Error: {re.escape(why)}$", log,
                         re.M), why


def stats_back(topo, g) -> dict:
    return query(str(topo.backend_ctl(g)), {"cmd": "stats"})
