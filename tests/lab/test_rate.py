"""A topology's ``rate:`` limits a vif's TX as Linux netback's ``rate`` key does (full tier:
root, netns, TAP, iperf3): guest->wire TCP runs at the limit, wire->guest is untouched, and
the packets waited on the ring for credit rather than being dropped."""

from __future__ import annotations

import os
import shutil

import pytest

from shared.lab.iperf import IperfPath, run_iperf
from shared.lab.topology import loads
from shared.plumbing.control.client import query
from tests.lab.labs import netns_lab, topology_yaml

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]
LIMIT = 40e6  # bit/s
TOPOLOGY = topology_yaml("pvr", "10.73.0", [{"domid": 181, "rate": '"40Mb/s@20ms"'}],
                         iperf_server=True)


def test_rate_limits_guest_tx_only_by_waiting_for_credit(tmp_path):
    topo = loads(TOPOLOGY, state_dir=tmp_path / "state")
    with netns_lab(topo):
        g = topo.guests[0]
        assert g.rate == (100_000, 20_000)
        tx = run_iperf(IperfPath("t", g.netns, "10.73.0.1", False), 3, udp=False, bitrate="0")
        rx = run_iperf(IperfPath("t", g.netns, "10.73.0.1", True), 3, udp=False, bitrate="0")
        assert tx.error is None and rx.error is None, (tx.error, rx.error)
        assert 0.8 * LIMIT < tx.receiver_bps < 1.1 * LIMIT, tx.receiver_bps
        assert rx.receiver_bps > 3 * LIMIT, rx.receiver_bps  # RX is not limited
        ring = query(str(topo.backend_ctl(g)), {"cmd": "stats"})["rings"]["tx"]
        assert ring["tx_credit_waits"] > 0 and ring["drops"] == 0
