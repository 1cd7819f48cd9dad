"""``map`` (RX): a mapping receiver - each posted buffer mapped, the frame copied in by the CPU.

The alternative to the hypervisor's grant copy that Menon et al. (2006) and Santos et al.
(2008) measured netback RX against: the backend reads the frame into its own memory, maps each
posted buffer it needs into its address space (a real ``mmap`` into the CPU view, writable),
copies the page in with the CPU and unmaps it (a real ``munmap``). Since the frame is read
before any buffer is touched, its pages go straight where ``layout`` wants them: no prediction,
no move. With ``feature-persistent`` the buffers are the frontend's persistent grants and each
is mapped once and kept (``backend/grants/persistent.py``): the kept-mapped RX buffers of Martins'
"use gref mappings for Rx requests". ``rx_mapped_copies`` counts the pages copied this way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from backend.rx.modes.base import Layout, RxMechanism, RxWrite
from shared.protocol.grant import GTF_writing
from shared.protocol.netif import PAGE_SIZE


class MapReceiver(RxMechanism):
    COUNTERS = "rx_mapped_copies"

    def write(self, fd: int, vnet: bytearray, targets, grefs, exps,
              predicted: Sequence[int], layout: Layout) -> RxWrite:
        """Read the frame into the bounce buffer (backend memory), then copy it in."""
        n = os.readv(fd, [vnet, self._bounce])
        length = n - len(vnet)
        data = layout(length) if length > 0 else None
        if not data:
            return RxWrite(n, [])
        bad = self.copy_in(data, targets, grefs, exps)
        return RxWrite(n, bad, [] if bad else data, kept=bool(bad))

    def copy_in(self, positions: Sequence[int], targets, grefs, exps) -> list[int]:
        """Bounce pages 0.. into the posted buffers at ``positions``: each validated, marked
        GTF_writing, mapped writable, written by the CPU, unmapped. Returns the positions
        found revoked (then nothing was copied)."""
        gs = [grefs[p] for p in positions]
        ex = [exps[p] for p in positions]
        bad = self._stale(gs, ex, 0)
        if bad:
            return [positions[i] for i in bad]
        gntmap, bounce = self.gntmap, self._bounce
        cmap, cunmap, page = gntmap.map, gntmap.unmap, gntmap.page
        self._writing(gs, ex, GTF_writing)
        try:
            for i, p in enumerate(positions):
                gref, frame = targets[p]
                cmap(gref, frame, write=True)
                try:
                    page(frame)[:] = bounce[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                finally:
                    cunmap(gref, frame)
        finally:
            self._writing(gs, ex, 0)
        self.own.rx_mapped_copies += len(positions)
        return []


MECHANISM = MapReceiver
