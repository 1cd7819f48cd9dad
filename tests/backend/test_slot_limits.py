"""Slot limits exactly as Linux's xenvif_count_requests: a packet of 1 + 18 follow-on slots is
sent, 1 + 19 and 1 + 20 are dropped (every slot answered with an error, drops_slots), a 21st
follow-on is fatal (fatal_skb_slots = 20) - on the fast path and the slow path (a nonzero
offset), with and without the packet wrapping round the end of the ring."""

import pytest

from backend.tx.requests import FatalTxError
from shared.protocol.netif import (
    TX_RESPONSE,
    XEN_NETIF_RSP_ERROR,
    XEN_NETIF_RSP_OKAY,
    NETTXF_header_slot,
    NETTXF_more_data,
)
from tests.backend.test_netback import close, grant, put
from tests.conftest import make_pair
from tests.hostile import HostileFrontend
from tests.inproc import BackendThread, wait_for

HS, MD = NETTXF_header_slot, NETTXF_more_data


def start_at(p, index: int) -> None:
    """Both ends of the TX ring as if ``index`` requests had come and gone."""
    ring, back = p.tx.ring, p.btx.ring
    ring.idx[0] = ring.idx[2] = index  # req_prod, rsp_prod
    ring.idx[1] = ring.idx[3] = index + 1  # req_event, rsp_event
    ring.req_prod_pvt = ring.rsp_cons = index
    back.req_cons = back.rsp_prod_pvt = index


def packet(p, follow_ons: int, offset: int) -> list[tuple]:
    """A header-slot first request and ``follow_ons`` 10-byte fragments (ids 1..)."""
    for ref in range(8, 8 + follow_ons):
        grant(p, ref)
    size = 100 + 10 * follow_ons
    return [(0, 0, HS | MD, 1, size),
            *[(8 + i, offset, MD if i < follow_ons - 1 else 0, 2 + i, 10)
              for i in range(follow_ons)]]


def statuses(p, first: int, n: int) -> list[int]:
    ring = p.btx.ring
    return [TX_RESPONSE.unpack_from(ring.buf, ring.entry(first + i))[1] for i in range(n)]


@pytest.mark.parametrize("start", [0, 250, 0xFFFFFFF8], ids=["no-wrap", "ring-wrap", "u32-wrap"])
@pytest.mark.parametrize("offset", [0, 8], ids=["fast", "slow"])
@pytest.mark.parametrize("follow_ons,verdict", [
    (17, "sent"), (18, "sent"), (19, "dropped"), (20, "dropped"), (21, "fatal")])
def test_slot_limits_match_xenvif_count_requests(follow_ons, verdict, offset, start):
    p = make_pair()
    start_at(p, start)
    put(p, *packet(p, follow_ons, offset))
    st = p.bstats[0]
    if verdict == "fatal":
        with pytest.raises(FatalTxError, match="more than 20 follow-on slots") as e:
            p.btx.action()
        assert e.value.reason == "too_many_slots"
        assert f"ring[{(start + 21) & 0xFFFFFFFF}]" in str(e.value)  # the 21st follow-on
    else:
        p.btx.action()
        got = statuses(p, start, 1 + follow_ons)
        if verdict == "sent":
            assert st.tx_packets == 1 and st.drops == 0 and st.drops_slots == 0
            assert got == [XEN_NETIF_RSP_OKAY] * (1 + follow_ons)
            assert len(p.wire_frames()) == 1
        else:
            assert st.tx_packets == 0 and st.drops == st.drops_slots == 1
            assert got == [XEN_NETIF_RSP_ERROR] * (1 + follow_ons)
            assert p.wire_frames() == []
        assert st.slots_consumed == st.slots_released == 1 + follow_ons
        assert p.btx.ring.req_cons == (start + 1 + follow_ons) & 0xFFFFFFFF
    close(p)


def test_the_connection_goes_on_after_a_slot_drop():
    """A dropped 1 + 19 packet is not fatal: the next packet is sent."""
    p = make_pair()
    put(p, *packet(p, 19, 0))
    p.btx.action()
    put(p, (0, 0, HS | MD, 100, 110), (8, 0, 0, 101, 10))
    p.btx.action()
    st = p.bstats[0]
    assert st.drops_slots == 1 and st.tx_packets == 1
    close(p)


def test_a_21st_follow_on_through_the_real_loop_is_booked_and_logged(tmp_path, caplog):
    """Through Netback.run: the verdict is a disconnect with malformed and
    fatal_too_many_slots counted, a log line with the ring index, nothing left held."""
    b = BackendThread(tmp_path)
    try:
        h = HostileFrontend(str(b.ev), "slots", b.domid)
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 5, "Connected")
        reqs = [(0, 0, HS | MD, 1, 100 + 21 * 10)]
        reqs += [(h.grant(8 + i), 0, MD if i < 20 else 0, 2 + i, 10) for i in range(21)]
        h.write_tx(*reqs)
        why = h.wait_closed()
        h.close()
        b.idle()
        c = b.nb.counters
        assert c["malformed"] == 1 and c["fatal_too_many_slots"] == 1, (why, c)
        assert "ring[21]" in b.nb.last_error and "fatal_skb_slots" in b.nb.last_error
        assert any("ring[21]" in r.getMessage() for r in caplog.records)
        assert b.nb.tx_stats.maps_outstanding == 0 and b.nb.tx_stats.grants_in_use == 0
    finally:
        b.stop()
