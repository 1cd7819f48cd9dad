"""Read pcap and pcapng files back in tests: an independent reading of what tcpdump reads."""

from __future__ import annotations

import struct
from pathlib import Path


def read_frames(path: Path | str) -> list[tuple[bytes, bool | None]]:
    """(frame bytes, outbound?) per packet; outbound is None where the file does not say."""
    data = Path(path).read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    out: list[tuple[bytes, bool | None]] = []
    if magic == 0x0A0D0D0A:
        at = 0
        while at + 8 <= len(data):
            btype, blen = struct.unpack_from("<II", data, at)
            if btype == 6:
                caplen = struct.unpack_from("<I", data, at + 20)[0]
                body = data[at + 28:at + 28 + caplen]
                opts = at + 28 + ((caplen + 3) & ~3)
                way = None
                if opts + 8 <= at + blen - 4:
                    code, _l, flags = struct.unpack_from("<HHI", data, opts)
                    if code == 2:
                        way = flags & 3 == 2
                out.append((body, way))
            at += blen
        return out
    if magic not in (0xA1B2C3D4, 0xA1B23C4D):
        raise ValueError(f"{path}: not a little-endian pcap or pcapng file")
    at = 24
    while at + 16 <= len(data):
        _s, _f, incl, _orig = struct.unpack_from("<IIII", data, at)
        out.append((data[at + 16:at + 16 + incl], None))
        at += 16 + incl
    return out
