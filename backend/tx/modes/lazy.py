"""``lazy``: fragments attached unmapped; a page is mapped only when something reads it.

Santos and Pratt's proposal (xen-devel, 2007): forwarding a packet never needs its payload in
the backend's address space, so the fragments stay unmapped - their grants held - and the vif
write hands them to the device as iovecs through the DMA view. Something that reads the bytes
(a payload filter, a capture past the header copy) maps the pages it reads (``SkBuff.payload``:
``grant_maps_on_touch``); every fragment nobody touched counts in ``grant_maps_avoided``.
"""

from __future__ import annotations

from backend.tx.modes.base import TxMechanism
from backend.tx.skb import SkBuff


class Lazy(TxMechanism):
    def free(self, skbs: list[SkBuff]) -> None:
        self.stats.grant_maps_avoided += sum(len(s.grefs) - s.touched for s in skbs)
        super().free(skbs)


MECHANISM = Lazy
