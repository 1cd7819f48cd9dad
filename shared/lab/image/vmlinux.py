"""The uncompressed ELF kernel inside a Debian bzImage (QEMU boots it directly: PVH)."""

from __future__ import annotations

import gzip
import lzma

from shared.lab.image.steps import ImageBuildError

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b\x08"


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
