"""Netback TX for a packet that is one header slot: copied, answered and sent on the spot.

At 64-byte frames nearly every packet is a lone header-slot request (``TxRequests.lone_slot``:
no fragment, no extra). Such a packet has no grant for a mechanism to hold, map or copy, no
header to pull (it is all in its head); its partial checksum, if any, is set up from its head's
walk by the full path's rule (``skb.csum_fault``). While no filter and no capture is on, the
core sends it here, without building an sk_buff or calling the mechanism's hooks (unless the
mechanism asks to see such packets: ``TxMechanism.HEAD_ONLY_HOOKS``), and counts it exactly as
the full path would: copied, answered at once (its slot is released as soon as it is copied),
then written to the vif. A frame whose checksum cannot be set up goes the full path, which
drops and counts it.
Only at the start of a ring pass, before any packet of the pass waits for the full path, so
the vif sees the packets in ring order.
"""

from __future__ import annotations

import os

from backend.tx.skb import csum_fault
from shared.protocol.headers import CSUM_OFFSET, HeaderError, NeedMore, walk
from shared.protocol.netif import NETTXF_csum_blank, NETTXF_data_validated
from shared.protocol.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR,
)
from shared.protocol.ring import MASK32

#: the virtio_net_hdr of a frame with no checksum to set up and no GSO, and of a validated one
VNET_NONE = VNET_HDR.pack(0, 0, 0, 0, 0, 0, 0)
VNET_VALID = VNET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0)


class HeadOnly:
    """The head-only send of ``backend.tx.path.TxPath`` (its ring, slots, vif and counters)."""

    def _head_only_ok(self) -> bool:
        """May a lone header-slot packet be sent on the spot (nothing else must see it)?"""
        return self.filter is None and not self.capture.on and not self.mech.HEAD_ONLY_HOOKS

    def _send_head(self, rid: int, start: int, size: int, flags: int) -> bool:
        """Copy the slot's bytes, set up the checksum (csum_blank: from the head's walk),
        answer the slot, write the frame (a failed write is a drop, ``drops_vif``, as in
        ``_write``). False, with nothing done, for a checksum that cannot be set up: the
        full path judges and counts that frame."""
        # copied first: what is judged and sent are bytes the frontend can no longer change
        head = bytes(self.hdr[start:start + size])
        if flags & NETTXF_csum_blank:
            try:
                h = walk(head)
            except (NeedMore, HeaderError):
                return False
            if csum_fault(h, self.csum_v6) is not None:
                return False
            vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, h.l4,
                                 CSUM_OFFSET[h.ip_proto], 0)
        else:
            vnet = VNET_VALID if flags & NETTXF_data_validated else VNET_NONE
        self._slot_copied(rid, size)  # answered at once
        st = self.stats
        st.tx_packets += 1
        st.tx_bytes += size
        try:
            os.writev(self.vif_fd, [vnet, head])
        except OSError as e:  # vif down or queue full: dropped, the slot already answered
            self._count_drop("vif", f"ring[{(self.ring.req_cons - 1) & MASK32}]: vif write "
                             f"failed: {e}")
        return True
