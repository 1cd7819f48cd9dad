"""cpio "newc" archives in memory: what the kernel unpacks as initramfs."""

from __future__ import annotations

from dataclasses import dataclass, field


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
