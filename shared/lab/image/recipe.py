"""The recipe (vm-images/ and this package) and its hash, the cache key of a built image."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.lab.image.kmods import ModuleWant, normalize_module

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE_DIR = REPO_ROOT / "vm-images"


def builder_sources() -> list[Path]:
    """The image builder's own sources (this package, and keys.py which makes the guest's
    host key): a change to them changes the image."""
    here = Path(__file__).resolve().parent
    return sorted([*here.glob("*.py"), here.parent / "keys.py"])


def recipe_id(recipe_dir: Path = RECIPE_DIR) -> str:
    """A short hash of the recipe (vm-images/ files and the builder): the image's directory
    name, so that checkouts with different recipes never rebuild over each other's image."""
    files = recipe_files(recipe_dir) + builder_sources()
    return recipe_hash(files, REPO_ROOT, {})[:16]


def recipe_files(recipe_dir: Path = RECIPE_DIR) -> list[Path]:
    """The files whose content defines the image: vm-images/ minus docs (and minus the
    vm-images/cache/ that older versions kept in the checkout)."""
    out = []
    for path in sorted(recipe_dir.rglob("*")):
        rel = path.relative_to(recipe_dir)
        if rel.parts[0] == "cache" or not path.is_file() or path.suffix == ".md":
            continue
        if "__pycache__" in rel.parts:
            continue
        out.append(path)
    return out


def recipe_hash(files: Iterable[Path], base: Path, extra: Mapping[str, str]) -> str:
    """sha256 over (relative path, exec bit, content) of each file plus the extra key/values."""
    h = hashlib.sha256()
    for path in sorted(files):
        rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
        h.update(f"file {rel} {os.access(path, os.X_OK)}\n".encode())
        h.update(path.read_bytes())
        h.update(b"\n")
    for key in sorted(extra):
        h.update(f"{key}={extra[key]}\n".encode())
    return h.hexdigest()


def parse_module_list(text: str) -> list[ModuleWant]:
    """Lines "name" or "name?" (optional); '#' starts a comment."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        optional = line.endswith("?")
        out.append(ModuleWant(normalize_module(line.rstrip("?")), optional))
    return out


def parse_package_list(text: str) -> list[str]:
    return [w for line in text.splitlines() for w in line.split("#", 1)[0].split()]
