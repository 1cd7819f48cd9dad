"""Wire formats of the pvnet rings: Xen's ``netif.h``, defined once for both ends.

Every structure that crosses the grant region is a precompiled ``struct.Struct`` here, so the
frontend and backend cannot disagree about a field. Values and layouts are Xen's; our
additions (header slots, persistent grefs, the RX extra slot's buffer id) are marked as such.
"""

from __future__ import annotations

import functools
import struct

PAGE_SIZE = 4096
RING_SIZE = 256  # __CONST_RING_SIZE(netif_tx, 4096) and (netif_rx, 4096)
ETH_HLEN = 14

# --- the ring messages (TX: frontend -> backend, RX: backend -> frontend) ---------------------
#: struct netif_tx_request { grant_ref_t gref; uint16_t offset, flags, id, size; }
TX_REQUEST = struct.Struct("<IHHHH")
#: byte offset of tx_request.flags (u16): netback finds a packet's end in this column
TX_REQUEST_FLAGS = 6
#: struct netif_tx_response { uint16_t id; int16_t status; }
TX_RESPONSE = struct.Struct("<Hh")
#: byte offsets of tx_response.id (u16) and .status (i16): both ends move these as columns
TX_RESPONSE_ID, TX_RESPONSE_STATUS = 0, 2
#: struct netif_rx_request { uint16_t id; uint16_t pad; grant_ref_t gref; }
RX_REQUEST = struct.Struct("<HHI")
#: struct netif_rx_response { uint16_t id, offset, flags; int16_t status; }
RX_RESPONSE = struct.Struct("<HHHh")

NETTXF_csum_blank = 1 << 0
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3
#: pvnet addition (feature-header-slots): ``gref`` is an offset into the header-slot area.
NETTXF_header_slot = 1 << 4

# RX flags: csum_blank and data_validated are the other way round from TX
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3


@functools.cache
def tx_requests(n: int) -> struct.Struct:
    """``n`` consecutive tx_requests, unpacked in one call (gref, offset, flags, id, size, ...)."""
    return struct.Struct(TX_REQUEST.format[0] + TX_REQUEST.format[1:] * n)


# --- extra info slots (both rings) --------------------------------------------------------
#: struct netif_extra_info { uint8_t type, flags; struct { uint16_t size; uint8_t type, pad;
#: uint16_t features; } gso; }
EXTRA_INFO = struct.Struct("<BBHBBH")
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_FLAG_MORE = 1
XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2
# pvnet addition (feature-rx-by-id only): the slot an RX extra-info occupies names the posted
# buffer it retires in gso.features. In stock netif it is 0 and retires its own ring position.

# --- statuses ----------------------------------------------------------------------------
XEN_NETIF_RSP_DROPPED = -2
XEN_NETIF_RSP_ERROR = -1
XEN_NETIF_RSP_OKAY = 0
XEN_NETIF_RSP_NULL = 1  # the response slot of an extra-info request

# --- limits (Linux xen-netback) ------------------------------------------------------------
#: XEN_NETBK_LEGACY_SLOTS_MAX: the most *follow-on* slots (after the first request, not
#: counting extras) a packet may use and still be sent; 19 or 20 follow-ons are dropped.
MAX_SLOTS_PER_PACKET = 18
#: fatal_skb_slots: a frontend whose packet has this many follow-on slots *and more_data on the
#: last of them* (i.e. a 21st follow-on) is malicious; disconnect it (xenvif_count_requests).
FATAL_SKB_SLOTS = 20
#: MAX_SKB_FRAGS: frags beyond this count as tx_frag_overflow (Linux uses a frag_list).
MAX_SKB_FRAGS = 17
#: Largest frame the TAP can hand over: 64 KiB IP datagram + Ethernet + VLAN header.
MAX_FRAME = 65535 + ETH_HLEN + 4
#: the largest GSO packet a netfront lets its stack hand it (Linux netfront's
#: netif_set_tso_max_size: XEN_NETIF_MAX_TX_SIZE less MAX_TCP_HEADER): tx_request.size is u16
GSO_MAX_SIZE = 0xFFFF - 320
#: pages the largest frame spans (17): an RX frame's buffers, what a TX read is offered
MAX_FRAME_PAGES = -(-MAX_FRAME // PAGE_SIZE)

#: pvnet addition (feature-persistent): set in a gref passed on the ring to say "keep it mapped".
GREF_PERSISTENT = 1 << 31
GREF_MASK = GREF_PERSISTENT - 1


#: pvnet addition: the most persistent grants a backend keeps per ring; one more is fatal for
#: the frontend. At least a recycling pool of twice the ring (2 x 256); pvnet's netfront names
#: at most this many TX payload pages under persistent grants (``frontend/tx/pages.py``).
#: Linux's blkback caps its persistent grants likewise (1056).
MAX_PERSISTENT_GRANTS = 2048

# --- negotiated feature keys (xenbus names) -------------------------------------------------
# netif.h gives each key a direction: what the backend writes says what it accepts on TX (and
# that it can copy on RX); what the frontend writes says what it accepts on RX. A missing key
# means 0 (off).
#: netif.h keys the backend may write and pvnet implements (Linux netback_probe writes these
#: and the NOT_IMPLEMENTED ones). feature-ipv6-csum-offload: it accepts IPv6 csum_blank TX.
BACKEND_KEYS = ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6",
                "feature-ipv6-csum-offload", "feature-rx-copy")
#: netif.h keys a frontend writes, all of them true: what Linux 6.x ``talk_to_netback`` writes
#: (feature-rx-notify: it notifies for RX requests; feature-ipv6-csum-offload: it accepts
#: IPv6 csum_blank RX frames)
FRONTEND_KEYS = ("request-rx-copy", "feature-rx-notify", "feature-sg", "feature-gso-tcpv4",
                 "feature-gso-tcpv6", "feature-ipv6-csum-offload")
#: netif.h keys a frontend may also write, which Linux netback reads: feature-no-csum-offload
#: (it cannot take partial IPv4 checksums on RX; FreeBSD's netfront writes it),
#: request-multicast-control (only meaningful with the backend's feature-multicast-control,
#: which pvnet does not offer: accepted and not in force)
FRONTEND_OPTIONAL = ("feature-no-csum-offload", "request-multicast-control")
#: the backend's most queues (an integer, as Linux netback's ``multi-queue-max-queues``, its
#: xenvif_max_queues) and the frontend's choice (``multi-queue-num-queues``, at most that; a
#: frontend that asks for more is at fault, as Linux's connect() refuses it)
MAX_QUEUES_KEY = "multi-queue-max-queues"
NUM_QUEUES_KEY = "multi-queue-num-queues"
#: with more than one queue each queue's keys live under ``queue-N/`` (netif.h: ring refs and
#: event channel per queue; one queue writes none of them: its rings are the region layout's,
#: its event channel is the handshake's, as today)
QUEUE_KEYS = ("tx-ring-ref", "rx-ring-ref", "event-channel")
#: the most queues a pvnet end serves (both ends: workers, TAP queues, descriptors passed)
MAX_QUEUES = 8


def queue_key(queue: int, key: str) -> str:
    """``queue-N/<key>``, a key of one queue of several (netif.h's xenstore layout)."""
    return f"queue-{queue}/{key}"


#: pvnet's own extensions: used only when the backend offers and the frontend accepts them.
#: feature-rx-by-id: RX responses may complete posted buffers in any order, found by id.
EXTENSIONS = ("feature-header-slots", "feature-persistent", "feature-rx-by-id",
              "feature-staging-grants")
#: staging grants (the key and the pool lists of Oracle UEK's netback, Orabug 26107942; Xen's
#: docs/misc/netif-staging-grants): the frontend names, with its Initialised message, a page
#: listing the grefs the backend is to keep mapped for each ring, and how many there are
STAGING_POOL_KEYS = ("tx-pool-ref", "tx-pool-size", "rx-pool-ref", "rx-pool-size")
#: one list entry (``struct xen_ext_gref_alloc``): grant ref u32, flags u16 (bit 0: read-only),
#: 2 bytes pad; a list is one page: at most 512 entries per ring
EXT_GREF_ALLOC = struct.Struct("<IH2x")
XEN_EXTF_GREF_readonly = 1
MAX_STAGING_GRANTS = PAGE_SIZE // 8
FEATURES = tuple(dict.fromkeys(BACKEND_KEYS + FRONTEND_KEYS + FRONTEND_OPTIONAL + EXTENSIONS))
