"""Netback RX: frames from the vif copied into buffers the frontend posted (Linux ``rx.c``).

Each posted request is validated when it is taken off the ring (its id unique among posted
buffers, its grant writable by this domain) and again when the backend writes into it, with
GTF_writing set during the copy (``backend/rxcopy.py``): a buffer the frontend
revoked meanwhile is not written but answered with XEN_NETIF_RSP_ERROR and counted
(``rx_grant_revoked``) - in stock order, with every buffer before it.

Stock netif (the default): requests are used in ring order and the response at each ring
position answers the request at that position; a GSO frame's extra-info slot follows its
first response and consumes a request of its own (whose buffer stays empty, ``gso.features``
0), as Linux ``xenvif_rx_extra_slot``. With ``feature-rx-by-id`` (ours) responses may skip a
buffer and the extra slot names the buffer it retires in ``gso.features``.

A frame is read from the vif straight into the posted pages through the DMA view - the
kernel's copy is our grant copy - when enough buffers for the largest frame are posted: the
first page into the first buffer, the rest from the third on (the second is the extra slot's,
if the frame turns out to be GSO; a jumbo frame without GSO is then moved down one buffer,
stock netif having no way to skip one). With fewer posted, the frame is read into a private
buffer and held until as many buffers as *it* needs are posted, then grant-copied (Linux
queues the skb the same way), so a frontend that posts few buffers still receives the frames
that fit.
"""

from __future__ import annotations

import os
from collections import deque
from itertools import islice

from backend.capture import NO_CAPTURE
from backend.gntmap import GntMap
from shared.faults import PeerFault
from shared.netif import (
    EXTRA_INFO,
    MAX_FRAME_PAGES,
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
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_TO_XEN_GSO,
    VNET_HDR,
)
from shared.region import Region
from shared.ring import MASK32, BackRing
from shared.stats import RingStats
from shared.xenbus import Agreement, gso_accepted

#: buffers the largest frame may need: a 64 KiB GSO frame spans 17 pages, plus its extra slot
NEED = MAX_FRAME_PAGES + 1
_unpack_req = RX_REQUEST.unpack_from
_pack_rsp = RX_RESPONSE.pack_into


class FatalRxError(PeerFault):
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
        #: partial checksums (csum_blank) only if the frontend takes them for both families:
        #: else the vif was told to hand none over (``shared.netdev.offload_flags``)
        self.csum_ok = ag is None or ag.rx_csum
        #: posted buffers, validated, in posting order: ids, grant indexes, the grant entries
        #: as validated (a u64 each), DMA targets
        self.posted: deque[int] = deque()
        self.posted_grefs: deque[int] = deque()
        self.posted_exps: deque[int] = deque()
        self.posted_views: deque[memoryview] = deque()
        self.posted_ids: set[int] = set()
        self.vnet = bytearray(VNET_HDR.size)
        self.capture = NO_CAPTURE  # the netback's CaptureTap (backend/capture.py)
        #: a frame read (into the grant module's bounce area) while fewer than NEED buffers
        #: were posted, waiting until as many as it needs are
        self.held = 0  # its length (0: none)
        self.held_need = 0
        self._gso = 0  # the netif GSO type of the frame being answered

    def refill(self) -> int:
        """Take newly posted requests off the ring, validating each once."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        n = ring.unconsumed_requests()
        post = self.gntmap.rx.post
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
        """Is there room for the next frame: the held one's slots, else any buffer."""
        want = self.held_need or 1
        if len(self.posted) < want:
            self.refill()
        return len(self.posted) >= want

    def _pick(self, at: list[int]) -> tuple[list, list, list]:
        """Views, grant indexes and validated entries of the posted buffers ``at``."""
        return ([self.posted_views[i] for i in at], [self.posted_grefs[i] for i in at],
                [self.posted_exps[i] for i in at])

    def action(self, budget: int = 64) -> bool:
        """Move up to ``budget`` frames from the vif. True if it stopped on the budget."""
        posted, st, gntmap = self.posted, self.stats, self.gntmap
        vnet, write, vif_fd = self.vnet, gntmap.rx.write, self.vif_fd
        direct = [0, *range(2, NEED)]  # the second buffer is kept for a GSO extra slot
        for _ in range(budget):
            if self.held:
                if not self._place_held():
                    return False
                continue
            if len(posted) < NEED:
                self.refill()
                if not posted:
                    return False
            if len(posted) < NEED:  # into the bounce area, held until it fits
                try:
                    n = os.readv(vif_fd, [vnet, gntmap.rx.bounce()])
                except BlockingIOError:
                    return False
                if n > VNET_HDR.size:
                    self.held = n - VNET_HDR.size
                    self.held_need = self._need(self.held)
                continue
            try:
                w = write(vif_fd, vnet, *self._pick(direct), NEED - 1)
            except BlockingIOError:
                return False
            if w.revoked:
                self._retire([direct[i] for i in w.revoked])
                if w.n:  # read, but a buffer it needed was revoked: dropped
                    st.drops += 1
                    st.drops_error += 1
                continue
            length = w.n - VNET_HDR.size
            if length <= 0:
                continue
            need = self._need(length)
            if not need:
                continue
            if need > 1 and not self._gso and not self.by_id:
                # stock order cannot skip the second buffer: move pages 2.. down by one
                bounce = gntmap.rx.bounce()
                for k in range(1, need):
                    bounce[(k - 1) * PAGE_SIZE:k * PAGE_SIZE] = self.posted_views[k + 1]
                bad = gntmap.rx.copy_in(1, need, self.posted_views, self.posted_grefs,
                                        self.posted_exps)
                if bad:
                    self._retire(bad)
                    st.drops += 1
                    st.drops_error += 1
                    continue
                self._respond(length, range(need))
            else:
                self._respond(length, [0, *range(2, need + (not self._gso))])
        st.grants_active = len(posted)
        return True

    def _need(self, length: int) -> int:
        """Slots this frame takes (0: dropped, counted, as the frontend cannot take it)."""
        vflags, vgso = VNET_HDR.unpack_from(self.vnet)[:2]
        xgso = VIRTIO_TO_XEN_GSO.get(vgso & ~VIRTIO_NET_HDR_GSO_ECN, -1) if vgso else 0
        nbufs = -(-length // PAGE_SIZE)
        if (xgso and xgso not in self.gso_ok) or (nbufs > 1 and not self.sg) \
                or (vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not self.csum_ok):
            st = self.stats
            st.drops += 1
            st.drops_not_negotiated += 1
            self.held = self.held_need = 0
            return 0
        self._gso = xgso
        return nbufs + (1 if xgso else 0)

    def _place_held(self) -> bool:
        """Grant-copy the held frame into posted buffers once as many as it needs are."""
        need = self.held_need
        if len(self.posted) < need:
            self.refill()
            if len(self.posted) < need:
                return False
        length = self.held
        self.held = self.held_need = 0
        data = [0, *range(2 if self._gso else 1, need)]
        bad = self.gntmap.rx.copy_in(0, len(data), *self._pick(data))
        if bad:
            self._retire([data[i] for i in bad])
            self.stats.drops += 1
            self.stats.drops_error += 1
            return True
        self._respond(length, data)
        return True

    def _respond(self, length: int, data: list[int] | range) -> None:
        """Answer one frame whose pages are in posted buffers ``data`` (indices into the
        posted queue, in frame order); with a GSO extra, buffer 1 is its slot's."""
        posted, st = self.posted, self.stats
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        vflags, _vgso, _hl, gso_size, _cs, _co, _nb = VNET_HDR.unpack_from(self.vnet)
        xgso = self._gso
        if self.capture.on:  # the frame's pages, in frame order, before they are answered
            _views, cgrefs, cexps = self._pick(list(data))
            self.capture.into(self.gntmap, cgrefs, cexps, length)
        flags = 0
        if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            flags = NETRXF_csum_blank | NETRXF_data_validated
        elif vflags & VIRTIO_NET_HDR_F_DATA_VALID:
            flags = NETRXF_data_validated
        ids = [posted[i] for i in data]
        prod = ring.rsp_prod_pvt
        first = min(length, PAGE_SIZE)
        _pack_rsp(buf, entry(prod), ids[0], 0,
                  flags | (NETRXF_more_data if len(ids) > 1 else 0)
                  | (NETRXF_extra_info if xgso else 0), first)
        prod += 1
        used = set(ids)
        if xgso:  # the extra slot consumes buffer 1 (stock: its own ring position)
            retired = posted[1]
            EXTRA_INFO.pack_into(buf, entry(prod), XEN_NETIF_EXTRA_TYPE_GSO, 0, gso_size,
                                 xgso, 0, retired if self.by_id else 0)
            prod += 1
            used.add(retired)
        left = length - first
        for rid in islice(ids, 1, None):
            size = min(left, PAGE_SIZE)
            left -= size
            _pack_rsp(buf, entry(prod), rid, 0, NETRXF_more_data if left else 0, size)
            prod += 1
        ring.rsp_prod_pvt = prod & MASK32
        # retire the buffers used; any skipped (by-id only) stay posted, in order
        self._drop_posted(range(max(data[-1], 1 if xgso else 0) + 1), used)
        self.posted_ids.difference_update(used)
        st.rx_packets += 1
        st.rx_bytes += length
        st.copy_bytes += length
        self._gso = 0

    def _drop_posted(self, span: range, gone: set[int]) -> None:
        """Take the buffers in ``span`` whose ids are in ``gone`` off the posted queues."""
        queues = (self.posted, self.posted_grefs, self.posted_exps, self.posted_views)
        kept = [tuple(q[i] for q in queues) for i in span if self.posted[i] not in gone]
        for q in queues:
            for _ in span:
                q.popleft()
        for entry in reversed(kept):
            for q, v in zip(queues, entry, strict=True):
                q.appendleft(v)

    def _retire(self, revoked: list[int]) -> None:
        """Buffers revoked under us: answered with XEN_NETIF_RSP_ERROR (never written), so
        the frontend gets its ids back. Stock netif answers in ring order, so every buffer
        before the last revoked one is answered the same way."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        span = range(max(revoked) + 1)
        gone = [self.posted[i] for i in (span if not self.by_id else sorted(revoked))]
        prod = ring.rsp_prod_pvt
        for rid in gone:
            _pack_rsp(buf, entry(prod), rid, 0, 0, XEN_NETIF_RSP_ERROR)
            prod += 1
        ring.rsp_prod_pvt = prod & MASK32
        self._drop_posted(span, set(gone))
        self.posted_ids.difference_update(gone)
        self.stats.rx_grant_revoked += len(revoked)

    def push(self) -> bool:
        return self.ring.push_responses()

    def release_all(self) -> None:
        """Disconnect: posted buffers are simply forgotten (the frontend owns them); a held
        frame is dropped."""
        if self.held:
            self.stats.drops += 1
            self.held = self.held_need = 0
        self.posted.clear()
        self.posted_grefs.clear()
        self.posted_exps.clear()
        self.posted_views.clear()
        self.posted_ids.clear()
        self.stats.grants_active = 0
