"""``copy`` (RX): the frame read from the vif straight into the posted buffers - a grant copy.

Linux's netback RX grant-copies each frame into the buffers a frontend posted
(``xenvif_gop_frag_copy``). Here the kernel's own copy out of the vif is that grant copy: the
``readv`` scatters the frame through the DMA view (``backend/grants/dmaview.py``) into the posted
pages, with GTF_writing set on each buffer written and every entry checked first against what
was validated at posting (``RxMechanism._stale``).

The read happens before the frame's length is known, so the pages go where the core predicts
(``predicted``: the first buffer, then from the third on - the second is kept for a GSO extra
slot); once ``layout`` has decided, a frame that belongs elsewhere (a jumbo frame without GSO,
in stock order) is moved down by one buffer with a second grant copy. To avoid checking 17
buffers for every small frame, after RX_SHRINK_AFTER single-page frames in a row only one
buffer is marked per frame; a longer frame then spills into the private bounce buffer and is
grant-copied on into the following buffers, validated the same way (``rx_spills``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from backend.rx.modes.base import RX_BOUNCE, Layout, RxMechanism, RxWrite
from shared.protocol.grant import WORD_FLAGS, GTF_writing
from shared.protocol.netif import PAGE_SIZE
from shared.protocol.offload import VNET_HDR

_now = time.perf_counter_ns
#: RX: small frames in a row after which only one buffer is marked per frame
RX_SHRINK_AFTER = 8


class GrantCopy(RxMechanism):
    """The RX grant copy of one connection."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._dma = self.gntmap.dma
        #: how many posted buffers the next frame may need (see ``write``)
        self.window = 1 << 16
        self._small = 0
        self._spill = self._bounce[:RX_BOUNCE - PAGE_SIZE]  # after one page

    def target(self, gref: int, frame: int) -> memoryview:
        """A posted page as a readv destination (the DMA view)."""
        return self._dma.rx_target(frame)

    def write(self, fd: int, vnet: bytearray, targets, grefs, exps,
              predicted: Sequence[int], layout: Layout) -> RxWrite:
        """One frame from ``fd`` into the ``predicted`` buffers, then where ``layout`` wants.

        How many buffers are marked before the read is itself predicted (``window``): all
        while frames span pages, one after a run of small frames; a frame longer than that
        spills into the bounce buffer and is copied on (``_rx_spill``) - so a stream of small
        frames does not pay for checking 17 buffers each."""
        maxbufs = len(predicted)
        k = min(self.window, maxbufs)
        if k == 1:  # small frames: the same steps for one buffer
            p = predicted[0]
            g, e = grefs[p], exps[p]
            q, flags = self._q, self.flags
            if q[g] != e:
                return RxWrite(0, [p])
            flags[g] = (e & WORD_FLAGS) | GTF_writing
            try:
                t = _now()
                n = self._dma.readv(fd, [vnet, targets[p], self._spill])
                t = _now() - t
            finally:
                flags[g] = e & WORD_FLAGS
            st = self.stats
            st.grant_copy_ns += t
            st.grant_copy_bytes += n
            length = n - len(vnet)
            if length > PAGE_SIZE:
                self.window, self._small = maxbufs, 0
                bad = self._rx_spill(1, -(-length // PAGE_SIZE), predicted, targets, grefs,
                                     exps)
                if bad:
                    return RxWrite(n, bad)
            return self._placed(n, predicted, targets, grefs, exps, layout)
        at = predicted[:k]
        gs, ex = [grefs[p] for p in at], [exps[p] for p in at]
        if list(map(self._q.__getitem__, gs)) != ex:
            return RxWrite(0, [at[i] for i in self._stale(gs, ex, 0)])
        self._writing(gs, ex, GTF_writing)
        try:
            iov = [vnet, *(targets[p] for p in at)]
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
        if nbufs > k:
            bad = self._rx_spill(k, nbufs, predicted, targets, grefs, exps)
            if bad:
                return RxWrite(n, bad)
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
            bad = self.copy_in(data[1:], targets, grefs, exps)
            if bad:
                return RxWrite(n, bad)
        return RxWrite(n, [], data)

    def copy_in(self, positions: Sequence[int], targets, grefs, exps) -> list[int]:
        """Grant-copy bounce pages 0.. into the posted buffers at ``positions``, each
        validated now and marked GTF_writing while copied. Returns the positions found
        revoked (then nothing was copied)."""
        return self._copy(positions, targets, grefs, exps)

    def _rx_spill(self, k: int, nbufs: int, predicted: Sequence[int], targets, grefs,
                  exps) -> list[int]:
        """The frame ran past the marked buffers into the bounce buffer: validate and mark
        the rest, copy on (a grant copy), unmark. A revoked one drops the frame."""
        bad = self._copy(predicted[k:nbufs], targets, grefs, exps)
        self.stats.rx_spills += not bad
        return bad

    def _copy(self, positions: Sequence[int], targets, grefs, exps) -> list[int]:
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
                targets[p][:] = bounce[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        finally:
            self._writing(gs, ex, 0)
        self.stats.grant_copy_ns += _now() - t
        return []


MECHANISM = GrantCopy
