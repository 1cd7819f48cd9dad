"""The header pull (Linux netback's copy of the first bytes into the skb's linear area, and
``skb_checksum_setup``'s pulls, done once): before anything inspects a TX packet, its headers
are copied into a private head, so the filter and the checksum set-up judge bytes the
frontend can no longer change, and those bytes are the ones sent.

At least TX_COPY_LEN bytes (or the whole frame) and on to the end of the L4 header, across
fragments, as far as ``shared.headers.walk`` says (VLAN tags, IPv6 extension headers, IP and
TCP options). The pull is a grant copy (``GntMap.pull``: counted in copy_bytes, never a map)
out of the frames resolved when the fragments were attached; the bytes pulled leave the
fragments (each keeps its slot, maybe empty), so the frame sent is exactly the head followed
by what remains.
"""

from __future__ import annotations

from collections.abc import Callable

from backend.skb import SkBuff
from shared.headers import HeaderError, NeedMore, walk

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
    want = min(size, TX_COPY_LEN)
    while True:
        if len(head) < want:
            if want > HEADER_PULL_MAX:
                return False
            head += _take(skb, want - len(head), pull)
        try:
            skb.hdrs = walk(head)
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
