"""The grant in-use protocol at every access point, with a revoke placed deterministically just
before each access (``tests/backend/grant_hooks.py``): TX grants stay GTF_reading until the skb
is freed (the vif write included, lazy mode included); an RX buffer is validated when the
backend writes into it, with GTF_writing set, and one revoked after posting is never written."""

import pytest

from shared.grant import GrantError, GTF_reading, GTF_writing
from shared.netif import XEN_NETIF_RSP_ERROR
from shared.offload import VNET_HDR
from tests.backend import grant_hooks
from tests.conftest import frame, make_pair


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


@pytest.mark.parametrize("mode", ["lazy", "map"])
def test_tx_grant_cannot_be_revoked_while_anything_may_read_it(mode):
    p = make_pair(mode)
    grants = p.front_region.grants
    seen = []

    def hook(point, gref):
        if point == "tx_submit":  # just before the vif write reads the pages
            seen.append((grants.in_use(gref), grants.end_access(gref)))

    grant_hooks.install(p.btx.gntmap, hook)
    sent = frame(b"q" * 20000)
    p.send(sent)
    p.run_tx()
    assert p.wire_frames() == [sent]
    assert seen and all(used and not revoked for used, revoked in seen)
    assert p.bstats[0].grants_in_use == 0
    assert not any(grants.flags[4 * g] & (GTF_reading | GTF_writing) for g in range(grants.count))
    close(p)


def test_tx_grant_revoked_before_the_backend_holds_it_is_refused():
    p = make_pair("lazy")
    grants = p.front_region.grants
    revoked = []

    def hook(point, gref):
        if point == "tx_hold" and not revoked:
            revoked.append(grants.end_access(gref))

    grant_hooks.install(p.btx.gntmap, hook)
    p.send(frame(b"r" * 20000))
    with pytest.raises(GrantError, match="revoked or changed while the backend took it"):
        p.run_tx()
    assert revoked == [True]
    assert p.wire_frames() == []  # nothing read from the revoked page went out
    assert p.bstats[0].grants_in_use == 0
    close(p)


def test_rx_buffer_revoked_after_posting_is_not_written():
    p = make_pair()
    p.rx.refill()
    p.rx.ring.push_requests()
    p.brx.refill()
    first = p.brx.posted[0]
    gref = p.rx.refs[first]
    page = p.front_region.page(p.rx.frames[first])
    page[:] = b"\xee" * len(page)
    grants = p.front_region.grants
    revoked = []

    def hook(point, g):
        if point == "rx_write" and g == gref and not revoked:
            revoked.append(grants.end_access(g))

    grant_hooks.install(p.brx.gntmap, hook, p.brx.mech)
    sent = frame(b"s" * 3000)
    p.wire.send(bytes(VNET_HDR.size) + sent)
    p.brx.action()
    assert revoked == [True]
    assert bytes(page) == b"\xee" * len(page)  # the revoked page was never written
    bst = p.bstats[1]
    assert bst.rx_grant_revoked == 1 and bst.rx_packets == 1
    ring = p.brx.ring
    rsp = ring.buf[64:64 + 8]  # the first response: that buffer, XEN_NETIF_RSP_ERROR
    assert int.from_bytes(rsp[0:2], "little") == first
    assert int.from_bytes(rsp[6:8], "little", signed=True) == XEN_NETIF_RSP_ERROR
    p.brx.ring.push_responses()
    p.rx.poll()
    p.run_rx()
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == [sent]  # in the next buffer
    assert not any(grants.flags[4 * g] & GTF_writing for g in range(grants.count))
    close(p)


def test_rx_marks_one_buffer_for_small_frames_and_spills_a_long_one_correctly():
    p = make_pair()
    frames = [frame(bytes([i]) * 40) for i in range(12)] + [frame(b"L" * 50000),
                                                            frame(b"t" * 10)]
    for f in frames:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx()
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == frames
    assert p.brx.mech.window > 1  # widened again after the long frame
    assert p.bstats[1].rx_spills == 1
    close(p)
