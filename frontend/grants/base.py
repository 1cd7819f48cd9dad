"""The frontend's side of a mechanism: how netfront grants its pages to the backend.

The TX pump and the RX refill name pages in requests; before those requests are published the
pages must be granted, and once the backend has answered them they may be revoked. Both queues
keep, per granted area, the grant entries that grant it (built once, ``GRANT_ENTRY`` each) and
the grant table's bytes they go into; a policy decides what happens to them, always for a
*batch* (the pages of one pump, one refill, one reap):

- ``setup(runs)``: at connect, every area the queues will ever name.
- ``grant(runs)``: the areas about to be named on the ring (before the requests go out).
- ``revoke(runs)``: areas the backend has answered; False if a grant is still in use (the
  backend holds it: its fault, the caller says which).
- ``ref_bit``: or-ed into every gref the ring carries (``GREF_PERSISTENT``: "keep it").
- ``max_grants``: how many the backend keeps per ring, if it limits them.
- ``revokes``: False if ``revoke`` never does anything (the queues skip building its runs).
- ``tail_pages``: payload pages at the region's end the policy keeps for itself (staging's
  pool lists): no queue names them.

Each queue has its own policy object (bound to its ring's counters); a policy is chosen by
the agreement (``feature``), or, for one that needs no extension (``recycle``), by netfront's
configuration.

A *run* is ``(table_bytes, entries)`` for ``setup``/``grant`` - the entries copied in as one
slice - and ``(first_ref, count)`` for ``revoke``.
"""

from __future__ import annotations

from typing import ClassVar

from shared.protocol.grant import GrantTable
from shared.protocol.stats import RingStats

#: (the grant table's bytes, the entries to copy there)
Run = tuple[memoryview, memoryview]
#: (first grant reference, how many consecutive ones)
RefRun = tuple[int, int]


class GrantPolicy:
    """The frontend's grants of one connection (its region's grant table)."""

    ref_bit: ClassVar[int] = 0
    #: the most grants of this kind the backend keeps per ring (0: no limit): the queues
    #: grant no more pages than that
    max_grants: ClassVar[int] = 0
    #: False: ``revoke`` does nothing (grants kept for the connection's life)
    revokes: ClassVar[bool] = True
    #: payload pages at the region's end that no queue may name (staging: its pool lists)
    tail_pages: ClassVar[int] = 0

    @classmethod
    def tx_pages(cls, available: int) -> int:
        """How many of the ``available`` payload pages from a TX queue's first on it names:
        less the pages the policy keeps at the region's end, at most ``max_grants``. The one
        count the TX queue (``frontend/tx/pages.py``) and a pool list (staging) both use."""
        n = available - cls.tail_pages
        return min(n, cls.max_grants) if cls.max_grants else n

    def __init__(self, table: GrantTable, stats: RingStats | None = None) -> None:
        self.table = table
        #: the counters of the ring whose queue uses this policy (a policy with counters of
        #: its own, e.g. recycling's hit rate, bumps them there: ``pvnet stats`` shows them)
        self.stats = stats

    def setup(self, runs: list[Run]) -> None:
        """At connect: nothing by default."""

    def grant(self, runs: list[Run]) -> None:
        raise NotImplementedError

    def revoke(self, runs: list[RefRun]) -> bool:
        raise NotImplementedError
