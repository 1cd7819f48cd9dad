"""Netback RX through the in-process pair, in every registered RX mechanism: frames of any size
land in posted buffers intact, GSO metadata survives, a buffer revoked after posting is never
written, and a bad posting is fatal. (What each mechanism does on the way:
tests/backend/rx/modes/.)"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.rx.path import FatalRxError
from shared.protocol.mechanisms import names
from shared.protocol.netif import RX_REQUEST
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR
from shared.protocol.ring import MASK32
from tests.backend import grant_hooks
from tests.conftest import frame, make_pair


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(14, 65535 + 14), min_size=1, max_size=10),
       by_id=st.booleans())
@pytest.mark.parametrize("rx_mode", names("rx"))
def test_any_frame_size_is_received(rx_mode, sizes, by_id):
    """Stock order and feature-rx-by-id alike (jumbo frames without GSO included)."""
    p = make_pair(rx_by_id=by_id, rx_mode=rx_mode)
    frames = [bytes([n % 253]) * n for n in sizes]
    for f in frames:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx()
    got = [g[VNET_HDR.size:] for g in p.guest_frames()]
    assert got == frames
    assert p.bstats[1].rx_packets == len(frames)
    assert p.bstats[1].copy_bytes == sum(map(len, frames))
    close(p)


@pytest.mark.parametrize("rx_mode", names("rx"))
def test_gso_and_checksum_metadata_survive(rx_mode):
    p = make_pair(rx_mode=rx_mode)
    f = frame(b"z" * 30000, proto=6)
    vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448,
                         34, 16, 0)
    p.wire.send(vnet + f)
    p.run_rx()
    (g,) = p.guest_frames()
    flags, gso_type, _hl, gso_size, cstart, coff, _ = VNET_HDR.unpack_from(g)
    assert (flags, gso_type, gso_size, cstart, coff) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)
    assert g[VNET_HDR.size:] == f
    # the extra slot's retired buffer came back: every buffer is free or posted again
    assert p.rx.held() == 0 and p.rx.active() == 256
    close(p)


@pytest.mark.parametrize("rx_mode", names("rx"))
def test_same_buffer_posted_twice_is_fatal(rx_mode):
    p = make_pair(rx_mode=rx_mode)
    ring = p.rx.ring
    p.front_region.grants.grant(8, 0, p.front_region.layout.payload_page)
    for _ in range(2):
        RX_REQUEST.pack_into(ring.buf, ring.entry(ring.req_prod_pvt), 7, 0, 8)
        ring.req_prod_pvt = (ring.req_prod_pvt + 1) & MASK32
    ring.push_requests()
    with pytest.raises(FatalRxError, match="posted twice"):
        p.brx.refill()
    close(p)


@pytest.mark.parametrize("rx_mode", names("rx"))
def test_read_only_buffer_is_refused(rx_mode):
    p = make_pair(rx_mode=rx_mode)
    ring = p.rx.ring
    p.front_region.grants.grant(8, 0, p.front_region.layout.payload_page, readonly=True)
    RX_REQUEST.pack_into(ring.buf, ring.entry(ring.req_prod_pvt), 7, 0, 8)
    ring.req_prod_pvt += 1
    ring.push_requests()
    with pytest.raises(Exception, match="read-only"):
        p.brx.refill()
    close(p)


@pytest.mark.parametrize("rx_mode", names("rx"))
def test_a_frontend_posting_ten_buffers_receives_every_frame_that_fits(rx_mode):
    """A frame needs only the slots its size requires: with ten buffers posted, frames of up
    to nine pages (or eight and a GSO extra) arrive; a bigger one waits for more buffers."""
    p = make_pair(rx_mode=rx_mode)
    gso = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16,
                        0)
    fits = [(bytes(VNET_HDR.size), frame(b"a" * 60)),
            (gso, frame(b"g" * 30000, proto=6)),  # 8 pages + extra
            (bytes(VNET_HDR.size), frame(b"j" * 36000)),  # 9 pages, no GSO
            (bytes(VNET_HDR.size), frame(b"s" * 1400))]
    big = (gso, frame(b"B" * 60000, proto=6))  # 15 pages + extra
    for v, f in [*fits, big]:
        p.wire.send(v + f)
    for _ in range(40):
        p.rx.refill(limit=10)
        p.rx.ring.push_requests()
        p.brx.action()
        p.brx.ring.push_responses()
        p.rx.poll()
        assert len(p.brx.posted) <= 10
    got = p.guest_frames()
    assert [g[VNET_HDR.size:] for g in got] == [f for _v, f in fits]
    assert p.brx.held == len(big[1]) and p.brx.held_need == 16
    p.run_rx()  # the frontend posts all it has: the held frame fits now
    (g,) = p.guest_frames()
    assert g[VNET_HDR.size:] == big[1]
    assert VNET_HDR.unpack_from(g)[1] == VIRTIO_NET_HDR_GSO_TCPV4
    close(p)


@pytest.mark.parametrize("rx_mode", names("rx"))
def test_a_buffer_revoked_after_posting_is_never_written(rx_mode):
    """Validated at posting, checked again when written: the frontend revokes its first
    posted buffer before a frame arrives; the buffer keeps its bytes, is answered
    XEN_NETIF_RSP_ERROR (rx_grant_revoked), and the frame arrives in the next one."""
    p = make_pair(rx_mode=rx_mode)
    first, page = poison_first_posted(p)
    assert p.front_region.grants.end_access(p.rx.refs[first])
    refused_then_delivered(p, page, frame(b"r" * 3000))
    close(p)


def poison_first_posted(p) -> tuple[int, memoryview]:
    """Buffers posted and taken by the backend; the first one's page filled with 0xee, to
    see that it stays untouched. Returns its buffer id and page."""
    p.rx.refill()
    p.rx.ring.push_requests()
    p.brx.refill()
    first = p.brx.posted[0]
    page = p.front_region.page(p.rx.frames[first])
    page[:] = b"\xee" * len(page)
    return first, page


def refused_then_delivered(p, page: memoryview, sent: bytes) -> None:
    """``sent`` from the wire: the poisoned buffer is refused (untouched, rx_grant_revoked 1)
    and the frame arrives whole in the next one."""
    p.wire.send(bytes(VNET_HDR.size) + sent)
    p.run_rx()
    assert bytes(page) == b"\xee" * len(page)
    assert p.bstats[1].rx_grant_revoked == 1
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == [sent]


@pytest.mark.parametrize("rx_mode", names("rx"))
def test_a_buffer_revoked_during_a_run_of_small_frames_is_not_written(rx_mode):
    """While small frames come in a row one buffer is checked per read (``write_one``): the
    frontend revokes that buffer just before the read; it keeps its bytes, is answered
    XEN_NETIF_RSP_ERROR (rx_grant_revoked 1), and the frame - not read yet - arrives in the next
    one, in every RX mechanism."""
    p = make_pair(rx_mode=rx_mode)
    warm = [frame(bytes([i]) * 40) for i in range(10)]
    for f in warm:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx()
    assert len(p.guest_frames()) == len(warm) and p.brx.small_run >= 8
    grants = p.front_region.grants
    revoked, pages = [], []

    def hook(point, g):
        if point == "rx_write" and not revoked:
            i = p.rx.refs.index(g)
            page = p.front_region.page(p.rx.frames[i])
            page[:] = b"\xee" * len(page)
            pages.append(page)
            revoked.append(grants.end_access(g))

    grant_hooks.install(p.brx.gntmap, hook, p.brx.mech)
    sent = frame(b"s" * 70)
    p.wire.send(bytes(VNET_HDR.size) + sent)
    p.run_rx()
    assert revoked == [True]
    assert bytes(pages[0]) == b"\xee" * len(pages[0])
    assert p.bstats[1].rx_grant_revoked == 1
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == [sent]
    close(p)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("rx_mode", names("rx"))
def test_a_small_frame_writes_only_its_own_bytes_into_a_guest_buffer(rx_mode, persistent):
    """A small frame read into one posted buffer writes the frame's bytes and nothing past
    them, as Linux's copy of skb->len bytes does: the rest of the guest's page keeps what the
    guest left there (a transient mapping receiver once copied its whole read page in)."""
    p = make_pair(rx_mode=rx_mode, persistent=persistent)
    warm = [frame(bytes([i]) * 40) for i in range(10)]
    for f in warm:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx()
    assert len(p.guest_frames()) == len(warm) and p.brx.small_run >= 8
    first, page = poison_first_posted(p)
    copied = p.bstats[1].cpu_copy_bytes
    sent = frame(b"s" * 70)
    p.wire.send(bytes(VNET_HDR.size) + sent)
    p.run_rx()
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == [sent]
    assert bytes(page[:len(sent)]) == sent  # it went into that buffer...
    assert bytes(page[len(sent):]) == b"\xee" * (len(page) - len(sent))  # ...and no further
    if not persistent:  # the cost model's CPU-copy count: the mapping receiver's copy only
        want = len(sent) if rx_mode == "map" else 0
        assert p.bstats[1].cpu_copy_bytes - copied == want
    close(p)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("rx_mode", names("rx"))
@pytest.mark.parametrize("after_small_run", [False, True])
def test_a_multi_page_frame_writes_no_stale_bytes_past_its_end(rx_mode, persistent,
                                                               after_small_run):
    """A frame over two buffers after a longer one: its last buffer gets the frame's bytes
    only, not what the longer frame left in the backend's bounce page (the rest of a frame is
    copied on from there: ``copy_in`` once copied whole pages). Every posted page is poisoned
    first; in the two buffers answered, exactly the frame's bytes differ from the poison."""
    p = make_pair(rx_mode=rx_mode, persistent=persistent)
    small = [frame(bytes([i]) * 40) for i in range(10)]
    for f in [*small, frame(b"L" * 3 * 4096), *(small if after_small_run else [])]:
        p.wire.send(bytes(VNET_HDR.size) + f)
        p.run_rx()
    assert len(p.guest_frames()) == len(small) * (1 + after_small_run) + 1
    assert (p.brx.small_run >= 8) == after_small_run
    p.rx.refill()
    p.rx.ring.push_requests()
    p.brx.refill()
    pages = {i: p.front_region.page(p.rx.frames[i]) for i in p.brx.posted}
    for page in pages.values():
        page[:] = b"\xee" * len(page)
    sent = frame(b"m" * (4096 + 100))
    copied = p.bstats[1].cpu_copy_bytes
    p.wire.send(bytes(VNET_HDR.size) + sent)
    p.run_rx()
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == [sent]
    if rx_mode == "map" and not persistent:  # the cost model's count: the frame's bytes
        assert p.bstats[1].cpu_copy_bytes - copied == len(sent)
    used = [pages[i] for i in pages if i not in p.brx.posted_ids]  # answered with the frame
    assert len(used) == 2
    written = sum(len(pg) - bytes(pg).count(0xee) for pg in used)
    assert written == len(sent) - sent.count(0xee)  # the frame's bytes, nothing past them
    close(p)
