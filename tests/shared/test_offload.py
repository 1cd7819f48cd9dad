from shared.protocol.offload import checksum_setup
from tests.conftest import frame


def test_ipv4_udp_and_tcp():
    assert checksum_setup(frame(b"x" * 10, proto=17)) == (34, 6)
    assert checksum_setup(frame(b"x" * 10, proto=6)) == (34, 16)


def test_vlan_and_ipv6():
    f = frame(b"x", proto=6)
    vlan = f[:12] + b"\x81\x00\x00\x05" + f[12:]
    assert checksum_setup(vlan) == (38, 16)
    v6 = bytes(12) + b"\x86\xdd" + bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + bytes(32) + bytes(20)
    assert checksum_setup(v6) == (54, 16)


def test_not_tcp_udp_or_truncated():
    assert checksum_setup(bytes(12) + b"\x08\x06" + bytes(28)) is None  # ARP
    assert checksum_setup(frame(b"", proto=1)) is None
    assert checksum_setup(b"\x00" * 13) is None
