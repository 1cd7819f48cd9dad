"""Netback RX: frames from the vif copied into buffers the frontend posted (Linux ``rx.c``).

Each posted request is validated once, when it is taken off the ring (its id unique among
posted buffers, its grant writable by this domain). A frame is read from the vif straight into
the posted pages - the kernel's copy is our grant copy - so no Python bytes object exists per
frame. Responses carry the request id ("ring v2"): the frontend finds buffers by id, not slot.
A GSO frame takes one more slot for its extra info, which retires one posted buffer and names
it in gso.features so the frontend can post it again.
"""

from __future__ import annotations

import os
from collections import deque
from itertools import islice

from backend.capture import NO_CAPTURE
from backend.gntmap import GntMap
from shared.netif import (
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
        #: posted buffers, validated, in posting order: their ids and their pages' views
        self.posted: deque[int] = deque()
        self.posted_views: deque[memoryview] = deque()
        self.posted_ids: set[int] = set()
        self.pages = {f: region.page(f) for f in region.layout.payload_frames}
        self.vnet = bytearray(VNET_HDR.size)
        self.capture = NO_CAPTURE  # the netback's CaptureTap (backend/capture.py)

    def refill(self) -> int:
        """Take newly posted requests off the ring, validating each once."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        n = ring.unconsumed_requests()
        check = self.gntmap.check
        for _ in range(n):
            rid, _pad, gref = _unpack_req(buf, entry(ring.req_cons))
            ring.req_cons = (ring.req_cons + 1) & MASK32
            if rid in self.posted_ids:
                raise FatalRxError(f"rx buffer id {rid} posted twice")
            frame = check(gref, True)
            self.posted_ids.add(rid)
            self.posted.append(rid)
            self.posted_views.append(self.pages[frame])
        self.stats.grants_active = len(self.posted)
        return n

    def can_receive(self) -> bool:
        if len(self.posted) < NEED:
            self.refill()
        return len(self.posted) >= NEED

    def action(self, budget: int = 64) -> bool:
        """Move up to ``budget`` frames from the vif. True if it stopped on the budget."""
        posted, views, st = self.posted, self.posted_views, self.stats
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        vnet = self.vnet
        for _ in range(budget):
            if len(posted) < NEED:
                self.refill()
                if len(posted) < NEED:
                    return False
            iov = [vnet, *islice(views, NEED - 1)]
            try:
                n = os.readv(self.vif_fd, iov)
            except BlockingIOError:
                return False
            length = n - VNET_HDR.size
            if length <= 0:
                continue
            if self.capture.on:
                self.capture.into(iov[1:], length)
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
                EXTRA_INFO.pack_into(buf, entry(prod), XEN_NETIF_EXTRA_TYPE_GSO, 0, gso_size,
                                     xgso, 0, retired)
                prod += 1
                used.append(retired)
            left = length - first
            while left > 0:
                rid = posted.popleft()
                views.popleft()
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

    def push(self) -> bool:
        return self.ring.push_responses()

    def release_all(self) -> None:
        """Disconnect: posted buffers are simply forgotten (the frontend owns them)."""
        self.posted.clear()
        self.posted_views.clear()
        self.posted_ids.clear()
        self.stats.grants_active = 0
