"""Netfront TX: frames from the guest's TAP straight into shared memory, then onto the ring.

One ``readv`` per frame scatters it with no Python copy: the virtio_net_hdr into a scratch
buffer, the first bytes (up to the slot size) into a free header slot, the rest into a 68 KiB
payload chunk whose pages are granted one reference each. The first request carries the header
slot's offset (``NETTXF_header_slot``), an extra-info slot carries GSO, then one request per
payload page. Without header slots the frame starts in the chunk's first page, as stock netif.

Flow control: when the ring, the header slots, the chunks or the ids run short, the queue stops
(it stops polling the TAP) and restarts as responses release them.
"""

from __future__ import annotations

import os

from shared.grant import (
    GRANT_ENTRY,
    RESERVED_REFS,
    GTF_in_use,
    GTF_permit_access,
    GTF_readonly,
)
from shared.netif import (
    EXTRA_INFO,
    GREF_PERSISTENT,
    MAX_SLOTS_PER_PACKET,
    PAGE_SIZE,
    RING_SIZE,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_RSP_NULL,
    XEN_NETIF_RSP_OKAY,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_header_slot,
    NETTXF_more_data,
)
from shared.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_TO_XEN_GSO,
    VNET_HDR,
)
from shared.region import Region
from shared.ring import MASK32, FrontRing
from shared.slots import HeaderSlots
from shared.stats import RingStats

#: the largest packet netif can describe (tx_request.size is u16: XEN_NETIF_MAX_TX_SIZE)
MAX_PACKET = 0xFFFF
#: pages per payload chunk: the largest frame (64 KiB + headers) without a header slot
CHUNK_PAGES = 17
_pack_req = TX_REQUEST.pack_into
_unpack_rsp = TX_RESPONSE.unpack_from
_pack_gnt = GRANT_ENTRY.pack_into
_RO = GTF_permit_access | GTF_readonly


class BackendError(Exception):
    """The backend answered something no correct backend answers: the device is broken."""


class TxQueue:
    def __init__(self, region: Region, tap_fd: int, stats: RingStats, first_page: int,
                 header_slots: bool, persistent: bool, backend_domid: int = 0) -> None:
        lay = region.layout
        self.ring = FrontRing(region.tx_ring, TX_REQUEST.size)
        self.buf = self.ring.buf
        self.tap_fd = tap_fd
        self.stats = stats
        self.grants = region.grants
        self.header_slots = header_slots
        self.persistent = persistent
        self.domid = backend_domid
        self.slots = HeaderSlots(region.hdr, lay.hdr_slot_size, lay.hdr_slots)
        self.slot_size = lay.hdr_slot_size
        nchunks = (lay.payload_pages - first_page) // CHUNK_PAGES
        if nchunks < 2:
            raise ValueError("region too small for TX payload chunks")
        self.chunk_views = []
        self.chunk_refs: list[list[int]] = []
        self.chunk_frames: list[list[int]] = []
        for c in range(nchunks):
            p0 = first_page + c * CHUNK_PAGES
            f0 = lay.payload_page + p0
            self.chunk_views.append(region.buf[f0 * PAGE_SIZE:(f0 + CHUNK_PAGES) * PAGE_SIZE])
            refs = [RESERVED_REFS + p0 + i for i in range(CHUNK_PAGES)]
            self.chunk_frames.append([f0 + i for i in range(CHUNK_PAGES)])
            self.chunk_refs.append([r | GREF_PERSISTENT for r in refs] if persistent else refs)
            if persistent:  # granted once, for the life of the connection
                for r, f in zip(refs, self.chunk_frames[-1], strict=True):
                    self.grants.grant(r, backend_domid, f, readonly=True)
        self.free_chunks = list(range(nchunks))
        self.chunk_out = [0] * nchunks
        self.free_ids = list(range(RING_SIZE))
        self.busy = bytearray(RING_SIZE)
        self.id_slot = [-1] * RING_SIZE
        self.id_chunk = [-1] * RING_SIZE
        self.id_gref = [0] * RING_SIZE
        self.vnet = bytearray(VNET_HDR.size)
        self.stopped = False

    def can_send(self) -> bool:
        return (self.ring.free_requests() >= MAX_SLOTS_PER_PACKET + 1 and bool(self.free_chunks)
                and bool(self.slots.free) and len(self.free_ids) >= MAX_SLOTS_PER_PACKET)

    def pump(self, budget: int = 64) -> int:
        """Move up to ``budget`` frames from the TAP onto the ring (not yet pushed)."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        st, vnet = self.stats, self.vnet
        free_slots, free_chunks, free_ids = self.slots.free, self.free_chunks, self.free_ids
        slot_views = self.slots.views
        busy, id_slot, id_chunk, id_gref = self.busy, self.id_slot, self.id_chunk, self.id_gref
        hs, ss = self.header_slots, self.slot_size
        grant = not self.persistent
        gbuf, domid = self.grants.buf, self.domid
        readv, tap = os.readv, self.tap_fd
        sent = 0
        while sent < budget:
            if not self.can_send():
                if not self.stopped:
                    self.stopped = True
                    st.queue_stops += 1
                break
            chunk = free_chunks[-1]
            if hs:
                slot = free_slots[-1]
                iov = [vnet, slot_views[slot], self.chunk_views[chunk]]
            else:
                iov = [vnet, self.chunk_views[chunk]]
            try:
                length = readv(tap, iov) - VNET_HDR.size
            except BlockingIOError:
                break
            if length <= 0:
                continue
            if length > MAX_PACKET:  # netif's size field is 16 bits; the TAP is capped below
                st.drops += 1
                st.drops_error += 1
                continue
            vflags, vgso, _hl, gso_size, _cs, _co, _nb = VNET_HDR.unpack_from(vnet)
            flags = 0
            if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                flags = NETTXF_csum_blank | NETTXF_data_validated
            elif vflags & VIRTIO_NET_HDR_F_DATA_VALID:
                flags = NETTXF_data_validated
            xgso = VIRTIO_TO_XEN_GSO.get(vgso & 0x7F) if vgso else 0
            if xgso is None:  # a GSO kind netif cannot carry (UDP): the TAP never offers it
                st.drops += 1
                continue
            if xgso:
                flags |= NETTXF_extra_info
            prod = start = ring.req_prod_pvt
            rid = free_ids.pop()
            busy[rid] = 1
            if hs:
                free_slots.pop()
                hlen = length if length < ss else ss
                rest = length - hlen
                id_slot[rid] = slot
                _pack_req(buf, entry(prod), slot * ss, 0,
                          flags | NETTXF_header_slot | (NETTXF_more_data if rest else 0),
                          rid, length)
                page = 0
                st.tx_header_slot_packets += 1
            else:
                first = length if length < PAGE_SIZE else PAGE_SIZE
                rest = length - first
                id_chunk[rid] = chunk
                ref = self.chunk_refs[chunk][0]
                id_gref[rid] = ref
                if grant:
                    _pack_gnt(gbuf, ref << 3, _RO, domid, self.chunk_frames[chunk][0])
                _pack_req(buf, entry(prod), ref, 0,
                          flags | (NETTXF_more_data if rest else 0), rid, length)
                page = 1
            prod += 1
            if xgso:
                EXTRA_INFO.pack_into(buf, entry(prod), XEN_NETIF_EXTRA_TYPE_GSO, 0, gso_size,
                                     xgso, 0, 0)
                prod += 1
            if rest or not hs:
                free_chunks.pop()
                refs = self.chunk_refs[chunk]
                nfrag = page
                while rest > 0:
                    size = rest if rest < PAGE_SIZE else PAGE_SIZE
                    rest -= size
                    fid = free_ids.pop()
                    busy[fid] = 1
                    ref = refs[page]
                    id_chunk[fid] = chunk
                    id_gref[fid] = ref
                    if grant:  # GrantTable.grant, inlined
                        _pack_gnt(gbuf, ref << 3, _RO, domid, self.chunk_frames[chunk][page])
                    _pack_req(buf, entry(prod), ref, 0, NETTXF_more_data if rest else 0,
                              fid, size)
                    prod += 1
                    page += 1
                    nfrag += 1
                self.chunk_out[chunk] = nfrag
            ring.req_prod_pvt = prod & MASK32
            st.slots_consumed += prod - start
            st.tx_packets += 1
            st.tx_bytes += length
            sent += 1
        return sent

    def reap(self) -> int:
        """Consume responses: release header slots, chunks, grants and ids."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        busy, id_slot, id_chunk = self.busy, self.id_slot, self.id_chunk
        st = self.stats
        revoke = not self.persistent
        gflags = self.grants.flags
        done = 0
        while True:
            n = ring.unconsumed_responses()
            if not n:
                return done
            cons = ring.rsp_cons
            for _ in range(n):
                rid, status = _unpack_rsp(buf, entry(cons))
                cons += 1
                if status == XEN_NETIF_RSP_NULL:
                    continue
                if rid >= RING_SIZE or not busy[rid]:
                    raise BackendError(f"tx response for id {rid} that is not in flight")
                busy[rid] = 0
                slot = id_slot[rid]
                if slot >= 0:
                    id_slot[rid] = -1
                    self.slots.release(slot)
                chunk = id_chunk[rid]
                if chunk >= 0:
                    id_chunk[rid] = -1
                    if revoke:  # GrantTable.end_access, inlined
                        ref = self.id_gref[rid] << 2
                        if gflags[ref] & GTF_in_use:
                            raise BackendError(f"backend still holds gref {ref >> 2}")
                        gflags[ref] = 0
                    self.chunk_out[chunk] -= 1
                    if not self.chunk_out[chunk]:
                        self.free_chunks.append(chunk)
                self.free_ids.append(rid)
                if status != XEN_NETIF_RSP_OKAY:
                    st.drops += 1
                done += 1
            ring.rsp_cons = cons & MASK32
            st.slots_released += n
            if self.stopped and self.can_send():
                self.stopped = False

    def in_flight(self) -> int:
        return (self.ring.req_prod_pvt - self.ring.rsp_cons) & MASK32

    def header_slots_in_use(self) -> int:
        return self.slots.in_use
