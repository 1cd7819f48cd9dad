"""``recycle`` does its own work and no other's: an answered page stays granted in the pool and
its gref is reused without a grant write (``grants_recycled``), the pool never holds more than
its rings' worth of pages (the oldest idle ones are ended: ``grants_evicted``), the grefs on the
ring carry no persistent bit (the backend sees transient grants), and a frontend that reuses a
recycled gref for something else gets exactly the backend's transient-grant verdict."""

from __future__ import annotations

import pytest

from frontend.grants.recycle import Recycle
from shared.protocol.grant import (
    GRANT_ENTRY,
    RESERVED_REFS,
    GrantTable,
    GTF_permit_access,
    GTF_reading,
)
from shared.protocol.netif import GREF_PERSISTENT, RING_SIZE, TX_REQUEST, NETTXF_header_slot
from shared.protocol.stats import RingStats
from tests.conftest import frame, make_pair
from tests.hostile import BASIC, HostileFrontend, assert_verdict
from tests.inproc import BackendThread, wait_for

_GE = GRANT_ENTRY.size


def _table(n: int) -> GrantTable:
    return GrantTable(memoryview(bytearray(n * _GE)), n)


def _entries(frames: list[int]) -> memoryview:
    return memoryview(b"".join(GRANT_ENTRY.pack(GTF_permit_access, 0, f) for f in frames))


def _use(pol: Recycle, table: GrantTable, ref: int, n: int) -> None:
    """Name pages ref..ref+n-1 on the ring (granting frame 1000 + ref each), then answer
    them."""
    pol.grant([(table.span(ref, n), _entries([1000 + r for r in range(ref, ref + n)]))])
    assert pol.revoke([(ref, n)])


def test_a_page_named_again_while_in_the_pool_is_not_granted_again():
    table, st = _table(4096), RingStats()
    pol = Recycle(table, st, pool_rings=1)
    _use(pol, table, 10, 4)
    assert (st.grants_fresh, st.grants_recycled) == (4, 0)
    assert all(table.ref_flags[r] == GTF_permit_access for r in range(10, 14))  # kept granted
    _use(pol, table, 10, 4)
    assert (st.grants_fresh, st.grants_recycled) == (4, 4)


@pytest.mark.parametrize("rings", [1, 2])
def test_the_pool_holds_at_most_its_rings_and_ends_the_oldest(rings):
    """A cycle over 2 x 256 pages, one at a time: with one ring's pool the page named next is
    always the one evicted longest ago (0 hits on the second lap); with two, every page of the
    second lap is still granted (all hits). Never more than the pool is granted."""
    table, st = _table(4096), RingStats()
    pol = Recycle(table, st, pool_rings=rings)
    for _lap in range(2):
        for r in range(100, 100 + 2 * RING_SIZE):
            _use(pol, table, r, 1)
            granted = sum(1 for f in table.ref_flags[100:100 + 2 * RING_SIZE] if f)
            assert granted <= rings * RING_SIZE
    assert st.grants_recycled == (0 if rings == 1 else 2 * RING_SIZE)
    assert st.grants_evicted == (2 * 2 * RING_SIZE - RING_SIZE if rings == 1 else 0)


def test_a_page_still_held_by_the_backend_is_refused_like_a_transient_revoke():
    table, st = _table(64), RingStats()
    pol = Recycle(table, st)
    pol.grant([(table.span(8, 2), _entries([1, 2]))])
    table.ref_flags[9] |= GTF_reading  # the backend still reads it
    assert not pol.revoke([(8, 2)])
    assert table.ref_flags[8] & GTF_permit_access and pol.busy == 2  # nothing changed


def test_netfront_reuses_its_grefs_through_a_real_backend():
    """Frames through the real TX path: grefs without the persistent bit, the chunk's grants
    still in place after the answer, and the second frame a hit for every page."""
    p = make_pair(header_slots=True, grants="recycle", recycle_pool=2)
    grants = p.front_region.grants
    p.send(frame(b"r" * 9000))
    assert p.tx.pump() == 1
    refs = [TX_REQUEST.unpack_from(p.tx.ring.buf, p.tx.ring.entry(i))[0] for i in range(1, 4)]
    p.tx.ring.push_requests()
    p.run_tx()
    assert all(not r & GREF_PERSISTENT for r in refs)
    assert all(grants.ref_flags[r] & GTF_permit_access for r in refs)  # answered, kept
    fst = p.fstats[0]
    fresh = fst.grants_fresh
    assert fresh == 3 and fst.grants_recycled == 0
    p.send(frame(b"s" * 9000))
    p.run_tx()
    assert p.wire_frames() == [frame(b"r" * 9000), frame(b"s" * 9000)]
    assert fst.grants_fresh == fresh and fst.grants_recycled == 3
    assert p.bstats[0].persistent_hits == 0  # transient to the backend: checked every time


def test_a_recycled_gref_reused_for_another_page_is_the_backends_fatal_grant(tmp_path):
    """Hostile: gref R was granted for a payload page, answered and kept (recycled); the
    frontend then points R at its grant table's own page and names it again. The backend
    checks every transient grant: verdict GrantError (the frame is not a payload page),
    malformed + fatal_grant, a peer fault; it holds nothing afterwards."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "reuser", b.domid)
    try:
        h.connect(BASIC)
        wait_for(lambda: b.nb.tx is not None, 5, "Connected")
        ref = RESERVED_REFS + 300
        ss = h.region.layout.hdr_slot_size
        for frame_no in (h.payload.start + 7, 0):  # a payload page, then page 0 (not one)
            h.grant(ref, frame=frame_no)
            h.region.hdr[0:ss] = frame(b"q" * 1000)[:ss]
            if not frame_no:  # the counters before the backend can see the hostile request
                before = dict(b.nb.counters)
            h.write_tx((0, 0, NETTXF_header_slot | 4, h.fresh_id(), 1100),
                       (ref, 0, 0, h.fresh_id(), 1100 - ss))
            if frame_no:
                wait_for(lambda: b.nb.tx_stats.tx_packets == 1, 10, "the first packet")
        why = h.wait_closed()
        assert f"gref {ref} grants frame 0, outside the payload area" in why, why
    finally:
        h.close()
    b.idle()
    try:
        assert_verdict(before, b.nb.counters, malformed=1, fatal_grant=1)
        assert b.nb.tx_stats.grants_in_use == 0 and b.nb.tx_stats.maps_outstanding == 0
    finally:
        b.stop()


@pytest.mark.parametrize("rings", [1, 2])
def test_rx_buffers_come_back_before_the_pool_is_full(rings):
    """The RX side through the real backend: netfront writes each frame to its TAP before it
    posts the buffer again, so at most one ring of buffers is ever out (posted or being
    answered) - never more than a pool of one ring holds. Every buffer posted again is still
    granted: all hits, no eviction, with either pool (the arithmetic of the P3 rows: the
    series' 30 % came from pages the guest's stack still held)."""
    p = make_pair(grants="recycle", recycle_pool=rings)
    frames = [frame(bytes([i % 256]) * 1400) for i in range(300)]
    for f in frames:
        p.wire.send(f)
        p.run_rx(rounds=2)
    got = p.guest_frames()
    assert [g[-1400:] for g in got] == [f[-1400:] for f in frames]
    st = p.fstats[1]
    assert st.grants_fresh == 256  # the first posting of each buffer
    assert st.grants_recycled >= 300 and st.grants_evicted == 0
    assert p.rx.policy.busy + len(p.rx.policy.idle) <= 256
