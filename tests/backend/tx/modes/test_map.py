"""``map`` does its own work and no other's: every fragment is mapped when it is attached -
before the header pull - and unmapped when the packet is freed, after its vif write; the write
itself still goes by reference (the DMA view), as a NIC reads mapped pages."""

import pytest

from tests.backend.handed import payload_offsets, spans, split_head_only, tx_through


@pytest.mark.parametrize("header_slots", [True, False])
def test_map_maps_every_fragment_at_attach_and_unmaps_at_free(monkeypatch, header_slots):
    p, spy = tx_through("map", header_slots, monkeypatch)
    every = sorted(f for a in spy.attached for f in a.frames)
    assert sorted(spy.maps(spy.between("attach", "pulled"))) == every
    assert spy.maps(spy.between("pulled", None)) == []
    unmapped = sorted(f for k, f, *_ in spy.between("free", None) if k == "unmap")
    assert unmapped == every
    hooked, _head_only = split_head_only(spy.writes)
    for pieces, a, left in zip(hooked, spy.attached, spy.pulled, strict=True):
        rest = [x for x in pieces[2:] if x.data]
        assert all(x.offset is not None for x in rest)
        assert spans([(x.offset, len(x.data)) for x in rest]) == spans(payload_offsets(a, left))
