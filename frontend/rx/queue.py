"""Netfront RX: keep the RX ring stocked with granted pages; write received frames to the TAP.

Stock netif (the default): the response at each ring position answers the request posted at
that position, and must carry its id; a GSO extra-info slot consumes its position's buffer,
which is simply posted again. With ``feature-rx-by-id`` (ours) buffers are found by the
response's id and may complete in any order; the extra slot names its buffer in
``gso.features``. A frame spanning several buffers (``NETRXF_more_data``) is written
with one ``writev`` straight out of the shared pages. Every response is checked first: an
unknown or duplicate id, or a size past the buffer, marks the device broken instead of
writing anywhere it should not. A frame whose GSO extra says size 0 is dropped (counted
``drops_gso``), as Linux's ``xennet_set_skb_gso`` drops it: never handed to the TAP.

In stock order the common frames go through a batched path (``frontend/rx/stock.py``); this
module holds the per-response path that takes the rest and names every fault.
"""

from __future__ import annotations

import os

from frontend.faults import BackendError
from frontend.grants.base import GrantPolicy
from frontend.rx.stock import _GE, MULTI_FLAGS, RX_BUFFERS, RX_MASK, StockOrder
from shared.protocol.grant import RESERVED_REFS
from shared.protocol.netif import (
    EXTRA_INFO,
    PAGE_SIZE,
    RX_REQUEST,
    RX_RESPONSE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
)
from shared.protocol.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR,
    XEN_TO_VIRTIO_GSO,
    checksum_setup,
)
from shared.protocol.region import Area
from shared.protocol.ring import MASK32, FrontRing
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import Agreement, gso_accepted

_unpack_rsp = RX_RESPONSE.unpack_from
_pack_req = RX_REQUEST.pack_into
_VNET_NONE = VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
_VNET_VALID = VNET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0)


class RxQueue(StockOrder):
    def __init__(self, region: Area, tap_fd: int, stats: RingStats, policy: GrantPolicy,
                 backend_domid: int = 0, agreement: Agreement | None = None) -> None:
        lay = region.layout
        ag = agreement
        #: what this frontend said it accepts (its own keys), and the by-id extension
        self.by_id = ag is not None and ag.rx_by_id
        self.sg = ag is None or ag.rx_sg
        self.gso_ok = gso_accepted(ag, rx=True)
        self.ring = FrontRing(region.rx_ring, RX_REQUEST.size)
        self.buf = self.ring.buf
        self.tap_fd = tap_fd
        self.stats = stats
        self.grants = region.grants
        self.policy = policy
        self.domid = backend_domid
        # the first RX_BUFFERS pages of this queue's payload, granted by the refs after
        # RESERVED_REFS that name them (netfront grants payload page p as RESERVED_REFS + p)
        first = region.payload.start
        self.ref0 = RESERVED_REFS + first
        self.frames = [lay.payload_page + first + i for i in range(RX_BUFFERS)]
        self.views = [region.page(f) for f in self.frames]
        self.refs = [(self.ref0 + i) | policy.ref_bit for i in range(RX_BUFFERS)]
        self.posted = bytearray(RX_BUFFERS)
        self.free = list(range(RX_BUFFERS))
        self.vnet = bytearray(VNET_HDR.size)
        self._reset_frame()
        #: stock order: every buffer at a ring position before ``done`` is back with us
        #: (positions ``done``..``rsp_cons`` are a frame still being collected)
        self.done = self.ring.req_prod_pvt
        self._init_stock(region, backend_domid)

    def _reset_frame(self) -> None:
        self.iov: list = [self.vnet]
        self.ids: list[int] = []
        self.flags = 0
        self.gso = (0, 0)
        self.bad = False

    def held(self) -> int:
        """Buffers taken from the backend (answered) and not yet back with us: 0 between
        frames."""
        if self.by_id:
            return RX_BUFFERS - len(self.free) - sum(self.posted)
        return (self.ring.rsp_cons - self.done) & MASK32

    def active(self) -> int:
        """Buffers granted to the backend or held: posted plus ``held``."""
        if self.by_id:
            return RX_BUFFERS - len(self.free)
        return (self.ring.req_prod_pvt - self.done) & MASK32

    def refill(self, limit: int = RX_BUFFERS) -> int:
        """Post buffers (not yet pushed) until ``limit`` are posted or held."""
        return self._refill_by_id(limit) if self.by_id else self._refill_stock(limit)

    def poll(self, budget: int = 64) -> int:
        """Consume responses, writing each complete frame to the TAP. Returns frames done."""
        return self._poll_general(budget) if self.by_id else self._poll_stock(budget)

    def _refill_by_id(self, limit: int = RX_BUFFERS) -> int:
        """Post free buffers (not yet pushed) until ``limit`` are posted."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        free, refs, posted = self.free, self.refs, self.posted
        n = min(len(free), ring.free_requests(), limit - (RX_BUFFERS - len(free)))
        prod = ring.req_prod_pvt
        span, tmpl = self.gnt_span, self.gnt_tmpl
        granted = []
        for _ in range(n):
            i = free.pop()
            granted.append((span[i * _GE:(i + 1) * _GE], tmpl[i * _GE:(i + 1) * _GE]))
            posted[i] = 1
            _pack_req(buf, entry(prod), i, 0, refs[i])
            prod += 1
        self.policy.grant(granted)  # before the requests are published
        ring.req_prod_pvt = prod & MASK32
        self.stats.grants_active = RX_BUFFERS - len(free)
        return n

    def _release(self, rid: int) -> None:
        if not self.policy.revoke([(self.ref0 + rid, 1)]):
            raise BackendError(f"backend still holds rx gref {self.refs[rid]}")
        if self.by_id:
            self.free.append(rid)
        else:
            self.done = (self.done + 1) & MASK32

    def _take(self, rid: int, pos: int) -> None:
        """The response at ring position ``pos`` answers buffer ``rid``: is that right?"""
        if not self.by_id:
            if rid != pos & RX_MASK:
                raise BackendError(f"rx response for buffer {rid} that is not posted at ring "
                                   f"position {pos} (buffer {pos & RX_MASK} is: stock netif "
                                   "answers in ring order)")
            return
        if rid >= RX_BUFFERS or not self.posted[rid]:
            raise BackendError(f"rx response for buffer {rid} that is not posted")
        self.posted[rid] = 0

    def _write(self, flags: int, gtype: int, gsize: int, pieces: tuple) -> None:
        """One frame to the TAP: its virtio_net_hdr from the response's flags and GSO."""
        st = self.stats
        vnet = _VNET_NONE
        if flags & NETRXF_csum_blank:
            setup = checksum_setup(pieces[0])
            if setup is not None or gtype:
                vnet = self.vnet
                VNET_HDR.pack_into(vnet, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM if setup else 0,
                                   gtype, 0, gsize, *(setup or (0, 0)), 0)
        elif flags & NETRXF_data_validated and not gtype:
            vnet = _VNET_VALID
        elif gtype or flags & NETRXF_data_validated:
            vnet = self.vnet
            VNET_HDR.pack_into(vnet, 0, VIRTIO_NET_HDR_F_DATA_VALID
                               if flags & NETRXF_data_validated else 0, gtype, 0, gsize, 0, 0, 0)
        try:
            st.rx_bytes += os.writev(self.tap_fd, (vnet, *pieces)) - VNET_HDR.size
            st.rx_packets += 1
        except OSError:
            st.drops += 1
            st.drops_error += 1

    def _poll_general(self, budget: int = 64) -> int:
        """Consume responses one by one, writing each complete frame to the TAP (feature-
        rx-by-id, and stock frames the batch did not take). Returns frames done."""
        ring, buf, entry, views = self.ring, self.buf, self.ring.entry, self.views
        posted, by_id = self.posted, self.by_id
        frames = 0
        while frames < budget:
            n = ring.unconsumed_responses()
            if not n:
                break
            cons = ring.rsp_cons
            end = cons + n
            while cons != end and frames < budget:
                pos = cons
                rid, off, flags, status = _unpack_rsp(buf, entry(cons))
                cons += 1
                if not (flags & MULTI_FLAGS or self.ids) and 0 < status <= PAGE_SIZE - off \
                        and rid < RX_BUFFERS \
                        and (posted[rid] if by_id else rid == pos & RX_MASK):
                    posted[rid] = 0  # the common case: a frame in one buffer
                    self._deliver_one(rid, views[rid][off:off + status], flags)
                    frames += 1
                    continue
                self._take(rid, pos)
                self.ids.append(rid)
                if status < 0:
                    self.bad = True
                elif off + status > PAGE_SIZE:
                    raise BackendError(f"rx response {rid}: {off}+{status} past its buffer")
                else:
                    self.iov.append(views[rid][off:off + status])
                if len(self.ids) == 1:
                    self.flags = flags
                if flags & NETRXF_extra_info:
                    if cons == end:
                        raise BackendError("rx extra info missing")
                    etype, _ef, gsize, gtype, _pad, retired = EXTRA_INFO.unpack_from(
                        buf, entry(cons))
                    pos = cons
                    cons += 1
                    if etype != XEN_NETIF_EXTRA_TYPE_GSO or gtype not in self.gso_ok:
                        raise BackendError(f"rx extra info type {etype}/{gtype} (GSO kinds "
                                           f"this frontend accepts: {sorted(self.gso_ok)})")
                    if not by_id:  # stock: the slot's own position's buffer, posted again
                        retired = pos & RX_MASK
                    self._take(retired, pos)
                    self.ids.append(retired)
                    self.gso = (XEN_TO_VIRTIO_GSO[gtype], gsize)
                    if not gsize:  # xennet_set_skb_gso: "GSO size must not be zero"
                        self.bad = True
                        self.stats.drops_gso += 1
                if flags & NETRXF_more_data:
                    if not self.sg:
                        raise BackendError("multi-slot rx frame without this frontend's "
                                           "feature-sg")
                    if len(self.ids) > 20:
                        raise BackendError("rx frame spans more than 20 buffers")
                    continue
                self._deliver()
                frames += 1
            ring.rsp_cons = cons & MASK32
        return frames

    def _deliver_one(self, rid: int, data: memoryview, flags: int) -> None:
        """_deliver for a frame that fits one buffer, without the multi-buffer bookkeeping."""
        self._write(flags, 0, 0, (data,))
        self._release(rid)

    def _deliver(self) -> None:
        iov = self.iov
        if self.bad or len(iov) < 2:
            self.stats.drops += 1
        else:
            self._write(self.flags, *self.gso, tuple(iov[1:]))
        for rid in self.ids:
            self._release(rid)
        self._reset_frame()
