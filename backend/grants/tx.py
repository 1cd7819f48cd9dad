"""Per-fragment grants of TX packets (backend): resolved once, held while anything may read them.

Each payload page of a TX packet comes with a grant of its own. Its entry is checked once, when
the fragment is attached (``resolve``): the frame found then is the one every later access uses
(map, header pull, vif write), never the entry again. ``hold`` sets GTF_reading on the packet's
transient grants from attach until its sk_buff-equivalent is freed (``release``), in every mode
(the vif write reads the pages), so the frontend's ``end_access`` is refused all that time; a
grant revoked while the backend took it is a fatal error for that frontend (``GrantError``).
Consecutive grefs with equal flags (how netfront grants a frame's pages) are read with one
unpack and marked and unmarked with one strided store each. Persistent grants
(``backend/grants/persistent.py``) are never held here: they stay marked until disconnect. A
packet on one persistent gref the ring already keeps (persistent grants, staging pools: the
common case once warm) is a dictionary lookup (``KEPT``), as Linux's persistent-grant tree
lookup is, with nothing to hold or release.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable

from shared.protocol.grant import (
    GRANT_ENTRY,
    WORD_FLAGS,
    GrantError,
    GrantTable,
    GTF_in_use,
    GTF_permit_access,
    GTF_reading,
    entries,
)
from shared.protocol.netif import GREF_PERSISTENT
from shared.protocol.stats import RingStats

_unpack_gnt = GRANT_ENTRY.unpack_from
_GE = GRANT_ENTRY.size
_NOT_IN_USE = ~GTF_in_use & WORD_FLAGS  # a u16 flags value without the in-use bits
#: ``resolve``'s flags for a packet whose every grant is kept (persistent, validated before):
#: ``hold`` and ``release`` have nothing to do
KEPT = -3


class TxGrants:
    """The TX fragments' grants of one ring; ``check`` is the full per-grant validation
    (``PersistentGrants.validate``: transient or persistent), used for anything unusual."""

    def __init__(self, table: GrantTable, domid: int, frames: range, stats: RingStats,
                 check: Callable[[int], int], refs: range | None = None,
                 kept: dict[int, int] | None = None) -> None:
        self.table, self.buf = table, table.buf
        #: this queue's grant references (``Layout.share``): the fast path stays inside them,
        #: anything else takes ``check``, which refuses a gref of another queue
        refs = range(table.count) if refs is None else refs
        self.lo, self.count = refs.start, min(refs.stop, table.count)
        self.flags = table.ref_flags  # flags[ref]
        self.domid, self.frames, self.stats, self.check = domid, frames, stats, check
        #: the ring's kept persistent grants (gref with the bit -> frame), validated once
        #: (and owned by this queue) when first kept: ``PersistentGrants.kept``
        self.kept = {} if kept is None else kept

    def resolve(self, grefs: list[int]) -> tuple[list[int], int]:
        """Check every fragment's grant; the frames they grant, and the entries' common flags
        when they are consecutive and alike (else -1). Consecutive grefs (how netfront grants
        a frame's pages) are read with one unpack; anything unusual takes the full per-grant check,
        which also says precisely what is wrong."""
        n = len(grefs)
        g0 = grefs[0]
        if n == 1 and g0 & GREF_PERSISTENT:  # one fragment on a grant kept before
            frame = self.kept.get(g0)
            if frame is not None:
                self.stats.persistent_hits += 1
                return [frame], KEPT
        lo, hi = self.frames.start, self.frames.stop
        if n == 1 and self.lo <= g0 < self.count:  # an MTU packet's one fragment
            fl, dom, frame = _unpack_gnt(self.buf, g0 * _GE)
            if fl & GTF_permit_access and not fl & GTF_in_use and dom == self.domid \
                    and lo <= frame < hi:
                return [frame], fl
        if self.lo <= g0 and g0 + n <= self.count and grefs[-1] == g0 + n - 1 \
                and grefs == list(range(g0, g0 + n)):
            e = entries(n).unpack_from(self.buf, g0 * _GE)
            fl, doms, frames = e[0::3], e[1::3], list(e[2::3])
            if fl[0] & GTF_permit_access and not fl[0] & GTF_in_use and fl.count(fl[0]) == n \
                    and doms.count(self.domid) == n and min(frames) >= lo and max(frames) < hi:
                return frames, fl[0]
        check = self.check
        table, count, dom = self.buf, self.count, self.domid
        out = []
        for gref in grefs:
            if self.lo <= gref < count:
                gflags, gdom, frame = _unpack_gnt(table, gref * _GE)
                if not (gflags & GTF_permit_access and gdom == dom and lo <= frame < hi):
                    frame = check(gref)
            else:
                frame = check(gref)
            out.append(frame)
        return out, -1

    def hold(self, grefs: list[int], frames: list[int], flags0: int = -1) -> int:
        """Set GTF_reading on a packet's transient TX grants, then check that each entry still
        grants the frame resolved at attach (a revoke that raced the marking is caught here,
        not after the bytes left). ``flags0``: every entry's flags, if the caller read them
        all equal (consecutive grefs: one strided store). Returns what to pass to
        ``release``."""
        if flags0 == KEPT:
            return KEPT
        flags = self.flags
        n = len(grefs)
        g0 = grefs[0]
        one = n == 1  # an MTU packet's one fragment: the same steps without the slices
        if flags0 >= 0 and (flags[g0] == flags0 if one
                            else flags[g0:g0 + n].tolist().count(flags0) == n):
            # unchanged since attach: one strided store, then re-read to catch a revoke that
            # landed after it (one that lands between the read and the store is the window
            # documented in docs/design.md: no compare-and-swap from Python). Only the flags are
            # re-read: the frames were resolved at attach and are never read again.
            held_flags = flags0 | GTF_reading
            if one:
                flags[g0] = held_flags
                still = flags[g0] == held_flags
            else:
                flags[g0:g0 + n] = _fill(held_flags, n)
                still = flags[g0:g0 + n].tolist().count(held_flags) == n
            if still:
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
                flags[g] |= GTF_reading
                held.append(g)
                fl, _dom, frame = _unpack_gnt(self.buf, g * _GE)
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
                flags[g] &= _NOT_IN_USE

    def release(self, grefs: list[int], flags0: int = -1) -> None:
        """The skb is freed: nothing reads these grants any more; end_access may succeed."""
        if flags0 == KEPT:
            return
        if flags0 >= 0:
            g0, n = grefs[0], len(grefs)
            if n == 1:
                self.flags[g0] = flags0 & ~GTF_in_use
            else:
                self.flags[g0:g0 + n] = _fill(flags0 & ~GTF_in_use, n)
            self.stats.grants_in_use -= n
            return
        self._unhold(grefs)
        self.stats.grants_in_use -= sum(1 for g in grefs if not g & GREF_PERSISTENT)


@functools.cache
def _fill(value: int, n: int) -> array:
    """n copies of a u16 flags value, for one strided store into the grant table."""
    return array("H", (value,)) * n
