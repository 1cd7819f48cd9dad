"""Netback RX: frames from the vif copied into buffers the frontend posted (Linux ``rx.c``).

Each posted request is validated when it is taken off the ring (its id unique among posted
buffers, its grant writable by this domain) and again when the backend writes into it, with
GTF_writing set during the copy (``GntMap.rx_write``): a buffer the frontend revoked meanwhile is
not written but answered with XEN_NETIF_RSP_ERROR and counted (``rx_grant_revoked``). A frame
is read from the vif straight into the posted pages through the DMA view - the kernel's copy is
our grant copy - so no Python bytes object exists per frame.
Responses carry the request id ("ring v2"): the frontend finds buffers by id, not slot.
A GSO frame takes one more slot for its extra info, which retires one posted buffer and names
it in gso.features so the frontend can post it again.
"""

from __future__ import annotations

from collections import deque

from backend.capture import NO_CAPTURE
from backend.gntmap import GntMap
from shared.netif import (
    EXTRA_INFO,
    PAGE_SIZE,
    RX_REQUEST,
    RX_RESPONSE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_RSP_ERROR,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
)
from shared.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_TO_XEN_GSO,
    VNET_HDR,
)
from shared.region import Region
from shared.ring import MASK32, BackRing
from shared.stats import RingStats

#: buffers a frame may need: a 64 KiB GSO frame spans 17 pages, plus its extra-info slot
NEED = 18
_unpack_req = RX_REQUEST.unpack_from
_pack_rsp = RX_RESPONSE.pack_into


class FatalRxError(Exception):
    """The frontend posted something no correct frontend posts."""


class RxPath:
    def __init__(self, region: Region, gntmap: GntMap, vif_fd: int, stats: RingStats) -> None:
        self.ring = BackRing(region.rx_ring, RX_REQUEST.size)
        self.buf = self.ring.buf
        self.region = region
        self.gntmap = gntmap
        self.vif_fd = vif_fd
        self.stats = stats
        #: posted buffers, validated, in posting order: ids, grant indexes, the grant entries
        #: as validated (a u64 each), DMA targets
        self.posted: deque[int] = deque()
        self.posted_grefs: deque[int] = deque()
        self.posted_exps: deque[int] = deque()
        self.posted_views: deque[memoryview] = deque()
        self.posted_ids: set[int] = set()
        self.vnet = bytearray(VNET_HDR.size)
        self.capture = NO_CAPTURE  # the netback's CaptureTap (backend/capture.py)

    def refill(self) -> int:
        """Take newly posted requests off the ring, validating each once."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        n = ring.unconsumed_requests()
        post = self.gntmap.rx_post
        for _ in range(n):
            rid, _pad, gref = _unpack_req(buf, entry(ring.req_cons))
            ring.req_cons = (ring.req_cons + 1) & MASK32
            if rid in self.posted_ids:
                raise FatalRxError(f"rx buffer id {rid} posted twice")
            gi, entry_now, view = post(gref)
            self.posted_ids.add(rid)
            self.posted.append(rid)
            self.posted_grefs.append(gi)
            self.posted_exps.append(entry_now)
            self.posted_views.append(view)
        self.stats.grants_active = len(self.posted)
        return n

    def can_receive(self) -> bool:
        if len(self.posted) < NEED:
            self.refill()
        return len(self.posted) >= NEED

    def action(self, budget: int = 64) -> bool:
        """Move up to ``budget`` frames from the vif. True if it stopped on the budget."""
        posted, views, st = self.posted, self.posted_views, self.stats
        pgrefs, pexps = self.posted_grefs, self.posted_exps
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        vnet, write, vif_fd = self.vnet, self.gntmap.rx_write, self.vif_fd
        for _ in range(budget):
            if len(posted) < NEED:
                self.refill()
                if len(posted) < NEED:
                    return False
            try:
                w = write(vif_fd, vnet, views, pgrefs, pexps, NEED - 1)
            except BlockingIOError:
                return False
            if w.revoked:
                self._retire(w.revoked)
                if w.n:  # read, but a buffer it needed was revoked: dropped
                    st.drops += 1
                    st.drops_error += 1
                continue
            n = w.n
            length = n - VNET_HDR.size
            if length <= 0:
                continue
            if self.capture.on:
                self.capture.into(self.gntmap, pgrefs, pexps, length)
            vflags, vgso, _hl, gso_size, _cs, _co, _nb = VNET_HDR.unpack_from(vnet)
            flags = 0
            if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                flags = NETRXF_csum_blank | NETRXF_data_validated
            elif vflags & VIRTIO_NET_HDR_F_DATA_VALID:
                flags = NETRXF_data_validated
            xgso = VIRTIO_TO_XEN_GSO.get(vgso & 0x7F, 0) if vgso else 0
            nbufs = -(-length // PAGE_SIZE)
            prod = ring.rsp_prod_pvt
            rid = posted.popleft()
            views.popleft()
            pgrefs.popleft()
            pexps.popleft()
            first = min(length, PAGE_SIZE)
            _pack_rsp(buf, entry(prod), rid, 0,
                      flags | (NETRXF_more_data if nbufs > 1 else 0)
                      | (NETRXF_extra_info if xgso else 0), first)
            prod += 1
            used = [rid]
            if xgso:  # the extra slot retires the buffer after the frame's last one
                retired = posted[nbufs - 1]
                del posted[nbufs - 1]
                del views[nbufs - 1]
                del pgrefs[nbufs - 1]
                del pexps[nbufs - 1]
                EXTRA_INFO.pack_into(buf, entry(prod), XEN_NETIF_EXTRA_TYPE_GSO, 0, gso_size,
                                     xgso, 0, retired)
                prod += 1
                used.append(retired)
            left = length - first
            while left > 0:
                rid = posted.popleft()
                views.popleft()
                pgrefs.popleft()
                pexps.popleft()
                size = min(left, PAGE_SIZE)
                left -= size
                _pack_rsp(buf, entry(prod), rid, 0, NETRXF_more_data if left else 0, size)
                prod += 1
                used.append(rid)
            ring.rsp_prod_pvt = prod & MASK32
            self.posted_ids.difference_update(used)
            st.rx_packets += 1
            st.rx_bytes += length
            st.copy_bytes += length
        st.grants_active = len(posted)
        return True

    def _retire(self, revoked: list[int]) -> None:
        """Buffers revoked under us: each answered alone with XEN_NETIF_RSP_ERROR (never
        written), so the frontend gets its id back; the frame stays in the vif's queue."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        prod = ring.rsp_prod_pvt
        for i in reversed(revoked):
            rid = self.posted[i]
            for q in (self.posted, self.posted_grefs, self.posted_exps, self.posted_views):
                del q[i]
            self.posted_ids.discard(rid)
            _pack_rsp(buf, entry(prod), rid, 0, 0, XEN_NETIF_RSP_ERROR)
            prod += 1
            self.stats.rx_grant_revoked += 1
        ring.rsp_prod_pvt = prod & MASK32

    def push(self) -> bool:
        return self.ring.push_responses()

    def release_all(self) -> None:
        """Disconnect: posted buffers are simply forgotten (the frontend owns them)."""
        self.posted.clear()
        self.posted_grefs.clear()
        self.posted_exps.clear()
        self.posted_views.clear()
        self.posted_ids.clear()
        self.stats.grants_active = 0
