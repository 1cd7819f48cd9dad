"""``python -m shared.lab.bench.devices`` really sends (full tier: root, namespaces, a TAP):
every frame of every sender - TAP, AF_PACKET socket, TPACKET_V2 TX ring - reaches the
receiving namespace's UDP stack, each record carries its per-frame figures, and nothing it
built is left behind. The figures themselves are the bench's business, not asserted here."""

from __future__ import annotations

import json
import os

import pytest
from pyroute2 import netns as pnetns

from shared.lab.bench import devices

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and a TAP need root"),
]


def test_every_sender_delivers_every_frame_and_leaves_nothing(capsys):
    assert devices.main(["--frames", "3000", "--rounds", "2", "--json", "--prefix", "pvt"]) == 0
    out = json.loads(capsys.readouterr().out)
    recs = out["records"]
    assert sorted({(r["sender"], r["round"]) for r in recs}) == sorted(
        (s, n) for s in devices.SENDERS for n in (1, 2))
    for r in recs:
        assert r["delivered"] == r["frames"] == 3000, r  # counted by the receiving stack
        assert r["wall_us"] > 0 and r["user_us"] + r["sys_us"] > 0, r
    assert set(out["median"]) == set(devices.SENDERS)
    assert not {"pvt-host", "pvt-peer"} & set(pnetns.listnetns())
    assert os.getcwd()  # the process left the host namespace (popns) without error
