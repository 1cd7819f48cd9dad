"""Netback's side of the mechanism registry: a registered name -> its class, and its counters.

``shared/protocol/mechanisms.py`` names the mechanisms and the module of each; this imports that
module (only netback does: the lab reads the names alone) and creates a mechanism's own counters
once per process, so they add up across connections like the ring's counters do.
"""

from __future__ import annotations

import importlib

from shared.protocol.mechanisms import find
from shared.protocol.stats import counters


def load(side: str, name: str) -> type:
    """The class of mechanism ``name`` of ``side`` ("tx" or "rx"): its module's
    ``MECHANISM``. ValueError names the valid ones."""
    module = importlib.import_module(find(side, name).module)
    return module.MECHANISM


def own_counters(cls: type) -> object:
    """A fresh set of the mechanism's own counters (``COUNTERS``), all 0, with ``as_dict``."""
    return counters(f"{cls.__name__}Counters", cls.COUNTERS,
                    f"The {cls.__name__} mechanism's own counters.")()
