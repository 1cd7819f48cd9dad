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

import functools
import mmap
import os
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from backend.cpuview import CpuView
from backend.dmaview import DmaView
from shared.grant import (
    GRANT_ENTRY,
    GrantError,
    GrantTable,
    GTF_in_use,
    GTF_permit_access,
    GTF_reading,
    GTF_writing,
)
from shared.netif import GREF_MASK, GREF_PERSISTENT, PAGE_SIZE
from shared.region import Region
from shared.stats import RingStats
from shared.xenbus import NotNegotiated

_unpack_gnt = GRANT_ENTRY.unpack_from
_now = time.perf_counter_ns
#: access points at which tests may act (revoke a grant) just before the backend's access
HOOK_POINTS = ("tx_hold", "tx_map", "tx_pull", "tx_submit", "rx_write")
#: RX: small frames in a row after which only one buffer is marked per frame
RX_SHRINK_AFTER = 8
#: RX: the private spill area for a frame longer than predicted (17 pages: a 64 KiB frame)
RX_BOUNCE = 17 * PAGE_SIZE


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
    """What ``rx_write`` did: bytes read (incl. the vnet header; 0: nothing read) and the
    positions of posted buffers found revoked (with n > 0: the frame was read and dropped)."""

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
        self._q = self.table.buf.cast("Q")  # whole entries, to compare one value per grant
        #: RX: how many posted buffers the next frame may need (see ``rx_write``)
        self.rx_window = 1 << 16
        self._rx_small = 0
        self._bounce = memoryview(bytearray(RX_BOUNCE))
        self._spill = self._bounce[:RX_BOUNCE - PAGE_SIZE]  # after one page

    # --- validation and the in-use bits ---------------------------------------------------
    def check(self, gref: int, write: bool = False) -> int:
        """Validate a gref from the ring; return its frame. Persistent ones are checked once."""
        if gref & GREF_PERSISTENT:
            frame = self.persistent.get(gref)
            if frame is not None:
                self.stats.persistent_hits += 1
                return frame
            if not self.persistent_ok:
                raise NotNegotiated(f"gref {gref:#x} marked persistent without "
                                    "feature-persistent")
            frame = self.table.check(gref & GREF_MASK, self.domid, write, self.frames)
            self.table.mark(gref & GREF_MASK, write)  # held until disconnect
            self.persistent[gref] = frame
            self.stats.grants_in_use += 1
            return frame
        return self.table.check(gref, self.domid, write, self.frames)

    def hold(self, grefs: list[int], frames: list[int], flags0: int = -1) -> int:
        """Set GTF_reading on a packet's transient TX grants, then check that each entry still
        grants the frame resolved at attach (a revoke that raced the marking is caught here,
        not after the bytes left). ``flags0``: every entry's flags, if the caller read them
        all equal (consecutive grefs: one strided store). Returns what to pass to
        ``release``."""
        if self.hook is not None:
            for g in grefs:
                self.hook("tx_hold", g)
        flags = self.flags
        n = len(grefs)
        g0 = grefs[0]
        span = slice(4 * g0, 4 * (g0 + n), 4)
        if flags0 >= 0 and flags[span].tolist().count(flags0) == n:
            # unchanged since attach: one strided store, then re-read to catch a revoke that
            # landed after it (one that lands between the read and the store is the window
            # documented in the README: no compare-and-swap from Python). Only the flags are
            # re-read: the frames were resolved at attach and are never read again.
            held_flags = flags0 | GTF_reading
            flags[span] = _fill(held_flags, n)
            if flags[span].tolist().count(held_flags) == n:
                self.stats.grants_in_use += n
                return flags0
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
        return -1  # released one by one
    def _unhold(self, grefs: list[int]) -> None:
        flags = self.flags
        for g in grefs:
            if not g & GREF_PERSISTENT:
                flags[4 * g] &= ~GTF_in_use & 0xFFFF

    def release(self, grefs: list[int], flags0: int = -1) -> None:
        """The skb is freed: nothing reads these grants any more; end_access may succeed."""
        if flags0 >= 0:
            g0, n = grefs[0], len(grefs)
            self.flags[4 * g0:4 * (g0 + n):4] = _fill(flags0 & ~GTF_in_use, n)
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

    def pull(self, gref: int, frame: int, offset: int, size: int) -> bytes:
        """The header pull: a grant copy out of a TX fragment, by the frame resolved at
        attach (the grant is held), into the skb's private head; counted as bytes copied."""
        if self.hook is not None:
            self.hook("tx_pull", gref)
        t = _now()
        data = self._dma.copy(frame, offset, size)
        st = self.stats
        st.grant_copy_ns += _now() - t
        st.grant_copies += 1
        st.grant_copy_bytes += size
        st.copy_bytes += size
        return data

    def tx_iovecs(self, grefs: list[int], frames: list[int], offs: list[int],
                  sizes: list[int], out: list) -> None:
        """The vif submit: fragments as iovecs through the DMA view (grants are held)."""
        if self.hook is not None:
            for g in grefs:
                self.hook("tx_submit", g)
        self._dma.iovecs(frames, offs, sizes, out)

    def rx_post(self, gref: int) -> tuple[int, int, memoryview]:
        """A posted RX buffer, validated now: (table index, the entry as one u64 - what it
        must still be at write time -, the page as a DMA target)."""
        frame = self.check(gref, True)
        gi = gref & GREF_MASK
        return gi, self._q[gi], self._dma.rx_target(frame)

    def rx_write(self, fd: int, vnet: bytearray, views: deque, grefs: deque, exps: deque,
                 maxbufs: int) -> RxWrite:
        """The RX grant copy of one frame from ``fd`` into the first posted buffers.

        Each buffer that may be written is validated *now* (its entry is still exactly what
        was validated at posting: granted, writable, same frame) and has GTF_writing set while
        the frame is read into it. A revoked buffer is not written: its position is returned
        (``revoked``), for an XEN_NETIF_RSP_ERROR answer. How many buffers may be written is
        predicted (``rx_window``): all ``maxbufs`` while frames span pages, one after a run of
        small frames; a frame longer than predicted spills into a private bounce buffer and is
        grant-copied on into the following buffers (validated the same way) - so a stream of
        small frames does not pay for checking 17 buffers each."""
        k = min(self.rx_window, maxbufs)
        if k == 1 and self.hook is None:  # small frames: the same steps for one buffer
            g, e = grefs[0], exps[0]
            q, flags = self._q, self.flags
            if q[g] != e:
                return RxWrite(0, [0])
            flags[4 * g] = (e & 0xFFFF) | GTF_writing
            try:
                t = _now()
                n = self._dma.readv(fd, [vnet, views[0], self._spill])
                t = _now() - t
            finally:
                flags[4 * g] = e & 0xFFFF
            st = self.stats
            st.grant_copy_ns += t
            st.grant_copy_bytes += n
            if n - len(vnet) <= PAGE_SIZE:
                return RxWrite(n, [])
            self.rx_window, self._rx_small = maxbufs, 0
            return self._rx_spill(n, 1, -(-(n - len(vnet)) // PAGE_SIZE), views, grefs, exps)
        gs, ex = list(islice(grefs, k)), list(islice(exps, k))
        if self.hook is not None:
            for g in gs:
                self.hook("rx_write", g)
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
            self.rx_window, self._rx_small = maxbufs, 0
        else:
            self._rx_small += 1
            if self._rx_small >= RX_SHRINK_AFTER:
                self.rx_window = 1
        if nbufs <= k:
            return RxWrite(n, [])
        return self._rx_spill(n, k, nbufs, views, grefs, exps)

    def rx_bounce(self) -> memoryview:
        """The private area a frame is read into when it cannot go straight into posted
        buffers (RX with few buffers posted); ``rx_copy_in`` grant-copies it on."""
        return self._bounce

    def rx_copy_in(self, first: int, nbufs: int, views, grefs, exps) -> list[int]:
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
        if self.hook is not None:
            for g in gs:
                self.hook("rx_write", g)
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
            flags[4 * g] = (e & 0xFFFF) | bit

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


@functools.cache
def _fill(value: int, n: int) -> array:
    """n copies of a u16 flags value, for one strided store into the grant table."""
    return array("H", (value,)) * n
