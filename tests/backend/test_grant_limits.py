"""What a frontend's grants can make the backend hold (issue 22, findings 3, 4 and 6), against
the real netback: persistent grants are capped, a map the kernel refuses is that packet's loss
(never a process exit), teardown never raises, the CPU view's holes are bounded, RX capture
maps only frames it validated, and nothing is built per declared grant entry."""

from __future__ import annotations

import errno
import mmap
import os
import time
import tracemalloc

import pytest

import backend.grants.cpuview
from backend.grants.gntmap import GntMap, Views
from backend.rx.path import RxPath
from backend.tx.path import TxPath
from shared.endpoint.capture import attach
from shared.plumbing.transport import create_memfd
from shared.protocol.grant import RESERVED_REFS, WORD_FRAME_SHIFT
from shared.protocol.netif import (
    GREF_PERSISTENT,
    MAX_PERSISTENT_GRANTS,
    PAGE_SIZE,
    RX_REQUEST,
    NETTXF_header_slot,
)
from shared.protocol.offload import VNET_HDR
from shared.protocol.region import VERSION, Layout, Region
from shared.protocol.ring import RSP_PROD
from shared.protocol.stats import RingStats
from tests.backend.test_netback import close
from tests.backend.txhand import Slot, drain, put_packet, wire
from tests.conftest import frame, make_pair
from tests.hostile import BASIC, HostileFrontend
from tests.inproc import BackendThread, gather, wait_for

VNET = bytes(VNET_HDR.size)
PERSISTENT = dict(BASIC, **{"feature-persistent": True})


def send_persistent(b: BackendThread, h: HostileFrontend, refs: range, frame_of) -> None:
    """One packet per ref: a 100-byte header slot and 1000 bytes on persistent gref ``ref``
    granting ``frame_of(ref)``; in ring-sized batches, each answered before the next."""
    refs = list(refs)
    ss = h.region.layout.hdr_slot_size
    for at in range(0, len(refs), 100):
        batch = refs[at:at + 100]
        for ref in batch:
            h.grant(ref, frame=frame_of(ref))
            slot = h.fresh_id() % h.region.layout.hdr_slots
            h.region.hdr[slot * ss:slot * ss + 100] = frame(b"p" * 1058)[:100]
            h.put_tx([(slot * ss, 0, NETTXF_header_slot | 4, h.fresh_id(), 1100),
                      (ref | GREF_PERSISTENT, 0, 0, h.fresh_id(), 1000)])
        want = h.tx.req_prod_pvt
        h.push()
        wait_for(lambda w=want: h.tx.idx[RSP_PROD] == w or b.nb.tx is None, 10, "answers")
        if b.nb.tx is None:  # disconnected
            return


def test_persistent_grants_of_one_frame_are_mapped_and_released(tmp_path):
    """Finding 3: 256 persistent references to one frame overflowed an 8-bit map count
    (booked as our internal error) and teardown then raised NotMapped out of the loop: the
    netback died. Now 300 are mapped (map mode), sent, and released at disconnect."""
    b = BackendThread(tmp_path, tx_mode="map")
    h = HostileFrontend(str(b.ev), "onepage", b.domid, size=8 << 20)
    try:
        h.connect(PERSISTENT)
        wait_for(lambda: b.nb.tx is not None, 5, "Connected")
        one = h.payload.start + 50
        send_persistent(b, h, range(RESERVED_REFS + 300, RESERVED_REFS + 600), lambda r: one)
        wait_for(lambda: b.nb.tx_stats.tx_packets == 300, 10, "300 packets")
        st = b.nb.tx_stats
        assert st.maps_outstanding == 300 and st.grants_in_use == 300
        assert len(gather(b.wire_frames, 300, 5, "frames on the wire")) == 300
    finally:
        h.close()
    b.idle()
    try:
        assert b.thread.is_alive()
        c = b.nb.counters
        assert c["internal_errors"] == 0 and c["malformed"] == 0, b.nb.last_error
        assert b.nb.tx_stats.maps_outstanding == 0 and b.nb.tx_stats.grants_in_use == 0
    finally:
        b.stop()


def test_more_persistent_grants_than_the_cap_disconnect_the_frontend(tmp_path):
    """The cap: MAX_PERSISTENT_GRANTS per ring (documented, shared with the netfront, which
    sizes its pool to it). One more is fatal: malformed, fatal_grant, a peer fault; the
    backend lives and releases every one it kept."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "hoarder", b.domid, size=16 << 20)
    try:
        h.connect(PERSISTENT)
        wait_for(lambda: b.nb.tx is not None, 5, "Connected")
        before = dict(b.nb.counters)
        refs = range(RESERVED_REFS + 300, RESERVED_REFS + 301 + MAX_PERSISTENT_GRANTS)
        send_persistent(b, h, refs, lambda r: h.payload.start + r % len(h.payload))
        why = h.wait_closed()
        assert f"more than {MAX_PERSISTENT_GRANTS} persistent grants" in why
    finally:
        h.close()
    b.idle()
    try:
        c = b.nb.counters
        assert c["malformed"] - before["malformed"] == 1
        assert c["fatal_grant"] - before["fatal_grant"] == 1
        assert c["faults_peer"] - before["faults_peer"] == 1 and c["internal_errors"] == 0
        assert b.nb.tx_stats.grants_in_use == 0 and b.nb.tx_stats.maps_outstanding == 0
    finally:
        b.stop()


class Refuse:
    """Stands in for CpuView.map: the kernel refuses (ENOMEM, as past vm.max_map_count) the
    maps numbered in ``which`` (1-based), while ``on``."""

    def __init__(self, cpu, which: set[int]) -> None:
        self.real, self.which, self.n, self.on = cpu.map, which, 0, True
        cpu.map = self

    def __call__(self, frame: int, write: bool = False) -> None:
        self.n += 1
        if self.on and self.n in self.which:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        self.real(frame, write)


@pytest.mark.parametrize("mode,rules,counter", [
    ("map", None, "drops_error"), ("copy", None, "drops_error"),
    ("lazy", ["drop payload=text:SECRET"], "drops_filtered")])
def test_a_map_the_kernel_refuses_is_that_packets_loss(mode, rules, counter, caplog):
    """The verdict of a refused map: the packet is dropped (drops, drops_map, and drops_error
    - or drops_filtered when a payload rule could not read it), every map it did hold is
    undone, its slots are answered, and the next packet goes."""
    p = make_pair(mode, filters=rules)
    try:
        refuse = Refuse(p.btx.gntmap.cpu, {2})  # the packet's second page
        f = frame(b"a" * 9000)
        p.send(f)
        p.run_tx()
        st = p.bstats[0]
        assert p.wire_frames() == []
        assert st.drops == st.drops_map == getattr(st, counter) == 1
        assert st.maps_outstanding == 0 and st.grants_in_use == 0
        assert st.slots_consumed == st.slots_released and p.tx.in_flight() == 0
        assert any("Cannot allocate memory" in r.getMessage() for r in caplog.records)
        refuse.on = False
        p.send(f)
        p.run_tx()
        assert p.wire_frames() == [f]
    finally:
        close(p)


def test_an_rx_capture_needs_no_map_at_all(tmp_path):
    """With every map refused, an RX capture still records the frame: it is read into backend
    memory, recorded there and copied in (issue 22, finding 7) - no guest page is mapped."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "cap", b.domid)
    att = None
    try:
        h.connect()
        wait_for(lambda: b.nb.rx is not None, 5, "Connected")
        Refuse(b.nb.rx.gntmap.cpu, set(range(1, 100)))
        att = attach(str(b.dir / "b.ctl"), {"snaplen": 0, "buffer_kb": 64, "direction": "in"})
        h.post_rx(4)
        h.push()
        b.wire.send(VNET + frame(b"r" * 300))
        wait_for(lambda: b.nb.rx_stats.rx_packets == 1, 5, "the frame delivered")
        cap = b.nb.capture.counters()
        assert cap["capture_drops"] == 0 and cap["capture_frames"] == 1
        assert b.nb.rx_stats.grant_maps == 0
        assert b.nb.counters["internal_errors"] == 0
    finally:
        if att is not None:
            att.close()
        h.close()
        b.stop()


def test_rx_capture_maps_only_the_frame_it_validated(tmp_path):
    """Finding 4: with a capture on `in`, a persistent RX grant whose entry the frontend
    rewrote (to frame 1, the grant table's page) after the backend kept it, posted again, was
    written and then mapped by the capture from that entry: NotMapped, the netback died. Now
    both buffers are found changed at write time: answered XEN_NETIF_RSP_ERROR
    (rx_grant_revoked 2), never written, never mapped; the frontend stays, and the frame
    (whole in backend memory) waits for its next good buffer, captured as read."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "rewriter", b.domid)
    att = None
    try:
        h.connect(PERSISTENT)
        wait_for(lambda: b.nb.rx is not None, 5, "Connected")
        att = attach(str(b.dir / "b.ctl"), {"snaplen": 0, "buffer_kb": 64, "direction": "in"})
        rx = b.nb.rx
        h.post_rx(1, persistent=True)
        h.push()
        wait_for(lambda: len(rx.posted) == 1, 5, "the buffer kept")
        ref = RESERVED_REFS + rx.posted[0]
        h.region.grants.grant(ref, 0, 1, readonly=False)
        # the same gref, posted again under a new id
        RX_REQUEST.pack_into(h.rx.buf, h.rx.entry(h.rx.req_prod_pvt), 200, 0,
                             ref | GREF_PERSISTENT)
        h.rx.req_prod_pvt += 1
        h.push()
        wait_for(lambda: len(rx.posted) == 2, 5, "the rewritten one posted")
        assert rx.posted_exps[1] >> WORD_FRAME_SHIFT == h.payload.start + ref - RESERVED_REFS
        for n in (100, 200):
            b.wire.send(VNET + frame(b"c" * n))
        st = b.nb.rx_stats
        wait_for(lambda: st.rx_grant_revoked == 2, 5, "the changed buffers refused")
        assert st.rx_packets == 0 and st.drops == 0  # held, whole, not lost
        h.post_rx(2)  # good, transient ones
        h.push()
        wait_for(lambda: st.rx_packets == 2, 5, "the held frames delivered")
        c = b.nb.counters
        assert c["internal_errors"] == 0 and c["malformed"] == 0, b.nb.last_error
        assert b.nb.capture.counters()["capture_frames"] == 2
        assert b.thread.is_alive() and b.nb.rx is not None
    finally:
        if att is not None:
            att.close()
        h.close()
        b.stop()


def test_rx_post_expects_the_validated_frame_even_if_the_entry_races_the_check():
    """The transient variant: the entry rewritten between the check and the read that keeps
    it. The word kept names the frame validated, so the write finds the entry changed."""
    p = make_pair()
    try:
        rx = p.brx.mech
        check_many = rx.check_many
        grants = p.front_region.grants
        lay = p.front_region.layout
        good = lay.payload_page + 3
        grants.grant(20, 0, good)

        def racing(grefs: list[int], write: bool) -> list[int]:
            frames = check_many(grefs, write)
            grants.grant(20, 0, 0)  # the frontend rewrites it right after the check
            return frames

        rx.check_many = racing
        _gis, (word,), _targets = rx.post([20])
        assert word >> WORD_FRAME_SHIFT == good
        assert rx._q[20] != word  # the write will refuse it (revoked)
    finally:
        close(p)


def test_the_cpu_views_holes_are_bounded(monkeypatch):
    """A frontend whose fragments land on scattered pages made every unmap leave a hole,
    one VMA each, towards vm.max_map_count (then every mmap of the process fails, Python's
    own included). Past HOLE_LIMIT an unmap puts PROT_NONE back instead: the process's map
    count stays bounded while every packet still crosses."""
    monkeypatch.setattr(backend.grants.cpuview, "HOLE_LIMIT", 32)
    p = make_pair("copy", size=16 << 20)
    try:
        with open("/proc/self/maps") as f:
            vmas0 = sum(1 for _ in f)
        sent = []
        for i in range(200):  # one page each, every other page: no two holes adjacent
            f_ = frame(bytes([i % 251]) * 1500)
            put_packet(p, [Slot(f_[:128]), Slot(f_[128:], 10 + 2 * i, 0)])
            drain(p)
            sent.append(f_)
        assert [fr for _v, fr in wire(p)] == sent
        with open("/proc/self/maps") as f:
            vmas = sum(1 for _ in f)
        cpu = p.btx.gntmap.cpu
        assert cpu.holes == 32 and cpu.outstanding == 0
        assert vmas - vmas0 <= 2 * 32 + 8, (vmas0, vmas)
    finally:
        close(p)


def test_a_declared_huge_grant_table_costs_nothing_per_entry():
    """Finding 6: a layout declaring 134 M grant entries (a 1 GiB region that is nearly all
    table) cost a 2-byte shadow per entry (+256 MiB, +0.24 s per handshake). The backend's
    set-up now builds nothing per declared entry."""
    size = 1 << 30
    pages = size // PAGE_SIZE
    gnt_pages = pages - 68
    lay = Layout(VERSION, pages, 1, gnt_pages * PAGE_SIZE // 8, 1 + gnt_pages, 2 + gnt_pages,
                 3 + gnt_pages, 128, 32, 4 + gnt_pages, 64)
    fd, mem = create_memfd(size)
    try:
        with memoryview(mem) as view:
            lay.pack_into(view)
        dma = mmap.mmap(fd, size)
        tracemalloc.start()
        t = time.process_time()
        region = Region.attach(dma)
        st = RingStats()
        views = Views(os.dup(fd), dma, region, st)
        gm = GntMap(region, views, 0, st, True)
        tx = TxPath(region, gm, -1, st, "lazy", True)
        rx = RxPath(region, GntMap(region, views, 0, st, True), -1, st)
        cpu = time.process_time() - t
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert region.grants.count == gnt_pages * PAGE_SIZE // 8 > 134_000_000
        assert cpu < 0.05, f"set-up took {cpu:.3f} s of CPU"
        assert used < 2 << 20, f"set-up allocated {used / 2**20:.1f} MiB"
        del tx, rx, gm
        views.close()
        region.close()
    finally:
        mem.close()
        os.close(fd)
