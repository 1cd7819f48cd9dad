"""``copy`` (RX): the frame read from the vif straight into the posted buffers - a grant copy.

Linux's netback RX grant-copies each frame into the buffers a frontend posted
(``xenvif_gop_frag_copy``). Here the kernel's own copy out of the vif is that grant copy: the
``readv`` scatters the frame through the DMA view (``backend/grants/dmaview.py``) into the posted
pages, with GTF_writing set on each buffer written and every entry checked first against what
was validated at posting (``RxMechanism._stale``).

The read happens before the frame's length is known, so the pages go where the core predicts
(``predicted``: the first buffer, then from the third on - the second is kept for a GSO extra
slot); once ``layout`` has decided, a frame that belongs elsewhere (a jumbo frame without GSO,
in stock order) is moved down by one buffer with a second grant copy. While small frames come
in a row the core asks for one buffer only (``write_one``: one entry checked and marked per
frame, not 17), and a longer frame then spills into the private bounce buffer and is
grant-copied on (``copy_in``, validated the same way; the core counts ``rx_spills``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from backend.rx.modes.base import Layout, RxMechanism, RxWrite
from shared.protocol.grant import WORD_FLAGS, GTF_writing
from shared.protocol.netif import PAGE_SIZE
from shared.protocol.offload import VNET_HDR

_now = time.perf_counter_ns


class GrantCopy(RxMechanism):
    """The RX grant copy of one connection."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._dma = self.gntmap.dma

    def target(self, gref: int, frame: int) -> memoryview:
        """A posted page as a readv destination (the DMA view)."""
        return self._dma.rx_target(frame)

    def write_one(self, fd: int, vnet: bytearray, target: memoryview, g: int, e: int) -> int:
        """One frame into one posted buffer, the rest of a longer one into the bounce
        buffer: its entry checked (-1 if revoked: nothing read) and marked for the read."""
        flags = self.flags
        if self._q[g] != e:
            return -1
        flags[g] = (e & WORD_FLAGS) | GTF_writing
        try:
            t = _now()
            n = self._dma.readv(fd, [vnet, target, self._spill])
            t = _now() - t
        finally:
            flags[g] = e & WORD_FLAGS
        st = self.stats
        st.grant_copy_ns += t
        st.grant_copy_bytes += n
        return n

    def write(self, fd: int, vnet: bytearray, targets, grefs, exps,
              predicted: Sequence[int], layout: Layout) -> RxWrite:
        """One frame from ``fd`` into the ``predicted`` buffers (each checked and marked
        first), then where ``layout`` wants."""
        at = predicted
        gs, ex = [grefs[p] for p in at], [exps[p] for p in at]
        if list(map(self._q.__getitem__, gs)) != ex:
            return RxWrite(0, [at[i] for i in self._stale(gs, ex, 0)])
        self._writing(gs, ex, GTF_writing)
        try:
            t = _now()
            n = self._dma.readv(fd, [vnet, *(targets[p] for p in at)])
            st = self.stats
            st.grant_copy_ns += _now() - t
        finally:
            self._writing(gs, ex, 0)
        st.grant_copy_bytes += n
        return self._placed(n, predicted, targets, grefs, exps, layout)

    def _placed(self, n: int, predicted: Sequence[int], targets, grefs, exps,
                layout: Layout) -> RxWrite:
        """The frame is in the predicted buffers; move it where ``layout`` wants it, if
        elsewhere (stock order cannot skip the second buffer: pages 2.. move down by one)."""
        length = n - VNET_HDR.size
        if length <= 0:
            return RxWrite(n, [])
        data = layout(length)
        if not data:
            return RxWrite(n, [])
        if list(data[1:]) != list(predicted[1:len(data)]):
            bounce = self._bounce
            for i, p in enumerate(predicted[1:len(data)]):
                bounce[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = targets[p]
            bad = self.copy_in(data[1:], targets, grefs, exps, length - PAGE_SIZE)
            if bad:
                return RxWrite(n, bad)
        return RxWrite(n, [], data)

    def copy_in(self, positions: Sequence[int], targets, grefs, exps,
                nbytes: int) -> list[int]:
        """Grant-copy the bounce buffer's first ``nbytes`` into the posted buffers at
        ``positions`` (a page each), each validated now and marked GTF_writing while copied.
        Returns the positions found revoked (then nothing was copied)."""
        gs = [grefs[p] for p in positions]
        ex = [exps[p] for p in positions]
        bad = self._stale(gs, ex, 0)
        if bad:
            return [positions[i] for i in bad]
        t = _now()
        self._writing(gs, ex, GTF_writing)
        bounce = self._bounce
        try:
            for i, p in enumerate(positions):
                at = i * PAGE_SIZE
                m = min(PAGE_SIZE, nbytes - at)
                targets[p][:m] = bounce[at:at + m]
        finally:
            self._writing(gs, ex, 0)
        st = self.stats
        st.grant_copy_ns += _now() - t
        st.grant_copy_bytes += nbytes
        return []


MECHANISM = GrantCopy
