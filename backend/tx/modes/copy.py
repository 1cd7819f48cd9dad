"""``copy``: the payload copied into the backend's own memory, the slots answered at once.

Snabb's position ("just copy"): once the headers are pulled, the CPU copies what is left of
each fragment out of the frontend's pages (through the CPU view: map, copy, unmap) into the
packet's private head, and the packet's slots are answered right away - the frontend gets its
pages back before the vif write. Its grants are never held: each is mapped only for its copy.
"""

from __future__ import annotations

from backend.grants.gntmap import MapError
from backend.tx.modes.base import TxMechanism
from backend.tx.skb import SkBuff


class Copy(TxMechanism):
    def attach(self, skbs: list[SkBuff]) -> None:
        """Nothing to hold: the grants are used once each, right after the header pull."""

    def pulled(self, skbs: list[SkBuff]) -> None:
        gntmap, release = self.gntmap, self.release
        page, cmap, cunmap = gntmap.page, gntmap.map, gntmap.unmap
        copied = 0
        for skb in skbs:
            if not skb.grefs:
                continue
            parts = [skb.head]
            try:
                for gref, frame, off, size in zip(skb.grefs, skb.frames, skb.offs, skb.sizes,
                                                  strict=True):
                    cmap(gref, frame)
                    parts.append(bytes(page(frame)[off:off + size]))
                    cunmap(gref, frame)
                    copied += size
            except MapError as e:  # the kernel refused a map: this packet's loss
                skb.drop = ("map", f"ring[{skb.idx}]: {e}")
                continue
            skb.head = b"".join(parts)
            release.release(skb.ids, skb.extras)
            skb.extras = 0
            skb.grefs, skb.frames, skb.offs, skb.sizes, skb.ids = [], [], [], [], []
        st = self.stats
        st.copy_bytes += copied
        st.cpu_copy_bytes += copied


MECHANISM = Copy
