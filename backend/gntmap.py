"""Grant operations of the backend: check, hold, map, unmap, copy (Xen's gnttab ops).

The mechanism behind every access to a frontend's payload lives here, so the rest of netback
does not know which kind of mapping is in force:

- ``check``: validate a gref from the ring (read the entry once) and return its frame.
  Persistent grants (gref with ``GREF_PERSISTENT``) are validated once, marked in use and kept
  until disconnect, found again by a lookup, as Pratt's mail proposes.
- ``hold``/``release``: GTF_reading on TX grants for as long as anything may read them (the
  vif write included, lazy mode included), so the frontend's ``end_access`` is refused.
- ``map``/``unmap``/``page``: the CPU view (``backend/cpuview.py``): a real mmap of that page
  into a PROT_NONE range, undone by a real unmap. Maps use the frame resolved when the fragment
  was attached, never the grant entry again. Persistent grants are mapped on first use and kept.
- ``copy_from`` (header copy), ``tx_iovecs`` (vif submit), ``rx_write`` (RX copy, validating each
  buffer at write time with GTF_writing set): the only uses of the DMA view
  (``backend/dmaview.py``).

``Views`` is what one connection maps: the CPU view, the DMA view, the region memfd; the two
``GntMap``\\ s of a connection (TX, RX) share one.
"""

from __future__ import annotations

import mmap
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from backend.cpuview import CpuView
from backend.dmaview import DmaView
from shared.grant import (
    GRANT_ENTRY,
    GrantError,
    GrantTable,
    GTF_in_use,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    entries,
)
from shared.netif import GREF_MASK, GREF_PERSISTENT
from shared.region import Region
from shared.stats import RingStats

_unpack_gnt = GRANT_ENTRY.unpack_from
_now = time.perf_counter_ns
#: access points at which tests may act (revoke a grant) just before the backend's access
HOOK_POINTS = ("tx_hold", "tx_map", "tx_submit", "rx_write")


class Views:
    """The two views of one connection's region, and the memfd the CPU view maps from.
    Takes ownership of ``fd`` and, unless ``shared``, of ``dma_mem`` (closed by ``close``)."""

    def __init__(self, fd: int, dma_mem: mmap.mmap, region: Region, stats: RingStats,
                 shared: bool = False) -> None:
        self.fd = fd
        self.dma_mem = dma_mem
        self.shared = shared
        self.cpu = CpuView(fd, region.layout, stats)
        self.dma = DmaView(dma_mem)

    def close(self) -> None:
        self.cpu.close()
        self.dma.close()
        if not self.shared:
            try:
                self.dma_mem.close()
            except BufferError:  # a view still referenced: unmapped when it is collected
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class RxWrite:
    """What ``rx_write`` did: bytes read (incl. the vnet header) or the posted indexes revoked."""

    n: int
    revoked: list[int]


class GntMap:
    """Grant operations for one ring of one frontend connection, counted into ``stats``."""

    def __init__(self, region: Region, views: Views, domid: int, stats: RingStats,
                 persistent: bool) -> None:
        self.region = region
        self.table: GrantTable = region.grants
        self.flags = self.table.flags
        self.cpu = views.cpu
        self._dma = views.dma
        self.domid = domid
        self.stats = stats
        self.persistent_ok = persistent
        self.frames = region.layout.payload_frames
        #: gref -> frame of persistent grants already validated and kept in use
        self.persistent: dict[int, int] = {}
        #: persistent grefs mapped into the CPU view (once each, until disconnect)
        self.pmapped: dict[int, int] = {}
        #: (gref, frame) -> count of transient CPU maps now held
        self.mapped: dict[tuple[int, int], int] = {}
        #: tests: called as hook(point, gref) just before the backend accesses a grant
        self.hook: Callable[[str, int], None] | None = None

    # --- validation and the in-use bits ---------------------------------------------------
    def check(self, gref: int, write: bool = False) -> int:
        """Validate a gref from the ring; return its frame. Persistent ones are checked once."""
        if gref & GREF_PERSISTENT:
            frame = self.persistent.get(gref)
            if frame is not None:
                self.stats.persistent_hits += 1
                return frame
            if not self.persistent_ok:
                raise GrantError(f"gref {gref:#x} marked persistent without feature-persistent")
            frame = self.table.check(gref & GREF_MASK, self.domid, write, self.frames)
            self.table.mark(gref & GREF_MASK, write)  # held until disconnect
            self.persistent[gref] = frame
            self.stats.grants_in_use += 1
            return frame
        return self.table.check(gref, self.domid, write, self.frames)

    def hold(self, grefs: list[int], frames: list[int], flags0: int = -1) -> None:
        """Set GTF_reading on a packet's transient TX grants, then check that each entry still
        grants the frame resolved at attach (a revoke that raced the marking is caught here,
        not after the bytes left). ``flags0``: every entry's flags, if the caller read them
        all equal (consecutive grefs: one strided store)."""
        if self.hook is not None:
            for g in grefs:
                self.hook("tx_hold", g)
        flags = self.flags
        n = len(grefs)
        g0 = grefs[0]
        if flags0 >= 0:
            flags[4 * g0:4 * (g0 + n):4] = array("H", (flags0 | GTF_reading,)) * n
            now = entries(n).unpack_from(self.table.buf, g0 << 3)
            if now[0::3].count(flags0 | GTF_reading) == n and list(now[2::3]) == frames:
                self.stats.grants_in_use += n
                return
            self._unhold(grefs)
            raise GrantError(f"a grant of grefs {g0}..{g0 + n - 1} was revoked or changed "
                             "while the backend took it")
        held = []
        try:
            for g, f in zip(grefs, frames, strict=True):
                if g & GREF_PERSISTENT:
                    continue
                flags[4 * g] |= GTF_reading
                held.append(g)
                fl, _dom, frame = _unpack_gnt(self.table.buf, g << 3)
                if not fl & GTF_permit_access or frame != f:
                    raise GrantError(f"gref {g} was revoked or changed while the backend took it")
        except BaseException:
            self._unhold(held)
            raise
        self.stats.grants_in_use += len(held)

    def _unhold(self, grefs: list[int]) -> None:
        flags = self.flags
        for g in grefs:
            if not g & GREF_PERSISTENT:
                flags[4 * g] &= ~GTF_in_use & 0xFFFF

    def release(self, grefs: list[int], flags0: int = -1) -> None:
        """The skb is freed: nothing reads these grants any more; end_access may succeed."""
        if flags0 >= 0:
            g0, n = grefs[0], len(grefs)
            self.flags[4 * g0:4 * (g0 + n):4] = array("H", (flags0 & ~GTF_in_use,)) * n
            self.stats.grants_in_use -= n
            return
        self._unhold(grefs)
        self.stats.grants_in_use -= sum(1 for g in grefs if not g & GREF_PERSISTENT)

    # --- the CPU view -------------------------------------------------------------------
    def map(self, gref: int, frame: int, touch: bool = False) -> None:
        """Map a payload page for CPU access, by the frame resolved at attach; pair with
        ``unmap``. ``touch``: this map is lazy mapping's, done because something read."""
        if self.hook is not None:
            self.hook("tx_map", gref)
        if gref & GREF_PERSISTENT:
            if self.pmapped.get(gref) == frame:
                return  # mapped once, kept for good
            self.pmapped[gref] = frame
        else:
            key = (gref, frame)
            self.mapped[key] = self.mapped.get(key, 0) + 1
        self.cpu.map(frame)
        self.stats.maps_outstanding += 1
        if touch:
            self.stats.grant_maps_on_touch += 1

    def unmap(self, gref: int, frame: int) -> None:
        if gref & GREF_PERSISTENT:
            return
        key = (gref, frame)
        n = self.mapped.pop(key) - 1
        if n:
            self.mapped[key] = n
        self.cpu.unmap(frame)
        self.stats.maps_outstanding -= 1

    def page(self, frame: int) -> memoryview:
        """A mapped payload page (the CPU view's one accessor: raises if not mapped)."""
        return self.cpu.page(frame)

    # --- the DMA view -------------------------------------------------------------------
    def copy_from(self, gref: int, offset: int, size: int) -> bytes:
        """GNTTABOP_copy out of a grant: checked, briefly marked, counted as bytes copied."""
        frame = self.check(gref)
        if not gref & GREF_PERSISTENT:
            self.table.mark(gref, False)
        t = _now()
        data = self._dma.copy(frame, offset, size)
        self.stats.grant_copy_ns += _now() - t
        if not gref & GREF_PERSISTENT:
            self.table.unmark(gref)
        self.stats.grant_copies += 1
        self.stats.grant_copy_bytes += size
        self.stats.copy_bytes += size
        return data

    def tx_iovecs(self, grefs: list[int], frames: list[int], offs: list[int],
                  sizes: list[int], out: list) -> None:
        """The vif submit: fragments as iovecs through the DMA view (grants are held)."""
        if self.hook is not None:
            for g in grefs:
                self.hook("tx_submit", g)
        self._dma.iovecs(frames, offs, sizes, out)

    def rx_target(self, frame: int) -> memoryview:
        return self._dma.rx_target(frame)

    def rx_write(self, fd: int, iov: list, grefs: list[int], frames: list[int]) -> RxWrite:
        """The RX grant copy: validate each posted buffer *now* (still granted, writable, the
        frame it granted when posted) and set GTF_writing on it while the frame is read into
        it; a revoked buffer is not written (its index is returned, its iovec left out)."""
        flags, buf, hook = self.flags, self.table.buf, self.hook
        dom, write = self.domid, GTF_writing
        revoked: list[int] = []
        marked: list[int] = []
        for i, g in enumerate(grefs):
            if g & GREF_PERSISTENT:
                continue
            if hook is not None:
                hook("rx_write", g)
            fl, gdom, frame = _unpack_gnt(buf, g << 3)
            if fl & (GTF_permit_access | GTF_readonly) != GTF_permit_access or gdom != dom \
                    or frame != frames[i]:
                revoked.append(i)
                continue
            flags[4 * g] = fl | write
            marked.append(g)
        try:
            if revoked:
                return RxWrite(0, revoked)
            t = _now()
            n = self._dma.readv(fd, iov)
            st = self.stats
            st.grant_copy_ns += _now() - t
            st.grant_copy_bytes += n
            return RxWrite(n, revoked)
        finally:
            for g in marked:
                flags[4 * g] &= ~GTF_in_use & 0xFFFF

    # --- disconnect ---------------------------------------------------------------------
    def unmap_all(self) -> None:
        """Disconnect: drop every mapping and persistent grant this ring still holds."""
        for (gref, frame), n in list(self.mapped.items()):
            self.table.unmark(gref)
            for _ in range(n):
                self.cpu.unmap(frame)
            self.stats.maps_outstanding -= n
        self.mapped.clear()
        for gref in self.persistent:
            self.table.unmark(gref & GREF_MASK)
        for frame in self.pmapped.values():
            self.cpu.unmap(frame)
        self.stats.maps_outstanding -= len(self.pmapped)
        self.stats.grants_in_use -= len(self.persistent)
        self.persistent.clear()
        self.pmapped.clear()

