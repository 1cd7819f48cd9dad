"""Netback TX through the in-process pair: frames arrive intact, each mode does what it says,
and malformed requests are fatal for the frontend that wrote them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.tx.path import EARLY_SLOTS
from backend.tx.requests import FatalTxError
from shared.protocol.grant import GrantError
from shared.protocol.mechanisms import names
from shared.protocol.netif import (
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_RSP_OKAY,
    NETTXF_header_slot,
    NETTXF_more_data,
)
from shared.protocol.ring import RingError
from tests.conftest import frame, make_pair
from tests.publish import publish


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


@pytest.mark.parametrize("mode", names("tx"))
@pytest.mark.parametrize("header_slots", [True, False])
def test_frames_cross_intact_in_every_mode(mode, header_slots):
    """Every registered mechanism: frames bit-exact, every slot answered, nothing left
    mapped, held or in flight (what each does on the way: tests/backend/tx/modes/)."""
    p = make_pair(mode, header_slots)
    frames = [frame(bytes([i]) * n) for i, n in enumerate([0, 10, 100, 1400, 5000, 60000])]
    for f in frames:
        p.send(f)
    p.run_tx()
    assert p.wire_frames() == frames
    bst = p.bstats[0]
    assert bst.tx_packets == len(frames)
    assert bst.slots_consumed == bst.slots_released
    assert p.tx.in_flight() == 0 and p.tx.header_slots_in_use() == 0
    assert bst.maps_outstanding == 0 and bst.grants_in_use == 0
    if header_slots:
        assert bst.tx_header_slot_packets == len(frames)
    assert bst.tx_zerocopy_sent == bst.tx_zerocopy_success + bst.tx_zerocopy_fail
    assert bst.grant_maps == bst.grant_unmaps + bst.maps_outstanding
    assert p.btx.gntmap.cpu.outstanding == 0
    close(p)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(14, 65535 + 20), min_size=1, max_size=12))
def test_any_frame_size_crosses(sizes):
    """Up to netif's 16-bit size limit frames cross intact; above it the frontend drops them
    (counted) instead of writing a size that does not fit the request."""
    p = make_pair()
    frames = [bytes([n % 251]) * n for n in sizes]
    for f in frames:
        p.send(f)
    p.run_tx()
    assert p.wire_frames() == [f for f in frames if len(f) <= 65535]
    assert p.fstats[0].drops == sum(len(f) > 65535 for f in frames)
    close(p)


def test_header_rule_drops_without_mapping_payload_rule_maps():
    p = make_pair(filters=["drop dst_port=9999"])
    p.send(frame(b"a" * 6000, dport=9999))
    p.send(frame(b"b" * 6000, dport=80))
    p.run_tx()
    assert len(p.wire_frames()) == 1
    bst = p.bstats[0]
    assert bst.drops_filtered == 1 and bst.grant_maps == 0
    close(p)
    p = make_pair(filters=["drop payload=text:SECRET"])
    p.send(frame(b"x" * 5000 + b"SECRET" + b"y" * 100))
    p.send(frame(b"x" * 5000))
    p.run_tx()
    assert len(p.wire_frames()) == 1
    bst = p.bstats[0]
    assert bst.drops_filtered == 1 and bst.grant_maps > 0
    assert bst.maps_outstanding == 0 and bst.tx_zerocopy_fail == 2
    assert bst.tx_zerocopy_sent == bst.tx_zerocopy_success + bst.tx_zerocopy_fail
    assert p.tx.in_flight() == 0  # filtered packets release their slots too
    close(p)


def put(p, *reqs):
    publish(p.tx.ring, TX_REQUEST, reqs)


def grant(p, ref):
    p.front_region.grants.grant(ref, 0, p.front_region.layout.payload_page + ref)


HS, MD = NETTXF_header_slot, NETTXF_more_data


@pytest.mark.parametrize("reqs,err,match", [
    ([(0, 0, HS | MD, 1, 200), (8, 0, 0, 1, 100)], FatalTxError, "reused"),
    ([(0, 0, HS | MD, 1, 5000), (8, 100, 0, 2, 4000)], FatalTxError, "page boundary"),
    ([(64, 0, HS, 1, 60)], FatalTxError, "not inside a slot"),
    ([(0, 0, HS | MD, 1, 200)], FatalTxError, "more slots than were published"),
    ([(0, 0, HS | MD, 1, 200), (99999, 0, 0, 2, 100)], GrantError, "outside the table"),
    ([(0, 0, HS | MD, 1, 200), (9, 0, 0, 2, 100)], GrantError, "not granted"),
    ([(0, 0, HS | MD, 1, 100), (8, 0, 0, 2, 200)], FatalTxError, "bigger than the packet"),
])
def test_malformed_requests_are_fatal(reqs, err, match):
    p = make_pair()
    grant(p, 8)
    put(p, *reqs)
    with pytest.raises(err, match=match):
        p.btx.action()
    close(p)


def test_producer_index_running_ahead_is_fatal():
    p = make_pair()
    p.tx.ring.idx[0] = 1000
    with pytest.raises(RingError):
        p.btx.action()
    close(p)


def test_header_slot_answered_before_fragments():
    p = make_pair()
    grant(p, 8)
    put(p, (0, 0, HS | MD, 1, 300), (8, 0, 0, 2, 200))
    p.btx._build(p.btx.ring.unconsumed_requests())  # built, not yet freed
    ring = p.btx.ring
    assert ring.rsp_prod_pvt == 1  # header slot answered at once
    rid, status = TX_RESPONSE.unpack_from(p.tx.ring.buf, p.tx.ring.entry(0))
    assert (rid, status) == (1, XEN_NETIF_RSP_OKAY)  # the header slot's request, OK
    close(p)


def test_fragment_slots_are_released_when_the_skb_is_freed_not_when_attached():
    """Linux answers a fragment's slot from the zerocopy callback, when the packet is freed;
    the header slot is answered at once. At the vif write only the header slot is answered
    (nothing else even queued); once the packet is freed, all four are."""
    p = make_pair("lazy")
    p.send(frame(b"x" * 10000))
    p.tx.pump()
    p.tx.ring.push_requests()
    btx = p.btx
    seen = []
    write = btx._write

    def spy(skb):
        seen.append((btx.ring.rsp_prod_pvt, list(btx.release.queued), len(skb.ids)))
        write(skb)

    btx._write = spy
    btx.action()
    assert seen == [(1, [], 3)]
    assert btx.ring.rsp_prod_pvt == 4 and btx.stats.slots_released == 4
    close(p)


def test_a_stopped_frontend_gets_answers_before_the_batch_ends():
    """The ring full of big packets, the frontend stopped with rsp_event armed: netback's
    batch publishes answers every EARLY_SLOTS released slots and kicks then, so the frontend
    can reap (and send again) while the rest of the batch still goes to the vif."""
    p = make_pair()
    for i in range(30):
        p.send(frame(bytes([i]) * 40000, proto=17))
    p.tx.pump()
    assert p.tx.stopped  # the ring ran short: about 19 packets of 13 slots each
    p.tx.ring.push_requests()
    assert p.tx.arm_completions() is False  # armed: rsp_event = rsp_cons + 1
    seen = []

    def publish():
        kick = p.btx.ring.push_responses()
        seen.append((kick, p.tx.ring.unconsumed_responses(), p.btx.ring.unconsumed_requests()))

    p.btx.action(64, publish)
    assert seen, "no answer went out before the end of the batch"
    kick, answered, left = seen[0]
    assert kick and EARLY_SLOTS <= answered < EARLY_SLOTS + 20 and left > 0
    p.tx.reap()
    assert not p.tx.stopped
    assert len(p.wire_frames()) == p.tx.stats.tx_packets
    close(p)
