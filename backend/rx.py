"""Netback RX: frames from the vif copied into buffers the frontend posted (Linux ``rx.c``).

Each posted request is validated once, when it is taken off the ring (its id unique among
posted buffers, its grant writable by this domain). Stock netif (the default): requests are
used in ring order and the response at each ring position answers the request at that
position; a GSO frame's extra-info slot follows its first response and consumes a request of
its own (whose buffer stays empty, ``gso.features`` 0), as Linux ``xenvif_rx_extra_slot``.
With ``feature-rx-by-id`` (ours) responses may skip a buffer and the extra slot names the
buffer it retires in ``gso.features``.

A frame is read from the vif straight into the posted pages - the kernel's copy is our grant
copy - when enough buffers for the largest frame are posted: the first page into the first
buffer, the rest from the third on (the second is the extra slot's, if the frame turns out to
be GSO). With fewer posted, the frame is read into a private buffer and held until as many
buffers as *it* needs are posted, then copied (Linux queues the skb the same way), so a
frontend that posts few buffers still receives the frames that fit.
"""

from __future__ import annotations

import os
from collections import deque
from itertools import islice

from backend.gntmap import GntMap
from shared.netif import (
    EXTRA_INFO,
    MAX_FRAME,
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
from shared.xenbus import Agreement, gso_accepted

#: buffers the largest frame may need: a 64 KiB GSO frame spans 17 pages, plus its extra slot
NEED = 18
_unpack_req = RX_REQUEST.unpack_from
_pack_rsp = RX_RESPONSE.pack_into


class FatalRxError(Exception):
    """The frontend posted something no correct frontend posts."""


class RxPath:
    def __init__(self, region: Region, gntmap: GntMap, vif_fd: int, stats: RingStats,
                 agreement: Agreement | None = None) -> None:
        self.ring = BackRing(region.rx_ring, RX_REQUEST.size)
        self.buf = self.ring.buf
        self.region = region
        self.gntmap = gntmap
        self.vif_fd = vif_fd
        self.stats = stats
        ag = agreement
        #: what the frontend accepts (its keys) and whether it takes buffers in any order
        self.by_id = ag is not None and ag.rx_by_id
        self.sg = ag is None or ag.rx_sg
        self.gso_ok = gso_accepted(ag, rx=True)
        #: posted buffers, validated, in posting order: their ids and their pages' views
        self.posted: deque[int] = deque()
        self.posted_views: deque[memoryview] = deque()
        self.posted_ids: set[int] = set()
        self.pages = {f: region.page(f) for f in region.layout.payload_frames}
        self.vnet = bytearray(VNET_HDR.size)
        #: a frame read while fewer than NEED buffers were posted, waiting for its own need
        self.bounce = bytearray(MAX_FRAME)
        self.held = 0  # its length (0: none)
        self.held_need = 0
        self._gso = 0  # the netif GSO type of the frame being answered

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
        """Is there room for the next frame: the held one's slots, else any buffer."""
        want = self.held_need or 1
        if len(self.posted) < want:
            self.refill()
        return len(self.posted) >= want

    def action(self, budget: int = 64) -> bool:
        """Move up to ``budget`` frames from the vif. True if it stopped on the budget."""
        posted, views = self.posted, self.posted_views
        vnet = self.vnet
        for _ in range(budget):
            if self.held:
                if not self._place_held():
                    return False
                continue
            if len(posted) < NEED:
                self.refill()
                if not posted:
                    return False
            if len(posted) >= NEED:  # straight into the posted pages (the second is skipped)
                iov = [vnet, views[0], *islice(views, 2, NEED)]
            else:
                iov = [vnet, self.bounce]
            try:
                n = os.readv(self.vif_fd, iov)
            except BlockingIOError:
                return False
            length = n - VNET_HDR.size
            if length <= 0:
                continue
            if len(iov) == 2:
                self.held = length
                self.held_need = self._need(length)
                if self.held_need and not self._place_held():
                    return False
                continue
            need = self._need(length)
            if not need:
                continue
            if need > 1 and not self._gso and not self.by_id:
                for k in range(1, need):  # stock order: no slot may be skipped without a GSO
                    views[k][:PAGE_SIZE] = views[k + 1]
                self._respond(length, range(need))
            else:
                self._respond(length, [0, *range(2, need + (not self._gso))])
        self.stats.grants_active = len(posted)
        return True

    def _need(self, length: int) -> int:
        """Slots this frame takes (0: dropped, counted, as the frontend cannot take it)."""
        vgso = VNET_HDR.unpack_from(self.vnet)[1]
        xgso = VIRTIO_TO_XEN_GSO.get(vgso & 0x7F, -1) if vgso else 0
        nbufs = -(-length // PAGE_SIZE)
        if (xgso and xgso not in self.gso_ok) or (nbufs > 1 and not self.sg):
            st = self.stats
            st.drops += 1
            st.drops_not_negotiated += 1
            self.held = self.held_need = 0
            return 0
        self._gso = xgso
        return nbufs + (1 if xgso else 0)

    def _place_held(self) -> bool:
        """Copy the held frame into posted buffers once as many as it needs are there."""
        need = self.held_need
        if len(self.posted) < need:
            self.refill()
            if len(self.posted) < need:
                return False
        length, views, src = self.held, self.posted_views, self.bounce
        data = [0, *range(2 if self._gso else 1, need)]
        for k, at in enumerate(data):
            size = min(PAGE_SIZE, length - k * PAGE_SIZE)
            views[at][:size] = src[k * PAGE_SIZE:k * PAGE_SIZE + size]
        self.held = self.held_need = 0
        self._respond(length, data)
        return True

    def _respond(self, length: int, data: list[int] | range) -> None:
        """Answer one frame whose pages are in posted buffers ``data`` (indices into the
        posted queue, in frame order); with a GSO extra, buffer 1 is its slot's."""
        posted, views, st = self.posted, self.posted_views, self.stats
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        vflags, _vgso, _hl, gso_size, _cs, _co, _nb = VNET_HDR.unpack_from(self.vnet)
        xgso = self._gso
        flags = 0
        if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            flags = NETRXF_csum_blank | NETRXF_data_validated
        elif vflags & VIRTIO_NET_HDR_F_DATA_VALID:
            flags = NETRXF_data_validated
        ids = [posted[i] for i in data]
        prod = ring.rsp_prod_pvt
        nbufs = len(ids)
        first = min(length, PAGE_SIZE)
        _pack_rsp(buf, entry(prod), ids[0], 0,
                  flags | (NETRXF_more_data if nbufs > 1 else 0)
                  | (NETRXF_extra_info if xgso else 0), first)
        prod += 1
        used = list(ids)
        if xgso:  # the extra slot consumes buffer 1 (stock: its own ring position)
            retired = posted[1]
            EXTRA_INFO.pack_into(buf, entry(prod), XEN_NETIF_EXTRA_TYPE_GSO, 0, gso_size,
                                 xgso, 0, retired if self.by_id else 0)
            prod += 1
            used.append(retired)
        left = length - first
        for rid in ids[1:]:
            size = min(left, PAGE_SIZE)
            left -= size
            _pack_rsp(buf, entry(prod), rid, 0, NETRXF_more_data if left else 0, size)
            prod += 1
        ring.rsp_prod_pvt = prod & MASK32
        # retire the buffers used; any skipped (by-id only) stay posted, in order
        top = max(data) + 1 if not xgso else max(max(data), 1) + 1
        keep = [(posted[i], views[i]) for i in range(top) if posted[i] not in used]
        for _ in range(top):
            posted.popleft()
            views.popleft()
        for rid, view in reversed(keep):
            posted.appendleft(rid)
            views.appendleft(view)
        self.posted_ids.difference_update(used)
        st.rx_packets += 1
        st.rx_bytes += length
        st.copy_bytes += length
        self._gso = 0

    def push(self) -> bool:
        return self.ring.push_responses()

    def release_all(self) -> None:
        """Disconnect: posted buffers are simply forgotten (the frontend owns them); a held
        frame is dropped."""
        if self.held:
            self.stats.drops += 1
            self.held = self.held_need = 0
        self.posted.clear()
        self.posted_views.clear()
        self.posted_ids.clear()
        self.stats.grants_active = 0
