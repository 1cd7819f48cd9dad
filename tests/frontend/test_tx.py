"""Netfront TX: what goes on the ring, and the queue stopping when the ring is full."""

from shared.netif import TX_REQUEST, NETTXF_header_slot
from tests.conftest import frame, make_pair


def test_first_request_carries_the_header_slot():
    p = make_pair()
    f = frame(b"q" * 3000)
    p.send(f)
    p.tx.pump()
    gref, off, flags, _rid, size = TX_REQUEST.unpack_from(p.tx.ring.buf, p.tx.ring.entry(0))
    assert flags & NETTXF_header_slot and size == len(f) and gref % 128 == 0
    assert p.tx.slots.views[gref // 128][:128] == f[:128]
    assert p.tx.header_slots_in_use() == 1


def test_full_ring_stops_the_queue_and_responses_restart_it():
    p = make_pair()
    for _ in range(40):
        p.send(frame(b"w" * 60000))
    p.tx.pump()
    assert p.tx.stopped and p.fstats[0].queue_stops == 1
    assert p.tx.ring.free_requests() < 19
    sent = p.fstats[0].tx_packets
    p.tx.ring.push_requests()
    p.btx.action()
    p.btx.ring.push_responses()
    p.tx.reap()
    assert not p.tx.stopped
    p.run_tx()
    assert p.fstats[0].tx_packets == 40 > sent
    assert len(p.wire_frames()) == 40
    for s in (p.guest, p.wire, *p._keep):
        s.close()
