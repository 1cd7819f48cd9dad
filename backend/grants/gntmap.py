"""Grant operations of the backend: check, map, unmap, copy (Xen's gnttab ops).

The mechanism behind every access to a frontend's payload is reached from here, so the rest of
netback does not know which kind of mapping is in force:

- ``check``: validate a gref from the ring (read the entry once) and return its frame.
  Persistent grants (gref with ``GREF_PERSISTENT``) are ``backend/grants/persistent.py``'s.
- ``tx`` (``backend/grants/tx.py``): the per-fragment grants of TX packets, resolved at attach
  and held (GTF_reading) until the packet is freed.
- ``map``/``unmap``/``page``: the CPU view (``backend/grants/cpuview.py``): a real mmap of that page
  into a PROT_NONE range, undone by a real unmap. Maps use the frame resolved when the fragment
  was attached, never the grant entry again. Persistent grants are mapped on first use and kept.
- ``copy_from`` (header copy), ``pull`` (header pull), ``tx_iovecs`` (vif submit) and ``dma``
  (for the RX grant copy, ``backend/rx/modes/copy.py``): the only uses of the DMA view
  (``backend/grants/dmaview.py``).

``Views`` is what one connection maps: the CPU view, the DMA view, the region memfd; the two
``GntMap``\\ s of a connection (TX, RX) share one.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import time

from backend.grants.cpuview import CpuView
from backend.grants.dmaview import DmaView
from backend.grants.persistent import PersistentGrants
from backend.grants.tx import TxGrants
from shared.faults import PeerFault, kind_of
from shared.protocol.grant import GrantError, GrantTable
from shared.protocol.netif import GREF_PERSISTENT
from shared.protocol.region import Area, Region
from shared.protocol.stats import RingStats

log = logging.getLogger("netback")
_now = time.perf_counter_ns


class MapError(PeerFault):
    """The kernel refused a map (``mmap``: ENOMEM past ``vm.max_map_count``, a place taken):
    the peer's grants asked for it, so it is the peer's fault for that packet - dropped and
    counted (``drops_map``; a capture's frame: ``capture_drops``) - never a process exit."""


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


class GntMap:
    """Grant operations for one ring of one frontend connection, counted into ``stats``."""

    def __init__(self, region: Area, views: Views, domid: int, stats: RingStats,
                 persistent: bool) -> None:
        self.region = region
        self.table: GrantTable = region.grants
        self.cpu = views.cpu
        self._dma = views.dma
        self.domid = domid
        self.stats = stats
        self.frames = region.layout.payload_frames
        #: the grant references of this ring's queue (all of them with one queue): with
        #: several queues a gref outside them is refused before its entry is read
        self.refs = region.refs
        owned = (functools.partial(check_owned, region.refs, region.share.label)
                 if region.share.queues > 1 else None)
        self.kept = PersistentGrants(self.table, domid, self.frames, stats, persistent, owned)
        #: (gref, frame) -> count of transient CPU maps now held
        self.mapped: dict[tuple[int, int], int] = {}
        # given the validation itself, not a method of this object: no reference cycle, so a
        # disconnected connection's mappings go the moment the last reference does
        self.tx = TxGrants(self.table, domid, self.frames, stats, self.kept.validate,
                           self.refs, self.kept.kept)

    # --- validation ---------------------------------------------------------------------
    def check(self, gref: int, write: bool = False) -> int:
        """Validate a gref from the ring; return its frame. Persistent ones are checked once."""
        return self.kept.validate(gref, write)

    def check_many(self, grefs: list[int], write: bool = False) -> list[int]:
        """``check`` for a batch (an RX refill): their frames, in order."""
        return self.kept.validate_many(grefs, write)

    # --- the CPU view -------------------------------------------------------------------
    def map(self, gref: int, frame: int, touch: bool = False, write: bool = False) -> None:
        """Map a payload page for CPU access, by the frame resolved at attach; pair with
        ``unmap``. ``touch``: this map is lazy mapping's, done because something read.
        ``write``: writable (an RX buffer the CPU copies a frame into). Raises MapError
        (nothing recorded) if the kernel refuses."""
        persistent = gref & GREF_PERSISTENT
        if persistent and self.kept.is_mapped(gref, frame):
            return  # mapped once, kept for good
        try:
            self.cpu.map(frame, write)
        except OSError as e:
            raise MapError(f"mapping frame {frame} of gref {gref & ~GREF_PERSISTENT}: "
                           f"{e}") from e
        if persistent:
            self.kept.note_mapped(gref, frame)
        else:
            key = (gref, frame)
            self.mapped[key] = self.mapped.get(key, 0) + 1
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
    @property
    def dma(self) -> DmaView:
        """The DMA view itself, for the RX grant copy (``backend/rx/modes/copy.py``): a grant
        operation like the ones below, and the only other holder it is handed to."""
        return self._dma

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
        attach (the grant is held), into the skb's private head; counted as bytes copied.
        From a page the backend keeps mapped (staging grants, a persistent grant mapped
        before) it is a CPU copy out of that mapping instead (``staged_pulls``): no grant
        operation, as staging grants' "memcpy of up to 128 bytes"."""
        if gref & GREF_PERSISTENT and self.kept.mapped.get(gref) == frame:
            self.stats.staged_pulls += 1
            self.stats.copy_bytes += size
            return bytes(self.cpu.page(frame)[offset:offset + size])
        t = _now()
        data = self._dma.copy(frame, offset, size)
        st = self.stats
        st.grant_copy_ns += _now() - t
        st.grant_copies += 1
        st.grant_pulls += 1
        st.grant_copy_bytes += size
        st.copy_bytes += size
        return data

    def tx_iovecs(self, grefs: list[int], frames: list[int], offs: list[int],
                  sizes: list[int], out: list) -> None:
        """The vif submit: fragments as iovecs through the DMA view (grants are held)."""
        self._dma.iovecs(frames, offs, sizes, out)

    # --- disconnect ---------------------------------------------------------------------
    def unmap_all(self) -> None:
        """Disconnect: drop every mapping and persistent grant this ring still holds. Never
        raises (teardown must finish): a mapping that cannot be undone is logged, and goes
        with the whole CPU view when it is closed."""
        mapped, self.mapped = self.mapped, {}
        for (gref, frame), n in mapped.items():
            self.table.unmark(gref)
            self.stats.maps_outstanding -= n
            for _ in range(n):
                _quietly(self.cpu.unmap, frame)
        self.kept.release_all(lambda frame: _quietly(self.cpu.unmap, frame))


def check_owned(refs: range, label: str, gref: int) -> None:
    """Refuse a gref (persistent bit masked) that is not this queue's: each grant entry is
    marked and unmarked by one queue's worker only (``Layout.share``), so a frontend naming
    one on another queue is at fault - whatever it meant - before the entry is touched."""
    ref = gref & ~GREF_PERSISTENT
    if ref not in refs:
        raise GrantError(f"gref {ref} is not {label}'s (its grants are "
                         f"{refs.start}..{refs.stop - 1})")


def _quietly(undo, frame: int) -> None:
    """Teardown's undo of one mapping: a failure is logged (with its fault kind), not
    raised."""
    try:
        undo(frame)
    except Exception as e:  # noqa: BLE001 - teardown goes on whatever one mapping says
        log.warning("teardown: frame %d: %s (%s fault)", frame, e, kind_of(e))
