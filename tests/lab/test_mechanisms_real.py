"""Every registered mechanism, really run (full tier: root, netns, TAP, iperf3): one guest per
TX mechanism (with the default RX) and one per other RX mechanism, all in one namespace lab;
real iperf3 TCP both ways, a file both ways with the same sha256, then ``pvnet stats --json``
(the real CLI) must show the mechanism and its own counters, and nothing left in flight.

The guests come from the registry: a new mechanism is run here without a line of this file
changing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.lab.iperf import IperfPath, run_iperf
from shared.lab.topology import loads
from shared.protocol.mechanisms import default, names
from tests.lab.labs import netns_lab, topology_yaml
from tests.lab.test_pair import RECEIVER, SENDER

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]

PAIRS = [(t, default("rx")) for t in names("tx")] + \
    [(default("tx"), r) for r in names("rx") if r != default("rx")]
GUESTS = [f"pvm-g{i}" for i in range(1, len(PAIRS) + 1)]
TOPOLOGY = topology_yaml("pvm", "10.74.0", [{"domid": 170 + i, "tx_mode": t, "rx_mode": r}
                                           for i, (t, r) in enumerate(PAIRS)],
                         iperf_server=True)
WIRE = "10.74.0.1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    topo = loads(TOPOLOGY, state_dir=tmp_path_factory.mktemp("pvm-state"))
    with netns_lab(topo):
        yield topo


def cli_stats(topo) -> dict[str, dict]:
    """``pvnet stats --json`` as a user runs it: every end of the lab, by name."""
    out = subprocess.run([sys.executable, "-m", "shared.cli", "stats", "--json", "--dir",
                          str(topo.state_dir)], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    return {e["name"]: e for e in json.loads(out) if "name" in e}


def transfer(src: str, dst: str, dst_ip: str, data: bytes, tmp: Path) -> str:
    path = tmp / "blob"
    path.write_bytes(data)
    rx = subprocess.Popen(["ip", "netns", "exec", dst, "python3", "-c", RECEIVER],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", src, "python3", "-c", SENDER, dst_ip,
                        str(path)], check=True, timeout=60)
        n, digest = rx.stdout.readline().split()
    finally:
        rx.kill()
        rx.wait()
    assert int(n) == len(data)
    return digest


@pytest.mark.parametrize("i", range(len(PAIRS)), ids=[f"{t}+rx-{r}" for t, r in PAIRS])
def test_each_mechanism_moves_real_traffic_intact_and_shows_its_counters(lab, tmp_path, i):
    tx, rx = PAIRS[i]
    g = lab.guests[i]
    for reverse in (False, True):
        r = run_iperf(IperfPath("t", g.netns, WIRE, reverse), 2, udp=False, bitrate="0")
        assert r.error is None and r.receiver_bps > 20e6, r.error
    data = os.urandom(8 << 20)
    want = hashlib.sha256(data).hexdigest()
    assert transfer(g.netns, lab.wire.netns, WIRE, data, tmp_path) == want
    assert transfer(lab.wire.netns, g.netns, str(g.ip.ip), data, tmp_path) == want
    deadline = time.monotonic() + 10
    while True:
        back = cli_stats(lab)[g.vif]
        btx, brx = back["rings"]["tx"], back["rings"]["rx"]
        if btx["slots_in_flight"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (back["tx_mode"], back["rx_mode"]) == (tx, rx)
    assert btx["slots_in_flight"] == 0 and btx["slots_consumed"] == btx["slots_released"]
    assert btx["maps_outstanding"] == 0 and btx["grants_in_use"] == 0
    assert brx["maps_outstanding"] == 0 and brx["rx_packets"] > 1000
    assert btx["tx_zerocopy_sent"] == btx["tx_zerocopy_success"] + btx["tx_zerocopy_fail"]
    # the mechanism's own counters, named by it alone, reach the CLI's JSON
    from backend.mechanisms import load  # what netback itself would show
    for side, ring, name in (("tx", btx, tx), ("rx", brx, rx)):
        own = load(side, name).COUNTERS.split()
        assert set(own) <= set(ring), (side, name, own)
        assert not own or any(ring[c] > 0 for c in own), {c: ring[c] for c in own}
