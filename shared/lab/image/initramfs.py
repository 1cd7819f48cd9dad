"""The initramfs: busybox, the recipe's /init and guest/ files, the needed kernel modules."""

from __future__ import annotations

import os
import re
from pathlib import Path

from shared.lab.image.cpio import CpioArchive
from shared.lab.image.kmods import KernelModule, format_modules_dep, read_module_file
from shared.lab.image.recipe import RECIPE_DIR
from shared.lab.image.steps import run_tool


def busybox_applets(busybox: Path) -> list[str]:
    """Applet names to link to busybox; never "busybox" itself (a self-link loops: ELOOP)."""
    out = run_tool([str(busybox), "--list"], "busybox --list")
    return sorted({a for a in out.split() if a and a != "busybox" and "/" not in a})


def make_initramfs(busybox: Path, moddir: Path, mods: list[KernelModule], version: str) -> bytes:
    arch = CpioArchive()
    for d in ("dev", "proc", "sys", "run", "tmp", "newroot", "lower", "upper", "root", "etc"):
        arch.add_dir(d)
    arch.add_chardev("dev/console", 5, 1, 0o600)
    arch.add_chardev("dev/null", 1, 3, 0o666)
    arch.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        arch.add_symlink(f"bin/{applet}", "busybox")
    arch.add_symlink("sbin", "bin")
    arch.add_file("init", (RECIPE_DIR / "init").read_bytes(), 0o755)
    guest = RECIPE_DIR / "guest"
    for path in sorted(guest.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            arch.add_file(f"pvnet/{path.relative_to(guest)}", path.read_bytes(), mode)
    kmods = []
    for m in mods:
        rel = re.sub(r"\.ko\.(xz|gz)$", ".ko", m.relpath)
        arch.add_file(f"lib/modules/{version}/{rel}", read_module_file(moddir / m.relpath))
        kmods.append(KernelModule(m.name, rel, m.depends))
    arch.add_file(f"lib/modules/{version}/modules.dep", format_modules_dep(kmods).encode())
    load = "".join(f"{m.relpath}\n" for m in kmods)
    arch.add_file(f"lib/modules/{version}/modules.load", load.encode())
    return arch.to_bytes()
