"""The lab's failure type (both placements): the message says what failed, with log tails."""

from __future__ import annotations


class LabError(RuntimeError):
    """Something in the lab failed; the message says what and carries the relevant log tails."""
