"""TX slot release: a packet's slots are answered when its sk_buff-equivalent is freed.

Linux answers a TX slot from the zerocopy callback, when the last user frees the packet
(``xenvif_zerocopy_callback`` -> ``xenvif_idx_release`` -> ``make_tx_response``); until then the
slot stays pending and the frontend cannot reuse it - that is the TX ring's flow control as the
backend sees it (docs/protocol.md: TX slot release and flow control). Here the skb destructor
queues the packet's request ids (``release``) and the action loop answers them in release
order (``flush``); a header slot is answered at once (``respond``), a dropped packet's slots with
errors (``error``). ``pending`` is the table of request ids consumed and not yet answered,
which request validation (``backend/tx/requests.py``) checks against id reuse.
"""

from __future__ import annotations

from array import array

from shared.protocol.netif import (
    RING_SIZE,
    TX_RESPONSE,
    TX_RESPONSE_ID,
    TX_RESPONSE_STATUS,
    XEN_NETIF_RSP_ERROR,
    XEN_NETIF_RSP_NULL,
    XEN_NETIF_RSP_OKAY,
)
from shared.protocol.ring import MASK32, BackRing
from shared.protocol.stats import RingStats

_pack_rsp = TX_RESPONSE.pack_into
_OKAYS = array("h", [XEN_NETIF_RSP_OKAY] * RING_SIZE)


class TxRelease:
    """The answers of one TX ring."""

    def __init__(self, ring: BackRing, stats: RingStats) -> None:
        self.ring = ring
        self.buf = ring.buf
        self.stats = stats
        self.pending = bytearray(1 << 16)  # request id (u16, opaque) -> not yet answered
        self.queued: list[int] = []  # ids released by skb destructors; -1: an extra's NULL
        self._ids = ring.column("H", TX_RESPONSE_ID)
        self._statuses = ring.column("h", TX_RESPONSE_STATUS)

    def release(self, ids: list[int], extras: int) -> None:
        """A packet let its slots go: queue their answers. With extras (a stock first slot
        only) their NULL answers follow the first id."""
        queued = self.queued
        if extras:
            queued.append(ids[0])
            queued.extend([-1] * extras)
            queued.extend(ids[1:])
        else:
            queued.extend(ids)

    def flush(self) -> None:
        """Answer the queued slots in release order. Ids and statuses go onto the ring as two
        strided copies, not a pack per answer."""
        d = self.queued
        if not d:
            return
        ring, pending = self.ring, self.pending
        prod = ring.rsp_prod_pvt
        n = len(d)
        ids_col, sts_col = self._ids, self._statuses
        pos = prod & ring.mask
        first = min(n, ring.size - pos)
        if -1 in d:  # extras' NULL answers (id 0) among them
            ids = array("H", [0 if rid < 0 else rid for rid in d])
            sts = array("h", [XEN_NETIF_RSP_NULL if rid < 0 else XEN_NETIF_RSP_OKAY
                              for rid in d])
            for rid in d:
                if rid >= 0:
                    pending[rid] = 0
        else:
            ids, sts = array("H", d), _OKAYS
            for rid in d:
                pending[rid] = 0
        ids_col[pos:pos + first] = ids[:first]
        sts_col[pos:pos + first] = sts[:first]
        if first < n:
            ids_col[:n - first] = ids[first:n]
            sts_col[:n - first] = sts[first:n]
        ring.rsp_prod_pvt = (prod + n) & MASK32
        self.stats.slots_released += n
        d.clear()

    def respond(self, rid: int, status: int, nulls: int) -> None:
        """make_tx_response now: the answer for ``rid`` then a NULL per extra-info slot."""
        ring, buf = self.ring, self.buf
        prod = ring.rsp_prod_pvt
        _pack_rsp(buf, ring.entry(prod), rid, status)
        for i in range(1, nulls + 1):
            _pack_rsp(buf, ring.entry(prod + i), 0, XEN_NETIF_RSP_NULL)
        ring.rsp_prod_pvt = (prod + 1 + nulls) & MASK32
        self.pending[rid] = 0
        self.stats.slots_released += 1 + nulls

    def error(self, rid: int, fids: list[int], extras: int) -> None:
        """Linux's xenvif_tx_err: answer every slot of a dropped packet with an error."""
        self.respond(rid, XEN_NETIF_RSP_ERROR, extras)
        for fid in fids:
            self.respond(fid, XEN_NETIF_RSP_ERROR, 0)
