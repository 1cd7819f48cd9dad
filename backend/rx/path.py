"""Netback RX: frames from the vif copied into buffers the frontend posted (Linux ``rx.c``).

The core of RX; how a frame's bytes get into the frontend's pages is the RX mechanism's
(``backend/rx/modes/``: the grant copy, a mapping receiver), which this module knows by its
protocol only (``backend/rx/modes/base.RxMechanism``). Each posted request is validated when it
is taken off the ring (its id unique among posted buffers; its grant writable by this domain,
by the mechanism's ``post``) and again when the mechanism writes into it, with GTF_writing set
meanwhile: a buffer the frontend revoked in between is not written but answered with
XEN_NETIF_RSP_ERROR and counted (``rx_grant_revoked``) - in stock order, with every buffer
before it.

Stock netif (the default): requests are used in ring order and the response at each ring
position answers the request at that position; a GSO frame's extra-info slot follows its
first response and consumes a request of its own (whose buffer stays empty, ``gso.features``
0), as Linux ``xenvif_rx_extra_slot``. With ``feature-rx-by-id`` (ours) responses may skip a
buffer and the extra slot names the buffer it retires in ``gso.features``.

When enough buffers for the largest frame are posted, the mechanism reads the frame from the
vif (``write``) and places its pages where ``_layout`` says once its length and GSO kind are
known. With fewer posted, the frame is read into the mechanism's private buffer and held until
as many buffers as *it* needs are posted, then copied in (``copy_in``; Linux queues the skb
the same way), so a frontend that posts few buffers still receives the frames that fit.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from itertools import islice

from backend.capture import NO_CAPTURE
from backend.grants.gntmap import GntMap
from backend.mechanisms import load, own_counters
from backend.rx.small import NEED, PREDICTED, RX_SHRINK_AFTER, SmallFrames
from shared.faults import PeerFault
from shared.protocol.netif import (
    EXTRA_INFO,
    PAGE_SIZE,
    RX_REQUEST,
    RX_RESPONSE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_RSP_ERROR,
    NETRXF_extra_info,
    NETRXF_more_data,
)
from shared.protocol.offload import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_TO_NETRXF,
    VIRTIO_TO_XEN_GSO,
    VNET_HDR,
)
from shared.protocol.region import Area
from shared.protocol.ring import MASK32, BackRing
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import Agreement, gso_accepted

_unpack_req = RX_REQUEST.unpack_from
#: virtio_net_hdr's flags, gso_type, hdr_len, gso_size
_unpack_vnet4 = struct.Struct("<BBHH").unpack_from
_pack_rsp = RX_RESPONSE.pack_into


class FatalRxError(PeerFault):
    """The frontend posted something no correct frontend posts."""


class RxPath(SmallFrames):
    """The RX ring of one connection, through mechanism ``mode`` (``backend/rx/modes/``)."""

    def __init__(self, region: Area, gntmap: GntMap, vif_fd: int, stats: RingStats,
                 agreement: Agreement | None = None, mode: str = "copy",
                 own: object | None = None) -> None:
        self.ring = BackRing(region.rx_ring, RX_REQUEST.size)
        self.buf = self.ring.buf
        self.region = region
        self.gntmap = gntmap
        self.vif_fd = vif_fd
        self.stats = stats
        self.mode = mode
        cls = load("rx", mode)
        #: the mechanism in force; ``own``: its counters (the netback keeps them per process)
        self.mech = cls(gntmap, stats, own_counters(cls) if own is None else own)
        ag = agreement
        #: what the frontend accepts (its keys) and whether it takes buffers in any order
        self.by_id = ag is not None and ag.rx_by_id
        self.sg = ag is None or ag.rx_sg
        self.gso_ok = gso_accepted(ag, rx=True)
        #: partial checksums (csum_blank) only if the frontend takes them for both families:
        #: else the vif was told to hand none over (``shared.plumbing.netdev.offload_flags``)
        self.csum_ok = ag is None or ag.rx_csum
        #: posted buffers, validated, in posting order: ids, grant indexes, the grant entries
        #: as validated (a u64 each), the mechanism's targets
        self.posted: deque[int] = deque()
        self.posted_grefs: deque[int] = deque()
        self.posted_exps: deque[int] = deque()
        self.posted_views: deque = deque()
        self.posted_ids: set[int] = set()
        self.vnet = bytearray(VNET_HDR.size)
        self.capture = NO_CAPTURE  # the netback's CaptureTap (backend/capture.py)
        #: a frame read (into the mechanism's bounce area) while fewer than NEED buffers
        #: were posted, waiting until as many as it needs are
        self.held = 0  # its length (0: none)
        self.held_need = 0
        self._gso = 0  # the netif GSO type of the frame being answered
        self._vflags = self._gso_size = 0  # and its virtio flags and GSO size
        #: single-page frames in a row (RX_SHRINK_AFTER of them: the next is read alone)
        self.small_run = 0

    def refill(self) -> int:
        """Take newly posted requests off the ring, validating each once (the mechanism's
        ``post``, for the whole batch)."""
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        n = ring.unconsumed_requests()
        if n:
            rids, grefs = [], []
            cons = ring.req_cons
            for i in range(n):
                rid, _pad, gref = _unpack_req(buf, entry(cons + i))
                rids.append(rid)
                grefs.append(gref)
            ring.req_cons = (cons + n) & MASK32
            ids = self.posted_ids
            if len(set(rids)) != n or not ids.isdisjoint(rids):
                seen = set(ids)
                for rid in rids:
                    if rid in seen:
                        raise FatalRxError(f"rx buffer id {rid} posted twice")
                    seen.add(rid)
            gis, exps, targets = self.mech.post(grefs)
            ids.update(rids)
            self.posted.extend(rids)
            self.posted_grefs.extend(gis)
            self.posted_exps.extend(exps)
            self.posted_views.extend(targets)
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
        posted, st, mech, capture = self.posted, self.stats, self.mech, self.capture
        vnet, vif_fd, layout = self.vnet, self.vif_fd, self._layout
        queues = (self.posted_views, self.posted_grefs, self.posted_exps)
        left = budget
        while left > 0:
            left -= 1  # a frame, or an attempt (the small-frame loop gives back the rest)
            if self.held:
                if not self._place_held():
                    return False
                continue
            if len(posted) < NEED:
                self.refill()
                if not posted:
                    return False
            if len(posted) < NEED or capture.on and capture.wants_in():
                # into the mechanism's own memory, held until it fits (and, while a capture
                # records incoming frames, recorded from there: exactly what was read)
                try:
                    n = os.readv(vif_fd, [vnet, mech.bounce()])
                except BlockingIOError:
                    return False
                if n > VNET_HDR.size:
                    self.held = n - VNET_HDR.size
                    self.held_need = self._need(self.held)
                continue
            if self.small_run >= RX_SHRINK_AFTER:
                try:
                    left -= max(self._small_frames(left + 1) - 1, 0)
                except BlockingIOError:
                    return False
                continue
            try:
                w = mech.write(vif_fd, vnet, *queues, PREDICTED, layout)
            except BlockingIOError:
                return False
            if w.revoked:
                self.small_run = 0
                self._retire(w.revoked)
                if w.kept:  # still whole in the mechanism's own memory: held, not lost
                    self.held = w.n - VNET_HDR.size
                    self.held_need = self._need(self.held)
                elif w.n:  # read, but a buffer it needed was revoked: dropped
                    st.drops += 1
                    st.drops_error += 1
                continue
            if w.data:
                self.small_run = self.small_run + 1 if len(w.data) == 1 else 0
                self._respond(w.n - VNET_HDR.size, w.data)
        st.grants_active = len(posted)
        return True

    def _need(self, length: int) -> int:
        """Slots this frame takes (0: dropped, counted, as the frontend cannot take it). Keeps
        the frame's virtio header fields for ``_respond`` (read once)."""
        vflags, vgso, _hl, gso_size = _unpack_vnet4(self.vnet)
        self._vflags, self._gso_size = vflags, gso_size
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

    def _layout(self, length: int) -> list[int] | range | None:
        """The posted positions a frame of ``length`` fills, in frame order (None: dropped):
        with a GSO extra, the first buffer and then from the third on (the second is the
        extra slot's); a multi-page frame without one takes consecutive buffers in stock
        order, and skips the second with feature-rx-by-id."""
        need = self._need(length)
        if not need:
            return None
        if need > 1 and not self._gso and not self.by_id:
            return range(need)
        return [0, *range(2, need + (not self._gso))]

    def _place_held(self) -> bool:
        """Copy the held frame into posted buffers once as many as it needs are."""
        need = self.held_need
        if len(self.posted) < need:
            self.refill()
            if len(self.posted) < need:
                return False
        length = self.held
        self.held = self.held_need = 0
        data = [0, *range(2 if self._gso else 1, need)]
        bad = self.mech.copy_in(data, self.posted_views, self.posted_grefs, self.posted_exps,
                                length)
        if bad:  # nothing was copied: the frame waits, whole, for buffers still granted
            self._retire(bad)
            self.held, self.held_need = length, need
            return True
        if self.capture.on:  # the frame as read from the vif, from backend memory
            self.capture.into(self.mech.bounce()[:length], length)
        self._respond(length, data)
        return True

    def _respond(self, length: int, data: list[int] | range) -> None:
        """Answer one frame whose pages are in posted buffers ``data`` (indices into the
        posted queue, in frame order); with a GSO extra, buffer 1 is its slot's."""
        posted, st = self.posted, self.stats
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        vflags, gso_size, xgso = self._vflags, self._gso_size, self._gso
        flags = VIRTIO_TO_NETRXF[vflags]
        prod = ring.rsp_prod_pvt
        if not xgso and len(data) == 1 and data[0] == 0:  # one buffer, the first posted
            rid = posted.popleft()
            _pack_rsp(buf, entry(prod), rid, 0, flags, length)
            ring.rsp_prod_pvt = (prod + 1) & MASK32
            self.posted_grefs.popleft()
            self.posted_exps.popleft()
            self.posted_views.popleft()
            self.posted_ids.discard(rid)
            st.rx_packets += 1
            st.rx_bytes += length
            st.copy_bytes += length
            return
        ids = [posted[i] for i in data]
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
        if len(gone) == len(span):  # every one of them (the usual case): no gaps to keep
            for q in queues:
                for _ in span:
                    q.popleft()
            return
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
