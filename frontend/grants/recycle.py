"""``recycle``: grant recycling - a pool of granted pages whose grant references are reused.

Martins' netfront series (Oracle UEK, Orabug 26107942, "xen-netfront: introduce rx page
recycling" and "generalize recycling for grants") keeps the pages it hands the backend in a
pool with their grants in place: a page that comes back is not revoked but kept granted, and
when the queue names it again its grant is already there (no grant entry written, no revoke).
The pool holds what the queues have in flight plus the idle pages most recently answered, up
to ``pool_rings`` x the ring size (256) pages; when it is full the oldest idle pages are
revoked (``grants_evicted``), so a page named again after it left the pool is granted afresh.
The hit rate - ``grants_recycled`` / (``grants_recycled`` + ``grants_fresh``) - is what the
series measured (~30 % with a pool of one ring, 80-100 % with two, on TCP streams).

The backend sees ordinary transient grants (no bit on the ring, no key: recycling is the
frontend's own business, as in the series, where it needs no negotiation): it checks and holds
every grant per packet as always. What recycling saves is the frontend's grant writes and
revokes. A page that comes back still held by the backend (GTF_reading/GTF_writing) is refused
as a transient revoke would be (the caller names the backend's fault); a pool page the
frontend reuses for something else is just a new grant to the backend, which validates it.
"""

from __future__ import annotations

from collections import OrderedDict

from frontend.grants.base import GrantPolicy, RefRun, Run
from shared.protocol.grant import WORD_FRAME_SHIFT, GTF_reading
from shared.protocol.netif import RING_SIZE
from shared.protocol.stats import RingStats

#: default pool: twice the ring (the series' 80-100 % case)
DEFAULT_POOL_RINGS = 2


class Recycle(GrantPolicy):
    def __init__(self, table, stats: RingStats | None = None,
                 pool_rings: int = DEFAULT_POOL_RINGS) -> None:
        super().__init__(table, stats)
        if pool_rings < 1:
            raise ValueError("a recycling pool holds at least one ring's pages")
        #: the most pages granted at once (in flight + idle)
        self.capacity = pool_rings * RING_SIZE
        #: idle granted pages, oldest first: frame -> gref
        self.idle: OrderedDict[int, int] = OrderedDict()
        #: pages granted and named on a ring, not answered yet
        self.busy = 0
        self._words = table.words
        self._flags = table.ref_flags

    def grant(self, runs: list[Run]) -> None:
        """Per page: still granted from an earlier use (an idle pool page with the very same
        entry) is a hit; anything else is granted now. One copy per run either way (writing
        an unchanged entry changes nothing)."""
        idle, hits, fresh = self.idle, 0, 0
        for dst, entries in runs:
            cur, want = dst.cast("Q"), memoryview(entries).cast("Q")
            for i, w in enumerate(want):
                if idle.pop(w >> WORD_FRAME_SHIFT, None) is not None and cur[i] == w:
                    hits += 1
                else:
                    fresh += 1
            dst[:] = entries
        self.busy += hits + fresh
        st = self.stats
        if st is not None:
            st.grants_recycled += hits
            st.grants_fresh += fresh
        self._evict()

    def revoke(self, runs: list[RefRun]) -> bool:
        """Answered pages go back to the pool, granted (refused, nothing changed, if the
        backend still holds one); the oldest idle ones are revoked while the pool is over its
        size."""
        flags, words, idle = self._flags, self._words, self.idle
        for ref, n in runs:
            if n and max(flags[ref:ref + n]) >= GTF_reading:
                return False
        for ref, n in runs:
            for r in range(ref, ref + n):
                frame = words[r] >> WORD_FRAME_SHIFT
                idle.pop(frame, None)
                idle[frame] = r
            self.busy -= n
        return self._evict()

    def _evict(self) -> bool:
        idle, end = self.idle, self.table.end_access
        n = 0
        ok = True
        while idle and len(idle) + self.busy > self.capacity:
            _frame, ref = idle.popitem(last=False)
            ok = end(ref) and ok
            n += 1
        if n and self.stats is not None:
            self.stats.grants_evicted += n
        return ok


MECHANISM = Recycle
