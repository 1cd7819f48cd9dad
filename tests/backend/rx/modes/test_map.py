"""RX ``map`` does its own work and no other's: the vif read goes into the backend's own
memory, never into a posted buffer; then each buffer a frame fills is mapped writable through
the CPU view, written and unmapped (or, with persistent grants, mapped once and kept)."""

import pytest

from shared.protocol.netif import PAGE_SIZE
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR
from tests.backend.handed import FRAMES_SIZES, RxSpy
from tests.conftest import frame, make_pair


@pytest.mark.parametrize("persistent", [False, True])
def test_map_reads_into_its_own_memory_and_maps_each_buffer_it_fills(monkeypatch, persistent):
    p = make_pair(rx_mode="map", persistent=persistent)
    spy = RxSpy(p)
    frames = [frame(bytes([i]) * n) for i, n in enumerate(FRAMES_SIZES)]
    gso = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34,
                        16, 0)
    vnets = [bytes(VNET_HDR.size)] * (len(frames) - 1) + [gso]
    assert spy.run(monkeypatch, frames, vnets) == frames
    for pieces in spy.reads:  # never a posted buffer: the frame lands in backend memory
        assert all(piece.offset is None for piece in pieces)
    pages = sum(-(-len(f) // PAGE_SIZE) for f in frames)
    posted = set(p.rx.frames)
    maps = spy.map_events()
    assert all(write and frame in posted for _k, frame, write in maps)
    if persistent:  # each buffer mapped once, kept until disconnect
        assert len(maps) == len({f for _k, f, _w in maps}) <= pages
        assert [ev for ev in spy.events if ev[0] == "unmap"] == []
    else:  # every page written: its own map and unmap, in turn
        assert len(maps) == pages
        pairs = [ev[:2] for ev in spy.events if ev[0] in ("map", "unmap")]
        assert pairs == [(k, f) for _m, f, _w in maps for k in ("map", "unmap")]
    assert p.brx.mech.own.rx_mapped_copies == pages
    assert p.bstats[1].grant_copy_bytes == 0  # no grant copy at all
    for s in (p.guest, p.wire, *p._keep):
        s.close()
