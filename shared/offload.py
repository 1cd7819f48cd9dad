"""Offload metadata: virtio_net_hdr (what a TAP speaks) <-> netif flags and GSO extra info.

netif carries only "checksum blank" and a GSO type/size; a TAP wants csum_start/csum_offset.
Like Linux's ``skb_checksum_setup`` (used by netback for TX and netfront for RX) the receiving
end re-derives them from the packet headers. Both ends use this module, so the translation is
defined once.
"""

from __future__ import annotations

import struct

from shared.netif import (
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
)

#: struct virtio_net_hdr_mrg_rxbuf (TUNSETVNETHDRSZ 12)
VNET_HDR = struct.Struct("<BBHHHHH")
VNET_HDR_SIZE = VNET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

VIRTIO_TO_XEN_GSO = {
    VIRTIO_NET_HDR_GSO_NONE: XEN_NETIF_GSO_TYPE_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4: XEN_NETIF_GSO_TYPE_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6: XEN_NETIF_GSO_TYPE_TCPV6,
}
XEN_TO_VIRTIO_GSO = {v: k for k, v in VIRTIO_TO_XEN_GSO.items()}

_ETH_P_IP, _ETH_P_IPV6, _ETH_P_8021Q = 0x0800, 0x86DD, 0x8100
_IPPROTO_TCP, _IPPROTO_UDP = 6, 17
_CSUM_OFFSET = {_IPPROTO_TCP: 16, _IPPROTO_UDP: 6}
_IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options


def checksum_setup(hdr: bytes | memoryview) -> tuple[int, int] | None:
    """(csum_start, csum_offset) for a TCP/UDP packet whose headers begin ``hdr``, else None."""
    try:
        off = 12
        ethertype = (hdr[off] << 8) | hdr[off + 1]
        if ethertype == _ETH_P_8021Q:
            off += 4
            ethertype = (hdr[off] << 8) | hdr[off + 1]
        off += 2
        if ethertype == _ETH_P_IP:
            proto = hdr[off + 9]
            off += (hdr[off] & 0x0F) * 4
        elif ethertype == _ETH_P_IPV6:
            proto = hdr[off + 6]
            off += 40
            while proto in _IPV6_EXT:
                proto, off = hdr[off], off + (hdr[off + 1] + 1) * 8
        else:
            return None
    except IndexError:
        return None
    csum = _CSUM_OFFSET.get(proto)
    return None if csum is None else (off, csum)
