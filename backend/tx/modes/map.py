"""``map``: every fragment grant-mapped when it is attached (classic netback).

Before Linux 3.x's grant copy of the header and the zerocopy work, netback mapped each TX
slot's page into its own address space (GNTTABOP_map_grant_ref) and unmapped it when the packet
was freed (a TLB flush). Here each map is a real ``mmap`` of the page into the CPU view and its
unmap a real ``munmap`` (``backend/grants/cpuview.py``); the vif write still reads the pages through
the DMA view, as a NIC would DMA from the mapped pages.
"""

from __future__ import annotations

from backend.tx.modes.base import TxMechanism
from backend.tx.skb import SkBuff


class Map(TxMechanism):
    def attach(self, skbs: list[SkBuff]) -> None:
        super().attach(skbs)
        gntmap = self.gntmap
        for skb in skbs:
            skb.map_frags(gntmap, range(len(skb.grefs)))


MECHANISM = Map
