"""pcap and pcapng writers for `pvnet capture`: the two file formats tcpdump and Wireshark read.

Written with ``struct`` rather than a library: the formats are a handful of fixed blocks
(libpcap's savefile header and record header; pcapng's SHB, IDB and EPB), we need exactly
Ethernet and nanosecond timestamps, and streaming to a pipe (``-w - | tcpdump -r -``) block by
block. pcapng (the default) carries each frame's direction in ``epb_flags``: out (netback
wrote it to the vif, from the guest) is "outbound", in (read from the vif, to the guest) is
"inbound". Classic pcap has no place for it.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

LINKTYPE_ETHERNET = 1
FORMATS = ("pcapng", "pcap")
#: pcap with nanosecond timestamps (libpcap >= 1.5 reads it; tcpdump --nano shows them)
PCAP_MAGIC_NS = 0xA1B23C4D
_PCAP_FILE = struct.Struct("<IHHiIII")
_PCAP_REC = struct.Struct("<IIII")
_SHB = struct.Struct("<IIIHHq")
_BLOCK_HEAD = struct.Struct("<II")
_IDB_BODY = struct.Struct("<HHI")
_EPB_BODY = struct.Struct("<IIIII")
_OPT = struct.Struct("<HH")
PCAPNG_BOM = 0x1A2B3C4D
EPB_INBOUND, EPB_OUTBOUND = 1, 2


def _pad4(b: bytes) -> bytes:
    return b + bytes(-len(b) & 3)


def _option(code: int, value: bytes) -> bytes:
    return _OPT.pack(code, len(value)) + _pad4(value)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return _BLOCK_HEAD.pack(btype, total) + body + struct.pack("<I", total)


class PcapWriter:
    """Frames to ``out`` in pcapng (default) or classic nanosecond pcap."""

    def __init__(self, out: BinaryIO, snaplen: int, fmt: str = "pcapng",
                 ifname: str = "") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: must be one of {', '.join(FORMATS)}")
        self.out, self.fmt = out, fmt
        if fmt == "pcap":
            out.write(_PCAP_FILE.pack(PCAP_MAGIC_NS, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
            return
        shb = _SHB.pack(0x0A0D0D0A, 28, PCAPNG_BOM, 1, 0, -1)[8:]  # body only
        out.write(_block(0x0A0D0D0A, shb))
        opts = b""
        if ifname:
            opts += _option(2, ifname.encode())  # if_name
        opts += _option(9, b"\x09")  # if_tsresol: 10^-9 s
        opts += _OPT.pack(0, 0)
        out.write(_block(1, _IDB_BODY.pack(LINKTYPE_ETHERNET, 0, snaplen) + opts))

    def write(self, ts_ns: int, data: bytes, wirelen: int, outbound: bool | None) -> None:
        """One frame; ``outbound`` None = direction unknown (not written)."""
        if self.fmt == "pcap":
            sec, ns = divmod(ts_ns, 1_000_000_000)
            self.out.write(_PCAP_REC.pack(sec, ns, len(data), wirelen))
            self.out.write(data)
            return
        opts = b""
        if outbound is not None:
            flags = EPB_OUTBOUND if outbound else EPB_INBOUND
            opts = _option(2, struct.pack("<I", flags)) + _OPT.pack(0, 0)
        body = _EPB_BODY.pack(0, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), wirelen)
        self.out.write(_block(6, body + _pad4(data) + opts))

    def flush(self) -> None:
        self.out.flush()
