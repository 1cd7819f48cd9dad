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

import functools
import logging
import os
import struct
import time
from array import array

from backend.capture import NO_CAPTURE
from backend.gntmap import GntMap
from backend.pull import HEADER_PULL_MAX, pull_headers
from backend.skb import SkBuff
from shared.faults import PeerFault
from shared.grant import GRANT_ENTRY, GrantError, GTF_in_use, GTF_permit_access, entries
from shared.headers import CSUM_OFFSET
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
)
from shared.region import Region
from shared.ring import HEADER_SIZE, MASK32, BackRing
from shared.slots import HeaderSlots, SlotError
from shared.stats import RingStats
from shared.xenbus import Agreement, NotNegotiated, gso_accepted

log = logging.getLogger("netback")
TX_MODES = ("lazy", "map", "copy")
#: drop log lines per second per connection
LOG_PER_SECOND = 10
#: SkBuff.hold_flags of fragments attached but not held (copy mode, before the copy)
NOT_HELD = -2
_unpack_req = TX_REQUEST.unpack_from
_pack_rsp = TX_RESPONSE.pack_into
_unpack_extra = EXTRA_INFO.unpack_from
_unpack_gnt = GRANT_ENTRY.unpack_from
#: a packet's fragments as columns: grefs, offsets, request ids, sizes
Frags = tuple[list[int], list[int], list[int], list[int]]
_HDR, _SLOT = HEADER_SIZE, TX_REQUEST.size  # entry(idx), inlined in hot loops
_OKAYS = array("H", [XEN_NETIF_RSP_OKAY] * RING_SIZE)


@functools.cache
def _reqs(n: int) -> struct.Struct:
    """n consecutive tx_requests, unpacked in one call."""
    return struct.Struct("<" + "IHHHH" * n)


#: why a TX packet was dropped (RingStats counter drops_<reason>); Linux drops these without
#: disconnecting: 19 or 20 follow-on slots, a size outside the frame limits, headers that cannot
#: be pulled within HEADER_PULL_MAX, a csum_blank frame whose checksum cannot be set up
DROP_REASONS = ("slots", "size", "headers", "csum", "vif")
#: why a frontend was disconnected (Netback counter fatal_<reason>)
FATAL_REASONS = ("slots_unpublished", "too_many_slots", "page_boundary", "id_reused",
                 "extra_info", "size", "header_slot", "grant", "tx_malformed")


class FatalTxError(PeerFault):
    """xenvif_fatal_tx_err: this frontend is broken or hostile; disconnect it. ``reason`` is
    one of FATAL_REASONS (the counter), the message names the ring index and the field."""

    def __init__(self, message: str, reason: str = "tx_malformed") -> None:
        super().__init__(message)
        self.reason = reason


class TxPath:
    """The TX ring of one connection and the vif it feeds."""

    def __init__(self, region: Region, gntmap: GntMap, vif_fd: int, stats: RingStats,
                 mode: str, header_slots: bool, pkt_filter=None,
                 agreement: Agreement | None = None) -> None:
        if mode not in TX_MODES:
            raise ValueError(f"tx mode {mode!r}: must be one of {', '.join(TX_MODES)}")
        self.ring = BackRing(region.tx_ring, TX_REQUEST.size)
        self.buf = self.ring.buf
        self.hdr = region.hdr
        self.slots = HeaderSlots(region.hdr, region.layout.hdr_slot_size,
                                 region.layout.hdr_slots, allocator=False)
        self.gntmap = gntmap
        self.vif_fd = vif_fd
        self.stats = stats
        self.mode = mode
        self.header_slots = header_slots
        self.filter = pkt_filter
        self.pending = bytearray(1 << 16)  # request id (u16, opaque) -> not yet answered
        self.dealloc: list[int] = []  # ids released by skb destructors, + NULL counts
        self.vnet = bytearray(VNET_HDR.size)
        self.r16 = self.buf.cast("H")
        self.gnt_buf = region.grants.buf
        self.gnt_count = region.grants.count
        self.frames = region.layout.payload_frames
        self._log_t, self._logged = 0.0, 0
        self.capture = NO_CAPTURE  # the netback's CaptureTap (backend/capture.py)
        # what this backend offered (its netif.h keys): a request beyond it is fatal
        self.sg = agreement is None or agreement.tx_sg
        self.gso_ok = gso_accepted(agreement, rx=False)

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
    def _take_id(self, rid: int, idx: int = -1) -> None:
        if self.pending[rid]:
            raise FatalTxError(f"ring[{idx & MASK32}].id: request id {rid} reused while "
                               f"pending", "id_reused")
        self.pending[rid] = 1

    def _fast_frags(self, idx: int, limit: int) -> Frags | None:
        """Parse a packet's fragment requests in one struct call, when they are the usual
        shape (contiguous on the ring, MORE_DATA on all but the last, offsets 0, whole pages,
        fresh ids); None sends the packet to ``_slow_frags``, which checks one by one."""
        ring = self.ring
        pos = idx & ring.mask
        k = min(limit, ring.size - pos, MAX_SLOTS_PER_PACKET)  # longer: the slow path
        if k <= 0:
            return None
        t = _reqs(k).unpack_from(self.buf, _HDR + pos * _SLOT)
        fl = t[2::5]
        try:
            n = fl.index(0) + 1
        except ValueError:
            return None
        if fl[:n - 1].count(NETTXF_more_data) != n - 1:
            return None
        offs, ids, sizes = list(t[1:5 * n:5]), list(t[3:5 * n:5]), list(t[4:5 * n:5])
        if offs.count(0) != n or max(sizes) > PAGE_SIZE:
            return None
        pending = self.pending
        if any(map(pending.__getitem__, ids)) or len(set(ids)) != n:
            return None
        for i in ids:
            pending[i] = 1
        return list(t[0:5 * n:5]), offs, ids, sizes

    def _slow_frags(self, idx: int, cons: int, avail: int) -> Frags:
        """One request at a time, with every check and the precise reason for a failure."""
        ring, buf = self.ring, self.buf
        grefs: list[int] = []
        offs: list[int] = []
        ids: list[int] = []
        sizes: list[int] = []
        fflags = NETTXF_more_data
        while fflags & NETTXF_more_data:
            # xenvif_count_requests, in its order: `slots` is the follow-ons already read
            if idx - cons >= avail:
                raise FatalTxError(f"ring[{idx & MASK32}]: packet asks for more slots than "
                                   f"were published", "slots_unpublished")
            if len(grefs) >= FATAL_SKB_SLOTS:
                raise FatalTxError(f"ring[{idx & MASK32}]: packet has more than "
                                   f"{FATAL_SKB_SLOTS} follow-on slots (fatal_skb_slots)",
                                   "too_many_slots")
            fgref, foff, fflags, fid, fsize = _unpack_req(buf, ring.entry(idx))
            if foff + fsize > PAGE_SIZE:
                raise FatalTxError(f"ring[{idx & MASK32}].offset+size: fragment crosses a "
                                   f"page boundary ({foff}+{fsize})", "page_boundary")
            idx += 1
            self._take_id(fid, idx - 1)
            grefs.append(fgref)
            offs.append(foff)
            ids.append(fid)
            sizes.append(fsize)
        return grefs, offs, ids, sizes

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
                    raise FatalTxError(f"ring[{idx & MASK32}]: missing extra info",
                                       "slots_unpublished")
                etype, eflags, gsize, gtype, _pad, _feat = _unpack_extra(buf, entry(idx))
                idx += 1
                extras += 1
                if etype != XEN_NETIF_EXTRA_TYPE_GSO or extras > 1:
                    raise FatalTxError(f"ring[{(idx - 1) & MASK32}].type: bad extra info "
                                       f"type {etype}", "extra_info")
                if gtype not in self.gso_ok or not gsize:
                    if gtype in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6) and gsize:
                        raise NotNegotiated(f"ring[{(idx - 1) & MASK32}].gso: GSO type {gtype} "
                                            "not negotiated (this backend did not offer its "
                                            "feature-gso key)")
                    raise FatalTxError(f"ring[{(idx - 1) & MASK32}].gso: bad GSO type "
                                       f"{gtype} size {gsize}", "extra_info")
                gso_type, gso_size = gtype, gsize
                more = eflags & XEN_NETIF_EXTRA_FLAG_MORE
        self._take_id(rid, cons)
        if flags & NETTXF_more_data:
            frags = self._fast_frags(idx, avail - (idx - cons))
            if frags is None:
                frags = self._slow_frags(idx, cons, avail)
        else:
            frags = ([], [], [], [])
        grefs, offs, ids, sizes = frags
        nfrags = len(grefs)
        if nfrags > (1 if flags & NETTXF_header_slot else 0) and not self.sg:
            raise NotNegotiated(f"packet of {nfrags + 1} slots without feature-sg")
        idx += nfrags
        total_frags = sum(sizes)
        ring.req_cons = idx & MASK32
        st = self.stats
        st.slots_consumed += (idx - cons) & MASK32
        first_len = size - total_frags
        if first_len <= 0:
            raise FatalTxError(f"ring[{cons & MASK32}].size: fragments ({total_frags} B) "
                               f"bigger than the packet ({size} B)", "size")
        if nfrags > MAX_SLOTS_PER_PACKET:  # 19 or 20 follow-ons: Linux drops, not fatal
            self._drop(rid, ids, extras, "slots",
                       f"ring[{cons & MASK32}]: {nfrags} follow-on slots "
                       f"(> {MAX_SLOTS_PER_PACKET})")
            return None
        if size > MAX_FRAME or size < 14:
            self._drop(rid, ids, extras, "size",
                       f"ring[{cons & MASK32}].size: {size} outside 14..{MAX_FRAME}")
            return None
        skb = SkBuff(b"", self._destructor)
        skb.size = size
        skb.idx = cons & MASK32
        if flags & NETTXF_header_slot:
            if not self.header_slots:
                raise NotNegotiated(f"ring[{cons & MASK32}].flags: header-slot request "
                                    "without feature-header-slots")
            try:
                start = self.slots.check(gref, off, first_len)
            except SlotError as e:
                raise FatalTxError(f"ring[{cons & MASK32}].gref: {e}", "header_slot") from e
            skb.head = bytes(self.hdr[start:start + first_len])
            st.copy_bytes += first_len
            st.tx_header_slot_packets += 1
            self._respond(rid, XEN_NETIF_RSP_OKAY, extras)  # header slot released at once
        else:
            if off + first_len > PAGE_SIZE:
                raise FatalTxError(f"ring[{cons & MASK32}].offset+size: first slot crosses a "
                                   f"page boundary ({off}+{first_len})", "page_boundary")
            # the first slot is the first fragment: its grant is resolved with the others
            # (once), and the header pull copies its head out of it
            grefs.insert(0, gref)
            offs.insert(0, off)
            ids.insert(0, rid)
            sizes.insert(0, first_len)
            skb.extras = extras  # its NULL answers follow it when it is released
        if flags & NETTXF_csum_blank:
            skb.csum_blank = True
        if flags & NETTXF_data_validated:
            skb.data_validated = True
        skb.gso_type, skb.gso_size = gso_type, gso_size
        if grefs:
            try:
                self._attach(skb, grefs, offs, ids, sizes)
            except GrantError as e:  # fatal (fatal_grant): say which packet
                raise GrantError(f"ring[{cons & MASK32}..{(idx - 1) & MASK32}].gref: {e}") \
                    from e
        if not pull_headers(skb, self.gntmap.pull):
            self._drop_skb(skb, "headers", f"ring[{cons & MASK32}]: headers run past "
                                           f"{HEADER_PULL_MAX} bytes")
            return None
        if self.mode == "copy" and skb.grefs:
            self._copy_rest(skb)
        return skb

    def _copy_rest(self, skb: SkBuff) -> None:
        """Copy mode: the CPU copies what the header pull left (map, copy through the CPU
        view, unmap) and the slots are released at once; the skb keeps no fragment."""
        gntmap = self.gntmap
        parts = [skb.head]
        for gref, frame, off, size in zip(skb.grefs, skb.frames, skb.offs, skb.sizes,
                                          strict=True):
            gntmap.map(gref, frame)
            parts.append(bytes(gntmap.page(frame)[off:off + size]))
            gntmap.unmap(gref, frame)
        self.stats.copy_bytes += sum(skb.sizes)
        skb.head = b"".join(parts)
        ids = skb.ids
        self.dealloc.append(ids[0])
        self.dealloc.extend([-1] * skb.extras)
        self.dealloc.extend(ids[1:])
        skb.extras = 0
        skb.grefs, skb.frames, skb.offs, skb.sizes, skb.ids = [], [], [], [], []

    def _drop_skb(self, skb: SkBuff, reason: str, why: str) -> None:
        """Drop a built packet (its slots are released by its destructor, as Linux's
        kfree_skb after a failed checksum_setup): counted, logged, the connection lives on."""
        st = self.stats
        st.drops += 1
        st.drops_error += 1
        setattr(st, f"drops_{reason}", getattr(st, f"drops_{reason}") + 1)
        self.log_drop(reason, why)
        skb.free()

    def _frames(self, grefs: list[int]) -> tuple[list[int], int]:
        """Check every fragment's grant; the frames they grant, and the entries' common flags
        when they are consecutive and alike (else -1). Consecutive grefs (how netfront grants
        a chunk) are read with one unpack; anything unusual takes the full per-grant check,
        which also says precisely what is wrong."""
        n = len(grefs)
        g0 = grefs[0]
        gntmap = self.gntmap
        if n > 1 and g0 + n <= self.gnt_count and grefs[-1] == g0 + n - 1 \
                and grefs == list(range(g0, g0 + n)):
            e = entries(n).unpack_from(self.gnt_buf, g0 << 3)
            fl, doms, frames = e[0::3], e[1::3], list(e[2::3])
            if fl[0] & GTF_permit_access and not fl[0] & GTF_in_use and fl.count(fl[0]) == n \
                    and doms.count(gntmap.domid) == n and min(frames) >= self.frames.start \
                    and max(frames) < self.frames.stop:
                return frames, fl[0]
        check = gntmap.check
        table, count, dom = self.gnt_buf, self.gnt_count, gntmap.domid
        lo, hi = self.frames.start, self.frames.stop
        out = []
        for gref in grefs:
            if gref < count:
                gflags, gdom, frame = _unpack_gnt(table, gref << 3)
                if not (gflags & GTF_permit_access and gdom == dom and lo <= frame < hi):
                    frame = check(gref)
            else:
                frame = check(gref)
            out.append(frame)
        return out, -1

    def _attach(self, skb: SkBuff, grefs: list[int], offs: list[int], ids: list[int],
                sizes: list[int]) -> None:
        gntmap, st = self.gntmap, self.stats
        n = len(grefs)
        st.tx_frags += n
        if n > MAX_SKB_FRAGS:
            st.tx_frag_overflow += 1
        frames, flags0 = self._frames(grefs)
        if self.mode == "copy":  # copied by ``_copy_rest`` once the header pull is done
            skb.grefs, skb.frames, skb.offs, skb.sizes = grefs, frames, offs, sizes
            skb.ids = ids
            skb.hold_flags = NOT_HELD
            return
        skb.hold_flags = gntmap.hold(grefs, frames, flags0)  # GTF_reading until freed
        skb.grefs, skb.frames, skb.offs, skb.sizes, skb.ids = grefs, frames, offs, sizes, ids
        if self.mode == "map":
            for gref, frame in zip(grefs, frames, strict=True):
                gntmap.map(gref, frame)
            skb.mapped.extend(range(n))

    # --- handing to the vif -------------------------------------------------------------
    def _submit(self, skb: SkBuff) -> None:
        st = self.stats
        size = skb.size
        st.tx_packets += 1
        st.tx_bytes += size
        if size > len(skb.head):  # payload left in the fragments (Linux: the skb has frags)
            skb.zc = True
            st.tx_zerocopy_sent += 1
        vflags = 0
        cstart = coff = 0
        if skb.csum_blank:  # checksum_setup on the pulled headers; Linux drops on failure
            h = skb.hdrs
            if h is None or h.l4 is None or h.fragment:
                self._drop_skb(skb, "csum", f"ring[{skb.idx}].flags: csum_blank frame "
                               "without a TCP/UDP header "
                               f"({'fragment' if h and h.fragment else 'not TCP/UDP'})")
                return
            vflags = VIRTIO_NET_HDR_F_NEEDS_CSUM
            cstart, coff = h.l4, CSUM_OFFSET[h.ip_proto]
        elif skb.data_validated:
            vflags = VIRTIO_NET_HDR_F_DATA_VALID
        VNET_HDR.pack_into(self.vnet, 0, vflags, XEN_TO_VIRTIO_GSO[skb.gso_type], 0,
                           skb.gso_size, cstart, coff, 0)
        if self.filter is not None and self.filter.drops(skb, self.gntmap):
            st.drops += 1
            st.drops_filtered += 1
            self.log_drop("filtered", f"ring[{skb.idx}]: a filter rule matched")
            skb.free()
            return
        if skb.linear is not None:  # a payload rule judged this copy: it is what is sent
            iov = [self.vnet, skb.linear]
        else:
            iov = [self.vnet, skb.head]
            if skb.frames:
                self.gntmap.tx_iovecs(skb.grefs, skb.frames, skb.offs, skb.sizes, iov)
        try:
            os.writev(self.vif_fd, iov)
            skb.transmitted = True
        except OSError as e:  # vif down or queue full: dropped, slots still released
            st.drops += 1
            st.drops_error += 1
            st.drops_vif += 1
            self.log_drop("vif", f"ring[{skb.idx}]: vif write failed: {e}")
        if self.capture.on and skb.transmitted:
            self.capture.out(skb, self.gntmap)
        skb.free()

    # --- releasing slots ----------------------------------------------------------------
    def _destructor(self, skb: SkBuff) -> None:
        """Runs when the skb is freed: unmap what was touched, release the grants' in-use
        bits (nothing reads them any more), queue fragment slots."""
        st = self.stats
        n = len(skb.grefs)
        if n and skb.hold_flags != NOT_HELD:
            gntmap = self.gntmap
            if skb.mapped:
                grefs, frames = skb.grefs, skb.frames
                for i in skb.mapped:
                    gntmap.unmap(grefs[i], frames[i])
            gntmap.release(skb.grefs, skb.hold_flags)
            touched = len(skb.mapped)
            if self.mode == "lazy":
                st.grant_maps_avoided += n - touched
            if skb.zc:  # handed over by reference (not dropped first, not all in the head)
                if skb.linear is not None or (touched and self.mode == "lazy"):
                    st.tx_zerocopy_fail += 1  # the payload was read (and its copy sent)
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
        """Answer released slots in release order; -1 stands for an extra's NULL answer.
        Ids and statuses go onto the ring as two strided copies, not a pack per answer."""
        d = self.dealloc
        if not d:
            return
        ring, pending = self.ring, self.pending
        prod = ring.rsp_prod_pvt
        n = len(d)
        if -1 in d:  # rare (stock slots with extras): one at a time
            buf, mask = self.buf, ring.mask
            for i, rid in enumerate(d):
                at = _HDR + ((prod + i) & mask) * _SLOT
                if rid >= 0:
                    _pack_rsp(buf, at, rid, XEN_NETIF_RSP_OKAY)
                else:
                    _pack_rsp(buf, at, 0, XEN_NETIF_RSP_NULL)
        else:
            r16 = self.r16  # response id at u16 index 32 + 6 * slot, status at 33 + 6 * slot
            pos = prod & ring.mask
            first = min(n, ring.size - pos)
            ids = array("H", d)
            r16[32 + 6 * pos:32 + 6 * (pos + first):6] = ids[:first]
            r16[33 + 6 * pos:33 + 6 * (pos + first):6] = _OKAYS[:first]
            if first < n:
                r16[32:32 + 6 * (n - first):6] = ids[first:]
                r16[33:33 + 6 * (n - first):6] = _OKAYS[:n - first]
        for rid in d:
            if rid >= 0:
                pending[rid] = 0
        ring.rsp_prod_pvt = (prod + n) & MASK32
        self.stats.slots_released += n
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

    def _drop(self, rid: int, fids: list[int], extras: int, reason: str, why: str) -> None:
        """Linux's xenvif_tx_err: answer every slot of the packet with an error; the
        connection lives on. Counted as drops, drops_error and drops_<reason>."""
        st = self.stats
        st.drops += 1
        st.drops_error += 1
        setattr(st, f"drops_{reason}", getattr(st, f"drops_{reason}") + 1)
        self.log_drop(reason, why)
        self._respond(rid, XEN_NETIF_RSP_ERROR, extras)
        for fid in fids:
            self._respond(fid, XEN_NETIF_RSP_ERROR, 0)

    def log_drop(self, reason: str, why: str) -> None:
        """A log line per drop, at most LOG_PER_SECOND a second (net_ratelimit): a frontend
        must not be able to turn drops into a disk-filling log."""
        now = time.monotonic()
        if now - self._log_t >= 1.0:
            self._log_t, self._logged = now, 0
        self._logged += 1
        if self._logged <= LOG_PER_SECOND:
            log.warning("tx drop (%s): %s", reason, why)

    def release_all(self) -> None:
        """Disconnect: nothing is left in flight (transmission is synchronous)."""
        self._flush_dealloc()
