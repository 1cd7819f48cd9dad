"""Persistent grants (``feature-persistent``, backend): validated once, kept until disconnect.

A gref with ``GREF_PERSISTENT`` (bit 31) on the ring says "keep it": the first time the backend
meets it, it validates the entry, marks it in use (GTF_reading/GTF_writing, so the frontend
cannot revoke it) and remembers its frame; afterwards a lookup finds it (``persistent_hits``),
as Pratt's mail proposes. It is CPU-mapped on first use and stays mapped. At disconnect every
one is unmarked and unmapped (``release_all``). Transient grants are ``backend/txgrants.py``'s
(TX) and ``backend/rxcopy.py``'s (RX).
"""

from __future__ import annotations

from backend.cpuview import CpuView
from shared.grant import GrantTable
from shared.netif import GREF_MASK, GREF_PERSISTENT
from shared.stats import RingStats
from shared.xenbus import NotNegotiated


class PersistentGrants:
    """The persistent grants one ring of one connection keeps."""

    def __init__(self, table: GrantTable, domid: int, frames: range, stats: RingStats,
                 negotiated: bool) -> None:
        self.table = table
        self.domid = domid
        self.frames = frames
        self.stats = stats
        self.negotiated = negotiated
        #: gref (with the bit) -> frame, for grants validated and kept in use
        self.kept: dict[int, int] = {}
        #: gref -> frame, for those mapped into the CPU view (once each, until disconnect)
        self.mapped: dict[int, int] = {}

    def validate(self, gref: int, write: bool = False) -> int:
        """Validate any gref from the ring; return its frame. A transient one is checked
        every time; a persistent one is looked up, or validated and kept on first use."""
        if not gref & GREF_PERSISTENT:
            return self.table.check(gref, self.domid, write, self.frames)
        frame = self.kept.get(gref)
        if frame is not None:
            self.stats.persistent_hits += 1
            return frame
        if not self.negotiated:
            raise NotNegotiated(f"gref {gref:#x} marked persistent without feature-persistent")
        frame = self.table.check(gref & GREF_MASK, self.domid, write, self.frames)
        self.table.mark(gref & GREF_MASK, write)  # held until disconnect
        self.kept[gref] = frame
        self.stats.grants_in_use += 1
        return frame

    def needs_map(self, gref: int, frame: int) -> bool:
        """A CPU map of ``frame`` is asked for: True the first time (then it is kept)."""
        if self.mapped.get(gref) == frame:
            return False
        self.mapped[gref] = frame
        return True

    def release_all(self, cpu: CpuView) -> None:
        """Disconnect: unmark every kept grant and unmap every kept mapping."""
        for gref in self.kept:
            self.table.unmark(gref & GREF_MASK)
        for frame in self.mapped.values():
            cpu.unmap(frame)
        self.stats.maps_outstanding -= len(self.mapped)
        self.stats.grants_in_use -= len(self.kept)
        self.kept.clear()
        self.mapped.clear()
