"""TX request validation: a packet's requests read off the ring and checked before any use.

Linux ``xenvif_count_requests``/``xenvif_get_extras``, in their order: every slot published,
request ids not reused while pending, fragments inside a page, at most 18 follow-on slots
(19 or 20 are dropped, a 21st is fatal), one GSO extra of a negotiated type, sizes that add
up, the frame size inside Ethernet's limits, header-slot references inside the header area and
only with feature-header-slots. What this module reads is what the rest of netback uses: the
fields are copied out of the shared ring once, here, and never read from it again.

A fault of the frontend raises (``FatalTxError``, ``NotNegotiated``): the connection ends. A
packet Linux would drop comes back with ``drop`` set; its slots are answered with errors by
the caller (``TxRelease.error``).
"""

from __future__ import annotations

from shared.faults import PeerFault
from shared.protocol.netif import (
    EXTRA_INFO,
    FATAL_SKB_SLOTS,
    MAX_FRAME,
    MAX_SLOTS_PER_PACKET,
    PAGE_SIZE,
    TX_REQUEST,
    TX_REQUEST_FLAGS,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NETTXF_extra_info,
    NETTXF_header_slot,
    NETTXF_more_data,
    tx_requests,
)
from shared.protocol.ring import MASK32, BackRing
from shared.protocol.slots import HeaderSlots, SlotError
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import NotNegotiated

#: why a TX packet was dropped (RingStats counter drops_<reason>); Linux drops these without
#: disconnecting: 19 or 20 follow-on slots, a size outside the frame limits, headers that cannot
#: be pulled within HEADER_PULL_MAX, a csum_blank frame whose checksum cannot be set up; and
#: a csum_blank IPv6 frame this backend did not offer feature-ipv6-csum-offload for, a map the
#: kernel refused (backend/gntmap.MapError)
DROP_REASONS = ("slots", "size", "headers", "csum", "vif", "not_negotiated", "map")
#: why a frontend was disconnected (Netback counter fatal_<reason>)
FATAL_REASONS = ("slots_unpublished", "too_many_slots", "page_boundary", "id_reused",
                 "extra_info", "size", "header_slot", "grant", "tx_malformed")
_unpack_req = TX_REQUEST.unpack_from
#: flags of a request that is not a whole packet on its own
_NOT_LONE = NETTXF_more_data | NETTXF_extra_info
#: a header slot followed by fragments, without extra info (``slot_frag``)
_SLOT_FRAG_MASK = NETTXF_header_slot | NETTXF_more_data | NETTXF_extra_info
_SLOT_FRAG = NETTXF_header_slot | NETTXF_more_data
#: flags of a request that is not a one-fragment packet on its own (``lone_frag``)
_NOT_LONE_FRAG = NETTXF_header_slot | NETTXF_more_data | NETTXF_extra_info
_unpack_extra = EXTRA_INFO.unpack_from


class FatalTxError(PeerFault):
    """xenvif_fatal_tx_err: this frontend is broken or hostile; disconnect it. ``reason`` is
    one of FATAL_REASONS (the counter), the message names the ring index and the field."""

    def __init__(self, message: str, reason: str = "tx_malformed") -> None:
        super().__init__(message)
        self.reason = reason


class TxPacket:
    """One packet's requests as validated (reused from packet to packet: nothing is allocated
    for it per packet but the fragment columns, which the sk_buff-equivalent takes over)."""

    __slots__ = ("cons", "end", "rid", "gref", "off", "flags", "size", "first_len", "extras",
                 "gso_type", "gso_size", "grefs", "offs", "ids", "sizes", "hdr_start", "drop")

    def __init__(self) -> None:
        #: ring index of its first request, and one past its last
        self.cons = self.end = 0
        #: the first request's fields (its ``size`` is the packet's)
        self.rid = self.gref = self.off = self.flags = self.size = 0
        #: bytes of the first slot: the header slot's, or the first page's
        self.first_len = 0
        self.extras = self.gso_type = self.gso_size = 0
        #: the follow-on fragments as columns: grefs, offsets, request ids, sizes
        self.grefs: list[int] = []
        self.offs: list[int] = []
        self.ids: list[int] = []
        self.sizes: list[int] = []
        #: NETTXF_header_slot: byte offset of its bytes in the header area (-1: none)
        self.hdr_start = -1
        #: (reason, log line) if Linux would drop it (all its slots answered with an error)
        self.drop: tuple[str, str] | None = None


class TxRequests:
    """Reads packets off one TX ring. ``pending[id]`` is 1 for request ids consumed and not
    yet answered (owned by ``TxRelease``, which clears them as it answers)."""

    def __init__(self, ring: BackRing, pending: bytearray, stats: RingStats,
                 slots: HeaderSlots, header_slots: bool, sg: bool, gso_ok: set[int]) -> None:
        self.ring, self.buf, self.offsets = ring, ring.buf, ring.offsets
        self.pending, self.stats, self.slots = pending, stats, slots
        #: what this backend offered: header slots, multi-slot packets, which GSO kinds
        self.header_slots, self.sg, self.gso_ok = header_slots, sg, gso_ok
        self.pkt = TxPacket()
        self._flags = ring.column("H", TX_REQUEST_FLAGS)  # each request's flags, strided

    def lone_slot(self) -> tuple[int, int, int, int] | None:
        """The usual small packet, checked and consumed in one go: a lone header-slot request
        (no fragment, no extra) whose id is free and whose slot reference and size are valid
        - (request id, byte offset of its bytes in the header area, size, flags). None
        (nothing consumed) for anything else, which ``read`` then judges, naming any fault."""
        ring = self.ring
        cons = ring.req_cons
        gref, off, flags, rid, size = _unpack_req(self.buf, ring.entry(cons))
        slots = self.slots
        ss = slots.slot_size
        if flags & _NOT_LONE or not flags & NETTXF_header_slot or not self.header_slots \
                or self.pending[rid] or size < 14 or off + size > ss or gref % ss \
                or not 0 <= gref < ss * slots.count:
            return None
        ring.req_cons = (cons + 1) & MASK32
        self.stats.slots_consumed += 1
        return rid, gref + off, size, flags

    def lone_frag(self) -> tuple[int, int, int, int, int] | None:
        """The usual small packet without header slots (every ring in Xen's own netif),
        checked and consumed in one go: one request, no header slot, no fragment and no extra
        after it, whose id is free, inside its page and of a size inside Ethernet's limits -
        (request id, gref, offset, size, flags). None (nothing consumed) for anything else,
        which ``read`` then judges, naming any fault: the checks are ``read``'s for that
        shape, in one expression."""
        ring = self.ring
        cons = ring.req_cons
        if self._flags[cons & ring.mask] & _NOT_LONE_FRAG:  # one strided read, no unpack
            return None
        gref, off, flags, rid, size = _unpack_req(self.buf, ring.entry(cons))
        if flags & _NOT_LONE_FRAG or self.pending[rid] or size < 14 or off + size > PAGE_SIZE:
            return None  # (inside its page is inside MAX_FRAME)
        self.pending[rid] = 1
        ring.req_cons = (cons + 1) & MASK32
        self.stats.slots_consumed += 1
        return rid, gref, off, size, flags

    def slot_frag(self, avail: int) -> tuple[int, int, int, int, int, int, int, int] | None:
        """The usual MTU packet, checked and consumed in one go: a header-slot request with
        MORE_DATA and no extra, then one last fragment at offset 0 within a page, both ids
        free, the slot reference and the sizes valid - (request id, byte offset of its bytes
        in the header area, their length, flags, the fragment's gref, id and size, the
        packet's size). None (nothing consumed) for anything else, which ``read`` judges."""
        if avail < 2:
            return None
        ring, buf = self.ring, self.buf
        cons = ring.req_cons
        gref, off, flags, rid, size = _unpack_req(buf, ring.entry(cons))
        if flags & _SLOT_FRAG_MASK != _SLOT_FRAG or not self.header_slots:
            return None
        fgref, foff, fflags, fid, fsize = _unpack_req(buf, ring.entry(cons + 1))
        first_len = size - fsize
        slots, pending = self.slots, self.pending
        ss = slots.slot_size
        if fflags or foff or fsize > PAGE_SIZE or first_len <= 0 or pending[rid] \
                or pending[fid] or fid == rid or size > MAX_FRAME or size < 14 \
                or off + first_len > ss or gref % ss or not 0 <= gref < ss * slots.count:
            return None
        pending[rid] = pending[fid] = 1
        ring.req_cons = (cons + 2) & MASK32
        self.stats.slots_consumed += 2
        return rid, gref + off, first_len, flags, fgref, fid, fsize, size

    def read(self, avail: int) -> TxPacket:
        """The next packet (``avail`` requests are published); consumes its requests."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        pkt = self.pkt
        pkt.drop = None
        pkt.hdr_start = -1
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
        pkt.grefs, pkt.offs, pkt.ids, pkt.sizes = frags
        nfrags = len(pkt.grefs)
        if nfrags > (1 if flags & NETTXF_header_slot else 0) and not self.sg:
            raise NotNegotiated(f"packet of {nfrags + 1} slots without feature-sg")
        idx += nfrags
        total_frags = sum(pkt.sizes)
        ring.req_cons = idx & MASK32
        self.stats.slots_consumed += (idx - cons) & MASK32
        first_len = size - total_frags
        pkt.cons, pkt.end, pkt.rid, pkt.gref, pkt.off, pkt.flags, pkt.size = \
            cons, idx, rid, gref, off, flags, size
        pkt.first_len, pkt.extras, pkt.gso_type, pkt.gso_size = \
            first_len, extras, gso_type, gso_size
        if first_len <= 0:
            raise FatalTxError(f"ring[{cons & MASK32}].size: fragments ({total_frags} B) "
                               f"bigger than the packet ({size} B)", "size")
        if nfrags > MAX_SLOTS_PER_PACKET:  # 19 or 20 follow-ons: Linux drops, not fatal
            pkt.drop = ("slots", f"ring[{cons & MASK32}]: {nfrags} follow-on slots "
                                 f"(> {MAX_SLOTS_PER_PACKET})")
        elif size > MAX_FRAME or size < 14:
            pkt.drop = ("size", f"ring[{cons & MASK32}].size: {size} outside 14..{MAX_FRAME}")
        elif flags & NETTXF_header_slot:
            if not self.header_slots:
                raise NotNegotiated(f"ring[{cons & MASK32}].flags: header-slot request "
                                    "without feature-header-slots")
            try:
                pkt.hdr_start = self.slots.check(gref, off, first_len)
            except SlotError as e:
                raise FatalTxError(f"ring[{cons & MASK32}].gref: {e}", "header_slot") from e
        elif off + first_len > PAGE_SIZE:
            raise FatalTxError(f"ring[{cons & MASK32}].offset+size: first slot crosses a "
                               f"page boundary ({off}+{first_len})", "page_boundary")
        return pkt

    def _take_id(self, rid: int, idx: int = -1) -> None:
        if self.pending[rid]:
            raise FatalTxError(f"ring[{idx & MASK32}].id: request id {rid} reused while "
                               f"pending", "id_reused")
        self.pending[rid] = 1

    def _fast_frags(self, idx: int, limit: int) -> tuple | None:
        """Parse a packet's fragment requests in one struct call, when they are the usual
        shape (contiguous on the ring, MORE_DATA on all but the last, offsets 0, whole pages,
        fresh ids); None sends the packet to ``_slow_frags``, which checks one by one."""
        ring = self.ring
        pos = idx & ring.mask
        k = min(limit, ring.size - pos, MAX_SLOTS_PER_PACKET)  # longer: the slow path
        if k <= 0:
            return None
        # the packet's end first, from the flags column: then only its requests are unpacked
        fl = self._flags[pos:pos + k].tolist()
        try:
            n = fl.index(0) + 1
        except ValueError:
            return None
        if fl[:n - 1].count(NETTXF_more_data) != n - 1:
            return None
        t = tx_requests(n).unpack_from(self.buf, self.offsets[pos])
        offs, ids, sizes = list(t[1:5 * n:5]), list(t[3:5 * n:5]), list(t[4:5 * n:5])
        if offs.count(0) != n or max(sizes) > PAGE_SIZE:
            return None
        pending = self.pending
        if any(map(pending.__getitem__, ids)) or len(set(ids)) != n:
            return None
        for i in ids:
            pending[i] = 1
        return list(t[0:5 * n:5]), offs, ids, sizes

    def _slow_frags(self, idx: int, cons: int, avail: int) -> tuple:
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
