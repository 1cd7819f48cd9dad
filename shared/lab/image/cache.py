"""Where the lab keeps what it downloads and builds, outside the checkout."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where the lab keeps what it downloads and builds (debs, images, ssh keys, accel probe):
    $PVNET_CACHE, else $XDG_CACHE_HOME/pvnet, else ~/.cache/pvnet. Never inside the checkout,
    so `up` and the tests leave the source tree as git has it."""
    env = os.environ.get("PVNET_CACHE")
    if env:
        return Path(env).resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pvnet"



CACHE_DIR = cache_dir()
DEB_DIR = CACHE_DIR / "debs"
