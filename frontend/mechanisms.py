"""Netfront's side of the mechanism registry: the grant policy an agreement calls for.

``shared/protocol/mechanisms.py`` names the policies (side ``grants``) and the extension each needs;
the policy in force is the one whose extension was agreed; failing that the one netfront was
configured with if it needs no extension (``recycle``: the frontend's own business), else the
first. Nothing here or in the queues asks for a policy by name.
"""

from __future__ import annotations

import importlib

from frontend.grants.base import GrantPolicy
from shared.protocol.grant import GrantTable
from shared.protocol.mechanisms import GRANTS, find
from shared.protocol.stats import RingStats


def grant_policy(agreed: dict[str, bool], table: GrantTable, stats: RingStats | None = None,
                 prefer: str = "", **options: int) -> GrantPolicy:
    """The policy for what was agreed (``{"feature-persistent": True, ...}``), bound to
    ``table`` and the ring's ``stats``; ``prefer``: the configured policy, used if it needs
    no extension and none was agreed; ``options`` go to its constructor (``pool_rings``)."""
    chosen = next((m for m in reversed(GRANTS) if m.feature and agreed.get(m.feature)), None)
    if chosen is None:
        wanted = find("grants", prefer) if prefer else GRANTS[0]
        chosen = wanted if not wanted.feature else GRANTS[0]
    cls = importlib.import_module(chosen.module).MECHANISM
    return cls(table, stats, **options) if options and chosen.name == prefer \
        else cls(table, stats)
