"""``lazy`` does its own work and no other's: the vif write is handed the granted frames
themselves (iovecs into the DMA view, exactly what the pull left of each fragment), nothing is
ever mapped, and a page is mapped only when something reads it."""

import pytest

from tests.backend.handed import (
    FRAMES_SIZES,
    TxSpy,
    payload_offsets,
    spans,
    split_head_only,
    tx_through,
)
from tests.conftest import frame, make_pair


@pytest.mark.parametrize("header_slots", [True, False])
def test_lazy_hands_the_vif_the_granted_frames_and_maps_nothing(monkeypatch, header_slots):
    p, spy = tx_through("lazy", header_slots, monkeypatch)
    assert spy.maps() == []  # not one page-table change
    hooked, head_only = split_head_only(spy.writes)
    # the 60-byte frame is all in its header slot: sent without the hooks (nothing to attach)
    assert len(head_only) == (1 if header_slots else 0)
    assert len(hooked) == len(FRAMES_SIZES) - len(head_only) == len(spy.attached) \
        == len(spy.pulled)
    for pieces, a, left in zip(hooked, spy.attached, spy.pulled, strict=True):
        vnet, head, *rest = pieces
        rest = [x for x in rest if x.data]  # a fragment the pull emptied is a 0-byte iovec
        assert vnet.offset is None and head.offset is None  # the backend's own bytes
        # every payload byte goes by reference: iovecs into the frontend's granted frames
        assert all(piece.offset is not None for piece in rest)
        assert spans([(x.offset, len(x.data)) for x in rest]) == spans(payload_offsets(a, left))
    assert p.bstats[0].grant_maps_avoided == sum(len(a.frames) for a in spy.attached)


def test_lazy_maps_a_page_only_when_something_reads_it(monkeypatch):
    p = make_pair("lazy", filters=["drop payload=text:NEVER"])
    spy = TxSpy(p)
    f = frame(b"z" * 9000)
    assert spy.run(monkeypatch, [f]) == [f]
    (a,) = spy.attached
    # the payload rule read the frame: each fragment mapped once, during the filter (after
    # the pull, before the write), unmapped when the packet was freed
    assert sorted(spy.maps(spy.between("pulled", "xmit"))) == sorted(a.frames)
    assert sorted(f for k, f, *_ in spy.between("free", None) if k == "unmap") == sorted(a.frames)
    assert p.bstats[0].grant_maps_on_touch == len(a.frames)
