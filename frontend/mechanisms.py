"""Netfront's side of the mechanism registry: the grant policy an agreement calls for.

``shared/mechanisms.py`` names the policies (side ``grants``) and the extension each needs;
the policy in force is the one whose extension was agreed (the first, needing none,
otherwise), so nothing here or in the queues asks for a policy by name.
"""

from __future__ import annotations

import importlib

from frontend.grants.base import GrantPolicy
from shared.grant import GrantTable
from shared.mechanisms import GRANTS


def grant_policy(agreed: dict[str, bool], table: GrantTable) -> GrantPolicy:
    """The policy for what was agreed (``{"feature-persistent": True, ...}``), bound to
    ``table``."""
    chosen = next((m for m in reversed(GRANTS) if m.feature and agreed.get(m.feature)),
                  GRANTS[0])
    return importlib.import_module(chosen.module).MECHANISM(table)
