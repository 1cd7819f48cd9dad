"""Netfront RX: out-of-order completion by id only with feature-rx-by-id; stock order
otherwise; a lying backend is refused."""

import pytest

from frontend.faults import BackendError
from shared.protocol.netif import RX_RESPONSE, NETRXF_more_data
from shared.protocol.offload import VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR
from tests.conftest import frame, make_pair
from tests.publish import publish


def respond(p, *rsps):
    publish(p.brx.ring, RX_RESPONSE, rsps)


@pytest.fixture(params=[True, False], ids=["by-id", "stock"])
def posted(request):
    p = make_pair(rx_by_id=request.param)
    p.rx.refill()
    p.rx.ring.push_requests()
    p.brx.refill()
    yield p
    for s in (p.guest, p.wire, *p._keep):
        s.close()


@pytest.mark.parametrize("posted", [True], ids=["by-id"], indirect=True)
def test_buffers_complete_out_of_order(posted):
    """Only with feature-rx-by-id (stock order is tested below)."""
    p = posted
    assert p.rx.by_id
    ids = list(p.brx.posted)[:3]
    # fill three buffers, then answer them in reverse order as one frame and one single
    for i, rid in enumerate(ids):
        p.front_region.page(p.rx.frames[rid])[:4] = bytes([i]) * 4
    respond(p, (ids[2], 0, NETRXF_more_data, 4), (ids[0], 0, 0, 4), (ids[1], 0, 0, 4))
    p.rx.poll()
    got = [g[VNET_HDR.size:] for g in p.guest_frames()]
    assert got == [bytes([2]) * 4 + bytes([0]) * 4, bytes([1]) * 4]
    assert set(ids) <= set(p.rx.free)


@pytest.mark.parametrize("bad", [(300, 0, 0, 10), (0, 4000, 0, 200)])
def test_unknown_id_or_overflow_breaks_the_device(posted, bad):
    rid = posted.brx.posted[0] if bad[0] == 0 else bad[0]
    respond(posted, (rid, *bad[1:]))
    with pytest.raises(BackendError):
        posted.rx.poll()
    assert posted.guest_frames() == []


@pytest.mark.parametrize("size", [30000, 3000, 200])
def test_a_gso_frame_of_size_0_is_dropped_not_handed_to_the_tap(posted, size):
    """Finding 8 (issue 22): a backend's GSO extra with size 0 went on to the TAP, in the
    batched (stock) and the per-response (by-id) path alike. Verdict, as Linux's
    xennet_set_skb_gso: dropped, counted (drops, drops_gso), the device not broken; the
    next frame is delivered."""
    p = posted
    bad = VNET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 0, 34, 16, 0) + frame(
        b"g" * size, proto=6)
    good = VNET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, 0) + frame(
        b"h" * 3000, proto=6)
    p.wire.send(bad)
    p.wire.send(good)
    p.run_rx()
    got = p.guest_frames()
    assert [g[VNET_HDR.size:] for g in got] == [good[VNET_HDR.size:]]
    assert VNET_HDR.unpack_from(got[0])[3] == 1448
    st = p.fstats[1]
    assert st.drops == st.drops_gso == 1 and st.rx_packets == 1
    assert p.rx.held() == 0


def test_duplicate_id_breaks_the_device(posted):
    rid = posted.brx.posted[0]
    respond(posted, (rid, 0, 0, 10), (rid, 0, 0, 10))
    with pytest.raises(BackendError, match="not posted"):
        posted.rx.poll()


def test_stock_refuses_a_response_out_of_ring_order():
    p = make_pair()
    p.rx.refill()
    p.rx.ring.push_requests()
    p.brx.refill()
    ids = list(p.brx.posted)[:2]
    respond(p, (ids[1], 0, 0, 4))
    with pytest.raises(BackendError, match="ring order"):
        p.rx.poll()
    assert p.guest_frames() == []
    for s in (p.guest, p.wire, *p._keep):
        s.close()
