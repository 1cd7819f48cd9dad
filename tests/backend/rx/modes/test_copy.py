"""RX ``copy`` does its own work and no other's: the vif read is handed the posted buffers
themselves (iovecs into the frontend's memory: the kernel's copy is the grant copy), and
nothing is ever mapped; its own access points honour a revoke placed just before each."""

from shared.protocol.grant import GTF_writing
from shared.protocol.netif import PAGE_SIZE, XEN_NETIF_RSP_ERROR
from shared.protocol.offload import VNET_HDR
from tests.backend import grant_hooks
from tests.backend.handed import FRAMES_SIZES, RxSpy
from tests.conftest import frame, make_pair


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


def test_copy_reads_the_frame_straight_into_posted_buffers_and_maps_nothing(monkeypatch):
    p = make_pair(rx_mode="copy")
    spy = RxSpy(p)
    frames = [frame(bytes([i]) * n) for i, n in enumerate(FRAMES_SIZES)]
    assert spy.run(monkeypatch, frames) == frames
    assert spy.map_events() == []
    posted = {p.rx.frames[i] * PAGE_SIZE for i in range(len(p.rx.frames))}
    for pieces in spy.reads:
        vnet, first, *_rest = pieces
        assert vnet.offset is None  # the virtio header: the backend's own
        assert first.offset in posted  # the frame's first page: a posted buffer itself
    assert p.bstats[1].grant_maps == 0
    close(p)


def test_rx_buffer_revoked_after_posting_is_not_written():
    p = make_pair(rx_mode="copy")
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
    p = make_pair(rx_mode="copy")
    frames = [frame(bytes([i]) * 40) for i in range(12)] + [frame(b"L" * 50000),
                                                            frame(b"t" * 10)]
    for f in frames:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx()
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == frames
    assert p.brx.small_run == 1  # read whole again after the long frame
    assert p.bstats[1].rx_spills == 1
    close(p)


def test_small_frames_keep_flowing_while_a_capture_records_only_outgoing_frames():
    """A capture that records TX only (``on``, not ``wants_in``) must not stop RX's
    small-frame loop: every frame arrives, in order, read one buffer each."""
    p = make_pair(rx_mode="copy")

    class OutOnly:
        on = True

        def wants_in(self):
            return False

    p.brx.capture = OutOnly()
    frames = [frame(bytes([i]) * 30) for i in range(40)]
    for f in frames:
        p.wire.send(bytes(VNET_HDR.size) + f)
    p.run_rx()
    assert [g[VNET_HDR.size:] for g in p.guest_frames()] == frames
    assert p.brx.small_run >= 8
    close(p)


def test_the_small_frame_loop_keeps_to_the_budget():
    """``action(budget)`` moves at most ``budget`` frames, also in a run of small ones."""
    p = make_pair(rx_mode="copy")
    for i in range(100):
        p.wire.send(bytes(VNET_HDR.size) + frame(bytes([i]) * 30))
    p.rx.refill()
    p.rx.ring.push_requests()
    assert p.brx.action(budget=16) is True  # stopped on the budget
    assert p.bstats[1].rx_packets == 16
    assert p.brx.action(budget=64) is True
    assert p.bstats[1].rx_packets == 80
    close(p)
