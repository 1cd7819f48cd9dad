"""Netfront TX: frames from the guest's TAP straight into shared memory, then onto the ring.

One ``readv`` per frame scatters it with no Python copy: the virtio_net_hdr into a scratch
buffer, the first bytes (up to the slot size) into a free header slot, the rest over the next
free payload pages, each granted with a reference of its own; the frame keeps the pages it
filled (``frontend/tx/pages.py``). The first request carries the header slot's offset
(``NETTXF_header_slot``), an extra-info slot carries GSO, then one request per payload page,
copied from the pages' templates with the last one's size patched. Without header slots the
frame starts in its first page, as stock netif.

Flow control and slot release (``frontend/tx/flow.py``): when the ring, the header slots or the
payload pages run short, the queue stops (it stops polling the TAP) and restarts as responses
release them.
"""

from __future__ import annotations

import os

from frontend.grants.base import GrantPolicy
from frontend.tx.flow import TxFlow
from frontend.tx.pages import ALL_FREE, READ_PAGES, SLOT_ID_BASE, TxPages
from shared.protocol.grant import GRANT_ENTRY
from shared.protocol.netif import (
    EXTRA_INFO,
    PAGE_SIZE,
    TX_REQUEST,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_NONE,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_header_slot,
    NETTXF_more_data,
)
from shared.protocol.offload import (
    VIRTIO_NET_HDR_F_MASK,
    VIRTIO_NET_HDR_GSO_KIND,
    VIRTIO_TO_XEN_GSO,
    VNET_HDR,
)
from shared.protocol.region import Area
from shared.protocol.ring import MASK32, FrontRing
from shared.protocol.slots import HeaderSlots
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import Agreement, gso_accepted

#: the largest packet netif can describe (tx_request.size is u16: XEN_NETIF_MAX_TX_SIZE)
MAX_PACKET = 0xFFFF
_pack_req = TX_REQUEST.pack_into
_pack_extra = EXTRA_INFO.pack_into
_SLOT = TX_REQUEST.size
_GE = GRANT_ENTRY.size
_ONES = b"\x01" * READ_PAGES
#: virtio_net_hdr flags (NEEDS_CSUM=1, DATA_VALID=2, indexed by VIRTIO_NET_HDR_F_MASK bits)
#: -> netif TX flags
_TX_FLAGS = (0, NETTXF_csum_blank | NETTXF_data_validated, NETTXF_data_validated,
             NETTXF_csum_blank | NETTXF_data_validated)
#: virtio gso_type (ECN bit masked) -> netif GSO type; None: netif cannot carry it
_XEN_GSO = tuple(VIRTIO_TO_XEN_GSO.get(i) for i in range(VIRTIO_NET_HDR_GSO_KIND + 1))


class TxQueue:
    def __init__(self, region: Area, tap_fd: int, stats: RingStats, first_page: int,
                 header_slots: bool, policy: GrantPolicy, backend_domid: int = 0,
                 agreement: Agreement | None = None) -> None:
        #: what the backend accepts (its keys): multi-slot packets, which GSO kinds
        self.sg = agreement is None or agreement.tx_sg
        ok = gso_accepted(agreement, rx=False) | {XEN_NETIF_GSO_TYPE_NONE}
        self.xen_gso = tuple(g if g in ok else None for g in _XEN_GSO)
        #: without the backend's feature-ipv6-csum-offload the TAP takes no partial checksum
        #: (``tap_offloads``); one that still comes (queued before) is not sent: None
        self.tx_flags = _TX_FLAGS if agreement is None or agreement.tx_csum else tuple(
            None if f & NETTXF_csum_blank else f for f in _TX_FLAGS)
        self.ring = FrontRing(region.tx_ring, TX_REQUEST.size)
        self.buf = self.ring.buf
        self.tap_fd, self.stats = tap_fd, stats
        self.header_slots, self.policy = header_slots, policy
        self.slots = HeaderSlots(region.hdr, region.hdr_slot_size, region.hdr_slots)
        self.pages = TxPages(region, first_page, policy, backend_domid)
        self.flow = flow = TxFlow(self.ring, self.slots, self.pages, stats)
        self.reap, self.arm_completions = flow.reap, flow.arm_completions
        self.can_send, self.in_flight = flow.can_send, flow.in_flight
        self.vnet = bytearray(VNET_HDR.size)

    @property
    def stopped(self) -> bool:
        """The queue stopped reading the TAP until responses release what it ran short of."""
        return self.flow.stopped

    def _put(self, prod: int, src: memoryview) -> None:
        """Copy whole requests from a template onto the ring at ``prod`` (it may wrap)."""
        ring = self.ring
        pos = prod & ring.mask
        room = (ring.size - pos) * _SLOT
        at = ring.offsets[pos]
        if len(src) <= room:
            self.buf[at:at + len(src)] = src
        else:
            start = ring.offsets[0]
            self.buf[at:at + room] = src[:room]
            self.buf[start:start + len(src) - room] = src[room:]

    def pump(self, budget: int = 64) -> int:
        """Move up to ``budget`` frames from the TAP onto the ring (not yet pushed).

        The hottest loop of the frontend (and, in a guest under TCG, of the whole guest): no
        method calls, no allocations but the iovec list reuse, counters summed per batch."""
        ring, buf, mask, offsets = self.ring, self.buf, self.ring.mask, self.ring.offsets
        flow, pages = self.flow, self.pages
        st, vnet, busy = self.stats, self.vnet, flow.busy
        free_slots, spans, count = self.slots.free, pages.spans, pages.count
        find = busy.find
        slot_views, ref0, req_tmpl = self.slots.views, pages.ref0, pages.req_tmpl
        gnt_tmpl, gnt_span = pages.gnt_tmpl, pages.gnt_span
        hs, ss = self.header_slots, self.slots.slot_size
        pbit = self.policy.ref_bit  # or-ed into grefs (the persistent bit)
        granted = []  # (table bytes, entries) of the pages named, for the grant policy
        readv, tap, unpack_vnet = os.readv, self.tap_fd, VNET_HDR.unpack_from
        room_needed = flow.room_needed
        xen_gso, fmask, kind = self.xen_gso, VIRTIO_NET_HDR_F_MASK, VIRTIO_NET_HDR_GSO_KIND
        tx_flags = self.tx_flags
        # without the backend's feature-sg a packet is one data slot (after its header slot)
        one_slot = MAX_PACKET if self.sg else (ss if hs else 0) + PAGE_SIZE
        iov = [vnet, None, None] if hs else [vnet, None]
        sent = nbytes = slots = 0
        while sent < budget:
            prod = start = ring.req_prod_pvt
            base = find(ALL_FREE, 0, count)  # the lowest run of free pages for any frame
            if (prod - ring.rsp_cons) & MASK32 > room_needed or base < 0 or not free_slots:
                flow.stop()
                break
            if hs:
                slot = free_slots[-1]
                iov[1] = slot_views[slot]
                iov[2] = spans[base]
            else:
                iov[1] = spans[base]
            try:
                length = readv(tap, iov) - VNET_HDR.size
            except BlockingIOError:
                break
            if not 0 < length <= MAX_PACKET:  # netif's size is 16 bits; the TAP is capped
                st.drops += 1
                st.drops_error += 1
                continue
            vflags, vgso, _hl, gso_size, _cs, _co, _nb = unpack_vnet(vnet)
            flags = tx_flags[vflags & fmask]
            xgso = xen_gso[vgso & kind]
            if xgso is None or flags is None or length > one_slot:
                # a GSO kind netif cannot carry (UDP) or the backend did not offer, a partial
                # checksum it did not agree to, or more slots than it accepts: the TAP's
                # offloads should have prevented it
                st.drops += 1
                st.drops_not_negotiated += 1
                continue
            if xgso:
                flags |= NETTXF_extra_info
            if hs:  # first request: the header slot
                free_slots.pop()
                rest = length - ss if length > ss else 0
                sid = SLOT_ID_BASE + slot
                busy[sid] = 1
                _pack_req(buf, offsets[prod & mask], slot * ss, 0,
                          flags | NETTXF_header_slot | (NETTXF_more_data if rest else 0),
                          sid, length)
                npages = -(-rest // PAGE_SIZE)
                first = 0
            else:  # first request: the frame's first page, sized as the whole packet
                npages = -(-length // PAGE_SIZE)
                _pack_req(buf, offsets[prod & mask], (ref0 + base) | pbit, 0,
                          flags | (NETTXF_more_data if npages > 1 else 0), base, length)
                rest = length - PAGE_SIZE
                first = 1
            prod += 1
            if xgso:
                _pack_extra(buf, offsets[prod & mask], XEN_NETIF_EXTRA_TYPE_GSO, 0,
                            gso_size, xgso, 0, 0)
                prod += 1
            if npages:
                nfrag = npages - first
                end = base + npages
                if nfrag:  # the pages' templates, then the real size of the last page
                    self._put(prod, req_tmpl[(base + first) * _SLOT:end * _SLOT])
                    prod += nfrag
                    _pack_req(buf, offsets[(prod - 1) & mask], (ref0 + end - 1) | pbit, 0, 0,
                              end - 1, rest - (nfrag - 1) * PAGE_SIZE)
                busy[base:end] = _ONES[:npages]  # in flight: no longer free
                granted.append((gnt_span[base * _GE:end * _GE], gnt_tmpl[base * _GE:end * _GE]))
            ring.req_prod_pvt = prod & MASK32
            slots += prod - start
            nbytes += length
            sent += 1
        if granted:  # before the requests are published (by the caller's push)
            self.policy.grant(granted)
        st.slots_consumed += slots
        st.tx_packets += sent
        st.tx_bytes += nbytes
        if hs:
            st.tx_header_slot_packets += sent
        return sent

    def header_slots_in_use(self) -> int:
        return self.slots.in_use
