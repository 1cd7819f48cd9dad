"""``copy`` does its own work and no other's: after the header pull each fragment is mapped,
copied and unmapped, the packet's slots are answered before its vif write, and the vif write
is handed only the backend's own bytes - nothing of the frontend's memory."""

import pytest

from tests.backend.handed import tx_through


@pytest.mark.parametrize("header_slots", [True, False])
def test_copy_copies_through_the_cpu_view_and_answers_before_the_write(monkeypatch,
                                                                       header_slots):
    p, spy = tx_through("copy", header_slots, monkeypatch)
    assert spy.maps(spy.between("attach", "pulled")) == []
    during = spy.between("pulled", "xmit")
    every = [f for a in spy.attached for f in a.frames]
    # each fragment: map, unmap, in turn (a page is never held mapped across the copy)
    assert [ev[:2] for ev in during if ev[0] in ("map", "unmap")] == \
        [(k, f) for f in every for k in ("map", "unmap")]
    answered = [i for ev in during if ev[0] == "answer" for i in ev[1]]
    assert len(answered) == sum(len(a.frames) for a in spy.attached)
    for pieces in spy.writes:  # [vnet, the whole frame]: the backend's own memory only
        assert len(pieces) == 2 and all(x.offset is None for x in pieces)
    assert spy.maps(spy.between("xmit", None)) == []


@pytest.mark.parametrize("header_slots", [True, False])
def test_copy_counts_the_bytes_its_cpu_copied_for_the_cost_model(monkeypatch, header_slots):
    """``cpu_copy_bytes`` is exactly what copy mode copied out of the frontend's pages (the
    fragments' bytes after the header pull), the count the paper's cost model multiplies by
    ``cpu_copy_kb``; a mode that copies nothing counts nothing."""
    p, spy = tx_through("copy", header_slots, monkeypatch)
    assert p.bstats[0].cpu_copy_bytes == sum(map(sum, spy.pulled)) > 0
    q, _ = tx_through("lazy", header_slots, monkeypatch)
    assert q.bstats[0].cpu_copy_bytes == 0
