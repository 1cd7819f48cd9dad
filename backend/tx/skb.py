"""The sk_buff-equivalent: a header copy plus payload fragments attached *unmapped*.

Building one costs a copy of the header bytes and nothing per fragment: a fragment is a
(gref, frame, offset, size) reference into the frontend's pages, its frame resolved once when
it was attached. Handing it to the vif passes those references as iovecs (the device's DMA,
not a CPU map). What a TX mechanism (``backend/tx/modes/``) does with the fragments - hold their
grants, map them, copy them - it records here (``hold_flags``, ``mapped``), so that freeing
the packet undoes exactly that, whatever state it was left in.

``payload()`` is how any backend code reads the bytes: through the CPU view, mapping each
fragment not mapped yet (a map *on touch*, counted in ``touched``). That is lazy mapping's
touch, and it is the same for every mechanism: code that reads bytes must map them.
Freeing the packet (``TxPath``, at the end of its ring pass) releases its fragment slots back
to the frontend, whether it was sent, dropped or filtered: that release is the TX ring's flow
control.

The header pull that fills the head, ``pull_headers``, follows the class.
"""

from __future__ import annotations

from collections.abc import Callable

from backend.grants.gntmap import GntMap, MapError
from shared.protocol.headers import CSUM_OFFSET, ETH_P_IPV6, HeaderError, NeedMore, walk

#: SkBuff.hold_flags of fragments whose grants are not held (copy, or not attached yet)
NOT_HELD = -2
#: SkBuff._hdrs of a head not walked yet (``SkBuff.hdrs`` walks it when asked)
UNWALKED = object()


class SkBuff:
    """One packet inside netback. Slotted: the TX path builds one per packet."""

    __slots__ = ("size", "head", "grefs", "frames", "offs", "sizes", "ids", "extras",
                 "gso_type", "gso_size", "csum_blank", "data_validated", "mapped", "touched",
                 "transmitted", "flags0", "hold_flags", "drop", "_hdrs", "linear", "idx", "zc",
                 "vnet")

    def __init__(self, head: bytes = b"") -> None:
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
        #: indexes of fragments mapped into the CPU view (unmapped when freed)
        self.mapped: list[int] = []
        #: of those, the maps made because something read the bytes (``payload``)
        self.touched = 0
        self.transmitted = False
        #: counted in tx_zerocopy_sent: payload bytes were left in the fragments (by reference)
        self.zc = False
        #: the fragments' grant entries' common flags as resolved (-1: not alike; KEPT: a
        #: persistent grant the ring keeps, nothing to hold)
        self.flags0 = -1
        #: the grants' common flags when held with one strided store, -1 when held one by
        #: one, KEPT when there was nothing to hold, NOT_HELD when not held
        #: (``backend/grants/tx.py``)
        self.hold_flags = NOT_HELD
        #: the header walk of the pulled head (``hdrs``), or UNWALKED until something asks
        self._hdrs: object = None
        #: the whole frame as a payload rule read it: then this copy is what is sent
        self.linear: bytes | None = None
        #: the ring index of its first request (for the log line of a drop)
        self.idx = -1
        #: (reason, log line) once a hook dropped it (``requests.DROP_REASONS``): the core counts
        #: it and frees it with its pass
        self.drop: tuple[str, str] | None = None
        #: its virtio_net_hdr for the vif write (checksum and GSO), set by the checksum set-up
        self.vnet = b""

    @property
    def hdrs(self):
        """The header walk of the head (shared.protocol.headers.Headers; None: not IP, or
        malformed/cut short). A frame wholly in its head needs no walk to be pulled, so its
        walk waits until the checksum set-up or a rule asks: most small frames are never
        walked (the walk was a fifth of a 64-byte frame's TX cost)."""
        h = self._hdrs
        if h is UNWALKED:
            try:
                h = walk(self.head)
            except (NeedMore, HeaderError):
                h = None
            self._hdrs = h
        return h

    def map_frags(self, gntmap: GntMap, which: list[int] | range, touch: bool = False) -> bool:
        """Map fragments ``which`` into the CPU view (those not mapped yet), remembering them
        for ``unmap_frags``. A map the kernel refuses drops the packet (``drop``: the peer's
        grants asked for it): False, and what was mapped stays for ``unmap_frags``."""
        mapped, grefs, frames = self.mapped, self.grefs, self.frames
        for i in which:
            if i not in mapped:
                try:
                    gntmap.map(grefs[i], frames[i], touch=touch)
                except MapError as e:
                    self.drop = ("map", f"ring[{self.idx}]: {e}")
                    return False
                mapped.append(i)
                self.touched += touch
        return True

    def unmap_frags(self, gntmap: GntMap) -> None:
        """Undo every map of this packet's fragments."""
        grefs, frames = self.grefs, self.frames
        for i in self.mapped:
            gntmap.unmap(grefs[i], frames[i])
        self.mapped = []

    def payload(self, gntmap: GntMap) -> bytes:
        """The whole packet's bytes, read through the CPU view; maps every fragment not
        mapped yet (once: it stays mapped until the skb is freed)."""
        if not self.map_frags(gntmap, range(len(self.grefs)), touch=True):
            raise MapError(self.drop[1] if self.drop else "map refused")
        page = gntmap.page
        return b"".join([self.head, *(bytes(page(f)[o:o + n]) for f, o, n in
                                      zip(self.frames, self.offs, self.sizes, strict=True))])

    def linearize(self, gntmap: GntMap) -> bytes:
        """The frame's bytes for a rule to judge, read once; the skb then sends exactly this
        copy, never the live shared pages a concurrent writer could change after the check."""
        if self.linear is None:
            self.linear = self.payload(gntmap)
        return self.linear


# The header pull (Linux netback's copy of the first bytes into the skb's linear area, and
# ``skb_checksum_setup``'s pulls, done once): before anything inspects a TX packet, its headers
# are copied into a private head, so the filter and the checksum set-up judge bytes the
# frontend can no longer change, and those bytes are the ones sent.
#
# At least TX_COPY_LEN bytes (or the whole frame) and on to the end of the L4 header, across
# fragments, as far as ``shared.protocol.headers.walk`` says (VLAN tags, IPv6 extension headers, IP
# and TCP options). The pull is a grant copy (``GntMap.pull``: counted in copy_bytes, never a map)
# out of the frames resolved when the fragments were attached; the bytes pulled leave the
# fragments (each keeps its slot, maybe empty), so the frame sent is exactly the head followed
# by what remains.

#: XEN_NETBACK_TX_COPY_LEN: the least a header pull copies into the private head
TX_COPY_LEN = 128
#: the most the header pull copies: a frame whose headers end later is dropped (drops_headers)
HEADER_PULL_MAX = 512

#: (gref, frame, offset, size) -> the bytes, by a grant copy
Pull = Callable[[int, int, int, int], bytes]


def pull_headers(skb: SkBuff, pull: Pull) -> bool:
    """Pull ``skb``'s headers into ``skb.head``; ``skb.hdrs`` becomes their walk (None: not
    IP, or malformed/cut short). False: the headers do not end within HEADER_PULL_MAX."""
    head, size = skb.head, skb.size
    if len(head) >= size:  # nothing left in the fragments to pull: walked only if asked
        skb._hdrs = UNWALKED
        return True
    want = min(size, TX_COPY_LEN)
    if want == size:  # the least pull takes the whole frame: no walk decides how much
        skb.head = head + _take(skb, size - len(head), pull)
        skb._hdrs = UNWALKED  # walked only if asked (checksum set-up, a filter)
        return True
    while True:
        if len(head) < want:
            if want > HEADER_PULL_MAX:
                return False
            head += _take(skb, want - len(head), pull)
        try:
            skb._hdrs = walk(head)
            break
        except NeedMore as e:
            if len(head) >= size:  # a frame shorter than its own headers
                break
            # at least double what is pulled (up to the limit): a long header chain costs a
            # few walks, not one per extension header
            want = min(max(e.need, min(2 * len(head), HEADER_PULL_MAX)), size)
        except HeaderError:
            break
    skb.head = head
    return True


def _take(skb: SkBuff, n: int, pull: Pull) -> bytes:
    """``n`` bytes off the front of the fragments."""
    parts = []
    grefs, frames, offs, sizes = skb.grefs, skb.frames, skb.offs, skb.sizes
    for i in range(len(sizes)):
        if not n:
            break
        k = min(n, sizes[i])
        if k:
            parts.append(pull(grefs[i], frames[i], offs[i], k))
            offs[i] += k
            sizes[i] -= k
            n -= k
    return b"".join(parts)


def csum_fault(h, csum_v6: bool) -> tuple[str, str] | None:
    """Linux's checksum_setup, judged on a header walk ``h`` (None: not IP or cut short): why
    a csum_blank frame's checksum cannot be set up - (drop reason, what is wrong) - or None,
    when it goes as NEEDS_CSUM from ``h.l4`` at ``CSUM_OFFSET[h.ip_proto]``."""
    if h is None or h.l4 is None or h.fragment or h.ip_proto not in CSUM_OFFSET:
        return ("csum", "csum_blank frame without a TCP/UDP header "
                f"({'fragment' if h and h.fragment else 'not TCP/UDP'})")
    if h.ethertype == ETH_P_IPV6 and not csum_v6:
        return ("not_negotiated", "csum_blank IPv6 frame without feature-ipv6-csum-offload")
    return None
