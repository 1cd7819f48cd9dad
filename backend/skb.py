"""The sk_buff-equivalent: a header copy plus payload fragments attached *unmapped*.

Building one costs a copy of the header bytes and nothing per fragment: a fragment is a
(gref, frame, offset, size) reference into the frontend's pages, its frame resolved once when
it was attached. Handing it to the vif passes those references as iovecs (the device's DMA,
not a CPU map). Only ``payload()`` - something reading the bytes - maps the fragments into the
CPU view (by the attached frame, never the grant entry again), which is lazy mapping
(``backend/txmodes.py``).
``free()`` runs the destructor that releases the fragment slots back to the frontend, whether
the packet was sent, dropped or filtered: that release is the flow control of the TX ring.
"""

from __future__ import annotations

from collections.abc import Callable

from backend.txmodes import payload


class SkBuff:
    """One packet inside netback. Slotted: the TX path builds one per packet."""

    __slots__ = ("size", "head", "grefs", "frames", "offs", "sizes", "ids", "extras",
                 "gso_type", "gso_size", "csum_blank", "data_validated", "mapped", "destructor",
                 "transmitted", "hold_flags", "hdrs", "linear", "idx", "zc")

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
        #: indexes of fragments mapped into the CPU view (unmapped on free)
        self.mapped: list[int] = []
        self.destructor = destructor
        self.transmitted = False
        #: counted in tx_zerocopy_sent: payload bytes were left in the fragments (by reference)
        self.zc = False
        #: the grants' common flags when held with one strided store (-1: held one by one)
        self.hold_flags = -1
        #: the header walk of the pulled head (shared.headers.Headers; None: not IP/malformed)
        self.hdrs = None
        #: the whole frame as a payload rule read it: then this copy is what is sent
        self.linear: bytes | None = None
        #: the ring index of its first request (for the log line of a drop)
        self.idx = -1

    def payload(self, gntmap) -> bytes:
        """The whole packet's bytes through the CPU view: lazy mapping
        (``backend/txmodes.payload``)."""
        return payload(self, gntmap)

    def linearize(self, gntmap) -> bytes:
        """The frame's bytes for a rule to judge, read once; the skb then sends exactly this
        copy, never the live shared pages a concurrent writer could change after the check."""
        if self.linear is None:
            self.linear = self.payload(gntmap)
        return self.linear

    def free(self) -> None:
        """kfree_skb: run the destructor exactly once."""
        destructor, self.destructor = self.destructor, None
        if destructor is not None:
            destructor(self)
