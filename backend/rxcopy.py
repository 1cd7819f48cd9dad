"""The RX copy: frames from the vif into the buffers a frontend posted (its grant copy).

A posted buffer is validated when it is taken off the ring (``post``: the grant entry is
remembered as one u64) and again when the backend writes into it: its entry must still be
exactly what was validated (granted, writable, same frame), and it has GTF_writing set while the
frame is read into it. A buffer revoked in between is not written; its position is returned,
for an XEN_NETIF_RSP_ERROR answer (``backend/rx.py``). To avoid checking 17 buffers for every
small frame, after RX_SHRINK_AFTER single-page frames in a row only one buffer is marked per
frame; a longer frame then spills into a private bounce buffer and is grant-copied on into the
following buffers, validated the same way (``rx_spills``). The reads go through the DMA view
(``backend/dmaview.py``): the kernel's copy out of the vif is our grant copy.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from backend.dmaview import DmaView
from shared.grant import WORD_FLAGS, WORD_FRAME_SHIFT, GrantTable, GTF_writing
from shared.netif import GREF_MASK, MAX_FRAME_PAGES, PAGE_SIZE
from shared.stats import RingStats

_now = time.perf_counter_ns
#: RX: small frames in a row after which only one buffer is marked per frame
RX_SHRINK_AFTER = 8
#: RX: the private spill area for a frame longer than predicted (17 pages: a 64 KiB frame)
RX_BOUNCE = MAX_FRAME_PAGES * PAGE_SIZE


@dataclass
class RxWrite:
    """What ``write`` did: bytes read (incl. the vnet header; 0: nothing read) and the
    positions of posted buffers found revoked (with n > 0: the frame was read and dropped)."""

    n: int
    revoked: list[int]


class RxCopy:
    """The RX grant copy of one connection; ``check(gref, write)`` validates a posted gref
    (``PersistentGrants.validate``: transient or persistent)."""

    def __init__(self, table: GrantTable, dma: DmaView, stats: RingStats,
                 check: Callable[[int, bool], int]) -> None:
        self._dma = dma
        self.stats = stats
        self.check = check
        self._q = table.words  # whole entries, to compare one value per grant
        self.flags = table.ref_flags
        #: how many posted buffers the next frame may need (see ``write``)
        self.window = 1 << 16
        self._small = 0
        self._bounce = memoryview(bytearray(RX_BOUNCE))
        self._spill = self._bounce[:RX_BOUNCE - PAGE_SIZE]  # after one page

    def post(self, gref: int) -> tuple[int, int, memoryview]:
        """A posted RX buffer, validated now: (table index, the entry as one u64 - what it
        must still be at write time -, the page as a DMA target)."""
        frame = self.check(gref, True)
        gi = gref & GREF_MASK
        word = self._q[gi]
        if word >> WORD_FRAME_SHIFT != frame:  # rewritten since the check (or a persistent
            # grant's entry since it was kept): expect the frame validated, so the write finds
            # it changed (not written: revoked), and nothing maps the unvalidated one
            word = (frame << WORD_FRAME_SHIFT) | (word & ((1 << WORD_FRAME_SHIFT) - 1))
        return gi, word, self._dma.rx_target(frame)

    def write(self, fd: int, vnet: bytearray, views: deque, grefs: deque, exps: deque,
              maxbufs: int) -> RxWrite:
        """The RX grant copy of one frame from ``fd`` into the first posted buffers.

        How many buffers may be written is predicted (``window``): all ``maxbufs`` while
        frames span pages, one after a run of small frames; a frame longer than predicted
        spills into the bounce buffer and is copied on (``_rx_spill``) - so a stream of small
        frames does not pay for checking 17 buffers each."""
        k = min(self.window, maxbufs)
        if k == 1:  # small frames: the same steps for one buffer
            g, e = grefs[0], exps[0]
            q, flags = self._q, self.flags
            if q[g] != e:
                return RxWrite(0, [0])
            flags[g] = (e & WORD_FLAGS) | GTF_writing
            try:
                t = _now()
                n = self._dma.readv(fd, [vnet, views[0], self._spill])
                t = _now() - t
            finally:
                flags[g] = e & WORD_FLAGS
            st = self.stats
            st.grant_copy_ns += t
            st.grant_copy_bytes += n
            if n - len(vnet) <= PAGE_SIZE:
                return RxWrite(n, [])
            self.window, self._small = maxbufs, 0
            return self._rx_spill(n, 1, -(-(n - len(vnet)) // PAGE_SIZE), views, grefs, exps)
        gs, ex = list(islice(grefs, k)), list(islice(exps, k))
        if list(map(self._q.__getitem__, gs)) != ex:
            return RxWrite(0, self._stale(gs, ex, 0))
        self._writing(gs, ex, GTF_writing)
        try:
            iov = [vnet, *islice(views, k)]
            if k < maxbufs:
                iov.append(self._bounce[:(maxbufs - k) * PAGE_SIZE])
            t = _now()
            n = self._dma.readv(fd, iov)
            st = self.stats
            st.grant_copy_ns += _now() - t
        finally:
            self._writing(gs, ex, 0)
        st.grant_copy_bytes += n
        nbufs = -(-(n - len(vnet)) // PAGE_SIZE)
        if nbufs > 1:
            self.window, self._small = maxbufs, 0
        else:
            self._small += 1
            if self._small >= RX_SHRINK_AFTER:
                self.window = 1
        if nbufs <= k:
            return RxWrite(n, [])
        return self._rx_spill(n, k, nbufs, views, grefs, exps)

    def bounce(self) -> memoryview:
        """The private area a frame is read into when it cannot go straight into posted
        buffers (RX with few buffers posted); ``copy_in`` grant-copies it on."""
        return self._bounce

    def copy_in(self, first: int, nbufs: int, views, grefs, exps) -> list[int]:
        """Grant-copy bounce pages 0.. into posted buffers ``first``..``nbufs - 1`` of the
        given sequences, each validated now and marked GTF_writing while copied (as
        ``_rx_spill``). Returns the positions found revoked (then nothing was copied)."""
        return self._rx_spill(0, first, nbufs, views, grefs, exps, spill=False).revoked

    def _rx_spill(self, n: int, k: int, nbufs: int, views: deque, grefs: deque,
                  exps: deque, spill: bool = True) -> RxWrite:
        """The frame ran past the predicted buffers into the bounce buffer: validate and mark
        the rest, copy on (a grant copy), unmark. A revoked one drops the frame."""
        gs = list(islice(grefs, k, nbufs))
        ex = list(islice(exps, k, nbufs))
        bad = self._stale(gs, ex, k)
        if bad:
            return RxWrite(n, bad)
        t = _now()
        self._writing(gs, ex, GTF_writing)
        try:
            for i, view in enumerate(islice(views, k, nbufs)):
                view[:] = self._bounce[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        finally:
            self._writing(gs, ex, 0)
        self.stats.grant_copy_ns += _now() - t
        self.stats.rx_spills += spill
        return RxWrite(n, [])

    def _stale(self, gs: list[int], ex: list[int], base: int) -> list[int]:
        """Positions (from ``base``) of buffers whose entry changed since they were posted."""
        q = self._q
        return [base + i for i, (g, e) in enumerate(zip(gs, ex, strict=True)) if q[g] != e]

    def _writing(self, gs: list[int], ex: list[int], bit: int) -> None:
        """Set (bit = GTF_writing) or clear (0) the write mark: the flags as validated | bit."""
        flags = self.flags
        for g, e in zip(gs, ex, strict=True):
            flags[g] = (e & WORD_FLAGS) | bit
