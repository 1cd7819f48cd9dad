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


@pytest.mark.parametrize("why", ["filter", "capture", "csum", "mechanism"])
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
    vnet = bytes(VNET_HDR.size)
    if why == "csum":  # a partial checksum: the full path walks the headers to set it up
        vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    real = os.writev
    monkeypatch.setattr(os, "writev", spy._writev[1])
    p.send(SMALL, vnet)
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
