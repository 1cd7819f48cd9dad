"""Netfront TX: frames from the guest's TAP straight into shared memory, then onto the ring.

One ``readv`` per frame scatters it with no Python copy: the virtio_net_hdr into a scratch
buffer, the first bytes (up to the slot size) into a free header slot, the rest into a 68 KiB
payload chunk whose pages are granted one reference each. The first request carries the header
slot's offset (``NETTXF_header_slot``), an extra-info slot carries GSO, then one request per
payload page. Without header slots the frame starts in the chunk's first page, as stock netif.

Request ids are fixed: a header slot and each page of each chunk own one id for good, so an
id says what a response releases and nothing has to be allocated per request. That also lets
the fragment requests (and grant entries) of a chunk be precomputed once: per packet the
frontend copies a slice of that template onto the ring and patches the last request's size,
instead of packing one request per page in Python.

Flow control: when the ring, the header slots or the chunks run short, the queue stops (it
stops polling the TAP) and restarts as responses release them.
"""

from __future__ import annotations

import os

from shared.faults import PeerFault
from shared.grant import (
    GRANT_ENTRY,
    RESERVED_REFS,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
)
from shared.netif import (
    EXTRA_INFO,
    GREF_PERSISTENT,
    MAX_SLOTS_PER_PACKET,
    PAGE_SIZE,
    TX_REQUEST,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_RSP_NULL,
    XEN_NETIF_RSP_OKAY,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_header_slot,
    NETTXF_more_data,
)
from shared.offload import (
    VIRTIO_TO_XEN_GSO,
    VNET_HDR,
)
from shared.region import Region
from shared.ring import HEADER_SIZE, MASK32, RSP_EVENT, FrontRing
from shared.slots import HeaderSlots
from shared.stats import RingStats
from shared.xenbus import Agreement, gso_accepted

#: the largest packet netif can describe (tx_request.size is u16: XEN_NETIF_MAX_TX_SIZE)
MAX_PACKET = 0xFFFF
#: pages per payload chunk: the largest frame (64 KiB + headers) without a header slot
CHUNK_PAGES = 17
#: seconds between reaps of TX completions while the queue runs without completion kicks
REAP_INTERVAL = 0.005
#: ids at and above this belong to header slots; below, id = chunk * CHUNK_PAGES + page
SLOT_ID_BASE = 0x8000
_pack_req = TX_REQUEST.pack_into
_RO = GTF_permit_access | GTF_readonly
_SLOT = TX_REQUEST.size
_ZEROS = bytes(CHUNK_PAGES * GRANT_ENTRY.size)
_ONES = b"\x01" * CHUNK_PAGES
_HDR = HEADER_SIZE
_pack_extra = EXTRA_INFO.pack_into
#: virtio_net_hdr flags (NEEDS_CSUM=1, DATA_VALID=2) -> netif TX flags
_TX_FLAGS = (0, NETTXF_csum_blank | NETTXF_data_validated, NETTXF_data_validated,
             NETTXF_csum_blank | NETTXF_data_validated)
#: virtio gso_type (ECN bit masked) -> netif GSO type; None: netif cannot carry it
_XEN_GSO = tuple(VIRTIO_TO_XEN_GSO.get(i) for i in range(8))


class BackendError(PeerFault):
    """The backend answered something no correct backend answers: the device is broken."""


class TxQueue:
    def __init__(self, region: Region, tap_fd: int, stats: RingStats, first_page: int,
                 header_slots: bool, persistent: bool, backend_domid: int = 0,
                 agreement: Agreement | None = None) -> None:
        lay = region.layout
        #: what the backend accepts (its keys): multi-slot packets, which GSO kinds
        self.sg = agreement is None or agreement.tx_sg
        ok = gso_accepted(agreement, rx=False) | {XEN_NETIF_GSO_TYPE_NONE}
        self.xen_gso = tuple(g if g in ok else None for g in _XEN_GSO)
        self.ring = FrontRing(region.tx_ring, TX_REQUEST.size)
        self.buf = self.ring.buf
        self.r16 = self.buf.cast("H")  # response id at u16 index 32 + 6 * slot
        self.r16s = self.buf.cast("h")  # response status at 33 + 6 * slot
        self.tap_fd = tap_fd
        self.stats = stats
        self.grants = region.grants
        self.header_slots = header_slots
        self.persistent = persistent
        self.slots = HeaderSlots(region.hdr, lay.hdr_slot_size, lay.hdr_slots)
        nchunks = min((lay.payload_pages - first_page) // CHUNK_PAGES,
                      SLOT_ID_BASE // CHUNK_PAGES)
        if nchunks < 2:
            raise ValueError("region too small for TX payload chunks")
        self.chunk_views = []
        self.chunk_ref0: list[int] = []  # refs of a chunk's pages are consecutive
        self.req_tmpl: list[memoryview] = []
        self.gnt_tmpl: list[memoryview] = []
        for c in range(nchunks):
            p0 = first_page + c * CHUNK_PAGES
            f0 = lay.payload_page + p0
            ref0 = RESERVED_REFS + p0
            self.chunk_views.append(region.buf[f0 * PAGE_SIZE:(f0 + CHUNK_PAGES) * PAGE_SIZE])
            self.chunk_ref0.append(ref0)
            flag = GREF_PERSISTENT if persistent else 0
            self.req_tmpl.append(memoryview(b"".join(
                TX_REQUEST.pack((ref0 + p) | flag, 0, NETTXF_more_data, c * CHUNK_PAGES + p,
                                PAGE_SIZE) for p in range(CHUNK_PAGES))))
            entries = b"".join(GRANT_ENTRY.pack(_RO, backend_domid, f0 + p)
                               for p in range(CHUNK_PAGES))
            self.gnt_tmpl.append(memoryview(entries))
            if persistent:  # granted once, for the life of the connection
                region.grants.buf[ref0 * 8:(ref0 + CHUNK_PAGES) * 8] = entries
        self.free_chunks = list(range(nchunks))
        self.chunk_out = [0] * nchunks  # fragment responses still awaited per chunk
        self.chunk_used = [0] * nchunks  # pages granted per chunk (to revoke)
        self.busy = bytearray(1 << 16)  # ids in flight: a response for any other is a lie
        self.vnet = bytearray(VNET_HDR.size)
        self.stopped = False

    def can_send(self) -> bool:
        return (self.ring.free_requests() >= MAX_SLOTS_PER_PACKET + 1 and bool(self.free_chunks)
                and bool(self.slots.free))

    def _put(self, prod: int, src: memoryview) -> None:
        """Copy whole requests from a template onto the ring at ``prod`` (it may wrap)."""
        ring = self.ring
        pos = prod & ring.mask
        room = (ring.size - pos) * _SLOT
        at = HEADER_SIZE + pos * _SLOT
        if len(src) <= room:
            self.buf[at:at + len(src)] = src
        else:
            self.buf[at:at + room] = src[:room]
            self.buf[HEADER_SIZE:HEADER_SIZE + len(src) - room] = src[room:]

    def pump(self, budget: int = 64) -> int:
        """Move up to ``budget`` frames from the TAP onto the ring (not yet pushed).

        The hottest loop of the frontend (and, in a guest under TCG, of the whole guest): no
        method calls, no allocations but the iovec list reuse, counters summed per batch."""
        ring, buf, mask = self.ring, self.buf, self.ring.mask
        st, vnet, busy = self.stats, self.vnet, self.busy
        free_slots, free_chunks = self.slots.free, self.free_chunks
        slot_views, chunk_views = self.slots.views, self.chunk_views
        chunk_ref0, req_tmpl = self.chunk_ref0, self.req_tmpl
        hs, ss = self.header_slots, self.slots.slot_size
        grant = not self.persistent
        pbit = 0 if grant else GREF_PERSISTENT
        gbuf = self.grants.buf
        readv, tap, unpack_vnet = os.readv, self.tap_fd, VNET_HDR.unpack_from
        room_needed = ring.size - MAX_SLOTS_PER_PACKET - 1
        xen_gso = self.xen_gso
        # without the backend's feature-sg a packet is one data slot (after its header slot)
        one_slot = MAX_PACKET if self.sg else (ss if hs else 0) + PAGE_SIZE
        iov = [vnet, None, None] if hs else [vnet, None]
        sent = nbytes = slots = 0
        while sent < budget:
            prod = start = ring.req_prod_pvt
            if (prod - ring.rsp_cons) & MASK32 > room_needed or not free_chunks \
                    or not free_slots:
                if not self.stopped:
                    self.stopped = True
                    st.queue_stops += 1
                break
            chunk = free_chunks[-1]
            if hs:
                slot = free_slots[-1]
                iov[1] = slot_views[slot]
                iov[2] = chunk_views[chunk]
            else:
                iov[1] = chunk_views[chunk]
            try:
                length = readv(tap, iov) - VNET_HDR.size
            except BlockingIOError:
                break
            if not 0 < length <= MAX_PACKET:  # netif's size is 16 bits; the TAP is capped
                st.drops += 1
                st.drops_error += 1
                continue
            vflags, vgso, _hl, gso_size, _cs, _co, _nb = unpack_vnet(vnet)
            flags = _TX_FLAGS[vflags & 3]
            xgso = xen_gso[vgso & 7]
            if xgso is None or length > one_slot:
                # a GSO kind netif cannot carry (UDP) or the backend did not offer, or more
                # slots than it accepts: the TAP's offloads should have prevented it
                st.drops += 1
                st.drops_not_negotiated += 1
                continue
            if xgso:
                flags |= NETTXF_extra_info
            base = chunk * CHUNK_PAGES
            if hs:  # first request: the header slot
                free_slots.pop()
                rest = length - ss if length > ss else 0
                sid = SLOT_ID_BASE + slot
                busy[sid] = 1
                _pack_req(buf, _HDR + (prod & mask) * _SLOT, slot * ss, 0,
                          flags | NETTXF_header_slot | (NETTXF_more_data if rest else 0),
                          sid, length)
                npages = -(-rest // PAGE_SIZE)
                first = 0
            else:  # first request: the chunk's first page, sized as the whole packet
                npages = -(-length // PAGE_SIZE)
                _pack_req(buf, _HDR + (prod & mask) * _SLOT, chunk_ref0[chunk] | pbit, 0,
                          flags | (NETTXF_more_data if npages > 1 else 0), base, length)
                rest = length - PAGE_SIZE
                first = 1
            prod += 1
            if xgso:
                _pack_extra(buf, _HDR + (prod & mask) * _SLOT, XEN_NETIF_EXTRA_TYPE_GSO, 0,
                            gso_size, xgso, 0, 0)
                prod += 1
            if npages:
                nfrag = npages - first
                if nfrag:  # the chunk's template, then the real size of the last page
                    self._put(prod, req_tmpl[chunk][first * _SLOT:npages * _SLOT])
                    prod += nfrag
                    _pack_req(buf, _HDR + ((prod - 1) & mask) * _SLOT,
                              (chunk_ref0[chunk] + npages - 1) | pbit, 0, 0,
                              base + npages - 1, rest - (nfrag - 1) * PAGE_SIZE)
                busy[base:base + npages] = _ONES[:npages]
                if grant:  # GrantTable.grant for every page used, as one copy
                    r0 = chunk_ref0[chunk] * 8
                    gbuf[r0:r0 + npages * 8] = self.gnt_tmpl[chunk][:npages * 8]
                free_chunks.pop()
                self.chunk_out[chunk] = npages
                self.chunk_used[chunk] = npages
            ring.req_prod_pvt = prod & MASK32
            slots += prod - start
            nbytes += length
            sent += 1
        st.slots_consumed += slots
        st.tx_packets += sent
        st.tx_bytes += nbytes
        if hs:
            st.tx_header_slot_packets += sent
        return sent

    def reap(self) -> int:
        """Consume responses: release header slots, chunks (revoking their grants) and ids."""
        ring = self.ring
        busy, chunk_out = self.busy, self.chunk_out
        free_slots = self.slots.free
        st = self.stats
        done = 0
        while True:
            n = ring.unconsumed_responses()
            if not n:
                return done
            cons = ring.rsp_cons
            pos = cons & ring.mask
            first = min(n, ring.size - pos)  # the responses up to the wrap, then the rest
            ids = self.r16[32 + 6 * pos:32 + 6 * (pos + first):6].tolist()
            sts = self.r16s[33 + 6 * pos:33 + 6 * (pos + first):6].tolist()
            if first < n:
                ids += self.r16[32:32 + 6 * (n - first):6].tolist()
                sts += self.r16s[33:33 + 6 * (n - first):6].tolist()
            finished = []
            for rid, status in zip(ids, sts, strict=True):
                if status == XEN_NETIF_RSP_NULL:
                    continue
                if not busy[rid]:
                    raise BackendError(f"tx response for id {rid} that is not in flight")
                busy[rid] = 0
                if rid >= SLOT_ID_BASE:
                    free_slots.append(rid - SLOT_ID_BASE)
                else:
                    c = rid // CHUNK_PAGES
                    chunk_out[c] -= 1
                    if not chunk_out[c]:
                        finished.append(c)
                if status != XEN_NETIF_RSP_OKAY:
                    st.drops += 1
                done += 1
            for c in finished:
                self._release_chunk(c)
            ring.rsp_cons = (cons + n) & MASK32
            st.slots_released += n
            if self.stopped and self.can_send():
                self.stopped = False

    def _release_chunk(self, c: int) -> None:
        """All of a chunk's pages are answered: revoke their grants (refused if in use)."""
        if not self.persistent:
            used = self.chunk_used[c]
            r0 = self.chunk_ref0[c]
            # GTF_reading/GTF_writing are the only flag bits >= 8: one max() checks them all
            if max(self.grants.flags[r0 * 4:(r0 + used) * 4:4]) >= GTF_reading:
                raise BackendError(f"backend still holds a grant of chunk {c}")
            self.grants.buf[r0 * 8:(r0 + used) * 8] = _ZEROS[:used * 8]
        self.free_chunks.append(c)

    def arm_completions(self) -> bool:
        """Before sleeping: ask for a TX-completion kick only when the queue is stopped.

        Like virtio-net's TX (no completion interrupts; old buffers are freed on the next
        transmit), a running queue reaps completions whenever it wakes anyway; a wake-up per
        completion batch is what costs most in a guest. So rsp_event is parked half the index
        space away unless the queue is stopped, when it is armed as RING_FINAL_CHECK does.
        The loop's idle timeout (``REAP_INTERVAL``) reaps what is left, so at rest nothing
        stays in flight. True if responses are waiting now."""
        ring = self.ring
        if self.stopped:
            return ring.final_check_for_responses()
        ring.idx[RSP_EVENT] = (ring.rsp_cons + 0x80000000) & MASK32
        return ring.unconsumed_responses() > 0

    def in_flight(self) -> int:
        return (self.ring.req_prod_pvt - self.ring.rsp_cons) & MASK32

    def header_slots_in_use(self) -> int:
        return self.slots.in_use
