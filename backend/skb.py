"""The sk_buff-equivalent: a header copy plus payload fragments attached *unmapped*.

Building one costs a copy of the header bytes and nothing per fragment: a fragment is a
(gref, frame, offset, size) reference into the frontend's pages. Handing it to the vif passes
those references as iovecs (the device's DMA, not a CPU map). Only ``payload()`` - something
reading the bytes - maps the fragments, which is lazy mapping. ``free()`` runs the destructor
that releases the fragment slots back to the frontend, whether the packet was sent, dropped or
filtered: that release is the flow control of the TX ring.
"""

from __future__ import annotations

from collections.abc import Callable


class SkBuff:
    """One packet inside netback. Slotted: the TX path builds one per packet."""

    __slots__ = ("size", "head", "grefs", "frames", "offs", "sizes", "ids", "extras",
                 "gso_type", "gso_size", "csum_blank", "data_validated", "mapped", "destructor",
                 "transmitted")

    def __init__(self, head: bytes, destructor: Callable[[SkBuff], None]) -> None:
        self.head = head
        self.size = len(head)
        #: the fragments, as columns (gref, frame, offset, size): attached, not mapped
        self.grefs: list[int] = []
        self.frames: list[int] = []
        self.offs: list[int] = []
        self.sizes: list[int] = []
        #: ring request ids whose slots are released when this skb is freed
        self.ids: list[int] = []
        self.extras = 0
        self.gso_type = 0
        self.gso_size = 0
        self.csum_blank = False
        self.data_validated = False
        #: grefs mapped because something touched the payload (unmapped on free)
        self.mapped: list[int] = []
        self.destructor = destructor
        self.transmitted = False

    def payload(self, gntmap) -> bytes:
        """The whole packet's bytes; maps every fragment (lazily, once) to read them."""
        parts = [self.head]
        for gref, frame, off, size in zip(self.grefs, self.frames, self.offs, self.sizes,
                                          strict=True):
            if gref not in self.mapped:
                self.mapped.append(gref)
                page = gntmap.map(gref)
            else:
                page = gntmap.region.page(frame)
            parts.append(bytes(page[off:off + size]))
        return b"".join(parts)

    def free(self) -> None:
        """kfree_skb: run the destructor exactly once."""
        destructor, self.destructor = self.destructor, None
        if destructor is not None:
            destructor(self)
