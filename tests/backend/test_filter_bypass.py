"""Filter bypasses of issue 22 (findings 1 and 2) and their variations, through the honest
netfront into the real netback, in every mode: the filter's verdict is never "could not
parse, so pass". Each test names its verdict: the counter (``drops_filtered`` with
``drops_unparsed`` or ``drops_fragment``, or a rule's own hit) and that the frame is not on
the wire, while honest fragmented traffic still crosses."""

from __future__ import annotations

import pytest

from backend.tx.filter import FRAGMENT_SLOTS
from tests.backend.test_netback import close
from tests.conftest import frame, frame6, ipv6_ext, make_pair, vlan

MODES = ["lazy", "map", "copy"]
HBH, FRAG, DSTOPT = 0, 44, 60
V6_DST = "::2"  # frame6's destination


def ip4_fragments(f: bytes, cuts: list[int], ident: int = 0x1234) -> list[bytes]:
    """The IPv4 frame ``f`` (no options) cut into fragments at IP-payload offsets ``cuts``
    (multiples of 8), as a sender's ip_fragment would: same identification, MF on all but
    the last, offsets in 8-byte units."""
    eth, ip, body = f[:14], bytearray(f[14:34]), f[34:]
    ip[4:6] = ident.to_bytes(2, "big")
    out = []
    edges = [0, *cuts, len(body)]
    for a, b in zip(edges, edges[1:], strict=False):
        part = bytearray(ip)
        part[2:4] = (20 + b - a).to_bytes(2, "big")
        part[6:8] = ((0x2000 if b < len(body) else 0) | (a // 8)).to_bytes(2, "big")
        out.append(eth + bytes(part) + body[a:b])
    return out


def ip6_fragments(f: bytes, cuts: list[int], ident: int = 0x51) -> list[bytes]:
    """The IPv6 frame ``f`` (no extension headers) cut into fragments at offsets ``cuts`` of
    what follows the IPv6 header (its extension headers and L4 header included)."""
    eth, ip, body = f[:14], bytearray(f[14:54]), f[54:]
    nxt = ip[6]
    ip[6] = FRAG
    out = []
    edges = [0, *cuts, len(body)]
    for a, b in zip(edges, edges[1:], strict=False):
        fh = bytes([nxt, 0]) + (a | (1 if b < len(body) else 0)).to_bytes(2, "big") \
            + ident.to_bytes(4, "big")
        part = bytearray(ip)
        part[4:6] = (8 + b - a).to_bytes(2, "big")
        out.append(eth + bytes(part) + fh + body[a:b])
    return out


def crossing(mode: str, rules: list[str], frames: list[bytes], header_slots: bool = True):
    """Send ``frames`` through the honest netfront; what reached the wire and the backend's
    TX counters."""
    p = make_pair(mode, header_slots=header_slots, filters=rules)
    try:
        for f in frames:
            p.send(f)
        p.run_tx()
        return p.wire_frames(), p.bstats[0]
    finally:
        close(p)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("header_slots", [True, False])
@pytest.mark.parametrize("n", [9, 12, 30, 56])
@pytest.mark.parametrize("rule", ["drop ip_proto=17", "drop dst_port=5201",
                                  f"drop dst_ip={V6_DST}"])
def test_many_ipv6_extension_headers_reach_every_rule(mode, header_slots, n, rule):
    """Finding 1: 9-12 Destination Options headers + UDP, and up to 56 (the most the 512-byte
    pull holds). Verdict: the rule itself matches (drops_filtered), the frame is not sent."""
    f = frame6(b"x" * 300, dport=5201, exts=(DSTOPT,) * n)
    wire, st = crossing(mode, [rule], [f], header_slots)
    assert wire == [] and st.drops == st.drops_filtered == 1
    assert st.drops_unparsed == st.drops_fragment == 0
    other = frame6(b"x" * 300, dport=80, exts=(DSTOPT,) * n)
    if "dst_port" in rule:  # the same chain to another port crosses, bit for bit
        assert crossing(mode, [rule], [other], header_slots)[0] == [other]


@pytest.mark.parametrize("mode", MODES)
def test_a_chain_past_the_pull_limit_is_dropped_not_passed(mode):
    """Variation: a chain longer than the 512-byte pull (70 x 8 bytes): drops_headers."""
    f = frame6(b"x" * 300, dport=5201, exts=(DSTOPT,) * 70)
    wire, st = crossing(mode, ["drop dst_port=5201"], [f])
    assert wire == [] and st.drops_headers == st.drops == 1


@pytest.mark.parametrize("mode", MODES)
def test_tiny_ipv4_fragments_do_not_carry_a_syn_past_a_port_rule(mode):
    """Finding 2 (RFC 1858): the first fragment holds 8 bytes of the TCP header, the second
    the rest. Verdicts: the first cannot be walked to its L4 header (drops_unparsed), the
    second's datagram never passed (drops_fragment); nothing reaches the receiver."""
    syn = frame(b"", proto=6, dport=5201)
    frags = ip4_fragments(syn, [8])
    assert len(frags[0]) == 14 + 20 + 8
    wire, st = crossing(mode, ["drop dst_port=5201"], frags)
    assert wire == []
    assert (st.drops, st.drops_filtered, st.drops_unparsed, st.drops_fragment) == (2, 2, 1, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("proto", [6, 17])
def test_a_fragmented_datagram_goes_where_its_first_fragment_goes(mode, proto):
    """Fragments are judged as their datagram: to the blocked port none passes (the first by
    the rule, the later ones after it: drops_fragment); to another port all of them do, so
    honest fragmented traffic still crosses a port rule."""
    bad = ip4_fragments(frame(b"b" * 3000, proto=proto, dport=5201), [1480, 2960], 7)
    good = ip4_fragments(frame(b"g" * 3000, proto=proto, dport=53), [1480, 2960], 8)
    wire, st = crossing(mode, ["drop dst_port=5201"], [*bad, *good])
    assert wire == good
    assert (st.drops_filtered, st.drops_fragment, st.drops_unparsed) == (3, 2, 0)


@pytest.mark.parametrize("mode", MODES)
def test_later_fragments_without_their_first_are_dropped(mode):
    """Variations: a later fragment sent before its first (out of order), one of a datagram
    never begun, one whose identification matches a passed datagram's but whose protocol
    does not (IPv4's reassembly key has it): each drops_fragment, under an ip_proto rule too.
    A later fragment after its first (passed) crosses."""
    f = frame(b"o" * 2000, proto=17, dport=53)
    first, later = ip4_fragments(f, [1480], 9)
    other_proto = bytearray(later)
    other_proto[23] = 6
    wire, st = crossing(mode, ["drop ip_proto=6"], [later, first, bytes(other_proto), later])
    assert wire == [first, later]
    assert st.drops_fragment == 2 and st.drops_filtered == 2


@pytest.mark.parametrize("mode", MODES)
def test_ipv6_first_fragment_without_its_l4_header_is_dropped(mode):
    """Variation in IPv6: the first fragment holds the Fragment header and a Destination
    Options header, the UDP header begins in the second (RFC 7112 forbids it). Verdicts:
    drops_unparsed, then drops_fragment. The honest split (UDP header in the first) crosses
    unless the rule blocks its port."""
    dst = ipv6_ext(DSTOPT, 17, body_len=62)  # 64 bytes
    f = frame6(b"d" * 1000, dport=5201)
    f = f[:20] + bytes([DSTOPT]) + f[21:54] + dst + f[54:]
    f = f[:18] + (len(f) - 54).to_bytes(2, "big") + f[20:]
    frags = ip6_fragments(f, [64])
    wire, st = crossing(mode, ["drop dst_port=5201"], frags)
    assert wire == [] and (st.drops_unparsed, st.drops_fragment) == (1, 1)
    honest = ip6_fragments(frame6(b"h" * 2000, dport=80), [1232])
    assert crossing(mode, ["drop dst_port=5201"], honest)[0] == honest
    blocked = ip6_fragments(frame6(b"h" * 2000, dport=5201), [1232])
    wire, st = crossing(mode, ["drop dst_port=5201"], blocked)
    assert wire == [] and (st.drops_filtered, st.drops_fragment) == (2, 1)


@pytest.mark.parametrize("mode", MODES)
def test_headers_that_cannot_be_walked_are_dropped_under_a_header_rule(mode):
    """The class: a frame cut short inside its headers, an impossible IHL, five VLAN tags
    hiding an IPv4/UDP frame: under a header rule each is drops_unparsed (it was sent before,
    the rule having seen only the outer ethertype). Without a header rule they cross as
    before (payload rules judge bytes, not headers)."""
    cut = frame(b"", proto=6, dport=5201)[:14 + 20 + 10]
    ihl = bytearray(frame(b"i" * 50))
    ihl[14] = 0x44
    tags = vlan(frame(b"v" * 100), *[(0x8100, 1)] * 5)
    bad = [cut, bytes(ihl), tags]
    wire, st = crossing(mode, ["drop dst_port=5201"], bad)
    assert wire == [] and st.drops_unparsed == st.drops_filtered == st.drops == 3
    wire, st = crossing(mode, ["drop ethertype=0x0806"], bad)
    assert wire == [] and st.drops_unparsed == 3
    wire, st = crossing(mode, ["drop payload=text:nothing-here"], bad)
    assert wire == bad and st.drops == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_rule_on_a_layer_the_frame_lacks_does_not_apply(mode):
    """ARP has no IP protocol, ICMP no ports: such rules pass them (not "unparsed")."""
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    icmp = frame(b"p" * 56, proto=1)
    wire, st = crossing(mode, ["drop ip_proto=17", "drop dst_port=5201"], [arp, icmp])
    assert wire == [arp, icmp] and st.drops == 0


@pytest.mark.parametrize("proto", [132, 136, 33])
def test_ports_of_sctp_udplite_dccp_meet_port_rules(proto):
    """Variation: the same port over another transport with ports (SCTP, UDP-Lite, DCCP)."""
    f = frame(b"s" * 100, proto=17, dport=5201)
    f = f[:23] + bytes([proto]) + f[24:]
    wire, st = crossing("lazy", ["drop dst_port=5201"], [f])
    assert wire == [] and st.drops_filtered == 1 and st.drops_unparsed == 0


def test_the_fragment_memory_is_bounded_and_forgets_the_oldest():
    """A frontend opening more datagrams than FRAGMENT_SLOTS loses only its own oldest later
    fragments (drops_fragment); the filter's memory does not grow."""
    p = make_pair(filters=["drop dst_port=5201"])
    try:
        datagrams = [ip4_fragments(frame(b"m" * 1600, dport=53), [1480], i)
                     for i in range(FRAGMENT_SLOTS + 1)]
        for first, _later in datagrams:
            p.send(first)
            p.run_tx(2)
        p.send(datagrams[0][1])  # the oldest: forgotten
        p.send(datagrams[-1][1])  # the newest: remembered
        p.run_tx()
        assert len(p.btx.filter.fragments.passed) == FRAGMENT_SLOTS
        st = p.bstats[0]
        assert st.drops_fragment == 1 and st.tx_packets == FRAGMENT_SLOTS + 3
        assert p.wire_frames()[-1] == datagrams[-1][1]
    finally:
        close(p)

