"""One walker over a frame's headers: Ethernet, VLAN/QinQ tags, IPv4 (with options), IPv6 with
its extension-header chain (Hop-by-Hop, Routing, Fragment, Destination Options, AH), then the
TCP (with options) or UDP header.

Why one: the backend's filter, its checksum set-up and the header pull must agree on where the
L4 header is. Two walkers that disagree are a filter bypass (a Fragment header the filter did
not walk, a VLAN tag the checksum code did) - and a frontend chooses the layout. The walker
never guesses: given fewer bytes than the headers need it says how many it needs
(``NeedMore``), so the caller can pull more and walk again, or drop the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
IPPROTO_TCP, IPPROTO_UDP = 6, 17
#: IPv6 extension headers whose length is (hdr[1] + 1) * 8: Hop-by-Hop, Routing, Dest. Options
_IPV6_EXT8 = frozenset({0, 43, 60})
_IPV6_FRAG, _IPV6_AH, _IPV6_NONXT = 44, 51, 59
#: most VLAN tags walked (802.1ad outer + 802.1Q inner, and one spare)
MAX_VLAN_TAGS = 3
#: most IPv6 extension headers walked; a longer chain is refused (``HeaderError``)
MAX_IPV6_EXT = 8
#: offset of the checksum field inside the L4 header
CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


class NeedMore(Exception):
    """The headers continue past the bytes given: ``need`` bytes from the frame's start are
    required to walk on (an upper bound only for the next step)."""

    def __init__(self, need: int) -> None:
        super().__init__(f"headers need {need} bytes")
        self.need = need


class HeaderError(ValueError):
    """Headers that no frame can legally have (an IHL below 5, a chain too long)."""


@dataclass(slots=True)
class Headers:
    """What the walk found. ``end`` is where the last header walked ends: the L4 header's end
    for TCP/UDP (a first or only fragment), else the end of the L3 headers."""

    ethertype: int
    l3: int
    ip_proto: int | None = None
    src_ip: bytes | None = None
    dst_ip: bytes | None = None
    l4: int | None = None
    src_port: int | None = None
    dst_port: int | None = None
    end: int = 0
    #: part of a fragmented IP datagram (first or later)
    fragment: bool = False
    #: a later fragment: no L4 header in this frame
    later_fragment: bool = False

    def fields(self) -> dict[str, object]:
        """The filter's view: only what the walk really found."""
        out: dict[str, object] = {"ethertype": self.ethertype}
        for name in ("ip_proto", "src_ip", "dst_ip", "src_port", "dst_port"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        return out


def _need(buf: bytes | memoryview, n: int) -> None:
    if len(buf) < n:
        raise NeedMore(n)


def walk(buf: bytes | memoryview) -> Headers:
    """Walk the headers at the start of ``buf``. Raises NeedMore when ``buf`` ends inside
    them, HeaderError when they are impossible. Non-IP frames stop after the Ethernet
    header (and tags)."""
    _need(buf, 14)
    off = 12
    etype = (buf[12] << 8) | buf[13]
    tags = 0
    while etype in (ETH_P_8021Q, ETH_P_8021AD):
        tags += 1
        if tags > MAX_VLAN_TAGS:
            raise HeaderError(f"more than {MAX_VLAN_TAGS} VLAN tags")
        off += 4
        _need(buf, off + 2)
        etype = (buf[off] << 8) | buf[off + 1]
    off += 2
    h = Headers(etype, off, end=off)
    if etype == ETH_P_IP:
        _need(buf, off + 20)
        ihl = (buf[off] & 0x0F) * 4
        if buf[off] >> 4 != 4 or ihl < 20:
            raise HeaderError(f"IPv4 version/IHL byte {buf[off]:#x}")
        _need(buf, off + ihl)
        h.ip_proto = buf[off + 9]
        h.src_ip, h.dst_ip = bytes(buf[off + 12:off + 16]), bytes(buf[off + 16:off + 20])
        frag = ((buf[off + 6] << 8) | buf[off + 7]) & 0x3FFF  # MF + offset
        h.fragment, h.later_fragment = frag != 0, (frag & 0x1FFF) != 0
        off += ihl
    elif etype == ETH_P_IPV6:
        _need(buf, off + 40)
        proto = buf[off + 6]
        h.src_ip, h.dst_ip = bytes(buf[off + 8:off + 24]), bytes(buf[off + 24:off + 40])
        off += 40
        for _ in range(MAX_IPV6_EXT + 1):
            if proto in _IPV6_EXT8:
                _need(buf, off + 2)
                proto, off = buf[off], off + (buf[off + 1] + 1) * 8
            elif proto == _IPV6_AH:
                _need(buf, off + 2)
                proto, off = buf[off], off + (buf[off + 1] + 2) * 4
            elif proto == _IPV6_FRAG:
                _need(buf, off + 8)
                h.fragment = True
                h.later_fragment = (((buf[off + 2] << 8) | buf[off + 3]) & 0xFFF8) != 0
                proto, off = buf[off], off + 8
            else:
                break
            _need(buf, off)
        else:
            raise HeaderError(f"more than {MAX_IPV6_EXT} IPv6 extension headers")
        h.ip_proto = None if proto == _IPV6_NONXT else proto
    else:
        return h
    h.end = off
    if h.later_fragment or h.ip_proto not in CSUM_OFFSET:
        return h
    h.l4 = off
    if h.ip_proto == IPPROTO_TCP:
        _need(buf, off + 20)
        h.end = off + max(20, (buf[off + 12] >> 4) * 4)
    else:
        h.end = off + 8
    _need(buf, h.end)
    h.src_port = (buf[off] << 8) | buf[off + 1]
    h.dst_port = (buf[off + 2] << 8) | buf[off + 3]
    return h


def header_len(buf: bytes | memoryview, size: int) -> int:
    """How many leading bytes of a ``size``-byte frame hold its headers, given its first
    bytes ``buf``: what a header pull must copy. Raises NeedMore(n) when ``buf`` is too short
    to tell, with n <= size; a frame shorter than its own headers yields ``size``."""
    try:
        return walk(buf).end
    except NeedMore as e:
        if e.need > size:
            return size
        raise
    except HeaderError:
        return min(len(buf), size)
