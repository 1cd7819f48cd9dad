"""Kernel modules: the closure of vm-images/modules.txt in load order, read from .modinfo."""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.lab.image.steps import ImageBuildError


def normalize_module(name: str) -> str:
    """Module names are compared with '-' and '_' equal, as the kernel does."""
    name = Path(name).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


@dataclass(frozen=True)
class ModuleWant:
    """One line of vm-images/modules.txt."""

    name: str
    optional: bool = False


@dataclass(frozen=True)
class KernelModule:
    name: str  # normalized
    relpath: str  # relative to /lib/modules/<version>
    depends: tuple[str, ...] = ()  # normalized names


def parse_modules_dep(text: str) -> dict[str, KernelModule]:
    """Parse depmod's modules.dep ("kernel/a.ko: kernel/b.ko kernel/c.ko")."""
    out = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        path = path.strip()
        name = normalize_module(path)
        out[name] = KernelModule(name, path, tuple(normalize_module(d) for d in deps.split()))
    return out


def format_modules_dep(mods: Iterable[KernelModule]) -> str:
    """Write modules.dep for a (trimmed) set, in the format busybox modprobe reads."""
    mods = list(mods)
    by_name = {m.name: m for m in mods}
    lines = []
    for m in mods:
        deps = " ".join(by_name[d].relpath for d in _closure(m.name, by_name) if d != m.name)
        lines.append(f"{m.relpath}: {deps}".rstrip())
    return "\n".join(lines) + "\n"


def _closure(name: str, mods: Mapping[str, KernelModule]) -> list[str]:
    """Dependencies of `name` in load order (deps first, `name` last)."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: tuple[str, ...]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ImageBuildError(f"module dependency cycle: {' -> '.join(chain + (n,))}")
        if n not in mods:
            raise ImageBuildError(
                f"module {n!r} (needed by {' -> '.join(chain) or 'modules.txt'}) not found"
            )
        state[n] = 1
        for d in mods[n].depends:
            visit(d, chain + (n,))
        state[n] = 2
        order.append(n)

    visit(name, ())
    return order


def resolve_modules(
    wanted: Iterable[ModuleWant],
    available: Mapping[str, KernelModule],
    builtin: Iterable[str] = (),
) -> list[KernelModule]:
    """The wanted modules plus their dependencies, in an order insmod can load them.

    Built-in modules are skipped (required or optional); an optional module that is neither
    built in nor available is skipped; a required one is an error.
    """
    builtin_set = {normalize_module(b) for b in builtin}
    order: list[str] = []
    for want in wanted:
        if want.name in builtin_set:
            continue
        if want.name not in available:
            if want.optional:
                continue
            raise ImageBuildError(f"module {want.name!r} is neither built in nor in the tree")
        for n in _closure(want.name, available):
            if n not in order and n not in builtin_set:
                order.append(n)
    return [available[n] for n in order]


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """The .modinfo section of an ELF64 little-endian kernel module as key -> values."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageBuildError("not an ELF64 little-endian module")
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        off = e_shoff + i * e_shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, off)
        return name, offset, size

    _, str_off, str_size = section(e_shstrndx)
    strtab = data[str_off : str_off + str_size]
    info: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name_off, offset, size = section(i)
        name = strtab[name_off : strtab.index(b"\0", name_off)]
        if name != b".modinfo":
            continue
        for item in data[offset : offset + size].split(b"\0"):
            if b"=" in item:
                k, v = item.decode(errors="replace").split("=", 1)
                info.setdefault(k, []).append(v)
    return info


def read_module_file(path: Path) -> bytes:
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        raise ImageBuildError(f"{path}: zstd-compressed modules are not supported (no zstd)")
    return path.read_bytes()


class ModuleTree(Mapping[str, KernelModule]):
    """The modules of an unpacked kernel package, indexed by name, deps read on demand.

    Why not depmod: Debian's package ships no modules.dep (depmod runs in postinst), and reading
    the depends= of the few modules we need is cheaper than depmod over 4000 files (and does not
    need kmod on the host).
    """

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        self._paths: dict[str, str] = {}
        for path in sorted((moddir / "kernel").rglob("*.ko*")):
            self._paths[normalize_module(path.name)] = str(path.relative_to(moddir))
        self._cache: dict[str, KernelModule] = {}

    def __getitem__(self, name: str) -> KernelModule:
        if name not in self._cache:
            rel = self._paths[name]  # KeyError for an unknown module, as Mapping wants
            info = read_modinfo(read_module_file(self.moddir / rel))
            deps = tuple(
                normalize_module(d) for v in info.get("depends", []) for d in v.split(",") if d
            )
            self._cache[name] = KernelModule(name, rel, deps)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def builtin(self) -> set[str]:
        path = self.moddir / "modules.builtin"
        if not path.exists():
            return set()
        return {normalize_module(line) for line in path.read_text().split()}

