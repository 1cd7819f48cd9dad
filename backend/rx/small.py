"""Netback RX for a run of small frames: one buffer per read, answered on the spot.

A TAP hands over one frame per read, and most frames of a packet-rate stream fit one page.
While they come in a row (RX_SHRINK_AFTER single-page frames), the core stops preparing every
read for the largest frame (17 buffers checked and marked, a layout decided afterwards) and
asks the mechanism for one buffer only (``write_one``); the frame is answered in the same loop,
as Linux's RX copies a batch of skbs in one pass. The first frame that is not small - longer
than a page, GSO, or not negotiated - is finished by ``_one`` (its rest copied on from the
bounce buffer: ``rx_spills``) and the core reads whole frames again.
"""

from __future__ import annotations

from shared.protocol.netif import MAX_FRAME_PAGES, PAGE_SIZE, RX_RESPONSE
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_TO_NETRXF, VNET_HDR
from shared.protocol.ring import MASK32

#: buffers the largest frame may need: a 64 KiB GSO frame spans 17 pages, plus its extra slot
NEED = MAX_FRAME_PAGES + 1
#: where a frame is read before its length is known: the first buffer, then from the third
#: on (the second is kept for a GSO extra slot)
PREDICTED = (0, *range(2, NEED))
#: single-page frames in a row after which the next is read into one buffer (``write_one``)
RX_SHRINK_AFTER = 8
_pack_rsp = RX_RESPONSE.pack_into


class SmallFrames:
    """The small-frame loop of ``backend.rx.path.RxPath`` (its state and queues)."""

    def _small_frames(self, limit: int) -> int:
        """Small frames in a row, each read into the first posted buffer (``write_one``) and
        answered on the spot: the one loop a stream of small frames runs (Linux's RX copies
        a batch of skbs the same way). Returns the frames read (at most ``limit``: the
        caller's budget); stops, for ``action`` to go on, at a frame that is not small
        (handled by ``_one``), when fewer than NEED buffers are posted or a capture wants
        incoming frames; BlockingIOError once the vif is empty."""
        posted, views, grefs, exps = (self.posted, self.posted_views, self.posted_grefs,
                                      self.posted_exps)
        ids, write_one, capture = self.posted_ids, self.mech.write_one, self.capture
        ring, buf, entry = self.ring, self.buf, self.ring.entry
        vnet, fd, hdr, st = self.vnet, self.vif_fd, VNET_HDR.size, self.stats
        no_csum = 0 if self.csum_ok else VIRTIO_NET_HDR_F_NEEDS_CSUM
        prod = ring.rsp_prod_pvt
        done = nbytes = reads = 0
        try:
            while reads < limit and len(posted) >= NEED \
                    and not (capture.on and capture.wants_in()):
                n = write_one(fd, vnet, views[0], grefs[0], exps[0])
                reads += 1
                length = n - hdr
                if 0 < length <= PAGE_SIZE and not vnet[1] and not vnet[0] & no_csum:
                    rid = posted.popleft()
                    views.popleft()
                    grefs.popleft()
                    exps.popleft()
                    ids.discard(rid)
                    _pack_rsp(buf, entry(prod), rid, 0, VIRTIO_TO_NETRXF[vnet[0]], length)
                    prod += 1
                    done += 1
                    nbytes += length
                    continue
                ring.rsp_prod_pvt = prod & MASK32
                self._one(n)
                prod = ring.rsp_prod_pvt
                if self.small_run < RX_SHRINK_AFTER:
                    break
        finally:
            ring.rsp_prod_pvt = prod & MASK32
            st.rx_packets += done
            st.rx_bytes += nbytes
            st.copy_bytes += nbytes
        return reads

    def _one(self, n: int) -> None:
        """A frame ``write_one`` read that is not a small one (``n``: bytes read, -1: the
        buffer was revoked, nothing read): laid out as any frame, a longer one's rest copied
        on from the bounce buffer (``rx_spills``); the next frames are read whole again."""
        if n < 0:
            self._retire([0])
            return
        length = n - VNET_HDR.size
        if length <= 0:
            return
        self.small_run = 0
        data = self._layout(length)
        if not data:
            return
        if len(data) > 1:
            bad = self.mech.copy_in(data[1:], self.posted_views, self.posted_grefs,
                                    self.posted_exps, length - PAGE_SIZE)
            if bad:  # read, but a buffer it needed was revoked: dropped
                self._retire(bad)
                st = self.stats
                st.drops += 1
                st.drops_error += 1
                return
            self.stats.rx_spills += 1
        self._respond(length, data)

