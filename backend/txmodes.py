"""How a TX packet's payload fragments reach netback's CPU, by mode; lazy mapping lives here.

- ``lazy``: fragments are attached *unmapped*: the vif write passes them as iovecs (the
  device's DMA, no CPU map), and a page is mapped only when something reads the bytes
  (``payload``: a payload filter, a capture past the header) - once, until the packet is freed
  (``grant_maps_on_touch``; the others count in ``grant_maps_avoided``).
- ``map``: every fragment is mapped at attach (Linux's grant map per slot).
- ``copy``: what the header pull left is copied through the CPU view (map, copy, unmap) and
  the slots are released at once; the packet keeps no fragment.

In every mode but copy the fragments' grants are held (GTF_reading, ``backend/txgrants.py``)
from attach until the packet is freed (``TxFrags.free``, its destructor): then what was mapped
is unmapped, the grants released and the slots handed to ``backend/txrelease.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.txrelease import TxRelease
from shared.netif import MAX_SKB_FRAGS
from shared.stats import RingStats

if TYPE_CHECKING:
    from backend.gntmap import GntMap
    from backend.skb import SkBuff

TX_MODES = ("lazy", "map", "copy")
#: SkBuff.hold_flags of fragments attached but not held (copy mode, before the copy)
NOT_HELD = -2


def payload(skb: SkBuff, gntmap: GntMap) -> bytes:
    """The whole packet's bytes, read through the CPU view; maps every fragment not mapped
    yet (lazily, once: it stays mapped until the skb is freed)."""
    parts = [skb.head]
    mapped = skb.mapped
    for i, (gref, frame, off, size) in enumerate(zip(skb.grefs, skb.frames, skb.offs,
                                                     skb.sizes, strict=True)):
        if i not in mapped:
            gntmap.map(gref, frame, touch=True)
            mapped.append(i)
        parts.append(bytes(gntmap.page(frame)[off:off + size]))
    return b"".join(parts)


class TxFrags:
    """The fragments of one TX ring's packets, in one mode."""

    def __init__(self, gntmap: GntMap, stats: RingStats, mode: str,
                 release: TxRelease) -> None:
        if mode not in TX_MODES:
            raise ValueError(f"tx mode {mode!r}: must be one of {', '.join(TX_MODES)}")
        self.gntmap = gntmap
        self.stats = stats
        self.mode = mode
        self.release = release

    def attach(self, skb: SkBuff, grefs: list[int], offs: list[int], ids: list[int],
               sizes: list[int]) -> None:
        """Resolve the fragments' grants (once) and attach them to ``skb``: held, and mapped
        in map mode; in copy mode neither (``copy_rest`` copies them after the header pull)."""
        gntmap, st = self.gntmap, self.stats
        n = len(grefs)
        st.tx_frags += n
        if n > MAX_SKB_FRAGS:
            st.tx_frag_overflow += 1
        frames, flags0 = gntmap.tx.resolve(grefs)
        if self.mode == "copy":  # copied by ``copy_rest`` once the header pull is done
            skb.grefs, skb.frames, skb.offs, skb.sizes = grefs, frames, offs, sizes
            skb.ids = ids
            skb.hold_flags = NOT_HELD
            return
        skb.hold_flags = gntmap.tx.hold(grefs, frames, flags0)  # GTF_reading until freed
        skb.grefs, skb.frames, skb.offs, skb.sizes, skb.ids = grefs, frames, offs, sizes, ids
        if self.mode == "map":
            for i, (gref, frame) in enumerate(zip(grefs, frames, strict=True)):
                gntmap.map(gref, frame)
                skb.mapped.append(i)  # one by one: a refused map leaves the rest to free

    def copy_rest(self, skb: SkBuff) -> None:
        """Copy mode: the CPU copies what the header pull left (map, copy through the CPU
        view, unmap) and the slots are released at once; the skb keeps no fragment."""
        gntmap = self.gntmap
        parts = [skb.head]
        for gref, frame, off, size in zip(skb.grefs, skb.frames, skb.offs, skb.sizes,
                                          strict=True):
            gntmap.map(gref, frame)
            parts.append(bytes(gntmap.page(frame)[off:off + size]))
            gntmap.unmap(gref, frame)
        self.stats.copy_bytes += sum(skb.sizes)
        skb.head = b"".join(parts)
        self.release.release(skb.ids, skb.extras)
        skb.extras = 0
        skb.grefs, skb.frames, skb.offs, skb.sizes, skb.ids = [], [], [], [], []

    def free(self, skb: SkBuff) -> None:
        """The skb destructor: unmap what was mapped, release the grants' in-use bits
        (nothing reads them any more), hand the slots to the release queue."""
        n = len(skb.grefs)
        if n and skb.hold_flags != NOT_HELD:
            st, gntmap = self.stats, self.gntmap
            if skb.mapped:
                grefs, frames = skb.grefs, skb.frames
                for i in skb.mapped:
                    gntmap.unmap(grefs[i], frames[i])
            gntmap.tx.release(skb.grefs, skb.hold_flags)
            touched = len(skb.mapped)
            if self.mode == "lazy":
                st.grant_maps_avoided += n - touched
            if skb.zc:  # handed over by reference (not dropped first, not all in the head)
                if skb.linear is not None or (touched and self.mode == "lazy"):
                    st.tx_zerocopy_fail += 1  # the payload was read (and its copy sent)
                else:
                    st.tx_zerocopy_success += 1
        self.release.release(skb.ids, skb.extras)
