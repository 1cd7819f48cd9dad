"""A packet wholly in its header slot is copied, answered and sent on the spot
(``backend/tx/small.py``): bit-exact, in ring order with the packets around it, counted as the
full path counts it, and never when something must see it (a filter, a capture, a partial
checksum to set up, a mechanism that asks for such packets)."""

import os

import pytest

from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR
from tests.backend.handed import TxSpy, split_head_only
from tests.conftest import frame, make_pair

SMALL = frame(b"s" * 22)  # 64 bytes: one header slot


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


def test_a_head_only_packet_goes_without_the_hooks_and_is_counted_as_the_full_path_counts():
    p = make_pair("lazy")
    spy = TxSpy(p)
    mp = pytest.MonkeyPatch()
    try:
        assert spy.run(mp, [SMALL] * 5) == [SMALL] * 5
    finally:
        mp.undo()
    hooked, head_only = split_head_only(spy.writes)
    assert (len(hooked), len(head_only), spy.attached) == (0, 5, [])
    assert [w[1].data for w in head_only] == [SMALL] * 5  # the backend's own copy
    assert all(w[0].offset is None and w[1].offset is None for w in head_only)
    st = p.bstats[0]
    assert (st.tx_packets, st.tx_bytes, st.tx_header_slot_packets) == (5, 5 * 64, 5)
    assert st.slots_consumed == st.slots_released == 5  # each slot answered
    assert p.fstats[0].tx_packets == 5 and p.tx.in_flight() == 0
    close(p)


def test_head_only_packets_keep_ring_order_with_the_full_path():
    """Small and large packets interleaved in one ring pass reach the wire in ring order:
    once a packet of the pass waits for the full path, the small ones after it wait too."""
    p = make_pair("lazy")
    frames = [SMALL, frame(b"L" * 3000), SMALL, frame(b"M" * 200), SMALL, SMALL]
    for f in frames:
        p.send(f)
    p.run_tx()
    assert p.wire_frames() == frames
    close(p)


@pytest.mark.parametrize("why", ["filter", "capture", "mechanism"])
def test_a_head_only_packet_that_something_must_see_takes_the_full_path(monkeypatch, why):
    p = make_pair("lazy", filters=["drop dst_port=7"] if why == "filter" else None)
    spy = TxSpy(p)
    if why == "capture":
        seen = []

        class On:  # a capture that records TX frames (headers only)
            on = True

            def out_caplen(self, wirelen):
                return 0

            def out(self, skb):
                seen.append(skb.head)

        p.btx.capture = On()
    if why == "mechanism":
        monkeypatch.setattr(type(p.btx.mech), "HEAD_ONLY_HOOKS", True)
    real = os.writev
    monkeypatch.setattr(os, "writev", spy._writev[1])
    p.send(SMALL)
    p.run_tx()
    monkeypatch.setattr(os, "writev", real)
    assert len(p.wire_frames()) == 1
    assert len(spy.attached) == 1  # the hooks saw it
    if why == "capture":
        assert seen == [SMALL]
    close(p)


def test_a_failed_vif_write_of_a_head_only_packet_is_a_drop_and_its_slot_is_answered(
        monkeypatch):
    p = make_pair("lazy")
    real = os.writev

    def full(fd, iov):
        if fd == p.btx.vif_fd:
            raise BlockingIOError(11, "queue full")
        return real(fd, iov)

    monkeypatch.setattr(os, "writev", full)
    p.send(SMALL)
    p.run_tx()
    monkeypatch.setattr(os, "writev", real)
    st = p.bstats[0]
    assert (st.drops, st.drops_vif, st.slots_released) == (1, 1, 1)
    assert p.wire_frames() == []
    close(p)


def test_a_head_only_packet_with_a_partial_checksum_has_it_set_up_from_its_head():
    """csum_blank UDP in one header slot: sent on the spot with the virtio header the full
    path would give it (NEEDS_CSUM from the UDP header, checksum field at 6)."""
    p = make_pair("lazy")
    p.send(SMALL, VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0))
    p.run_tx()
    got = p.wire.recv(1 << 16)
    flags, gso, _hl, _gs, start, off, _n = VNET_HDR.unpack_from(got)
    assert (flags, gso, start, off) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 34, 6)
    assert got[VNET_HDR.size:] == SMALL
    assert p.bstats[0].tx_packets == 1 and p.bstats[0].drops == 0
    close(p)


def test_a_head_only_packet_whose_checksum_cannot_be_set_up_is_dropped_by_the_full_path():
    """csum_blank on a frame that is not TCP/UDP (ICMP): the head-only send declines it, the
    full path drops it as Linux's checksum_setup does (drops_csum 1), its slot answered."""
    p = make_pair("lazy")
    icmp = frame(b"i" * 22, proto=1)
    p.send(icmp, VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 2, 0))
    p.run_tx()
    st = p.bstats[0]
    assert (st.drops, st.drops_csum, st.tx_packets, st.slots_released) == (1, 1, 0, 1)
    assert p.wire_frames() == []
    close(p)
