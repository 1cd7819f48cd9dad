"""RX ``map`` does its own work and no other's: the vif read goes into the backend's own
memory, never into a posted buffer; then each buffer a frame fills is mapped writable through
the CPU view, written and unmapped (or, with persistent grants, mapped once and kept)."""

import pytest

from shared.protocol.netif import GREF_MASK, PAGE_SIZE
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR
from tests.backend.handed import FRAMES_SIZES, RxSpy, _address
from tests.backend.test_rx import poison_first_posted, refused_then_delivered
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


def test_kept_mapped_buffers_take_small_frames_straight_from_the_vif_read(monkeypatch):
    """Kept-mapped RX buffers (persistent grants, Martins' "gref mappings for Rx"): once a
    buffer is mapped and kept, a small frame is read from the vif straight into that mapping -
    the one copy Linux's memcpy from the skb is - with no bounce copy, no new map and no grant
    copy; every frame arrives intact."""
    p = make_pair(rx_mode="map", persistent=True)
    first = [frame(bytes([i % 251]) * 50) for i in range(300)]  # every buffer used, kept
    for f in first:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx(rounds=20)
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == first
    spy = RxSpy(p)
    cpu = p.brx.gntmap.cpu
    kept = {_address(cpu.page(f)) for f in p.rx.frames}  # every buffer's kept mapping
    into: list[int] = []
    real = spy._readv[1]

    def readv(fd, iov):  # where each frame read's first page went
        n = real(fd, iov)
        if fd == p.brx.vif_fd and len(iov) > 1 and len(iov[1]):
            into.append(_address(iov[1]))
        return n

    spy._readv = (spy._readv[0], readv)
    own = p.brx.mech.own
    kept0 = own.rx_kept_reads
    frames = [frame(bytes([i]) * (20 + i)) for i in range(40)]
    assert spy.run(monkeypatch, frames) == frames
    assert spy.map_events() == []  # nothing new mapped: the buffers are kept mapped
    direct = sum(a in kept for a in into)
    assert direct == own.rx_kept_reads - kept0 >= len(frames) - 8  # after a run's first 8
    assert p.bstats[1].grant_copy_bytes == 0
    for s in (p.guest, p.wire, *p._keep):
        s.close()


def test_a_kept_buffer_whose_entry_the_frontend_rewrote_is_not_written_in_a_small_run():
    """A hostile frontend rewrites the grant entry of a kept-mapped buffer (to another page)
    while small frames run: the read into one buffer checks the entry first, so that buffer is
    answered XEN_NETIF_RSP_ERROR (rx_grant_revoked 1), nothing is read into it, and the frame
    arrives in the next buffer."""
    p = make_pair(rx_mode="map", persistent=True)
    warm = [frame(bytes([i % 251]) * 50) for i in range(300)]
    for f in warm:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx(rounds=20)
    assert len(p.guest_frames()) == len(warm)
    assert p.brx.small_run >= 8  # the next frame is read into one buffer
    first, page = poison_first_posted(p)
    grants = p.front_region.grants  # the entry rewritten to another page
    grants.grant(p.rx.refs[first] & GREF_MASK, 0, p.front_region.layout.payload_page)
    refused_then_delivered(p, page, frame(b"k" * 70))
    for s in (p.guest, p.wire, *p._keep):
        s.close()
