"""Netfront TX: what goes on the ring, and the queue stopping when the ring is full."""

from frontend.tx.queue import MAX_PACKET
from shared.protocol.netif import TX_REQUEST, NETTXF_header_slot
from shared.protocol.offload import VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR
from shared.protocol.ring import MASK32, RSP_EVENT
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


def test_a_stopped_queue_arms_rsp_event_a_running_one_parks_it():
    """Only a stopped queue asks for a completion kick; without it, the queue would wait
    for the 5 ms reap timer (a lost wake-up the timer hides)."""
    p = make_pair()
    for _ in range(40):
        p.send(frame(b"w" * 60000))
    p.tx.pump()
    assert p.tx.stopped
    ring = p.tx.ring
    assert p.tx.arm_completions() is False
    assert ring.idx[RSP_EVENT] == (ring.rsp_cons + 1) & MASK32
    ring.push_requests()
    p.btx.action()
    assert p.btx.ring.push_responses() is True  # the backend's push now notifies
    p.tx.reap()
    assert not p.tx.stopped
    p.tx.arm_completions()
    assert ring.idx[RSP_EVENT] == (ring.rsp_cons + 0x80000000) & MASK32
    close(p)


def test_queue_stops_before_a_maximum_slot_packet_could_overrun_the_ring():
    """5 one-slot frames and 13 maximum ones (header slot, GSO extra, 16 pages: 18 slots)
    leave exactly 17 slots free: too few for another maximum packet."""
    p = make_pair()
    small = [frame(b"s" * 20) for _ in range(5)]
    big = frame(b"B" * (MAX_PACKET - 54), proto=6)
    for f in small:
        p.send(f)
    for _ in range(16):
        p.send(big, VNET_HDR.pack(1, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16, 0))
    p.tx.pump()
    assert p.tx.in_flight() == 5 + 13 * 18 and p.tx.stopped
    assert p.tx.ring.free_requests() == 17
    p.tx.ring.push_requests()
    p.run_tx()
    assert p.wire_frames() == small + [big] * 16
    close(p)


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()
