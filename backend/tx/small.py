"""Netback TX for a packet that is one header slot: copied, answered and sent on the spot.

At 64-byte frames nearly every packet is a lone header-slot request (``TxRequests.lone_slot``:
no fragment, no extra). Such a packet has no grant for a mechanism to hold, map or copy, no
header to pull (it is all in its head) and, without a partial checksum, no checksum to set up.
While no filter and no capture is on, the core sends it here, without building an sk_buff or
calling the mechanism's hooks (unless the mechanism asks to see such packets:
``TxMechanism.HEAD_ONLY_HOOKS``), and counts it exactly as the full path would: copied,
answered at once (its slot is released as soon as it is copied), then written to the vif.
Only at the start of a ring pass, before any packet of the pass waits for the full path, so
the vif sees the packets in ring order.
"""

from __future__ import annotations

import os

from shared.protocol.netif import XEN_NETIF_RSP_OKAY, NETTXF_csum_blank, NETTXF_data_validated
from shared.protocol.offload import VIRTIO_NET_HDR_F_DATA_VALID, VNET_HDR
from shared.protocol.ring import MASK32

#: the virtio_net_hdr of a frame with no checksum to set up and no GSO, and of a validated one
VNET_NONE = VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
VNET_VALID = VNET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0)


class HeadOnly:
    """The head-only send of ``backend.tx.path.TxPath`` (its ring, slots, vif and counters)."""

    def _head_only_ok(self, flags: int) -> bool:
        """May a lone header-slot packet with these request flags be sent on the spot?"""
        return (not flags & NETTXF_csum_blank and self.filter is None
                and not self.capture.on and not self.mech.HEAD_ONLY_HOOKS)

    def _send_head(self, rid: int, start: int, size: int, flags: int) -> None:
        """Copy the slot's bytes, answer the slot, write the frame (a failed write is a
        drop, ``drops_vif``, as in ``_write``)."""
        head = bytes(self.hdr[start:start + size])
        self.release.respond(rid, XEN_NETIF_RSP_OKAY, 0)
        st = self.stats
        st.copy_bytes += size
        st.tx_header_slot_packets += 1
        st.tx_packets += 1
        st.tx_bytes += size
        try:
            os.writev(self.vif_fd, [VNET_VALID if flags & NETTXF_data_validated else VNET_NONE,
                                    head])
        except OSError as e:  # vif down or queue full: dropped, the slot already answered
            self._count_drop("vif", f"ring[{(self.ring.req_cons - 1) & MASK32}]: vif write "
                             f"failed: {e}")
