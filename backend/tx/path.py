"""Netback TX: frontend requests -> sk_buff-equivalents -> the vif (Linux ``netback.c``).

The core of TX, in ring passes: read and validate a pass's requests (``backend/tx/requests.py``);
per packet, copy the header (from the persistently mapped header slot, answered at once, or
by the header pull out of the first fragment when header slots are off) and resolve every
fragment's grant once (``backend/grants/tx.py``); then, for the whole pass, let the TX
mechanism in force attach the fragments (``backend/tx/modes/``: hold, map, copy...), pull the
headers (``backend/tx/skb.py``), hand the pass to the mechanism again, set up checksums and
filter, write each packet to the vif as iovecs, and free the pass: the mechanism undoes what
it did and the slots are answered (``backend/tx/release.py``). This module knows no mechanism
by name: it calls the hooks of ``backend/tx/modes/base.TxMechanism``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from backend.capture import NO_CAPTURE
from backend.grants.gntmap import GntMap, MapError
from backend.mechanisms import load, own_counters
from backend.tx.credit import Credit
from backend.tx.release import TxRelease
from backend.tx.requests import TxRequests
from backend.tx.skb import HEADER_PULL_MAX, SkBuff, csum_fault, pull_headers
from backend.tx.small import HeadOnly
from shared.protocol.grant import GrantError
from shared.protocol.headers import CSUM_OFFSET
from shared.protocol.netif import (
    MAX_SKB_FRAGS,
    TX_REQUEST,
    XEN_NETIF_RSP_OKAY,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_header_slot,
)
from shared.protocol.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR,
    XEN_TO_VIRTIO_GSO,
)
from shared.protocol.region import Area
from shared.protocol.ring import MASK32, BackRing
from shared.protocol.slots import HeaderSlots
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import Agreement, gso_accepted

log = logging.getLogger("netback")
_unpack_req = TX_REQUEST.unpack_from
#: drop log lines per second per connection
LOG_PER_SECOND = 10
#: slots a ring pass takes at most: its answers go out when it ends, not at the end of the
#: whole batch (``action``) - about two 64 KB packets' worth, enough for a stopped frontend
#: to send again
EARLY_SLOTS = 32


def _offered(name: str) -> property:
    """``TxPath.<name>`` is its request validation's ``<name>``."""
    return property(lambda self: getattr(self.requests, name),
                    lambda self, value: setattr(self.requests, name, value))


class TxPath(HeadOnly):
    """The TX ring of one connection and the vif it feeds, through mechanism ``mode``."""

    def __init__(self, region: Area, gntmap: GntMap, vif_fd: int, stats: RingStats,
                 mode: str, header_slots: bool, pkt_filter=None,
                 agreement: Agreement | None = None, own: object | None = None,
                 rate: tuple[int, int] | None = None) -> None:
        self.ring = BackRing(region.tx_ring, TX_REQUEST.size)
        self.hdr = region.hdr
        self.gntmap, self.vif_fd, self.stats = gntmap, vif_fd, stats
        self.mode, self.filter = mode, pkt_filter
        #: csum_blank on IPv6 only if this backend wrote feature-ipv6-csum-offload
        self.csum_v6 = agreement is None or agreement.tx_csum_v6
        self._log_t, self._logged = 0.0, 0
        self.capture = NO_CAPTURE  # the netback's CaptureTap (backend/capture.py)
        self.release = TxRelease(self.ring, stats)
        #: the vif's ``rate`` (credit_bytes, credit_usec), if limited (backend/tx/credit.py)
        self.credit = Credit(*rate, stats) if rate else None
        cls = load("tx", mode)
        #: the mechanism in force; ``own``: its counters (the netback keeps them per process)
        self.mech = cls(gntmap, stats, self.release, own_counters(cls) if own is None else own)
        #: the header-slot area (validation only: the backend allocates nothing per slot)
        self.slots = HeaderSlots(region.hdr, region.hdr_slot_size, region.hdr_slots,
                                 allocator=False)
        # what was agreed (its netif.h keys and the extensions): a request beyond it is fatal
        self.requests = TxRequests(self.ring, self.release.pending, stats, self.slots,
                                   header_slots, agreement is None or agreement.tx_sg,
                                   gso_accepted(agreement, rx=False))

    # what was agreed (header slots, multi-slot packets, GSO kinds): request validation holds
    # and applies it; a test may narrow it on a live path
    header_slots, sg, gso_ok = _offered("header_slots"), _offered("sg"), _offered("gso_ok")

    # --- the action loop ------------------------------------------------------------------
    def action(self, budget: int = 64, publish: Callable[[], object] | None = None) -> bool:
        """Consume up to ``budget`` packets, a ring pass (at most EARLY_SLOTS slots) at a
        time; answer released slots. True if work remains.

        With ``publish`` (push the answers, kick if asked) the answers of each pass go out
        when it ends, not only at the end of the batch: a frontend stopped on a full ring (it
        armed rsp_event) sends again while the rest of the batch is still going to the vif,
        as Linux netback answers from its dealloc thread, not after a batch."""
        ring, release = self.ring, self.release
        left = budget
        while left > 0:
            skbs, n = self._take(left)
            if not n:
                break
            left -= n
            if skbs:
                self._pass(skbs)
            if publish is not None and release.queued and ring.unconsumed_requests():
                release.flush()
                publish()
        release.flush()
        return ring.unconsumed_requests() > 0 and not self.credit_wait()

    def credit_wait(self) -> float:
        """Seconds until the packet waiting for credit may go (0: none waits)."""
        return self.credit.wait_s() if self.credit is not None else 0.0

    def push(self) -> bool:
        """Publish responses; True if the frontend asked to be notified."""
        return self.ring.push_responses()

    def _take(self, limit: int) -> tuple[list[SkBuff], int]:
        """One ring pass: build packets until ``limit`` packets or EARLY_SLOTS slots are
        consumed. Returns the packets built and how many were consumed (dropped ones too)."""
        ring, credit, lone_slot = self.ring, self.credit, self.requests.lone_slot
        slot_frag, lone_frag = self.requests.slot_frag, self.requests.lone_frag
        skbs: list[SkBuff] = []
        start = ring.req_cons
        n = 0
        while n < limit:
            avail = ring.unconsumed_requests()
            if not avail:
                break
            if credit is not None and credit.exceeded(
                    _unpack_req(ring.buf, ring.entry(ring.req_cons))[4]):
                break  # its requests stay on the ring until the next window
            n += 1
            one = lone_frag()  # no header slot: a flags peek declines the other shapes
            if one is not None:
                skb = self._lone_frag(*one)
            elif (lone := lone_slot()) is None:
                pair = slot_frag(avail)
                skb = self._build(avail) if pair is None else self._slot_frag(*pair)
            elif not skbs and self._head_only_ok() and self._send_head(*lone):
                skb = None  # sent on the spot: backend/tx/small.py
            else:
                skb = self._small(*lone)
            if skb is not None:
                skbs.append(skb)
            if (ring.req_cons - start) & MASK32 >= EARLY_SLOTS:
                break
        return skbs, n

    def _pass(self, skbs: list[SkBuff]) -> None:
        """The mechanism's four hooks around the core's steps, each over the whole pass;
        then every packet is freed. A fault of the frontend part-way still frees what the
        mechanism did (its holds and maps) before the connection ends."""
        mech = self.mech
        try:
            try:
                mech.attach(skbs)
            except GrantError as e:  # fatal (fatal_grant): say which packets
                raise GrantError(f"ring[{skbs[0].idx}..]: {e}") from e
            live = [skb for skb in self._alive(skbs) if self._pull(skb)]
            mech.pulled(live)
            live = [skb for skb in self._alive(live) if self._check(skb)]
            mech.xmit(live)
            for skb in self._alive(live):
                self._write(skb)
        except BaseException:
            mech.free(skbs)
            raise
        self._free(skbs)

    def _alive(self, skbs: list[SkBuff]) -> list[SkBuff]:
        """The packets a hook left alive; one it dropped (``skb.drop``: a map the kernel
        refused, say) is counted and logged here, and freed with the pass."""
        if all(skb.drop is None for skb in skbs):
            return skbs
        for skb in skbs:
            if skb.drop is not None:
                self._count_drop(*skb.drop)
        return [skb for skb in skbs if skb.drop is None]

    def _free(self, skbs: list[SkBuff]) -> None:
        """kfree_skb for a pass: the zerocopy verdicts, the mechanism's ``free``, then the
        slots (``skb.ids``, emptied by a mechanism that answered them earlier)."""
        st = self.stats
        for skb in skbs:
            if skb.zc:  # handed over by reference (not dropped first, not all in the head)
                if skb.linear is not None or skb.touched:
                    st.tx_zerocopy_fail += 1  # the payload was read (and its copy sent)
                else:
                    st.tx_zerocopy_success += 1
        self.mech.free(skbs)
        release = self.release.release
        for skb in skbs:
            if skb.ids:
                release(skb.ids, skb.extras)

    # --- building an skb from the ring ------------------------------------------------------
    def _build(self, avail: int) -> SkBuff | None:
        pkt = self.requests.read(avail)
        cons = pkt.cons
        if pkt.drop is not None:
            reason, why = pkt.drop
            self._count_drop(reason, why)
            self.release.error(pkt.rid, pkt.ids, pkt.extras)
            return None
        grefs, offs, ids, sizes = pkt.grefs, pkt.offs, pkt.ids, pkt.sizes
        first_len, flags = pkt.first_len, pkt.flags
        skb = SkBuff()
        skb.size = pkt.size
        skb.idx = cons & MASK32
        st = self.stats
        if flags & NETTXF_header_slot:
            start = pkt.hdr_start
            skb.head = bytes(self.hdr[start:start + first_len])
            self._slot_copied(pkt.rid, first_len, pkt.extras)
        else:
            # the first slot is the first fragment: its grant is resolved with the others
            # (once), and the header pull copies its head out of it
            grefs.insert(0, pkt.gref)
            offs.insert(0, pkt.off)
            ids.insert(0, pkt.rid)
            sizes.insert(0, first_len)
            skb.extras = pkt.extras  # its NULL answers follow it when it is released
        if flags & NETTXF_csum_blank:
            skb.csum_blank = True
        if flags & NETTXF_data_validated:
            skb.data_validated = True
        skb.gso_type, skb.gso_size = pkt.gso_type, pkt.gso_size
        skb.ids = ids
        if grefs:
            n = len(grefs)
            st.tx_frags += n
            if n > MAX_SKB_FRAGS:
                st.tx_frag_overflow += 1
            self._resolve(skb, grefs, cons, pkt.end - 1)
            skb.offs, skb.sizes = offs, sizes
        return skb

    def _slot_copied(self, rid: int, size: int, nulls: int = 0) -> None:
        """A header slot's ``size`` bytes were copied out: counted, and the slot (with
        ``nulls`` extra-info slots) answered at once - it is released as soon as copied."""
        st = self.stats
        st.copy_bytes += size
        st.tx_header_slot_packets += 1
        self.release.respond(rid, XEN_NETIF_RSP_OKAY, nulls)

    def _resolve(self, skb: SkBuff, grefs: list[int], first: int, last: int) -> None:
        """Attach the fragments' grants to ``skb`` (their frames resolved once); a bad one is
        the frontend's fatal fault, naming the packet's ring slots ``first..last``."""
        try:
            skb.frames, skb.flags0 = self.gntmap.tx.resolve(grefs)
        except GrantError as e:  # fatal (fatal_grant): say which packet
            raise GrantError(f"ring[{first & MASK32}..{last & MASK32}].gref: {e}") from e
        skb.grefs = grefs

    def _small(self, rid: int, start: int, size: int, flags: int) -> SkBuff:
        """A packet that is one header slot (``TxRequests.lone_slot``): copied, answered at
        once, no fragment to resolve."""
        skb = SkBuff(bytes(self.hdr[start:start + size]))
        self._slot_copied(rid, size)
        skb.idx = (self.ring.req_cons - 1) & MASK32
        skb.csum_blank = bool(flags & NETTXF_csum_blank)
        skb.data_validated = bool(flags & NETTXF_data_validated)
        return skb

    def _slot_frag(self, rid: int, start: int, first_len: int, flags: int, fgref: int,
                   fid: int, fsize: int, size: int) -> SkBuff:
        """A header slot and one fragment (``TxRequests.slot_frag``): ``_build``'s steps for
        that shape - the slot copied and answered at once, the fragment's grant resolved."""
        skb = SkBuff(bytes(self.hdr[start:start + first_len]))
        self._slot_copied(rid, first_len)
        return self._one_frag(skb, size, 2, flags, fgref, fid, 0, fsize)

    def _lone_frag(self, rid: int, gref: int, off: int, size: int, flags: int) -> SkBuff:
        """A packet that is one fragment, no header slot (``TxRequests.lone_frag``): ``_build``'s
        steps for that shape - its grant resolved once; the header pull copies its head out
        of it later, as for any packet without a header slot."""
        return self._one_frag(SkBuff(), size, 1, flags, gref, rid, off, size)

    def _one_frag(self, skb: SkBuff, size: int, slots: int, flags: int, gref: int, fid: int,
                  off: int, fsize: int) -> SkBuff:
        """``skb`` (its head, if any, copied) with its one fragment attached: the packet's
        ``slots`` requests were just consumed, the fragment's is the last of them."""
        skb.size = size
        idx = skb.idx = (self.ring.req_cons - slots) & MASK32
        skb.csum_blank = bool(flags & NETTXF_csum_blank)
        skb.data_validated = bool(flags & NETTXF_data_validated)
        skb.ids = [fid]
        self.stats.tx_frags += 1
        self._resolve(skb, [gref], idx, idx + slots - 1)
        skb.offs, skb.sizes = [off], [fsize]
        return skb

    def _pull(self, skb: SkBuff) -> bool:
        """The header pull; False: dropped (drops_headers)."""
        if pull_headers(skb, self.gntmap.pull):
            return True
        self._count_drop("headers", f"ring[{skb.idx}]: headers run past "
                                    f"{HEADER_PULL_MAX} bytes")
        return False

    def _count_drop(self, reason: str, why: str) -> None:
        """Counted as drops, drops_error and drops_<reason> (requests.DROP_REASONS), logged."""
        st = self.stats
        st.drops += 1
        st.drops_error += 1
        setattr(st, f"drops_{reason}", getattr(st, f"drops_{reason}") + 1)
        self.log_drop(reason, why)

    # --- handing to the vif -------------------------------------------------------------
    def _check(self, skb: SkBuff) -> bool:
        """Checksum set-up and the filter; False: dropped (freed with the pass)."""
        st = self.stats
        vflags = 0
        cstart = coff = 0
        if skb.csum_blank:  # checksum_setup on the pulled headers; Linux drops on failure
            h = skb.hdrs
            fault = csum_fault(h, self.csum_v6)
            if fault is not None:
                self._count_drop(fault[0], f"ring[{skb.idx}].flags: {fault[1]}")
                return False
            vflags = VIRTIO_NET_HDR_F_NEEDS_CSUM
            cstart, coff = h.l4, CSUM_OFFSET[h.ip_proto]
        elif skb.data_validated:
            vflags = VIRTIO_NET_HDR_F_DATA_VALID
        skb.vnet = VNET_HDR.pack(vflags, XEN_TO_VIRTIO_GSO[skb.gso_type], 0, skb.gso_size,
                                 cstart, coff, 0)
        # counted once the checksum is set up, as Linux's xenvif_tx_submit counts after
        # checksum_setup; a frame the filter drops was handed on (Linux: netfilter is later)
        size = skb.size
        st.tx_packets += 1
        st.tx_bytes += size
        if size > len(skb.head):  # payload left in the fragments (Linux: the skb has frags)
            skb.zc = True
            st.tx_zerocopy_sent += 1
        if self.filter is not None and (why := self.filter.drops(skb, self.gntmap, st)):
            st.drops += 1
            st.drops_filtered += 1
            self.log_drop("filtered", f"ring[{skb.idx}]: {why}")
            return False
        return True

    def _write(self, skb: SkBuff) -> None:
        """The vif write: the head, then the fragments as iovecs through the DMA view - or
        the frame's copy in backend memory, when a payload rule judged it or a capture
        records it, which is then what is sent."""
        capture = self.capture
        if capture.on and capture.out_caplen(skb.size) > len(skb.head):
            try:
                skb.linearize(self.gntmap)  # read once: that copy is both sent and recorded
            except MapError as e:  # the kernel refused a map: this packet's loss
                self._count_drop("map", f"ring[{skb.idx}]: {e}")
                return
        if skb.linear is not None:
            iov = [skb.vnet, skb.linear]
        else:
            iov = [skb.vnet, skb.head]
            if skb.frames:
                self.gntmap.tx_iovecs(skb.grefs, skb.frames, skb.offs, skb.sizes, iov)
        try:
            os.writev(self.vif_fd, iov)
            skb.transmitted = True
        except OSError as e:  # vif down or queue full: dropped, slots still released
            self._count_drop("vif", f"ring[{skb.idx}]: vif write failed: {e}")
        if capture.on and skb.transmitted:
            capture.out(skb)

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
        self.release.flush()
