"""One walker over a frame's headers: Ethernet, VLAN/QinQ tags, IPv4 (with options), IPv6 with
its extension-header chain (Hop-by-Hop, Routing, Fragment, Destination Options, AH: any number
of them, as ip6tables/nft walk them - each is at least 8 bytes, so the walk is linear in the
bytes given and bounded by them), then the L4 header: TCP (with options), UDP, or the other
protocols with ports at the same place (UDP-Lite, SCTP, DCCP).

Why one: the backend's filter, its checksum set-up and the header pull must agree on where the
L4 header is. Two walkers that disagree are a filter bypass (a Fragment header the filter did
not walk, a VLAN tag the checksum code did) - and a frontend chooses the layout. The walker
never guesses: given fewer bytes than the headers need it says how many it needs
(``NeedMore``), so the caller can pull more and walk again, or drop the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.faults import PeerFault

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
IPPROTO_TCP, IPPROTO_UDP = 6, 17
#: L4 protocols whose header starts with the 16-bit source and destination ports, and the
#: least each header is (TCP: 20 + its options, read from the header)
PORT_HEADERS = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, 136: 8, 132: 12, 33: 12}  # UDP-Lite, SCTP, DCCP
#: IPv6 extension headers whose length is (hdr[1] + 1) * 8: Hop-by-Hop, Routing, Dest. Options
_IPV6_EXT8 = frozenset({0, 43, 60})
_IPV6_FRAG, _IPV6_AH, _IPV6_NONXT = 44, 51, 59
#: most VLAN tags walked (802.1ad outer + 802.1Q inner, and one spare)
MAX_VLAN_TAGS = 3
#: offset of the checksum field inside the L4 header
CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}


class NeedMore(Exception):
    """The headers continue past the bytes given: ``need`` bytes from the frame's start are
    required to walk on (an upper bound only for the next step)."""

    def __init__(self, need: int) -> None:
        super().__init__(f"headers need {need} bytes")
        self.need = need


class HeaderError(PeerFault, ValueError):
    """Headers that no frame can legally have (an IHL below 5, more VLAN tags than allowed)."""


@dataclass(slots=True)
class Headers:
    """What the walk found (offsets into ``buf``, the bytes walked). ``end`` is where the last
    header walked ends: the L4 header's end for TCP/UDP (a first or only fragment), else the
    end of the L3 headers. Addresses and ports are read from ``buf`` only when asked for: the
    data path needs offsets, the filter needs fields."""

    buf: bytes | memoryview
    ethertype: int
    l3: int
    ip_proto: int | None = None
    #: offset of the L4 header with ports (None: a protocol without them, or a later fragment)
    l4: int | None = None
    end: int = 0
    #: part of a fragmented IP datagram (first or later)
    fragment: bool = False
    #: a later fragment: no L4 header in this frame
    later_fragment: bool = False
    #: a fragment: offset of its identification (IPv4: 2 bytes in the IP header; IPv6: 4 in
    #: the Fragment header)
    frag_id_at: int = 0

    def datagram(self) -> bytes:
        """A fragment's reassembly key, as the receiver's: addresses, identification and (IPv4)
        protocol; every fragment of one datagram has the same one."""
        b, o, i = self.buf, self.l3, self.frag_id_at
        if self.ethertype == ETH_P_IP:
            return bytes(b[o + 12:o + 20]) + bytes(b[i:i + 2]) + bytes([b[o + 9]])
        return bytes(b[o + 8:o + 40]) + bytes(b[i:i + 4])

    @property
    def src_ip(self) -> bytes | None:
        return self._ip(12, 8)

    @property
    def dst_ip(self) -> bytes | None:
        return self._ip(16, 24)

    def _ip(self, v4: int, v6: int) -> bytes | None:
        b, o = self.buf, self.l3
        if self.ethertype == ETH_P_IP:
            return bytes(b[o + v4:o + v4 + 4])
        if self.ethertype == ETH_P_IPV6:
            return bytes(b[o + v6:o + v6 + 16])
        return None

    @property
    def src_port(self) -> int | None:
        o = self.l4
        return None if o is None else (self.buf[o] << 8) | self.buf[o + 1]

    @property
    def dst_port(self) -> int | None:
        o = self.l4
        return None if o is None else (self.buf[o + 2] << 8) | self.buf[o + 3]

    def fields(self) -> dict[str, object]:
        """The filter's view: only what the walk really found."""
        out: dict[str, object] = {"ethertype": self.ethertype}
        if self.ip_proto is not None:
            out["ip_proto"] = self.ip_proto
        if self.ethertype in (ETH_P_IP, ETH_P_IPV6):
            out["src_ip"], out["dst_ip"] = self.src_ip, self.dst_ip
        if self.l4 is not None:
            out["src_port"], out["dst_port"] = self.src_port, self.dst_port
        return out


def walk(buf: bytes | memoryview) -> Headers:
    """Walk the headers at the start of ``buf``. Raises NeedMore when ``buf`` ends inside
    them, HeaderError when they are impossible. Non-IP frames stop after the Ethernet
    header (and tags). Written for speed: it runs once per packet on the TX path."""
    n = len(buf)
    if n < 14:
        raise NeedMore(14)
    etype = (buf[12] << 8) | buf[13]
    off = 14
    if etype == ETH_P_8021Q or etype == ETH_P_8021AD:
        tags = 0
        while etype == ETH_P_8021Q or etype == ETH_P_8021AD:
            tags += 1
            if tags > MAX_VLAN_TAGS:
                raise HeaderError(f"more than {MAX_VLAN_TAGS} VLAN tags")
            off += 4
            if n < off:
                raise NeedMore(off)
            etype = (buf[off - 2] << 8) | buf[off - 1]
    fragment = later = False
    frag_at = 0
    if etype == ETH_P_IP:
        if n < off + 20:
            raise NeedMore(off + 20)
        vihl = buf[off]
        ihl = (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or ihl < 20:
            raise HeaderError(f"IPv4 version/IHL byte {vihl:#x}")
        if n < off + ihl:
            raise NeedMore(off + ihl)
        proto: int | None = buf[off + 9]
        frag = ((buf[off + 6] << 8) | buf[off + 7]) & 0x3FFF  # MF + offset
        if frag:
            fragment, later, frag_at = True, (frag & 0x1FFF) != 0, off + 4
        l3, off = off, off + ihl
    elif etype == ETH_P_IPV6:
        if n < off + 40:
            raise NeedMore(off + 40)
        proto = buf[off + 6]
        l3, off = off, off + 40
        while True:  # each header is 8 bytes or more: at most len(buf) / 8 rounds
            if proto in _IPV6_EXT8 or proto == _IPV6_AH:
                if n < off + 2:
                    raise NeedMore(off + 2)
                step = (buf[off + 1] + 1) * 8 if proto != _IPV6_AH else (buf[off + 1] + 2) * 4
                proto, off = buf[off], off + step
            elif proto == _IPV6_FRAG:
                if n < off + 8:
                    raise NeedMore(off + 8)
                fragment, frag_at = True, off + 4
                later = (((buf[off + 2] << 8) | buf[off + 3]) & 0xFFF8) != 0
                proto, off = buf[off], off + 8
                if later:  # what follows is the datagram's middle, not headers
                    break
            else:
                break
            if n < off:
                raise NeedMore(off)
        if proto == _IPV6_NONXT:
            proto = None
    else:
        return Headers(buf, etype, off, end=off)
    least = PORT_HEADERS.get(proto) if not later else None  # type: ignore[arg-type]
    if least is None:
        return Headers(buf, etype, l3, proto, None, off, fragment, later, frag_at)
    end = off + least
    if n < end:
        raise NeedMore(end)
    if proto == IPPROTO_TCP:
        doff = (buf[off + 12] >> 4) * 4
        if doff > 20:
            end = off + doff
            if n < end:
                raise NeedMore(end)
    return Headers(buf, etype, l3, proto, off, end, fragment, later, frag_at)


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
