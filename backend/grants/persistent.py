"""Persistent grants (``feature-persistent``, backend): validated once, kept until disconnect.

A gref with ``GREF_PERSISTENT`` (bit 31) on the ring says "keep it": the first time the backend
meets it, it validates the entry, marks it in use (GTF_reading/GTF_writing, so the frontend
cannot revoke it) and remembers its frame; afterwards a lookup finds it (``persistent_hits``),
as Pratt's mail proposes. It is CPU-mapped on first use and stays mapped. At disconnect every
one is unmarked and unmapped (``release_all``). A ring keeps at most MAX_PERSISTENT_GRANTS
(Linux's blkback caps them too): one more is a fatal grant error for the frontend, so what a
frontend can make the backend keep (entries, mappings, VMAs) is bounded. Transient grants are
``backend/grants/tx.py``'s (TX) and ``backend/rx/modes/copy.py``'s (RX).
"""

from __future__ import annotations

from collections.abc import Callable

from shared.protocol.grant import GrantError, GrantTable
from shared.protocol.netif import GREF_MASK, GREF_PERSISTENT, MAX_PERSISTENT_GRANTS
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import NotNegotiated


class PersistentGrants:
    """The persistent grants one ring of one connection keeps."""

    def __init__(self, table: GrantTable, domid: int, frames: range, stats: RingStats,
                 negotiated: bool, owned: Callable[[int], None] | None = None) -> None:
        self.table = table
        #: raises if a gref is not this ring's queue's (``gntmap.check_owned``)
        self.owned = owned
        self.domid = domid
        self.frames = frames
        self.stats = stats
        self.negotiated = negotiated
        #: gref (with the bit) -> frame, for grants validated and kept in use
        self.kept: dict[int, int] = {}
        #: gref -> frame, for those mapped into the CPU view (once each, until disconnect)
        self.mapped: dict[int, int] = {}
        #: staging grants: only the pools' grefs (kept at connect) may carry the bit
        self.pools_only = False

    def validate(self, gref: int, write: bool = False) -> int:
        """Validate any gref from the ring; return its frame. A transient one is checked
        every time; a persistent one is looked up, or validated and kept on first use."""
        if self.owned is not None:
            self.owned(gref)
        if not gref & GREF_PERSISTENT:
            return self.table.check(gref, self.domid, write, self.frames)
        frame = self.kept.get(gref)
        if frame is not None:
            self.stats.persistent_hits += 1
            return frame
        if self.pools_only:
            raise NotNegotiated(f"gref {gref & GREF_MASK} marked kept but not in the staging "
                                "pools")
        if not self.negotiated:
            raise NotNegotiated(f"gref {gref:#x} marked persistent without feature-persistent")
        return self.keep(gref, write)

    def validate_many(self, grefs: list[int], write: bool = False) -> list[int]:
        """``validate`` for a batch: transient grefs of a table no other queue shares are
        checked in one loop (``GrantTable.check_many``)."""
        if self.owned is None and not any(g & GREF_PERSISTENT for g in grefs):
            return self.table.check_many(grefs, self.domid, write, self.frames)
        return [self.validate(g, write) for g in grefs]

    def keep(self, gref: int, write: bool = False) -> int:
        """Validate ``gref`` (with the bit) once and keep it in use until disconnect."""
        if len(self.kept) >= MAX_PERSISTENT_GRANTS:
            raise GrantError(f"gref {gref & GREF_MASK}: more than {MAX_PERSISTENT_GRANTS} "
                             "persistent grants on one ring")
        frame = self.table.check(gref & GREF_MASK, self.domid, write, self.frames)
        self.table.mark(gref & GREF_MASK, write)  # held until disconnect
        self.kept[gref] = frame
        self.stats.grants_in_use += 1
        return frame

    def is_mapped(self, gref: int, frame: int) -> bool:
        """Is ``gref`` already CPU-mapped (to ``frame``, the one it was validated with)?"""
        return self.mapped.get(gref) == frame

    def note_mapped(self, gref: int, frame: int) -> None:
        """``gref`` was just CPU-mapped: kept so until disconnect."""
        self.mapped[gref] = frame

    def release_all(self, unmap: Callable[[int], None]) -> None:
        """Disconnect: unmark every kept grant and unmap (``unmap(frame)``, which must not
        raise) every kept mapping."""
        for gref in self.kept:
            self.table.unmark(gref & GREF_MASK)
        for frame in self.mapped.values():
            unmap(frame)
        self.stats.maps_outstanding -= len(self.mapped)
        self.stats.grants_in_use -= len(self.kept)
        self.kept.clear()
        self.mapped.clear()
