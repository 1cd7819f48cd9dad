"""Netback TX: frontend requests -> sk_buff-equivalents -> the vif (Linux ``netback.c``).

Per packet: validate every slot before using it (``xenvif_count_requests``/``xenvif_get_extras``
checks: slots published, ids not reused while pending, offsets inside a page, at most 18 slots
and fatal at 20, grants valid for this domain, header-slot offsets inside the header area);
copy the header (from the persistently mapped header slot, or by a grant copy from the first
payload grant when header slots are off) and answer the header slot at once; attach payload
fragments *unmapped* (``lazy``), mapped (``map``) or copied (``copy``); filter; hand the
fragments to the vif as iovecs. The skb destructor queues fragment ids for release and the
action loop turns them into responses (``xenvif_idx_release`` -> ``make_tx_response``).
"""

from __future__ import annotations

import os

from backend.gntmap import GntMap
from backend.skb import SkBuff
from shared.grant import GRANT_ENTRY, GTF_permit_access
from shared.netif import (
    EXTRA_INFO,
    FATAL_SKB_SLOTS,
    MAX_FRAME,
    MAX_SKB_FRAGS,
    MAX_SLOTS_PER_PACKET,
    PAGE_SIZE,
    RING_SIZE,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_RSP_ERROR,
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
    VNET_HDR,
    XEN_TO_VIRTIO_GSO,
    checksum_setup,
)
from shared.region import Region
from shared.ring import HEADER_SIZE, MASK32, BackRing
from shared.slots import HeaderSlots, SlotError
from shared.stats import RingStats

TX_MODES = ("lazy", "map", "copy")
#: XEN_NETBACK_TX_COPY_LEN: what a grant copy pulls into the linear area without header slots
TX_COPY_LEN = 128
_unpack_req = TX_REQUEST.unpack_from
_pack_rsp = TX_RESPONSE.pack_into
_unpack_extra = EXTRA_INFO.unpack_from
_unpack_gnt = GRANT_ENTRY.unpack_from
_HDR, _SLOT = HEADER_SIZE, TX_REQUEST.size  # entry(idx), inlined in hot loops


class FatalTxError(Exception):
    """xenvif_fatal_tx_err: this frontend is broken or hostile; disconnect it."""


class TxPath:
    """The TX ring of one connection and the vif it feeds."""

    def __init__(self, region: Region, gntmap: GntMap, vif_fd: int, stats: RingStats,
                 mode: str, header_slots: bool, pkt_filter=None) -> None:
        if mode not in TX_MODES:
            raise ValueError(f"tx mode {mode!r}: must be one of {', '.join(TX_MODES)}")
        self.ring = BackRing(region.tx_ring, TX_REQUEST.size)
        self.buf = self.ring.buf
        self.mem = region.buf
        self.hdr = region.hdr
        self.slots = HeaderSlots(region.hdr, region.layout.hdr_slot_size, region.layout.hdr_slots)
        self.gntmap = gntmap
        self.vif_fd = vif_fd
        self.stats = stats
        self.mode = mode
        self.header_slots = header_slots
        self.filter = pkt_filter
        self.pending = bytearray(RING_SIZE)  # request id -> slot not yet answered
        self.dealloc: list[int] = []  # ids released by skb destructors, + NULL counts
        self.vnet = bytearray(VNET_HDR.size)
        self.gnt_buf = region.grants.buf
        self.gnt_count = region.grants.count
        self.frames = region.layout.payload_frames

    # --- the action loop ------------------------------------------------------------------
    def action(self, budget: int = 64) -> bool:
        """Consume up to ``budget`` packets; answer released slots. True if work remains."""
        ring = self.ring
        for _ in range(budget):
            avail = ring.unconsumed_requests()
            if not avail:
                break
            skb = self._build(avail)
            if skb is not None:
                self._submit(skb)
        self._flush_dealloc()
        return ring.unconsumed_requests() > 0

    def push(self) -> bool:
        """Publish responses; True if the frontend asked to be notified."""
        return self.ring.push_responses()

    # --- building an skb from the ring ------------------------------------------------------
    def _take_id(self, rid: int) -> None:
        if rid >= RING_SIZE:
            raise FatalTxError(f"request id {rid} out of range")
        if self.pending[rid]:
            raise FatalTxError(f"request id {rid} reused while pending")
        self.pending[rid] = 1

    def _build(self, avail: int) -> SkBuff | None:
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        cons = ring.req_cons
        gref, off, flags, rid, size = _unpack_req(buf, entry(cons))
        idx = cons + 1
        gso_type = gso_size = extras = 0
        if flags & NETTXF_extra_info:
            more = True
            while more:
                if idx - cons >= avail:
                    raise FatalTxError("missing extra info")
                etype, eflags, gsize, gtype, _pad, _feat = _unpack_extra(buf, entry(idx))
                idx += 1
                extras += 1
                if etype != XEN_NETIF_EXTRA_TYPE_GSO or extras > 1:
                    raise FatalTxError(f"bad extra info type {etype}")
                if gtype not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6) \
                        or not gsize:
                    raise FatalTxError(f"bad GSO type {gtype} size {gsize}")
                gso_type, gso_size = gtype, gsize
                more = eflags & XEN_NETIF_EXTRA_FLAG_MORE
        self._take_id(rid)
        pending, mask = self.pending, ring.mask
        frags: list[tuple[int, int, int, int]] = []
        fflags = flags
        total_frags = 0
        while fflags & NETTXF_more_data:
            if idx - cons >= avail:
                raise FatalTxError("packet asks for more slots than were published")
            if len(frags) + 2 >= FATAL_SKB_SLOTS:
                raise FatalTxError(f"packet uses {FATAL_SKB_SLOTS} or more slots")
            fgref, foff, fflags, fid, fsize = _unpack_req(buf, _HDR + (idx & mask) * _SLOT)
            idx += 1
            if foff + fsize > PAGE_SIZE:
                raise FatalTxError(f"fragment crosses a page boundary ({foff}+{fsize})")
            if fid >= RING_SIZE or pending[fid]:
                self._take_id(fid)  # raises with the reason
            pending[fid] = 1
            frags.append((fgref, foff, fid, fsize))
            total_frags += fsize
        slots = (idx - cons) & MASK32
        ring.req_cons = idx & MASK32
        st = self.stats
        st.slots_consumed += slots
        first_len = size - total_frags
        if first_len <= 0:
            raise FatalTxError(f"fragments ({total_frags} B) bigger than the packet ({size} B)")
        if len(frags) + 1 > MAX_SLOTS_PER_PACKET or size > MAX_FRAME or size < 14:
            # Linux drops such packets (not fatal below fatal_skb_slots)
            self._drop(rid, [f[2] for f in frags], extras)
            return None
        skb = SkBuff(b"", self._destructor)
        skb.size = size
        if flags & NETTXF_header_slot:
            if not self.header_slots:
                raise FatalTxError("header-slot request without feature-header-slots")
            try:
                start = self.slots.check(gref, off, first_len)
            except SlotError as e:
                raise FatalTxError(str(e)) from e
            skb.head = bytes(self.hdr[start:start + first_len])
            st.copy_bytes += first_len
            st.tx_header_slot_packets += 1
            self._respond(rid, XEN_NETIF_RSP_OKAY, extras)  # header slot released at once
        else:
            if off + first_len > PAGE_SIZE:
                raise FatalTxError(f"first slot crosses a page boundary ({off}+{first_len})")
            copy = min(first_len, TX_COPY_LEN)
            skb.head = self.gntmap.copy_from(gref, off, copy)
            if copy == first_len:
                self._respond(rid, XEN_NETIF_RSP_OKAY, extras)
            else:  # the rest of the first slot is the first fragment
                frags.insert(0, (gref, off + copy, rid, first_len - copy))
                skb.extras = extras  # its NULL answers follow it when it is released
        if flags & NETTXF_csum_blank:
            skb.csum_blank = True
        if flags & NETTXF_data_validated:
            skb.data_validated = True
        skb.gso_type, skb.gso_size = gso_type, gso_size
        self._attach(skb, frags)
        return skb

    def _attach(self, skb: SkBuff, frags: list[tuple[int, int, int, int]]) -> None:
        gntmap, st = self.gntmap, self.stats
        st.tx_frags += len(frags)
        if len(frags) > MAX_SKB_FRAGS:
            st.tx_frag_overflow += 1
        if self.mode == "copy":
            parts = [skb.head]
            for i, (gref, off, fid, fsize) in enumerate(frags):
                parts.append(gntmap.copy_from(gref, off, fsize))
                self.dealloc.append(fid)
                if i == 0 and skb.extras:
                    self.dealloc.extend([-1] * skb.extras)
            skb.head = b"".join(parts)
            skb.extras = 0
            return
        check = gntmap.check
        table, count, dom = self.gnt_buf, self.gnt_count, gntmap.domid
        lo, hi = self.frames.start, self.frames.stop
        out = skb.frags
        ids = skb.ids
        for gref, off, fid, fsize in frags:
            # gnttab check inlined for the common case; anything unusual takes the full path
            if gref < count:
                gflags, gdom, frame = _unpack_gnt(table, gref << 3)
                if not (gflags & GTF_permit_access and gdom == dom and lo <= frame < hi):
                    frame = check(gref)
            else:
                frame = check(gref)
            out.append((gref, frame, off, fsize))
            ids.append(fid)
        if self.mode == "map":
            for gref, *_ in out:
                gntmap.map(gref)
                skb.mapped.append(gref)

    # --- handing to the vif -------------------------------------------------------------
    def _submit(self, skb: SkBuff) -> None:
        st = self.stats
        size = skb.size
        st.tx_packets += 1
        st.tx_bytes += size
        if skb.frags:
            st.tx_zerocopy_sent += 1
        if self.filter is not None and self.filter.drops(skb, self.gntmap):
            st.drops += 1
            st.drops_filtered += 1
            skb.free()
            return
        head = skb.head
        vflags = 0
        cstart = coff = 0
        if skb.csum_blank:
            setup = checksum_setup(head)
            if setup is not None:
                vflags = VIRTIO_NET_HDR_F_NEEDS_CSUM
                cstart, coff = setup
        elif skb.data_validated:
            vflags = VIRTIO_NET_HDR_F_DATA_VALID
        VNET_HDR.pack_into(self.vnet, 0, vflags, XEN_TO_VIRTIO_GSO[skb.gso_type], 0,
                           skb.gso_size, cstart, coff, 0)
        iov = [self.vnet, head]
        mem = self.mem
        start = end = -1
        for _gref, frame, off, fsize in skb.frags:  # merge physically contiguous fragments
            a = frame * PAGE_SIZE + off
            if a == end:
                end += fsize
                continue
            if end >= 0:
                iov.append(mem[start:end])
            start, end = a, a + fsize
        if end >= 0:
            iov.append(mem[start:end])
        try:
            os.writev(self.vif_fd, iov)
            skb.transmitted = True
        except OSError:  # vif down or queue full: the packet is dropped, slots still released
            st.drops += 1
            st.drops_error += 1
        skb.free()

    # --- releasing slots ----------------------------------------------------------------
    def _destructor(self, skb: SkBuff) -> None:
        """Runs when the skb is freed: unmap what was touched, queue fragment slots."""
        st = self.stats
        gntmap = self.gntmap
        touched = len(skb.mapped)
        for gref in skb.mapped:
            gntmap.unmap(gref)
        if skb.frags:
            if self.mode == "lazy":
                st.grant_maps_avoided += len(skb.frags) - touched
                if touched:
                    st.tx_zerocopy_fail += 1
                else:
                    st.tx_zerocopy_success += 1
            else:
                st.tx_zerocopy_success += 1
        dealloc = self.dealloc
        if skb.extras:  # NULL answers owed after the first id (stock first slot only)
            dealloc.append(skb.ids[0])
            dealloc.extend([-1] * skb.extras)
            dealloc.extend(skb.ids[1:])
        else:
            dealloc.extend(skb.ids)

    def _flush_dealloc(self) -> None:
        """Answer released slots in release order; -1 stands for an extra's NULL answer."""
        d = self.dealloc
        if not d:
            return
        ring, buf, pending, mask = self.ring, self.buf, self.pending, self.ring.mask
        prod = ring.rsp_prod_pvt
        for rid in d:
            if rid >= 0:
                _pack_rsp(buf, _HDR + (prod & mask) * _SLOT, rid, XEN_NETIF_RSP_OKAY)
                pending[rid] = 0
            else:
                _pack_rsp(buf, _HDR + (prod & mask) * _SLOT, 0, XEN_NETIF_RSP_NULL)
            prod += 1
        ring.rsp_prod_pvt = prod & MASK32
        self.stats.slots_released += len(d)
        d.clear()

    def _respond(self, rid: int, status: int, nulls: int) -> None:
        """make_tx_response: the answer for ``rid`` then a NULL per extra-info slot."""
        ring, buf = self.ring, self.buf
        prod = ring.rsp_prod_pvt
        _pack_rsp(buf, ring.entry(prod), rid, status)
        for i in range(1, nulls + 1):
            _pack_rsp(buf, ring.entry(prod + i), 0, XEN_NETIF_RSP_NULL)
        ring.rsp_prod_pvt = (prod + 1 + nulls) & MASK32
        self.pending[rid] = 0
        self.stats.slots_released += 1 + nulls

    def _drop(self, rid: int, fids: list[int], extras: int) -> None:
        st = self.stats
        st.drops += 1
        st.drops_error += 1
        self._respond(rid, XEN_NETIF_RSP_ERROR, extras)
        for fid in fids:
            self._respond(fid, XEN_NETIF_RSP_ERROR, 0)

    def release_all(self) -> None:
        """Disconnect: nothing is left in flight (transmission is synchronous)."""
        self._flush_dealloc()
