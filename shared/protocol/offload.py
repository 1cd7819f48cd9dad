"""Offload metadata: virtio_net_hdr (what a TAP speaks) <-> netif flags and GSO extra info.

netif carries only "checksum blank" and a GSO type/size; a TAP wants csum_start/csum_offset.
Like Linux's ``skb_checksum_setup`` (used by netback for TX and netfront for RX) the receiving
end re-derives them from the packet headers. Both ends use this module, so the translation is
defined once.
"""

from __future__ import annotations

import struct

from shared.protocol.headers import CSUM_OFFSET, HeaderError, NeedMore, walk
from shared.protocol.netif import (
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NETRXF_csum_blank,
    NETRXF_data_validated,
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
#: the flag bits netif can carry (NEEDS_CSUM | DATA_VALID), and the gso_type bits that name
#: the kind (all but ECN fit in them): tables indexed by ``value & mask`` cover every case
VIRTIO_NET_HDR_F_MASK = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
VIRTIO_NET_HDR_GSO_KIND = 0x07

VIRTIO_TO_XEN_GSO = {
    VIRTIO_NET_HDR_GSO_NONE: XEN_NETIF_GSO_TYPE_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4: XEN_NETIF_GSO_TYPE_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6: XEN_NETIF_GSO_TYPE_TCPV6,
}
XEN_TO_VIRTIO_GSO = {v: k for k, v in VIRTIO_TO_XEN_GSO.items()}
#: a virtio_net_hdr's flags byte -> the netif RX flags of its frame (netback RX): a partial
#: checksum is csum_blank and data_validated, a validated one data_validated
VIRTIO_TO_NETRXF = tuple(
    (NETRXF_csum_blank | NETRXF_data_validated) if f & VIRTIO_NET_HDR_F_NEEDS_CSUM
    else NETRXF_data_validated if f & VIRTIO_NET_HDR_F_DATA_VALID else 0 for f in range(256))


def checksum_setup(hdr: bytes | memoryview) -> tuple[int, int] | None:
    """(csum_start, csum_offset) for a TCP/UDP packet whose headers begin ``hdr``, else None
    (not TCP/UDP, a fragment - Linux's skb_checksum_setup refuses those too -, or headers that
    run past ``hdr``). The headers are walked by ``shared.protocol.headers.walk``, the same walker
    the backend's filter and header pull use, so all three agree on where the L4 header is."""
    try:
        h = walk(hdr)
    except (NeedMore, HeaderError):
        return None
    if h.l4 is None or h.fragment or h.ip_proto not in CSUM_OFFSET:
        return None
    return h.l4, CSUM_OFFSET[h.ip_proto]
