"""The one header walker (shared/protocol/headers.py) that the filter, the checksum set-up and the
header pull share: every layout a frontend can choose lands on the same L4 header."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.tx.filter import header_fields
from shared.protocol.headers import HeaderError, NeedMore, header_len, walk
from shared.protocol.offload import checksum_setup
from tests.conftest import frame, frame6, ipv4_options, l4_header, vlan

HBH, ROUTING, FRAG, DSTOPT = 0, 43, 44, 60


@pytest.mark.parametrize("exts,l4", [
    ((), 54), ((HBH,), 62), ((FRAG,), 62), ((HBH, ROUTING, DSTOPT), 78),
    ((HBH, DSTOPT, FRAG, DSTOPT), 86)])
@pytest.mark.parametrize("proto,csum,hlen", [(17, 6, 8), (6, 16, 20)])
def test_ipv6_extension_chains_reach_the_l4_header(exts, l4, proto, csum, hlen):
    f = frame6(b"x" * 30, proto=proto, dport=5201, exts=exts)
    h = walk(f)
    assert (h.ip_proto, h.l4, h.dst_port, h.end) == (proto, l4, 5201, l4 + hlen)
    assert h.fragment == (FRAG in exts)
    assert header_fields(f)["dst_port"] == 5201
    # the checksum code walks the same chain; a fragment gets no checksum (Linux neither)
    assert checksum_setup(f) == (None if FRAG in exts else (l4, csum))


def test_a_later_ipv6_fragment_has_the_protocol_but_no_ports():
    f = frame6(b"x" * 30, exts=(HBH, FRAG), frag_offset=185)
    h = walk(f)
    assert (h.ip_proto, h.l4, h.later_fragment) == (17, None, True)
    assert header_fields(f) == {"ethertype": 0x86DD, "ip_proto": 17,
                                "src_ip": h.src_ip, "dst_ip": h.dst_ip}


def test_vlan_qinq_ipv4_options_and_tcp_options():
    f = frame(b"y" * 20, proto=6, dport=443)
    f = f[:34] + l4_header(6, 443, b"", tcp_options=bytes(12)) + f[54:]
    f = ipv4_options(f, bytes(8))
    q = vlan(f, (0x88A8, 100), (0x8100, 5))
    h = walk(q)
    assert (h.ethertype, h.l3, h.ip_proto, h.l4, h.end) == (0x0800, 22, 6, 50, 82)
    assert checksum_setup(q) == (50, 16)
    assert header_fields(q)["dst_port"] == 443


def test_an_ipv4_fragment_is_walked_and_refused_a_checksum():
    f = bytearray(frame(b"z" * 20))
    f[20] = 0x20  # MF, offset 0: the first fragment still has its UDP header
    assert walk(bytes(f)).dst_port == 5201 and checksum_setup(bytes(f)) is None
    f[21] = 0x10  # offset 16: a later fragment, no ports
    h = walk(bytes(f))
    assert h.later_fragment and h.dst_port is None and h.ip_proto == 17


@pytest.mark.parametrize("n", [9, 12, 40, 56, 200])
def test_any_number_of_ipv6_extension_headers_reaches_the_ports(n):
    """Finding 1 (issue 22): the walker gave up after 8 extension headers and the filter saw
    only the ethertype. Now it walks as many as the bytes hold (the pull holds 56: 54 + 56 x 8
    + 8 <= 512), each step at least 8 bytes: linear in the bytes given."""
    f = frame6(b"x" * 30, dport=5201, exts=(DSTOPT,) * (n - 1) + (HBH,))
    h = walk(f)
    assert (h.ip_proto, h.l4, h.dst_port) == (17, 54 + 8 * n, 5201)
    assert header_fields(f)["dst_port"] == 5201


def test_other_protocols_with_ports_are_walked_to_them():
    """UDP-Lite, SCTP and DCCP start with ports as TCP and UDP do: a port rule sees them
    (a guest cannot reach a port by choosing another transport); no checksum set-up."""
    for proto in (136, 132, 33):
        f = frame(b"s" * 40, proto=17, dport=5201)
        f = f[:23] + bytes([proto]) + f[24:]
        h = walk(f)
        assert (h.ip_proto, h.l4, h.dst_port) == (proto, 34, 5201)
        assert checksum_setup(f) is None


def test_short_buffers_say_how_much_they_need():
    f = frame6(b"x" * 100, proto=6, exts=(HBH, DSTOPT), tcp_options=bytes(20))
    end = walk(f).end
    assert end == 14 + 40 + 16 + 40
    for cut in range(0, end):
        with pytest.raises(NeedMore) as e:
            walk(f[:cut])
        assert cut < e.value.need <= end
    with pytest.raises(NeedMore):
        header_len(f[:64], len(f))
    assert header_len(f[:60], 60) == 60  # a frame shorter than its headers: all of it


def test_impossible_headers_are_refused():
    f = bytearray(frame(b""))
    f[14] = 0x44  # IHL 4
    with pytest.raises(HeaderError):
        walk(bytes(f))
    with pytest.raises(HeaderError):
        walk(vlan(frame(b""), *[(0x8100, 1)] * 4))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_walk_or_say_why(data):
    try:
        h = walk(data)
    except NeedMore as e:
        assert e.need > len(data)
    except HeaderError:
        pass
    else:
        assert h.end <= len(data)
