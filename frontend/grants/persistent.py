"""``persistent`` (``feature-persistent``): every page the queues will ever name is granted
once, at connect, and never revoked while connected; each gref on the ring carries bit 31
(``GREF_PERSISTENT``), telling the backend it may validate it once and keep it mapped (Pratt's
proposal; Martins' "persistent grant maps" for netif). Nothing is done per packet."""

from __future__ import annotations

from frontend.grants.base import GrantPolicy, RefRun, Run
from shared.protocol.netif import GREF_PERSISTENT, MAX_PERSISTENT_GRANTS


class Persistent(GrantPolicy):
    ref_bit = GREF_PERSISTENT
    max_grants = MAX_PERSISTENT_GRANTS
    revokes = False

    def setup(self, runs: list[Run]) -> None:
        for dst, entries in runs:
            dst[:] = entries

    def grant(self, runs: list[Run]) -> None:
        """Granted for good at connect."""

    def revoke(self, runs: list[RefRun]) -> bool:
        """Kept until disconnect."""
        return True


MECHANISM = Persistent
