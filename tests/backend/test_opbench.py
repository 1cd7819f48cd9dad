"""The cost model's inputs: ``backend.opbench`` times every operation the model charges, on a
real grant region, and the data path counts the one operation the model charges apart
from a grant copy - a header pull out of a fragment the packet already holds."""

from __future__ import annotations

import pytest

from backend.opbench import measure
from shared.protocol.offload import VNET_HDR
from tests.conftest import frame
from tests.inproc import BackendThread, FrontendThread, wait_for

KEYS = {"map", "unmap", "first_touch", "grant_copy", "grant_copy_kb", "pull", "staged_pull",
        "hold", "cpu_copy_kb", "notify"}


def test_every_operation_the_model_charges_is_timed():
    costs = measure(rounds=300)
    assert set(costs) == KEYS
    assert all(costs[k] > 0 for k in KEYS - {"grant_copy_kb", "cpu_copy_kb"}), costs
    assert costs["grant_copy_kb"] >= 0 and costs["cpu_copy_kb"] >= 0


@pytest.mark.parametrize("slots", [False, True])
def test_a_header_pull_out_of_a_held_fragment_is_counted_as_a_pull(tmp_path, slots):
    """Without header slots a 64-byte frame's one fragment is held and its header pulled by
    a grant copy: every copy is a pull (the model charges it the copy alone, the check being
    the hold's). With header slots the header comes from the slot: no pull, no copy."""
    b = BackendThread(tmp_path, tx_mode="linux")
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid, header_slots=slots)
    try:
        f.connected()
        b.connected()
        tx = b.nb.tx_stats
        for i in range(8):
            f.guest.send(bytes(VNET_HDR.size) + frame(bytes([i]) * 50))
        wait_for(lambda: tx.tx_packets == 8, 5, "8 TX packets")
        if slots:
            assert (tx.grant_pulls, tx.grant_copies) == (0, 0)
        else:
            assert tx.grant_pulls == tx.grant_copies == 8
    finally:
        f.stop()
        b.stop()
