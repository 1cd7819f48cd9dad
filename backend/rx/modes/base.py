"""The RX mechanism protocol: how a frame from the vif gets into the buffers a frontend posted.

The core of netback RX (``backend/rx/path.py``) takes posted requests off the ring, decides which
buffers a frame fills and in which order (stock netif or ``feature-rx-by-id``; a GSO frame's
extra slot), answers them and retires them. It knows no mechanism by name; the mechanism in
force does the part that touches the frontend's pages:

- ``post(grefs)``: the batch of buffers one refill took off the ring, validated once each
  (``check``: the grant is this domain's, writable, a payload page); returns, per buffer, its
  table index, its entry as one u64 (what it must still be when written) and a *target*, the
  mechanism's own handle on the page (a DMA-view page, or the frame to map).
- ``write(fd, vnet, targets, grefs, exps, maxbufs, layout)``: one frame from the vif (a TAP
  hands over one frame per read) into the first posted buffers; ``layout(length)`` is the
  core's decision, once the frame's length and GSO kind are known, of the positions its pages
  go to (None: dropped, not negotiated). Returns what was read, the positions found revoked
  (then nothing is answered for the frame), and the positions written.
- ``write_one(fd, vnet, target, g, e)``: one frame into one posted buffer, the rest of a
  longer one into the bounce buffer's pages 0..; the core asks for this while small frames
  come in a row (a frame per read, one buffer checked and marked, not 17), and copies a longer
  frame's rest on with ``copy_in``. Returns the bytes read (with the vnet header), or -1 if
  the buffer was found revoked (nothing read).
- ``copy_in(positions, targets, grefs, exps, nbytes)``: the first ``nbytes`` of ``bounce()``
  (a frame read there while too few buffers were posted, or the rest of a frame ``write_one``
  read) into the posted buffers at ``positions``, a page each, in order (``nbytes`` falls in
  the last of them: the callers lay the frame out from it): the last buffer gets only the
  frame's bytes, never what an earlier, longer frame left in the bounce page
  (Linux copies the skb's bytes, not pages).

Every write into a buffer checks first that its entry is still exactly what was validated, and
sets GTF_writing on it meanwhile (``_stale``, ``_writing``): a buffer the frontend revoked in
between is never written but reported, and answered XEN_NETIF_RSP_ERROR by the core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from backend.grants.gntmap import GntMap
from shared.protocol.grant import WORD_FLAGS, WORD_FRAME_SHIFT
from shared.protocol.netif import GREF_MASK, MAX_FRAME_PAGES, PAGE_SIZE
from shared.protocol.stats import RingStats

#: the private area a frame is read into when it cannot go straight into posted buffers
#: (17 pages: a 64 KiB frame)
RX_BOUNCE = MAX_FRAME_PAGES * PAGE_SIZE

#: the core's layout decision: a frame's length -> the buffer positions of its pages, in
#: frame order (None: the frame is dropped, counted by the core)
Layout = Callable[[int], "Sequence[int] | None"]


@dataclass
class RxWrite:
    """What ``write`` did: bytes read (incl. the vnet header; 0: nothing read), the positions
    of posted buffers found revoked (with n > 0: the frame was read and is dropped, unless
    ``kept``), and the positions its pages were written to, in frame order (empty: nothing
    to answer). ``kept``: the frame is still whole in ``bounce()``, so the core holds it and
    copies it in later, into buffers that are still granted."""

    n: int
    revoked: list[int]
    data: Sequence[int] = field(default_factory=list)
    kept: bool = False


class RxMechanism:
    """What every RX mechanism is handed, and the validation every one shares."""

    #: the mechanism's own counters (space-separated names), shown beside the ring's
    COUNTERS: ClassVar[str] = ""

    def __init__(self, gntmap: GntMap, stats: RingStats, own: object) -> None:
        self.gntmap = gntmap
        self.stats = stats
        self.own = own
        #: validates a refill's grefs (``PersistentGrants.validate_many``: transient or
        #: persistent), returning their frames
        self.check_many = gntmap.check_many
        table = gntmap.table
        self._q = table.words  # whole entries, to compare one value per grant
        self.flags = table.ref_flags
        self._bounce = memoryview(bytearray(RX_BOUNCE))
        #: where ``write_one`` reads what follows a frame's first page
        self._spill = self._bounce[:RX_BOUNCE - PAGE_SIZE]

    def target(self, gref: int, frame: int) -> object:
        """The mechanism's handle on a posted page (what ``write`` and ``copy_in`` get) for
        ``gref`` as posted (its persistent bit included) and the frame it grants."""
        return gref, frame

    def post(self, grefs: list[int]) -> tuple[list[int], list[int], list]:
        """A refill's posted buffers, validated now (``GntMap.check_many``: the batch in one
        loop): their table indexes, their entries as one u64 each (what they must still be at
        write time), their targets."""
        frames = self.check_many(grefs, True)
        q = self._q
        gis = [gref & GREF_MASK for gref in grefs]
        exps = []
        low = (1 << WORD_FRAME_SHIFT) - 1
        for gi, frame in zip(gis, frames, strict=True):
            word = q[gi]
            if word >> WORD_FRAME_SHIFT != frame:  # rewritten since the check (or a kept
                # grant's entry since it was kept): expect the frame validated, so the write
                # finds the entry changed (revoked) and nothing reaches the unvalidated one
                word = (frame << WORD_FRAME_SHIFT) | (word & low)
            exps.append(word)
        return gis, exps, list(map(self.target, grefs, frames))

    def write(self, fd: int, vnet: bytearray, targets, grefs, exps, maxbufs: int,
              layout: Layout) -> RxWrite:
        raise NotImplementedError

    def write_one(self, fd: int, vnet: bytearray, target, g: int, e: int) -> int:
        raise NotImplementedError

    def copy_in(self, positions: Sequence[int], targets, grefs, exps,
                nbytes: int) -> list[int]:
        raise NotImplementedError

    def bounce(self) -> memoryview:
        """The private area a frame is read into when it cannot go straight into posted
        buffers (RX with few buffers posted); ``copy_in`` copies it on."""
        return self._bounce

    def _stale(self, gs: list[int], ex: list[int], base: int) -> list[int]:
        """Positions (from ``base``) of buffers whose entry changed since they were posted."""
        q = self._q
        return [base + i for i, (g, e) in enumerate(zip(gs, ex, strict=True)) if q[g] != e]

    def _writing(self, gs: list[int], ex: list[int], bit: int) -> None:
        """Set (bit = GTF_writing) or clear (0) the write mark: the flags as validated | bit."""
        flags = self.flags
        for g, e in zip(gs, ex, strict=True):
            flags[g] = (e & WORD_FLAGS) | bit
