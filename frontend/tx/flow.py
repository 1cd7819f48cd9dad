"""TX flow control and slot release on the frontend: stop when short, reap, restart.

A packet needs ring slots (up to MAX_SLOTS_PER_PACKET + 1 besides its extra), a header slot and
free payload pages for the largest frame. When any of them runs short the queue *stops* (the
pump stops reading the TAP) and restarts as responses release them (``reap``): a header slot's
answer frees the slot, a page's answer the page (revoking its grant). The backend answers a
slot only when its packet is freed (``backend/tx/release.py``), so this is where its pace reaches
the guest (docs/protocol.md: TX slot release and flow control). Every response is checked: an
id not in flight is a lie (``BackendError``).

Completions without kicks: like virtio-net's TX, a running queue does not ask to be notified of
TX completions (rsp_event is parked); it reaps them whenever it wakes and at least every
REAP_INTERVAL. Only a stopped queue arms rsp_event (``arm_completions``).
"""

from __future__ import annotations

from frontend.faults import BackendError
from frontend.tx.pages import SLOT_ID_BASE, TxPages
from shared.protocol.netif import (
    MAX_SLOTS_PER_PACKET,
    TX_RESPONSE_ID,
    TX_RESPONSE_STATUS,
    XEN_NETIF_RSP_NULL,
    XEN_NETIF_RSP_OKAY,
)
from shared.protocol.ring import MASK32, RSP_EVENT, FrontRing
from shared.protocol.slots import HeaderSlots
from shared.protocol.stats import RingStats

#: seconds between reaps of TX completions while the queue runs without completion kicks
REAP_INTERVAL = 0.005


class TxFlow:
    """Which TX resources are in flight, and whether the queue may send."""

    def __init__(self, ring: FrontRing, slots: HeaderSlots, pages: TxPages,
                 stats: RingStats) -> None:
        self.ring = ring
        self.slots = slots
        self.pages = pages
        self.stats = stats
        self.busy = pages.busy  # ids in flight: a response for any other is a lie
        self.stopped = False
        #: the most requests in flight that still leave room for a packet of the most slots
        #: (its first request and MAX_SLOTS_PER_PACKET follow-ons); beyond it the queue stops
        self.room_needed = ring.size - MAX_SLOTS_PER_PACKET - 1
        self._ids = ring.column("H", TX_RESPONSE_ID)
        self._statuses = ring.column("h", TX_RESPONSE_STATUS)

    def can_send(self) -> bool:
        return (self.ring.free_requests() >= MAX_SLOTS_PER_PACKET + 1
                and self.pages.can_read() and bool(self.slots.free))

    def stop(self) -> None:
        """The pump found the ring, the header slots or the payload pages short."""
        if not self.stopped:
            self.stopped = True
            self.stats.queue_stops += 1

    def reap(self) -> int:
        """Consume responses: release header slots, pages (revoking their grants) and ids."""
        ring, pages = self.ring, self.pages
        busy = self.busy
        free_slots = self.slots.free
        st = self.stats
        done = 0
        while True:
            n = ring.unconsumed_responses()
            if not n:
                return done
            cons = ring.rsp_cons
            pos = cons & ring.mask
            first = min(n, ring.size - pos)  # the responses up to the wrap, then the rest
            ids = self._ids[pos:pos + first].tolist()
            sts = self._statuses[pos:pos + first].tolist()
            if first < n:
                ids += self._ids[:n - first].tolist()
                sts += self._statuses[:n - first].tolist()
            freed = []
            for rid, status in zip(ids, sts, strict=True):
                if status == XEN_NETIF_RSP_NULL:
                    continue
                if not busy[rid]:
                    raise BackendError(f"tx response for id {rid} that is not in flight")
                busy[rid] = 0
                if rid >= SLOT_ID_BASE:
                    free_slots.append(rid - SLOT_ID_BASE)
                else:
                    freed.append(rid)
                if status != XEN_NETIF_RSP_OKAY:
                    st.drops += 1
                done += 1
            if freed:
                pages.release(freed)
            ring.rsp_cons = (cons + n) & MASK32
            st.slots_released += n
            if self.stopped and self.can_send():
                self.stopped = False

    def arm_completions(self) -> bool:
        """Before sleeping: ask for a TX-completion kick only when the queue is stopped.

        Like virtio-net's TX (no completion interrupts; old buffers are freed on the next
        transmit), a running queue reaps completions whenever it wakes anyway; a wake-up per
        completion batch is what costs most in a guest. So rsp_event is parked half the index
        space away unless the queue is stopped, when it is armed as RING_FINAL_CHECK does.
        The loop's idle timeout (``REAP_INTERVAL``) reaps what is left, so at rest nothing
        stays in flight. True if responses are waiting now."""
        ring = self.ring
        if self.stopped:
            return ring.final_check_for_responses()
        ring.idx[RSP_EVENT] = (ring.rsp_cons + 0x80000000) & MASK32
        return ring.unconsumed_responses() > 0

    def in_flight(self) -> int:
        return (self.ring.req_prod_pvt - self.ring.rsp_cons) & MASK32
