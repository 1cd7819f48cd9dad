"""Netfront RX in stock order, batched: the frontend's side of netif RX made cheap, as in
Linux netfront.

The buffer posted at ring position ``p`` is buffer ``p % 256`` (``xennet_rxidx``), a page of
one contiguous area. So a frame's responses are checked against what a correct stock backend
must answer in a few list operations (ids in ring order, middle buffers full from offset 0),
a frame that filled consecutive buffers leaves in one ``writev`` of a few large pieces, and
buffers (with their grants) go back on the ring as one template copy per batch. A frame that
does not match the pattern (partial, an odd offset, a wrong id) is left to the per-response
path in ``frontend/rx/queue.py``, which delivers it or names the fault. Why it matters: a guest
under TCG pays for every Python operation, and a 64 KB frame spans 17 buffers.
"""

from __future__ import annotations

from shared.protocol.grant import GRANT_ENTRY, GTF_permit_access
from shared.protocol.netif import (
    EXTRA_INFO,
    MAX_FRAME_PAGES,
    PAGE_SIZE,
    RING_SIZE,
    RX_REQUEST,
    RX_RESPONSE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    NETRXF_extra_info,
    NETRXF_more_data,
)
from shared.protocol.offload import XEN_TO_VIRTIO_GSO
from shared.protocol.region import Area
from shared.protocol.ring import MASK32

#: RX buffers: one page per RX ring slot, at the start of the payload area
RX_BUFFERS = RING_SIZE
RX_MASK = RX_BUFFERS - 1
MULTI_FLAGS = NETRXF_more_data | NETRXF_extra_info
_GE, _REQ = GRANT_ENTRY.size, RX_REQUEST.size
#: the batch reads a response as 4 u16s (id, offset, flags, status) at the request's stride
assert RX_RESPONSE.size == _REQ == 4 * 2
#: a middle response of a multi-buffer frame, as the 4 u16s of the entry at each position
#: (twice round the ring, so a run that wraps is still one slice)
_MIDDLE = [v for p in range(2 * RX_BUFFERS)
           for v in (p & RX_MASK, 0, NETRXF_more_data, PAGE_SIZE)]


class StockOrder:
    """The stock-order half of ``RxQueue`` (which holds the ring, the views, the per-response
    path and ``_write``)."""

    def _init_stock(self, region: Area, backend_domid: int) -> None:
        ring = self.ring
        entries = ring.buf[ring.entry(0):ring.entry(0) + RX_BUFFERS * ring.entry_size]
        #: the responses as u16s (id, offset, flags, status) per position: one slice a batch
        self.rsp16 = entries.cast("H")
        self.req_bytes = entries
        #: all RX buffers as one view (consecutive pages): a run of buffers is one slice
        self.area = region.pages(self.frames[0], RX_BUFFERS)
        self.req_tmpl = b"".join(RX_REQUEST.pack(i, 0, self.refs[i]) for i in range(RX_BUFFERS))
        self.gnt_tmpl = b"".join(GRANT_ENTRY.pack(GTF_permit_access, backend_domid, f)
                                 for f in self.frames)
        self.gnt_span = self.grants.span(self.ref0, RX_BUFFERS)
        self.policy.setup([(self.gnt_span, memoryview(self.gnt_tmpl))])

    def _refill_stock(self, limit: int = RX_BUFFERS) -> int:
        """Post buffers (not yet pushed) until ``limit`` are posted or held: position ``p``
        gets buffer ``p % 256``, so a run of requests (and their grants) is a template copy."""
        ring = self.ring
        prod = ring.req_prod_pvt
        n = limit - ((prod - self.done) & MASK32)
        if n <= 0:
            return 0
        at = prod & RX_MASK
        for a, m in ((at, min(n, RX_BUFFERS - at)), (0, n - (RX_BUFFERS - at))):
            if m > 0:
                g0, g1 = a * _GE, (a + m) * _GE  # the policy grants them, as one copy
                self.policy.grant([(self.gnt_span[g0:g1], self.gnt_tmpl[g0:g1])])
                r0, r1 = a * _REQ, (a + m) * _REQ
                self.req_bytes[r0:r1] = self.req_tmpl[r0:r1]
        ring.req_prod_pvt = (prod + n) & MASK32
        self.stats.grants_active = (prod + n - self.done) & MASK32
        return n

    def _release_run(self, pos: int, n: int) -> None:
        """Stock order: the ``n`` buffers from ring position ``pos`` on are back, each grant
        ended (``GrantTable.end_access_run``; one by one, to name the gref, if one is held)."""
        at = pos & RX_MASK
        m = min(n, RX_BUFFERS - at)
        if not self.policy.revoke([(self.ref0 + at, m), (self.ref0, n - m)]):
            for i in range(n):
                self._release((pos + i) & RX_MASK)
            return
        self.done = (self.done + n) & MASK32

    def _poll_stock(self, budget: int = 64) -> int:
        """Stock order: whole well-formed frames in batches (``_batch``); a frame the batch
        does not take goes through the per-response path, which delivers it or names the
        fault. Returns frames done."""
        frames = 0
        while frames < budget:
            if not self.ids:
                got = self._batch(budget - frames)
                frames += got
                if frames >= budget or not self.ring.unconsumed_responses():
                    break
                if got:  # the backend published more meanwhile: batch those too
                    continue
            got = self._poll_general(1)
            self.stats.rx_unbatched += got
            if not got:  # responses ran out in the middle of a frame: wait for the rest
                break
            frames += got
        return frames

    def _batch(self, budget: int) -> int:
        """Consume frames that are complete and exactly as a correct stock backend answers
        (ids in ring order, middle buffers full from offset 0), up to ``budget``; stop at the
        first other one, unconsumed. The responses are read once, as a list: what is
        checked is what is used."""
        ring = self.ring
        n = ring.unconsumed_responses()
        if not n:
            return 0
        cons = ring.rsp_cons
        at = cons & RX_MASK
        rsp = self.rsp16
        if at + n <= RX_BUFFERS:
            e = rsp[4 * at:4 * (at + n)].tolist()
        else:
            e = rsp[4 * at:].tolist() + rsp[:4 * (at + n - RX_BUFFERS)].tolist()
        views, area, middle, sg = self.views, self.area, _MIDDLE, self.sg
        i = frames = 0
        while i < n and frames < budget:
            b = 4 * i
            rid, off, flags, status = e[b:b + 4]
            if rid != (at + i) & RX_MASK or not 0 < status <= PAGE_SIZE - off:
                break
            if not flags & MULTI_FLAGS:  # one buffer (an ACK, a small frame)
                self._write(flags, 0, 0, (views[rid][off:off + status],))
                i += 1
                frames += 1
                continue
            j = i + 1
            gtype = gsize = 0
            if flags & NETRXF_extra_info:
                if j == n:
                    break
                etype, _ef, gsize, gtype, _pad, _ret = EXTRA_INFO.unpack_from(
                    self.buf, ring.entry(cons + j))
                if etype != XEN_NETIF_EXTRA_TYPE_GSO or gtype not in self.gso_ok or not gsize:
                    break  # the per-response path names the fault or drops the frame
                gtype = XEN_TO_VIRTIO_GSO[gtype]
                j += 1
            first = views[rid][off:off + status]
            if not flags & NETRXF_more_data:
                self._write(flags, gtype, gsize, (first,))
                i = j
                frames += 1
                continue
            if not sg or status != PAGE_SIZE:
                break
            try:  # the last buffer: the first response after j with no flags
                k = j + e[4 * j + 2:4 * (j + MAX_FRAME_PAGES) + 2:4].index(0)
            except ValueError:
                break  # not all here yet, or not plain
            a, z = (at + j) & RX_MASK, (at + k) & RX_MASK
            zid, zoff, _zf, zsize = e[4 * k:4 * k + 4]
            if e[4 * j:4 * k] != middle[4 * a:4 * (a + k - j)] \
                    or zid != z or zoff or not 0 < zsize <= PAGE_SIZE:
                break
            end = z * PAGE_SIZE + zsize
            if a <= z:
                self._write(flags, gtype, gsize, (first, area[a * PAGE_SIZE:end]))
            else:  # the run wraps round the buffer area
                self._write(flags, gtype, gsize, (first, area[a * PAGE_SIZE:], area[:end]))
            i = k + 1
            frames += 1
        ring.rsp_cons = (cons + i) & MASK32
        self._release_run(cons, i)  # every buffer of the frames written, in one go
        return frames
