"""Grant operations of the backend: check, map, unmap, copy (Xen's gnttab ops).

A *map* is the costly thing lazy mapping avoids: it validates the grant entry, marks it in use
(GTF_reading/GTF_writing) and is counted, and it must be undone. Persistent grants (a gref with
``GREF_PERSISTENT``) stay mapped from first use to disconnect, found again by a range check,
as Pratt's mail proposes; ``unmap_all`` releases them.
"""

from __future__ import annotations

from shared.grant import GrantTable
from shared.netif import GREF_MASK, GREF_PERSISTENT
from shared.region import Region
from shared.stats import RingStats
from shared.xenbus import NotNegotiated


class GntMap:
    """Grant operations for one frontend connection, counted into ``stats``."""

    def __init__(self, region: Region, domid: int, stats: RingStats, persistent: bool) -> None:
        self.region = region
        self.table: GrantTable = region.grants
        self.domid = domid
        self.stats = stats
        self.persistent_ok = persistent
        self.frames = region.layout.payload_frames
        #: gref -> frame of persistent grants already validated and kept mapped
        self.persistent: dict[int, int] = {}
        #: persistent grefs that have been CPU-mapped (once each)
        self.pmapped: set[int] = set()
        #: gref -> map count of transient maps now held
        self.mapped: dict[int, int] = {}

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

    def map(self, gref: int, write: bool = False) -> memoryview:
        """Map a payload grant for CPU access (counted); pair with ``unmap``."""
        frame = self.check(gref, write)
        if gref & GREF_PERSISTENT:
            if gref not in self.pmapped:  # mapped once, kept for good
                self.pmapped.add(gref)
                self.stats.grant_maps += 1
                self.stats.maps_outstanding += 1
            return self.region.page(frame)
        n = self.mapped.get(gref, 0)
        if not n:
            self.table.mark(gref, write)
            self.stats.grants_in_use += 1
        self.mapped[gref] = n + 1
        self.stats.grant_maps += 1
        self.stats.maps_outstanding += 1
        return self.region.page(frame)

    def unmap(self, gref: int) -> None:
        if gref & GREF_PERSISTENT:
            return
        n = self.mapped.pop(gref, 0) - 1
        if n > 0:
            self.mapped[gref] = n
        else:
            self.table.unmark(gref)
            self.stats.grants_in_use -= 1
        self.stats.maps_outstanding -= 1

    def copy_from(self, gref: int, offset: int, size: int) -> bytes:
        """GNTTABOP_copy out of a grant: checked, briefly marked, counted as bytes copied."""
        frame = self.check(gref)
        if not gref & GREF_PERSISTENT:
            self.table.mark(gref, False)
        data = bytes(self.region.page(frame)[offset:offset + size])
        if not gref & GREF_PERSISTENT:
            self.table.unmark(gref)
        self.stats.grant_copies += 1
        self.stats.copy_bytes += size
        return data

    def unmap_all(self) -> None:
        """Disconnect: drop every mapping this connection still holds."""
        for gref in list(self.mapped):
            self.table.unmark(gref)
        self.stats.maps_outstanding -= sum(self.mapped.values())
        self.stats.grants_in_use -= len(self.mapped)
        self.mapped.clear()
        for gref in self.persistent:
            self.table.unmark(gref & GREF_MASK)
        self.stats.maps_outstanding -= len(self.pmapped)
        self.stats.grants_in_use -= len(self.persistent)
        self.persistent.clear()
        self.pmapped.clear()
