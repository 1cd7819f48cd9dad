"""``map`` (RX): a mapping receiver - each posted buffer mapped, the frame copied in by the CPU.

The alternative to the hypervisor's grant copy that Menon et al. (2006) and Santos et al.
(2008) measured netback RX against: the backend reads the frame into its own memory, maps each
posted buffer it needs into its address space (a real ``mmap`` into the CPU view, writable),
copies the page in with the CPU and unmaps it (a real ``munmap``). Since the frame is read
before any buffer is touched, its pages go straight where ``layout`` wants them: no prediction,
no move. With ``feature-persistent`` the buffers are the frontend's persistent grants and each
is mapped once and kept (``backend/grants/persistent.py``): the kept-mapped RX buffers of Martins'
"use gref mappings for Rx requests". A small frame (``write_one``) goes by the vif read itself
straight into a kept mapping - the one copy Linux's memcpy from the skb into the mapped buffer
is, with no grant operation - while a transient buffer still takes the read into backend memory,
then a map, the CPU copy of the frame's bytes (not the page's) and the unmap (mapping first would
pay a map for every empty read).
``rx_mapped_copies`` counts the pages written through a mapping, ``rx_kept_reads`` those read
straight into a kept one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from backend.rx.modes.base import Layout, RxMechanism, RxWrite
from shared.protocol.grant import WORD_FLAGS, GTF_writing
from shared.protocol.netif import GREF_PERSISTENT, PAGE_SIZE


class MapReceiver(RxMechanism):
    COUNTERS = "rx_mapped_copies rx_kept_reads"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._first = memoryview(bytearray(PAGE_SIZE))  # a transient buffer's page, read first

    def write_one(self, fd: int, vnet: bytearray, target, g: int, e: int) -> int:
        """One frame into one posted buffer (the rest into the bounce buffer), its entry
        checked first (-1 if revoked: nothing read) and marked GTF_writing meanwhile:
        straight into its mapping if it is kept mapped, else read into backend memory, then
        mapped, copied in by the CPU and unmapped (only once a frame was read)."""
        gref, frame = target
        flags = self.flags
        if self._q[g] != e:
            return -1
        gntmap = self.gntmap
        kept = gref & GREF_PERSISTENT and gntmap.kept.is_mapped(gref, frame)
        flags[g] = (e & WORD_FLAGS) | GTF_writing
        try:
            if kept:
                n = os.readv(fd, [vnet, gntmap.page(frame), self._spill])
                self.own.rx_kept_reads += 1
            else:
                n = os.readv(fd, [vnet, self._first, self._spill])
                m = min(n - len(vnet), PAGE_SIZE)  # the frame's bytes in its first page
                if m > 0:  # as Linux's memcpy: the frame's bytes, not the whole page
                    gntmap.map(gref, frame, write=True)
                    try:
                        gntmap.page(frame)[:m] = self._first[:m]
                    finally:
                        gntmap.unmap(gref, frame)
                    self.stats.cpu_copy_bytes += m
        finally:
            flags[g] = e & WORD_FLAGS
        self.own.rx_mapped_copies += n > len(vnet)
        return n

    def write(self, fd: int, vnet: bytearray, targets, grefs, exps,
              predicted: Sequence[int], layout: Layout) -> RxWrite:
        """Read the frame into the bounce buffer (backend memory), then copy it in."""
        n = os.readv(fd, [vnet, self._bounce])
        length = n - len(vnet)
        data = layout(length) if length > 0 else None
        if not data:
            return RxWrite(n, [])
        bad = self.copy_in(data, targets, grefs, exps, length)
        return RxWrite(n, bad, [] if bad else data, kept=bool(bad))

    def copy_in(self, positions: Sequence[int], targets, grefs, exps,
                nbytes: int) -> list[int]:
        """The bounce buffer's first ``nbytes`` into the posted buffers at ``positions`` (a
        page each): each validated, marked GTF_writing, mapped writable (unless kept mapped),
        written by the CPU, unmapped. Returns the positions found revoked (then nothing was
        copied)."""
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
                at = i * PAGE_SIZE
                m = min(PAGE_SIZE, nbytes - at)
                cmap(gref, frame, write=True)
                try:
                    page(frame)[:m] = bounce[at:at + m]
                finally:
                    cunmap(gref, frame)
        finally:
            self._writing(gs, ex, 0)
        self.own.rx_mapped_copies += len(positions)
        self.stats.cpu_copy_bytes += nbytes
        return []


MECHANISM = MapReceiver
