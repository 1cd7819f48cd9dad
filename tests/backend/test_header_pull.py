"""What the backend checks is what it sends (issue 11), with hand-built ring entries: each
fragment's own offset and size decide the iovecs, headers split across fragments are pulled
into a private head before the filter and the checksum code look at them, IPv6 extension
chains and VLAN tags are walked by the one walker, and csum_blank frames get a correct
checksum set-up or are dropped with a reason counter, whatever their header layout."""

import pytest

from shared.protocol.mechanisms import names
from shared.protocol.netif import PAGE_SIZE, NETTXF_csum_blank
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM
from tests.backend.test_netback import close
from tests.backend.txhand import Slot, drain, page, put_packet, split, wire
from tests.conftest import frame, frame6, ipv4_options, ipv6_ext, l4_header, make_pair, vlan

MODES = names("tx")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rules", [None, ["drop payload=text:SECRET"]])
@pytest.mark.parametrize("layout", ["sizes-100-4096", "offsets-0-2000"])
def test_iovecs_come_from_each_fragments_own_offset_and_size(mode, rules, layout):
    """Contiguous frames, first offset 0, one whole page among the sizes: the old shortcut
    sent one run of pages - 8192 bytes for a 4324-byte packet, or the wrong bytes."""
    p = make_pair(mode, filters=rules)
    f = frame(bytes(range(256)) * 20)[:4324]
    for ref in (8, 9):
        page(p, ref)[:] = (b"SECRET" * 700)[:PAGE_SIZE]  # bytes outside every fragment
    if layout == "sizes-100-4096":
        slots = [Slot(f[:128]), Slot(f[128:228], 8, 0), Slot(f[228:4324], 9, 0)]
    else:
        f = f[:128 + 4096 + 100]
        slots = [Slot(f[:128]), Slot(f[128:4224], 8, 0), Slot(f[4224:], 9, 2000)]
    put_packet(p, slots)
    drain(p)
    assert [fr for _v, fr in wire(p)] == [f]
    st = p.bstats[0]
    assert st.tx_packets == 1 and st.drops == 0
    close(p)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("header_slot", [True, False])
@pytest.mark.parametrize("rule", ["drop dst_port=5201", "drop ip_proto=17"])
@pytest.mark.parametrize("cuts", [[14], [14, 20, 30, 40], [20, 36]])
def test_headers_split_across_fragments_are_pulled_before_the_filter(mode, header_slot,
                                                                      rule, cuts):
    p = make_pair(mode, header_slots=header_slot, filters=[rule])
    f = frame(b"u" * 3000, proto=17, dport=5201)
    put_packet(p, split(f, cuts, first_in_slot=header_slot))
    drain(p)
    st = p.bstats[0]
    assert wire(p) == [] and st.drops_filtered == 1 and st.drops == 1
    assert st.slots_consumed == st.slots_released == 1 + len(cuts)
    # the same layout with another port is sent, bit for bit, its head pulled (a grant copy)
    p2 = make_pair(mode, header_slots=header_slot, filters=["drop dst_port=5201"])
    g = frame(b"u" * 3000, proto=17, dport=80)
    put_packet(p2, split(g, cuts, first_in_slot=header_slot))
    drain(p2)
    assert [fr for _v, fr in wire(p2)] == [g]
    st2 = p2.bstats[0]
    assert st2.grant_copy_bytes >= 128 - (cuts[0] if header_slot else 0)
    assert st2.grant_maps_on_touch == 0  # a pull is a copy, never a map
    close(p)
    close(p2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule,f", [
    ("drop dst_port=5201", frame6(b"v" * 1400, exts=(0, 44))),  # HBH + first fragment
    ("drop ip_proto=17", frame6(b"v" * 1400, exts=(0, 44), frag_offset=175)),  # later one
    ("drop dst_port=5201", vlan(frame(b"w" * 900), (0x88A8, 7), (0x8100, 5))),  # QinQ
    ("drop ip_proto=6", frame6(b"t" * 900, proto=6, exts=(0, 43, 60)))])
def test_ipv6_chains_and_vlan_tags_are_walked_by_the_filter(mode, rule, f):
    p = make_pair(mode, filters=[rule])
    put_packet(p, split(f, [14, 60]))
    drain(p)
    assert wire(p) == [] and p.bstats[0].drops_filtered == 1
    close(p)


def _tcp4_options_qinq() -> tuple[bytes, int]:
    f = frame(b"", proto=6, dport=443)
    f = f[:34] + l4_header(6, 443, b"", tcp_options=bytes(40)) + b"p" * 2000
    return vlan(ipv4_options(f, bytes(40)), (0x88A8, 1), (0x8100, 2)), 22 + 60


def _ipv6_long_chain() -> tuple[bytes, int]:
    f = frame6(b"q" * 2000, proto=17, exts=(0, 60))
    hbh = ipv6_ext(0, 60, body_len=190)  # a 192-byte Hop-by-Hop header: L4 at 14+40+192+8
    f = f[:20] + bytes([0]) + f[21:54] + hbh + f[62:]
    return f, 14 + 40 + 192 + 8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("header_slot", [True, False])
@pytest.mark.parametrize("layout", ["tcp4-options-qinq", "ipv6-long-chain", "plain-udp"])
def test_csum_blank_gets_a_checksum_whatever_the_header_layout(mode, header_slot, layout):
    if layout == "tcp4-options-qinq":
        f, l4 = _tcp4_options_qinq()
        coff = 16
    elif layout == "ipv6-long-chain":
        f, l4 = _ipv6_long_chain()
        coff = 6
    else:
        f, l4, coff = frame(b"z" * 1000), 34, 6
    p = make_pair(mode, header_slots=header_slot)
    put_packet(p, split(f, [100, 180], first_in_slot=header_slot), NETTXF_csum_blank)
    drain(p)
    (vnet, got), = wire(p)
    assert got == f
    assert vnet[0] == VIRTIO_NET_HDR_F_NEEDS_CSUM and vnet[4:6] == (l4, coff)
    close(p)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("f,why", [
    (frame(b"i" * 100, proto=1), "not TCP/UDP"),
    (frame6(b"v" * 400, exts=(44,), frag_offset=10), "fragment"),
    (bytes(12) + b"\x08\x06" + bytes(300), "not TCP/UDP")])
def test_csum_blank_without_a_checksummable_header_is_dropped_and_counted(mode, f, why,
                                                                           caplog):
    p = make_pair(mode)
    put_packet(p, split(f, [64]), NETTXF_csum_blank)
    drain(p)
    st = p.bstats[0]
    assert wire(p) == [] and st.drops_csum == 1 and st.drops == 1
    assert st.tx_packets == st.tx_bytes == 0  # dropped before it was handed on
    assert st.slots_consumed == st.slots_released
    assert any(why in r.getMessage() for r in caplog.records)
    close(p)


@pytest.mark.parametrize("mode", MODES)
def test_headers_past_the_pull_limit_are_dropped_and_counted(mode, caplog):
    f = frame6(b"h" * 1000, exts=(0,))
    hbh = ipv6_ext(0, 17, body_len=700)  # L4 header ends past HEADER_PULL_MAX (512)
    f = f[:54] + hbh + f[62:]
    p = make_pair(mode)
    put_packet(p, split(f, [128, 400, 900]))
    drain(p)
    st = p.bstats[0]
    assert wire(p) == [] and st.drops_headers == 1 and st.drops == 1
    assert st.slots_consumed == st.slots_released == 4
    assert any("ring[0]" in r.getMessage() and "headers" in r.getMessage()
               for r in caplog.records)
    # not fatal: the next packet goes
    g = frame(b"n" * 500)
    put_packet(p, split(g, [128]))
    drain(p)
    assert [fr for _v, fr in wire(p)] == [g]
    close(p)
