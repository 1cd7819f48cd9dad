"""Build the QEMU guest image: an ELF vmlinux, a busybox initramfs and an unpacked sshd.

Why this shape (see vm-images/README.md for the whole recipe):
- Nothing is installed on the host: Debian packages are fetched with `apt-get download` and
  unpacked with `dpkg -x` into the cache (~/.cache/pvnet, see cache_dir()), never into the
  checkout. The kernel is the package linux-image-amd64 currently depends on (the non-cloud
  flavour: the cloud one has no 9p).
- The guest boots the *uncompressed* ELF vmlinux found inside the xz bzImage (PVH entry via
  QEMU -kernel): under TCG the xz decompressor alone costs seconds of emulated CPU.
- The initramfs holds busybox-static, the recipe's /init and only the kernel modules listed in
  vm-images/modules.txt plus their dependencies (the full module tree is ~400 MB).
- The guest's userland is the host's, over read-only 9p, so sshd is the only extra program: it
  lives in the cache (reachable by the guest at the same path) with its own host key.
- The build is cached (images/<recipe id>/): a stamp hashes the recipe files (vm-images/
  minus *.md, plus this module's source) and the kernel package name and version; the image
  is rebuilt only when that hash changes (or with --force).

Usage: python3 -m shared.lab.image [--force] [--json] [--quiet]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "vm-images"


def cache_dir() -> Path:
    """Where the lab keeps what it downloads and builds (debs, images, ssh keys, accel probe):
    $PVNET_CACHE, else $XDG_CACHE_HOME/pvnet, else ~/.cache/pvnet. Never inside the checkout,
    so `up` and the tests leave the source tree as git has it."""
    env = os.environ.get("PVNET_CACHE")
    if env:
        return Path(env).resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pvnet"


def recipe_id(recipe_dir: Path = RECIPE_DIR) -> str:
    """A short hash of the recipe (vm-images/ files and this module): the image's directory
    name, so that checkouts with different recipes never rebuild over each other's image."""
    files = recipe_files(recipe_dir) + [Path(__file__).resolve()]
    return recipe_hash(files, REPO_ROOT, {})[:16]


CACHE_DIR = cache_dir()
DEB_DIR = CACHE_DIR / "debs"
KERNEL_META_PACKAGE = "linux-image-amd64"
STAMP_NAME = "stamp.json"
HOST_KEY_NAME = "ssh_host_ed25519_key"
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"


class ImageBuildError(RuntimeError):
    """The image cannot be built; the message says which step failed and why."""


@dataclass(frozen=True)
class ImageInfo:
    """What a launcher needs from a built image (all paths absolute, on the host).

    sshd_dir is also the path at which the guest finds sshd: the guest sees the host root.
    """

    kernel: Path
    initrd: Path
    sshd_dir: Path
    host_key_pub: Path
    kernel_version: str
    kernel_package: str
    kernel_package_version: str
    modules: tuple[str, ...]
    size_bytes: int
    stamp: str
    built: bool = False
    build_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------- progress


class Progress:
    """Step lines with the elapsed time since the build started, on stderr.

    Why: a build from nothing takes ~20 s (mostly unpacking 400 MB of modules); silence that
    long looks like a hang.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, msg: str) -> Iterator[None]:
        self.say(msg + " ...")
        t = time.monotonic()
        yield
        if self.enabled and time.monotonic() - t >= 0.5:
            self.say(f"  done in {time.monotonic() - t:.1f}s")


# ---------------------------------------------------------------------------------- recipe


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


IMAGE_DIR = CACHE_DIR / "images" / recipe_id()


@dataclass(frozen=True)
class ModuleWant:
    """One line of vm-images/modules.txt."""

    name: str
    optional: bool = False


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


# ---------------------------------------------------------------------------------- modules


def normalize_module(name: str) -> str:
    """Module names are compared with '-' and '_' equal, as the kernel does."""
    name = Path(name).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


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


def _read_module_file(path: Path) -> bytes:
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
            info = read_modinfo(_read_module_file(self.moddir / rel))
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


# ---------------------------------------------------------------------------------- vmlinux


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (the kernel's scripts/extract-vmlinux).

    Tries every xz (then gzip) stream start in the file and keeps the first that decompresses
    to an ELF image.
    """
    for magic, decompress in ((XZ_MAGIC, _xz_stream), (GZIP_MAGIC, _gzip_stream)):
        pos = bzimage.find(magic)
        while pos >= 0:
            try:
                out = decompress(bzimage[pos:])
            except (lzma.LZMAError, OSError, EOFError, gzip.BadGzipFile):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            pos = bzimage.find(magic, pos + 1)
    raise ImageBuildError("no xz or gzip stream decompressing to an ELF image in the bzImage")


def _xz_stream(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gzip_stream(data: bytes) -> bytes:
    import zlib

    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


# ---------------------------------------------------------------------------------- cpio


@dataclass
class CpioEntry:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class CpioArchive:
    """A cpio "newc" archive built in memory: what the kernel unpacks as initramfs.

    Written in Python (no cpio/fakeroot): device nodes like /dev/console need no root, and all
    owners are 0 and all times 0, so the same inputs give the same bytes.
    """

    entries: dict[str, CpioEntry] = field(default_factory=dict)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.entries:
                self.entries[p] = CpioEntry(0o040755)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = CpioEntry(0o040000 | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = CpioEntry(0o100000 | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = CpioEntry(0o120777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = CpioEntry(0o020000 | mode, b"", (major, minor))

    def to_bytes(self) -> bytes:
        out = bytearray()
        # Sorted: a parent directory always precedes what is in it.
        for ino, (name, e) in enumerate(sorted(self.entries.items()), start=1):
            _cpio_record(out, name, e.mode, e.data, ino, e.rdev)
        _cpio_record(out, "TRAILER!!!", 0, b"", 0, (0, 0))
        return bytes(out)


def _cpio_record(
    out: bytearray, name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]
) -> None:
    nameb = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == 0o040000 else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0)
    out += b"070701" + b"".join(b"%08X" % f for f in fields)
    out += nameb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)


def read_cpio(data: bytes) -> dict[str, CpioEntry]:
    """Parse a newc archive (the inverse of CpioArchive.to_bytes; used by tests and checks)."""
    out: dict[str, CpioEntry] = {}
    pos = 0
    while True:
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = CpioEntry(mode, body, (rmaj, rmin))


# ---------------------------------------------------------------------------------- apt


def _run(argv: list[str], what: str, **kw: object) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what}: {argv[0]} not found ({e})") from e
    if res.returncode != 0:
        raise ImageBuildError(
            f"{what}: `{' '.join(argv)}` exited {res.returncode}: {res.stderr.strip()[-800:]}"
        )
    return res.stdout


def parse_apt_depends(text: str, prefix: str = "linux-image-") -> tuple[str, str | None]:
    """(kernel package, pinned version or None) from the meta package's dependencies.

    Accepts `apt-cache depends` output ("  Depends: pkg") and `apt-cache show` stanzas
    ("Depends: pkg (= version), ...").
    """
    for line in text.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(.*)", line)
        if not m:
            continue
        for item in m.group(1).split(","):
            dm = re.match(r"\s*([^\s(<>|]+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", item)
            if dm and dm.group(1).startswith(prefix):
                return dm.group(1), dm.group(2)
    raise ImageBuildError(f"no {prefix}* dependency in apt-cache output:\n{text}")


def parse_apt_show(text: str) -> dict[str, str]:
    """Package -> Version from `apt-cache show --no-all-versions` stanzas."""
    out: dict[str, str] = {}
    for stanza in re.split(r"\n\s*\n", text):
        pkg = re.search(r"^Package:\s*(\S+)", stanza, re.M)
        ver = re.search(r"^Version:\s*(\S+)", stanza, re.M)
        if pkg and ver:
            out.setdefault(pkg.group(1), ver.group(1))
    return out


def apt_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel linux-image-amd64 pulls in now (one apt-cache call).

    The meta package pins its kernel with "(= version)"; without a pin, ask for the
    candidate version of the kernel package itself.
    """
    hint = " (run `apt-get update` first)"
    try:
        out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
                   "apt-cache show")
        pkg, version = parse_apt_depends(out)
    except ImageBuildError as e:
        raise ImageBuildError(str(e) + hint) from e
    return pkg, version or apt_candidate_versions([pkg])[pkg]


def apt_candidate_versions(pkgs: list[str]) -> dict[str, str]:
    out = _run(["apt-cache", "show", "--no-all-versions", *pkgs], "apt-cache show")
    versions = parse_apt_show(out)
    missing = [p for p in pkgs if p not in versions]
    if missing:
        raise ImageBuildError(f"apt-cache show: no candidate version for {missing}")
    return versions


def deb_path(pkg: str, version: str) -> Path:
    return DEB_DIR / f"{pkg}_{version.replace(':', '%3a')}.deb"


def apt_fetch(pins: Mapping[str, str | None], progress: Progress) -> dict[str, Path]:
    """The .debs of the given packages (pinned version, or the candidate when None) in the deb
    cache; those missing are fetched with one `apt-get download` (apt's own caching and
    signature checks; nothing is installed)."""
    unpinned = [p for p, v in pins.items() if v is None]
    versions = {p: v for p, v in pins.items() if v is not None}
    if unpinned:
        versions.update(apt_candidate_versions(unpinned))
    DEB_DIR.mkdir(parents=True, exist_ok=True)
    wanted = {p: deb_path(p, v) for p, v in versions.items()}
    missing = [p for p, path in wanted.items() if not path.exists()]
    if missing:
        specs = [f"{p}={versions[p]}" for p in missing]
        progress.say(f"  apt-get download {' '.join(specs)}")
        with tempfile.TemporaryDirectory(dir=DEB_DIR) as tmp:
            _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *specs],
                 "apt-get download", cwd=tmp)
            for p in missing:
                got = list(Path(tmp).glob(f"{p}_*.deb"))
                if len(got) != 1:
                    raise ImageBuildError(f"apt-get download {p}: expected one .deb, got {got}")
                got[0].rename(wanted[p])
    return wanted


def deb_depends(deb: Path) -> list[list[str]]:
    """Depends of a .deb as alternatives groups of bare package names."""
    text = _run(["dpkg-deb", "-f", str(deb), "Depends"], f"dpkg-deb -f {deb.name}")
    groups = []
    for group in text.replace("\n", " ").split(","):
        names = [re.sub(r"[\s(:].*", "", alt.strip()) for alt in group.split("|")]
        names = [n for n in names if n]
        if names:
            groups.append(names)
    return groups


def host_installed(pkgs: Iterable[str]) -> set[str]:
    pkgs = list(pkgs)
    if not pkgs:
        return set()
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *pkgs],
        capture_output=True, text=True, check=False,
    )
    return {
        line.split()[0]
        for line in res.stdout.splitlines()
        if len(line.split()) >= 2 and line.split()[1].startswith("ii")
    }


def dpkg_extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg", "-x", str(deb), str(dest)], f"dpkg -x {deb.name}")


# ---------------------------------------------------------------------------------- ssh key


def write_host_key(private_path: Path) -> Path:
    """A fresh ed25519 host key in OpenSSH format (no ssh-keygen needed); returns the .pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path = private_path.with_name(private_path.name + ".pub")
    pub_path.write_bytes(pub + b" pvnet-guest\n")
    return pub_path


# ---------------------------------------------------------------------------------- build


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _stamp_inputs(kernel_pkg: str, kernel_ver: str) -> tuple[str, dict[str, str]]:
    extra = {"kernel_package": kernel_pkg, "kernel_package_version": kernel_ver}
    files = recipe_files() + [Path(__file__).resolve()]
    return recipe_hash(files, REPO_ROOT, extra), extra


def _load_info(image_dir: Path, built: bool = False) -> ImageInfo | None:
    stamp_path = image_dir / STAMP_NAME
    if not stamp_path.exists():
        return None
    try:
        s = json.loads(stamp_path.read_text())
        info = ImageInfo(
            kernel=image_dir / "vmlinux",
            initrd=image_dir / "initrd.cpio",
            sshd_dir=image_dir / "sshd",
            host_key_pub=image_dir / "sshd" / (HOST_KEY_NAME + ".pub"),
            kernel_version=s["kernel_version"],
            kernel_package=s["kernel_package"],
            kernel_package_version=s["kernel_package_version"],
            modules=tuple(s["modules"]),
            size_bytes=int(s["size_bytes"]),
            stamp=s["stamp"],
            built=built,
            build_seconds=float(s.get("build_seconds", 0.0)),
        )
    except (KeyError, ValueError, TypeError):
        return None
    if not (info.kernel.exists() and info.initrd.exists() and info.host_key_pub.exists()):
        return None
    return info


def cached_image() -> ImageInfo | None:
    """The image in the cache, whatever its stamp (no apt look-up): for tools that only run."""
    return _load_info(IMAGE_DIR)


def build_image(force: bool = False, progress: bool = True) -> ImageInfo:
    """Return the guest image, building it first if the recipe or the kernel changed."""
    prog = Progress(progress)
    IMAGE_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            kernel_pkg, kernel_ver = apt_kernel_package()
        except ImageBuildError as e:
            old = cached_image()
            if old is None or force:
                raise
            prog.say(f"warning: {e}; using the cached image ({old.kernel_package})")
            return old
        stamp, _ = _stamp_inputs(kernel_pkg, kernel_ver)
        old = _load_info(IMAGE_DIR)
        if old is not None and old.stamp == stamp and not force:
            (IMAGE_DIR / STAMP_NAME).touch()  # in use: keeps prune_images away from it
            prune_images(IMAGE_DIR)
            prog.say(
                f"image up to date: {kernel_pkg} {kernel_ver}, "
                f"{old.size_bytes / 2**20:.1f} MiB in {IMAGE_DIR}"
            )
            return old
        why = "forced" if force else ("recipe or kernel changed" if old else "no image yet")
        prog.say(f"building the guest image ({why}): {kernel_pkg} {kernel_ver}")
        new_dir = IMAGE_DIR.with_name(IMAGE_DIR.name + ".new")
        shutil.rmtree(new_dir, ignore_errors=True)
        new_dir.mkdir()
        try:
            _build_into(new_dir, kernel_pkg, kernel_ver, stamp, prog)
        except BaseException:
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        old_dir = IMAGE_DIR.with_name(IMAGE_DIR.name + ".old")
        shutil.rmtree(old_dir, ignore_errors=True)
        if IMAGE_DIR.exists():
            IMAGE_DIR.rename(old_dir)
        new_dir.rename(IMAGE_DIR)
        shutil.rmtree(old_dir, ignore_errors=True)
        info = _load_info(IMAGE_DIR, built=True)
        if info is None:
            raise ImageBuildError(f"built image in {IMAGE_DIR} is incomplete")
        prune_images(IMAGE_DIR)
        return info


#: an image of another recipe (another checkout or an older version) unused this long goes
IMAGE_KEEP_DAYS = 14


def prune_images(keep: Path, days: float = IMAGE_KEEP_DAYS) -> list[Path]:
    """Remove the images beside `keep` that nobody used for `days` (using one touches its
    stamp): each recipe change builds a new ~70 MiB image under images/<recipe id>/."""
    cutoff = time.time() - days * 86400
    gone = []
    for d in sorted(keep.parent.iterdir()):
        if d == keep or not d.is_dir():
            continue
        try:
            last = (d / STAMP_NAME).stat().st_mtime
        except OSError:
            last = d.stat().st_mtime
        if last < cutoff:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _build_into(out: Path, kernel_pkg: str, kernel_ver: str, stamp: str, prog: Progress) -> None:
    packages = parse_package_list((RECIPE_DIR / "packages.txt").read_text())
    wanted = parse_module_list((RECIPE_DIR / "modules.txt").read_text())

    with prog.step(f"fetching {kernel_pkg} and {' '.join(packages)} (apt-get download)"):
        pins: dict[str, str | None] = {kernel_pkg: kernel_ver, **dict.fromkeys(packages)}
        debs = apt_fetch(pins, prog)
        kernel_deb = debs[kernel_pkg]

    work = out / "work"
    with prog.step(f"unpacking {kernel_deb.name} ({kernel_deb.stat().st_size / 2**20:.0f} MiB)"):
        dpkg_extract(kernel_deb, work / "kernel")
    moddirs = list((work / "kernel" / "lib" / "modules").iterdir())
    if len(moddirs) != 1:
        raise ImageBuildError(f"expected one module directory in {kernel_deb.name}: {moddirs}")
    moddir = moddirs[0]
    version = moddir.name
    bzimage = work / "kernel" / "boot" / f"vmlinuz-{version}"

    with prog.step("extracting the ELF vmlinux from the xz bzImage"):
        vmlinux = extract_vmlinux(bzimage.read_bytes())
        (out / "vmlinux").write_bytes(vmlinux)
        shutil.copy2(work / "kernel" / "boot" / f"config-{version}", out / f"config-{version}")

    with prog.step("resolving kernel modules"):
        tree = ModuleTree(moddir)
        mods = resolve_modules(wanted, tree, tree.builtin())
        prog.say(
            f"  {len(wanted)} wanted -> {len(mods)} modules: {' '.join(m.name for m in mods)}"
        )

    with prog.step("unpacking busybox-static, openssh-server (+ libraries missing on the host)"):
        busybox_root = work / "busybox"
        dpkg_extract(debs["busybox-static"], busybox_root)
        busybox = busybox_root / "bin" / "busybox"
        sshd_dir = out / "sshd"
        for p in packages:
            if p != "busybox-static":
                dpkg_extract(debs[p], sshd_dir)
        extra = _fetch_missing_libs([debs[p] for p in packages if p != "busybox-static"], prog)
        for deb in extra:
            dpkg_extract(deb, sshd_dir)
        _check_sshd_libs(sshd_dir)
        write_host_key(sshd_dir / HOST_KEY_NAME)
        shutil.rmtree(sshd_dir / "usr" / "share", ignore_errors=True)

    with prog.step("writing the initramfs (cpio newc, uncompressed)"):
        initrd = make_initramfs(busybox, moddir, mods, version)
        (out / "initrd.cpio").write_bytes(initrd)

    with prog.step("removing the unpacked kernel package"):
        shutil.rmtree(work)

    sizes = {
        "vmlinux": dir_size(out / "vmlinux"),
        "initrd": dir_size(out / "initrd.cpio"),
        "sshd": dir_size(sshd_dir),
    }
    total = sum(sizes.values())
    stamp_data = {
        "stamp": stamp,
        "kernel_version": version,
        "kernel_package": kernel_pkg,
        "kernel_package_version": kernel_ver,
        "modules": [m.name for m in mods],
        "size_bytes": total,
        "sizes": sizes,
        "extra_packages": [d.name for d in extra],
        "build_seconds": round(prog.elapsed(), 1),
    }
    (out / STAMP_NAME).write_text(json.dumps(stamp_data, indent=2) + "\n")
    detail = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items())
    prog.say(f"image built in {prog.elapsed():.1f}s: {total / 2**20:.1f} MiB ({detail} MiB)")


def _fetch_missing_libs(debs: list[Path], prog: Progress) -> list[Path]:
    """Library packages sshd needs that the host lacks (e.g. libwrap0), recursively."""
    fetched: list[Path] = []
    seen: set[str] = set()
    todo = list(debs)
    while todo:
        groups = [g for deb in todo for g in deb_depends(deb)]
        todo = []
        have = host_installed({n for g in groups for n in g})
        need = []
        for group in groups:
            if any(n in have for n in group) or not group[0].startswith("lib"):
                continue  # present, or a maintainer-script tool (adduser, ucf...): not needed
            if group[0] not in seen:
                seen.add(group[0])
                need.append(group[0])
        if need:
            prog.say(f"  not installed on the host, unpacked next to sshd: {' '.join(need)}")
            todo = list(apt_fetch(dict.fromkeys(need), prog).values())
            fetched += todo
    return fetched


def _check_sshd_libs(sshd_dir: Path) -> None:
    libdirs = [str(sshd_dir / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(libdirs))
    out = _run(["ldd", str(sshd_dir / "usr" / "sbin" / "sshd")], "ldd sshd", env=env)
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        raise ImageBuildError(f"sshd needs libraries that are neither on the host nor fetched: "
                              f"{missing}")


def busybox_applets(busybox: Path) -> list[str]:
    """Applet names to link to busybox; never "busybox" itself (a self-link loops: ELOOP)."""
    out = _run([str(busybox), "--list"], "busybox --list")
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
        arch.add_file(f"lib/modules/{version}/{rel}", _read_module_file(moddir / m.relpath))
        kmods.append(KernelModule(m.name, rel, m.depends))
    arch.add_file(f"lib/modules/{version}/modules.dep", format_modules_dep(kmods).encode())
    load = "".join(f"{m.relpath}\n" for m in kmods)
    arch.add_file(f"lib/modules/{version}/modules.load", load.encode())
    return arch.to_bytes()


# ---------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m shared.lab.image",
        description="Build (or reuse) the pvnet QEMU guest image under ~/.cache/pvnet/images/. "
        "Rebuilt only when vm-images/ recipe files or the Debian kernel version change.",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    ap.add_argument("--json", action="store_true", help="print the ImageInfo as JSON on stdout")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    try:
        info = build_image(force=args.force, progress=not args.quiet)
    except ImageBuildError as e:
        print(f"image build failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print(
            f"kernel {info.kernel_version} ({info.kernel_package} {info.kernel_package_version})\n"
            f"vmlinux {info.kernel}\ninitrd  {info.initrd}\nsshd    {info.sshd_dir}\n"
            f"size    {info.size_bytes / 2**20:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
