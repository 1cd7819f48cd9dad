"""Netback TX: frontend requests -> sk_buff-equivalents -> the vif (Linux ``netback.c``).

Per packet: read and validate its requests (``backend/txreq.py``); copy the header (from the
persistently mapped header slot, or by the header pull out of the first fragment when header
slots are off) and answer the header slot at once; attach payload fragments by mode
(``backend/txmodes.py``: lazy mapping, map, copy) with their grants resolved and held
(``backend/txgrants.py``); pull the headers (``backend/pull.py``); filter; hand the fragments
to the vif as iovecs. Freeing the skb releases its slots (``backend/txrelease.py``), which the
action loop answers in the same pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from backend.capture import NO_CAPTURE
from backend.gntmap import GntMap, MapError
from backend.pull import HEADER_PULL_MAX, pull_headers
from backend.skb import SkBuff
from backend.txmodes import TxFrags
from backend.txrelease import TxRelease
from backend.txreq import TxRequests
from shared.grant import GrantError
from shared.headers import CSUM_OFFSET, ETH_P_IPV6
from shared.netif import (
    TX_REQUEST,
    XEN_NETIF_RSP_OKAY,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_header_slot,
)
from shared.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR,
    XEN_TO_VIRTIO_GSO,
)
from shared.region import Region
from shared.ring import MASK32, BackRing
from shared.slots import HeaderSlots
from shared.stats import RingStats
from shared.xenbus import Agreement, gso_accepted

log = logging.getLogger("netback")
#: drop log lines per second per connection
LOG_PER_SECOND = 10
#: answers released within a batch that go out at once rather than at its end (``action``):
#: about two 64 KB packets' worth of slots, enough for a stopped frontend to send again
EARLY_SLOTS = 32


def _offered(name: str) -> property:
    """``TxPath.<name>`` is its request validation's ``<name>``."""
    return property(lambda self: getattr(self.requests, name),
                    lambda self, value: setattr(self.requests, name, value))


class TxPath:
    """The TX ring of one connection and the vif it feeds."""

    def __init__(self, region: Region, gntmap: GntMap, vif_fd: int, stats: RingStats,
                 mode: str, header_slots: bool, pkt_filter=None,
                 agreement: Agreement | None = None) -> None:
        self.ring = BackRing(region.tx_ring, TX_REQUEST.size)
        self.hdr = region.hdr
        self.gntmap, self.vif_fd, self.stats = gntmap, vif_fd, stats
        self.mode, self.filter = mode, pkt_filter
        #: csum_blank on IPv6 only if this backend wrote feature-ipv6-csum-offload
        self.csum_v6 = agreement is None or agreement.tx_csum_v6
        self.vnet = bytearray(VNET_HDR.size)
        self._log_t, self._logged = 0.0, 0
        self.capture = NO_CAPTURE  # the netback's CaptureTap (backend/capture.py)
        self.release = TxRelease(self.ring, stats)
        self.frags = TxFrags(gntmap, stats, mode, self.release)
        #: the header-slot area (validation only: the backend allocates nothing per slot)
        self.slots = HeaderSlots(region.hdr, region.layout.hdr_slot_size,
                                 region.layout.hdr_slots, allocator=False)
        # what this backend offered (its netif.h keys): a request beyond it is fatal
        self.requests = TxRequests(self.ring, self.release.pending, stats, self.slots,
                                   header_slots, agreement is None or agreement.tx_sg,
                                   gso_accepted(agreement, rx=False))

    # what this backend offered (header slots, multi-slot packets, GSO kinds): request
    # validation holds and applies it; a test may narrow it on a live path
    header_slots, sg, gso_ok = _offered("header_slots"), _offered("sg"), _offered("gso_ok")

    # --- the action loop ------------------------------------------------------------------
    def action(self, budget: int = 64, publish: Callable[[], object] | None = None) -> bool:
        """Consume up to ``budget`` packets; answer released slots. True if work remains.

        With ``publish`` (push the answers, kick if asked) the answers go out every
        EARLY_SLOTS released slots, not only at the end of the batch: a frontend stopped on a
        full ring (it armed rsp_event) sends again while the rest of the batch is still going
        to the vif, as Linux netback answers from its dealloc thread, not after a batch."""
        ring, release = self.ring, self.release
        queued = release.queued
        for _ in range(budget):
            avail = ring.unconsumed_requests()
            if not avail:
                break
            skb = self._build(avail)
            if skb is not None:
                self._submit(skb)
            if publish is not None and len(queued) >= EARLY_SLOTS:
                release.flush()
                publish()
        release.flush()
        return ring.unconsumed_requests() > 0

    def push(self) -> bool:
        """Publish responses; True if the frontend asked to be notified."""
        return self.ring.push_responses()

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
        skb = SkBuff(b"", self.frags.free)
        skb.size = pkt.size
        skb.idx = cons & MASK32
        if flags & NETTXF_header_slot:
            start = pkt.hdr_start
            skb.head = bytes(self.hdr[start:start + first_len])
            st = self.stats
            st.copy_bytes += first_len
            st.tx_header_slot_packets += 1
            # the header slot is released at once
            self.release.respond(pkt.rid, XEN_NETIF_RSP_OKAY, pkt.extras)
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
        if grefs:
            try:
                self.frags.attach(skb, grefs, offs, ids, sizes)
            except GrantError as e:  # fatal (fatal_grant): say which packet
                raise GrantError(f"ring[{cons & MASK32}..{(pkt.end - 1) & MASK32}].gref: "
                                 f"{e}") from e
            except MapError as e:  # map mode: the kernel refused a map; this packet's loss
                self._drop_skb(skb, "map", f"ring[{cons & MASK32}]: {e}")
                return None
        if not pull_headers(skb, self.gntmap.pull):
            self._drop_skb(skb, "headers", f"ring[{cons & MASK32}]: headers run past "
                                           f"{HEADER_PULL_MAX} bytes")
            return None
        if self.mode == "copy" and skb.grefs:
            try:
                self.frags.copy_rest(skb)
            except MapError as e:
                self._drop_skb(skb, "map", f"ring[{cons & MASK32}]: {e}")
                return None
        return skb

    def _drop_skb(self, skb: SkBuff, reason: str, why: str) -> None:
        """Drop a built packet (its slots are released by its destructor, as Linux's
        kfree_skb after a failed checksum_setup): counted, logged, the connection lives on."""
        self._count_drop(reason, why)
        skb.free()

    def _count_drop(self, reason: str, why: str) -> None:
        """Counted as drops, drops_error and drops_<reason> (txreq.DROP_REASONS), logged."""
        st = self.stats
        st.drops += 1
        st.drops_error += 1
        setattr(st, f"drops_{reason}", getattr(st, f"drops_{reason}") + 1)
        self.log_drop(reason, why)

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
            if h is None or h.l4 is None or h.fragment or h.ip_proto not in CSUM_OFFSET:
                self._drop_skb(skb, "csum", f"ring[{skb.idx}].flags: csum_blank frame "
                               "without a TCP/UDP header "
                               f"({'fragment' if h and h.fragment else 'not TCP/UDP'})")
                return
            if h.ethertype == ETH_P_IPV6 and not self.csum_v6:
                self._drop_skb(skb, "not_negotiated", f"ring[{skb.idx}].flags: csum_blank "
                               "IPv6 frame without feature-ipv6-csum-offload")
                return
            vflags = VIRTIO_NET_HDR_F_NEEDS_CSUM
            cstart, coff = h.l4, CSUM_OFFSET[h.ip_proto]
        elif skb.data_validated:
            vflags = VIRTIO_NET_HDR_F_DATA_VALID
        VNET_HDR.pack_into(self.vnet, 0, vflags, XEN_TO_VIRTIO_GSO[skb.gso_type], 0,
                           skb.gso_size, cstart, coff, 0)
        if self.filter is not None and (why := self.filter.drops(skb, self.gntmap, st)):
            st.drops += 1
            st.drops_filtered += 1
            self.log_drop("filtered", f"ring[{skb.idx}]: {why}")
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
            self._count_drop("vif", f"ring[{skb.idx}]: vif write failed: {e}")
        if self.capture.on and skb.transmitted:
            self.capture.out(skb, self.gntmap)
        skb.free()

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
