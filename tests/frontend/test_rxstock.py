"""Netfront RX in stock order, batched (``frontend/rx/stock.py``): well-formed frames are taken
whole by the batch (checked here by making the per-response path fail if it is asked), one
that is not is left to the per-response path, which names its fault; buffers come back in
ring order as template copies, grants included."""

import pytest

from frontend.faults import BackendError
from frontend.rx.queue import RX_BUFFERS, RxQueue
from shared.protocol.grant import RESERVED_REFS, GTF_permit_access, GTF_reading
from shared.protocol.netif import RX_REQUEST, RX_RESPONSE, NETRXF_more_data
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR
from tests.conftest import frame
from tests.publish import publish

GSO = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, 0)


@pytest.fixture
def p(pair):
    return pair


def _no_general(monkeypatch):
    def refuse(self, budget=64):
        raise AssertionError("the per-response path was used for a well-formed frame")
    monkeypatch.setattr(RxQueue, "_poll_general", refuse)


def test_buffer_at_each_ring_position_is_that_positions_and_granted(p):
    p.rx.refill()
    ring, grants = p.rx.ring, p.front_region.grants
    for pos in (0, 1, 77, 255):
        rid, _pad, gref = RX_REQUEST.unpack_from(ring.buf, ring.entry(pos))
        assert (rid, gref) == (pos, RESERVED_REFS + pos)
        g = grants.read(gref)
        assert (g.flags, g.frame) == (GTF_permit_access, p.rx.frames[pos])
    assert p.rx.active() == RX_BUFFERS and p.rx.held() == 0


def test_gso_and_small_frames_go_through_the_batch_round_the_ring(p, monkeypatch):
    """40 frames of 8 pages + a GSO extra each wrap the ring (and the buffer area) about
    1.5 times: the batch takes every one, wrapped runs included, and every buffer comes back."""
    _no_general(monkeypatch)
    frames = []
    for i in range(40):
        big = frame(bytes([i]) * 30000, proto=6)
        small = frame(bytes([i + 100]) * 60)
        frames += [big, small]
        p.wire.send(GSO + big)
        p.wire.send(bytes(VNET_HDR.size) + small)
    p.run_rx(rounds=200)
    got = p.guest_frames()
    assert [g[VNET_HDR.size:] for g in got] == frames
    flags, gso_type, _hl, gso_size, cstart, coff, _ = VNET_HDR.unpack_from(got[0])
    assert (flags, gso_type, gso_size, cstart, coff) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)
    assert p.rx.ring.rsp_cons > RX_BUFFERS  # it did wrap
    assert p.rx.held() == 0
    assert p.fstats[1].rx_packets == 80 and p.fstats[1].drops == 0
    assert p.fstats[1].rx_unbatched == 0


def test_a_partial_frame_waits_then_arrives_once(p):
    """The backend publishes the first 3 of a frame's 5 responses: nothing is written; the
    rest published, the frame arrives once, whole."""
    p.rx.refill()
    p.rx.ring.push_requests()
    data = bytes(range(256)) * 80  # four full buffers and 100 bytes of a fifth
    for i in range(5):
        p.front_region.page(p.rx.frames[i])[:] = data[i * 4096:(i + 1) * 4096].ljust(4096, b"\0")
    rsps = [(i, 0, NETRXF_more_data, 4096) for i in range(4)] + [(4, 0, 0, 100)]
    publish(p.brx.ring, RX_RESPONSE, rsps[:3])
    assert p.rx.poll() == 0
    assert p.guest_frames() == [] and p.rx.held() == 3
    publish(p.brx.ring, RX_RESPONSE, rsps[3:])
    assert p.rx.poll() == 1
    (g,) = p.guest_frames()
    assert g[VNET_HDR.size:] == data[:4 * 4096 + 100]
    assert p.rx.held() == 0


@pytest.mark.parametrize("bad, fault", [
    ((5, 0, 0, 10), "ring order"),  # position 0 answered with buffer 5
    ((0, 0, 0, -1), None),  # an error status: a dropped frame, not a fault
    ((0, 4000, 0, 200), "past its buffer"),
])
def test_a_response_the_batch_refuses_is_judged_by_the_per_response_path(p, bad, fault):
    p.rx.refill()
    p.rx.ring.push_requests()
    publish(p.brx.ring, RX_RESPONSE, [bad])
    if fault:
        with pytest.raises(BackendError, match=fault):
            p.rx.poll()
    else:
        p.rx.poll()
        assert p.fstats[1].drops == 1
    assert p.guest_frames() == []


def test_a_middle_buffer_not_full_is_not_batched_and_breaks_nothing(p):
    """A backend that fills a middle buffer only partly is odd but legal: the per-response
    path delivers exactly the bytes the responses name."""
    p.rx.refill()
    p.rx.ring.push_requests()
    for i in range(3):
        p.front_region.page(p.rx.frames[i])[:8] = bytes([65 + i]) * 8
    publish(p.brx.ring, RX_RESPONSE, [(0, 0, NETRXF_more_data, 4096),
                                      (1, 0, NETRXF_more_data, 8), (2, 0, 0, 8)])
    assert p.rx.poll() == 1
    (g,) = p.guest_frames()
    body = g[VNET_HDR.size:]
    assert len(body) == 4096 + 16 and body[4096:] == b"B" * 8 + b"C" * 8
    assert p.fstats[1].rx_unbatched == 1


def test_a_grant_still_marked_in_use_at_release_is_a_backend_fault(p):
    p.rx.refill()
    p.rx.ring.push_requests()
    p.front_region.grants.ref_flags[RESERVED_REFS] |= GTF_reading
    publish(p.brx.ring, RX_RESPONSE, [(0, 0, 0, 60)])
    with pytest.raises(BackendError, match="still holds rx gref"):
        p.rx.poll()
