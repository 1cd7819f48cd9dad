"""What a guest needs of the interpreter running the lab: its path, its directories, PATH."""

from __future__ import annotations

import os
import sys

#: host directories the guest has a tmpfs of its own on: host files there need a bind mount
SHADOWED = ("/tmp/", "/run/")


def guest_python() -> str:
    """The interpreter guests run the netfront with: $PVNET_GUEST_PYTHON, else the one running
    the lab (a venv's python included: the guest sees it at the same path)."""
    return os.environ.get("PVNET_GUEST_PYTHON") or sys.executable


def interpreter_paths(python: str | None = None) -> list[str]:
    """Host directories the guest needs at their own paths to run `python` (default: this
    interpreter) with the same packages: its prefix (a venv: pyvenv.cfg, site-packages with
    editable-install finders and .pth files), its base prefix, the real executable's dir and
    every sys.path entry (an editable install's source tree). Only the ones under /tmp and
    /run are listed: the guest sees the rest of the host root as it is; the guest's init
    bind-mounts these from /host (vm-images/guest/guest_init.py)."""
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        python = sys.executable
        candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]
    else:
        candidates = []
    for exe in (python, os.path.realpath(python)):  # bin dir and prefix (a venv's pyvenv.cfg)
        candidates += [os.path.dirname(exe), os.path.dirname(os.path.dirname(exe))]
    out = []
    for path in candidates:
        if not path:
            continue
        real = os.path.realpath(path)
        for p in {os.path.abspath(path), real}:
            if p.startswith(SHADOWED) and os.path.isdir(p):
                out.append(p)
    return sorted(set(out))


def default_guest_path() -> str:
    """PATH for guest programs: this interpreter's bin dir first, then the usual ones."""
    std = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return f"{os.path.dirname(sys.executable)}:{std}"
