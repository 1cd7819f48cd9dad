"""``staging`` does its own work and no other's: the netfront lists its pages per ring
(``tx-pool-ref``... , the UEK keys), the backend maps every one at connect and none per packet
(TX read, RX written with the CPU; the header pull from the mapping instead of a grant copy),
and a frontend that lists overlapping staging areas, revokes a kept mapping or uses a kept
gref outside its pools gets an exact verdict."""

from __future__ import annotations

import pytest

from frontend.grants.staging import pool_refs
from frontend.rx.queue import RX_BUFFERS
from shared.plumbing.channel import ChannelClosed
from shared.protocol.grant import RESERVED_REFS, GTF_reading
from shared.protocol.netif import (
    EXT_GREF_ALLOC,
    GREF_PERSISTENT,
    MAX_STAGING_GRANTS,
    PAGE_SIZE,
    NETTXF_header_slot,
)
from shared.protocol.offload import VNET_HDR
from shared.protocol.region import Region
from tests.conftest import frame
from tests.hostile import BASIC, HostileFrontend, assert_verdict
from tests.inproc import BackendThread, FrontendThread, gather, wait_for

STAGING = dict(BASIC, **{"feature-staging-grants": True})
TX_STAGED = MAX_STAGING_GRANTS  # the list page's 512 entries, TX payload pages


@pytest.mark.parametrize("slots", [True, False])
def test_pools_mapped_at_connect_and_no_grant_op_per_packet(tmp_path, slots):
    b = BackendThread(tmp_path, tx_mode="linux", rx_mode="map")
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid, region_size=8 << 20,
                       grants="staging", header_slots=slots)
    try:
        f.connected()
        b.connected()
        tx, rx = b.nb.tx_stats, b.nb.rx_stats
        assert (tx.staged_grants, rx.staged_grants) == (TX_STAGED, RX_BUFFERS)
        assert tx.maps_outstanding == TX_STAGED and rx.maps_outstanding == RX_BUFFERS
        maps0, copies0 = tx.grant_maps + rx.grant_maps, tx.grant_copies + rx.grant_copies
        out = [frame(bytes([i]) * (60 + 900 * i)) for i in range(8)]  # 1 to 3 pages
        for fr in out:
            f.guest.send(bytes(VNET_HDR.size) + fr)
        wait_for(lambda: len(got := b.wire_frames()) and got, 5, "frames on the wire")
        wait_for(lambda: tx.tx_packets == 8, 5, "8 TX packets")
        back = [frame(bytes([0x40 + i]) * 1200) for i in range(8)]
        for fr in back:
            b.wire.send(bytes(VNET_HDR.size) + fr)
        wait_for(lambda: rx.rx_packets == 8, 5, "8 RX frames")
        assert tx.grant_maps + rx.grant_maps == maps0  # every page was mapped at connect
        assert tx.grant_copies + rx.grant_copies == copies0  # no grant copy either way
        assert b.nb.rx_own.rx_mapped_copies >= 8  # RX written by the CPU into the mapping
        assert tx.persistent_hits > 0 and tx.grants_in_use == TX_STAGED
        if not slots:  # the linear part pulled by a CPU copy from the staged page
            assert tx.staged_pulls >= 8
        got = gather(f.guest_frames, len(back), 5, "frames handed to the guest")
        assert [g[-1100:] for g in got] == [fr[-1100:] for fr in back]
    finally:
        f.stop()
        b.stop()
    assert b.nb.tx_stats.maps_outstanding == 0 and b.nb.tx_stats.grants_in_use == 0


def _pools(entries_tx: list[int], entries_rx: list[int] | None = None):
    """A region_keys callback: grant each listed ref (ref -> its payload page) and write the
    lists into the last two payload pages, as netfront does, but with the refs given."""
    def keys(region: Region) -> dict[str, int]:
        lay = region.layout
        out = {}
        for i, (name, refs, ro) in enumerate((("tx", entries_tx, True),
                                              ("rx", entries_rx or [], False))):
            page = lay.payload_pages - 1 - i
            at = (lay.payload_page + page) * PAGE_SIZE
            for j, ref in enumerate(refs):
                EXT_GREF_ALLOC.pack_into(region.buf, at + j * 8, ref, int(ro))
                region.grants.grant(ref, 0, lay.payload_page + (ref - RESERVED_REFS) % 300, ro)
            region.grants.grant(RESERVED_REFS + page, 0, lay.payload_page + page, True)
            out[f"{name}-pool-ref"], out[f"{name}-pool-size"] = RESERVED_REFS + page, len(refs)
        return out
    return keys


def _refused(tmp_path, region_keys, why: str) -> None:
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "stager", b.domid, size=4 << 20)
    try:
        before = dict(b.nb.counters)
        try:  # refused at attach, after the backend said Connected: the frontend's own
            h.connect(STAGING, region_keys)  # Connected may find the channel gone
            h.wait_closed()
        except ChannelClosed:
            pass
    finally:
        h.close()
    b.idle()
    try:
        assert why in b.nb.last_error
        assert_verdict(before, b.nb.counters, malformed=1, fatal_grant=1)
        for st in (b.nb.tx_stats, b.nb.rx_stats):  # the list was taken whole or not at all
            assert st.grants_in_use == 0 and st.maps_outstanding == 0
    finally:
        b.stop()


def test_overlapping_staging_areas_refuse_the_whole_list(tmp_path):
    """Hostile: two TX pool entries whose grants stage the same page (ref 20 and ref 320 both
    grant payload page 12): GrantError naming both entries; nothing stays mapped or kept."""
    r = RESERVED_REFS
    _refused(tmp_path, _pools([r + 10, r + 12, r + 312]), "pool entries 1 and 2 overlap")


def test_a_gref_listed_twice_refuses_the_whole_list(tmp_path):
    r = RESERVED_REFS
    _refused(tmp_path, _pools([r + 10, r + 11], [r + 40, r + 41, r + 40]),
             f"rx pool lists gref {r + 40} twice")


def test_a_read_only_rx_pool_entry_is_refused(tmp_path):
    def keys(region):
        out = _pools([], [RESERVED_REFS + 40])(region)
        at = (region.layout.payload_page + region.layout.payload_pages - 2) * PAGE_SIZE
        EXT_GREF_ALLOC.pack_into(region.buf, at, RESERVED_REFS + 40, 1)  # flagged read-only
        return out
    _refused(tmp_path, keys, f"rx pool entry 0: gref {RESERVED_REFS + 40} is read-only")


def test_revoking_a_kept_mapping_is_refused_and_a_forced_revoke_changes_nothing(tmp_path):
    """Hostile: end_access on a staged gref is refused (the backend holds GTF_reading); a
    frontend that clears the entry by force gets no fault either - the backend keeps the page
    it mapped at connect (as a Xen mapping outlives its grant entry) and sends what that page
    holds; at disconnect it lets go of it without complaint."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "revoker", b.domid, size=4 << 20)
    ref = RESERVED_REFS + 10
    try:
        h.connect(STAGING, _pools([ref]))
        wait_for(lambda: b.nb.tx is not None, 5, "Connected")
        grants = h.region.grants
        assert grants.ref_flags[ref] & GTF_reading
        assert not grants.end_access(ref)  # refused while kept
        page = h.payload.start + 10
        data = frame(b"k" * 2000)
        h.region.buf[page * PAGE_SIZE:page * PAGE_SIZE + len(data) - 128] = data[128:]
        grants.ref_flags[ref] = 0  # forced: the entry no longer grants anything
        h.region.hdr[0:128] = data[:128]
        h.write_tx((0, 0, NETTXF_header_slot | 4, h.fresh_id(), len(data)),
                   (ref | GREF_PERSISTENT, 0, 0, h.fresh_id(), len(data) - 128))
        wait_for(lambda: b.nb.tx_stats.tx_packets == 1, 5, "the packet")
        assert gather(b.wire_frames, 1, 5, "frame on the wire") == [data]
        assert b.nb.counters["malformed"] == 0 and b.nb.tx_stats.persistent_hits >= 1
    finally:
        h.close()
    b.idle()
    try:
        assert b.nb.counters["internal_errors"] == 0 and b.nb.counters["malformed"] == 0
        assert b.nb.tx_stats.maps_outstanding == 0 and b.nb.tx_stats.grants_in_use == 0
    finally:
        b.stop()


def test_a_kept_gref_outside_the_pools_is_not_negotiated(tmp_path):
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "outsider", b.domid, size=4 << 20)
    try:
        h.connect(STAGING, _pools([RESERVED_REFS + 10]))
        wait_for(lambda: b.nb.tx is not None, 5, "Connected")
        before = dict(b.nb.counters)
        other = h.grant(RESERVED_REFS + 11)
        h.region.hdr[0:128] = frame(b"o" * 600)[:128]
        h.write_tx((0, 0, NETTXF_header_slot | 4, h.fresh_id(), 642),
                   (other | GREF_PERSISTENT, 0, 0, h.fresh_id(), 642 - 128))
        assert f"gref {other} marked kept but not in the staging pools" in h.wait_closed()
    finally:
        h.close()
    b.idle()
    try:
        assert_verdict(before, b.nb.counters, malformed=1, not_negotiated=1)
    finally:
        b.stop()


def test_the_pools_cover_what_the_queues_name():
    """netfront's lists hold exactly the grefs its queues use: RX buffers 0..255, then whole
    TX payload pages from page 256 on, as many as 512 entries allow."""
    from shared.plumbing.transport import create_memfd

    _fd, mem = create_memfd(8 << 20)
    tx, rx = pool_refs(Region.create(mem), RX_BUFFERS)
    assert rx == [RESERVED_REFS + i for i in range(RX_BUFFERS)]
    assert tx == [RESERVED_REFS + RX_BUFFERS + p for p in range(TX_STAGED)]


def test_the_pools_are_granted_before_initialised_and_kept_in_use_once_mapped():
    """The backend maps the pools as soon as it has answered Connected, which may be before
    netfront has built its queues (with the netfront in a QEMU guest under TCG it was, every
    time: "gref 264 is not granted"). So everything a pool names is granted by
    ``write_pools``, before Initialised: the backend's ``premap`` in that order stages every
    page; and the queues built afterwards leave the entries as the backend marked them (in
    use), where rewriting them would let the frontend revoke a page the backend has mapped."""
    import os

    from backend.grants.gntmap import GntMap, Views
    from backend.grants.staging import premap
    from backend.handshake import attach_region
    from frontend.grants.staging import write_pools
    from frontend.mechanisms import grant_policy
    from frontend.rx.queue import RxQueue
    from frontend.tx.queue import TxQueue
    from shared.plumbing.transport import create_memfd
    from shared.protocol.grant import GTF_writing
    from shared.protocol.stats import RingStats
    from tests.conftest import agreement, dgram_pair

    fd, mem = create_memfd(8 << 20)
    front = Region.create(mem)
    keys = write_pools(front, 0, RX_BUFFERS)  # what goes with Initialised
    region, own_fd = attach_region(fd, mem)
    os.close(fd)
    st = RingStats()
    views = Views(own_fd, mem, region, st, shared=True)
    gms = [GntMap(region, views, 0, st, True) for _ in range(2)]
    assert premap(keys, *gms) == TX_STAGED + RX_BUFFERS  # before any queue exists
    tx, rx = pool_refs(front, RX_BUFFERS)
    flags = front.grants.ref_flags
    marked = [flags[r] & (GTF_reading | GTF_writing) for r in tx + rx]
    assert all(marked)
    guest, tap = dgram_pair()
    ag = agreement(header_slots=False)
    chosen = {"feature-staging-grants": True}
    queues = [RxQueue(front, tap.fileno(), RingStats(),
                      grant_policy(chosen, front.grants, RingStats(), "staging"), 0, ag),
              TxQueue(front, tap.fileno(), RingStats(), RX_BUFFERS, False,
                      grant_policy(chosen, front.grants, RingStats(), "staging"), 0, ag)]
    assert [flags[r] & (GTF_reading | GTF_writing) for r in tx + rx] == marked
    assert not any(front.grants.end_access(r) for r in (tx[0], rx[0]))  # still refused
    for gm in gms:
        gm.unmap_all()
    views.close()
    del queues
    guest.close()
    tap.close()
