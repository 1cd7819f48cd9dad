"""A netfront queue worker: one queue of a multi-queue connection, in a process of its own.

After the fork (``shared.endpoint.workers``) the worker builds its queue's TX and RX queues over its
area of the region (its rings, header slots, payload pages and grant references:
``Layout.share``) with the grant policy in force, serves them with the netfront's data loop
(``frontend/loop.py``) on its own event channel and TAP queue, and answers its master's
questions (counters) and stop from its link's thread.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from frontend import loop
from frontend.faults import BACKEND_FAULTS
from frontend.rx.queue import RX_BUFFERS, RxQueue
from frontend.tx.queue import TxQueue
from shared.endpoint.connection import Endpoint
from shared.endpoint.lifecycle import Shutdown
from shared.endpoint.workers import WorkerLink
from shared.faults import kind_of
from shared.plumbing.channel import ChannelClosed
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import Agreement

if TYPE_CHECKING:
    from frontend.handshake import Laid, Offer
    from frontend.netfront import Netfront

log = logging.getLogger("netfront")


class QueueHost:
    """What ``frontend.loop.serve`` uses of a Netfront, for one queue in its worker."""

    found_unannounced = Endpoint.found_unannounced

    def __init__(self, nf: Netfront, queue: int) -> None:
        self.log, self.name = nf.log, f"{nf.name} queue {queue}"
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.tx_stats, self.rx_stats = RingStats(), RingStats()
        self.counters = dict.fromkeys(loop.LOOP_COUNTERS, 0)

    def stop(self) -> None:
        """The master asked (or went): the loop raises Shutdown at its next wake-up."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass


def run(nf: Netfront, offer: Offer, chosen: dict[str, object], laid: Laid, queue: int,
        link: WorkerLink) -> None:
    """Serve queue ``queue`` of a connection until stopped or a fault."""
    region = laid.region
    lay = region.layout
    area = region.queue(lay.share(queue, laid.queues), *lay.queue_rings(queue))
    ag = Agreement.of(offer.features, chosen)
    host = QueueHost(nf, queue)
    fd = nf.tap.fds[queue]
    # this queue's own policies, over its refs (a recycling pool per ring, as one queue has)
    rx = RxQueue(area, fd, host.rx_stats, nf.policy(chosen, region, host.rx_stats),
                 offer.backend_domid, ag)
    tx = TxQueue(area, fd, host.tx_stats, area.payload.start + RX_BUFFERS, ag.header_slots,
                 nf.policy(chosen, region, host.tx_stats), offer.backend_domid, ag)
    stats = (host.tx_stats, host.rx_stats)
    link.serve(lambda: {"pid": os.getpid(), "counters": dict(host.counters),
                        "rings": loop.rings_of(stats, tx, rx)}, host.stop)
    try:
        loop.serve(host, laid.channels[queue], fd, tx, rx, nf.cfg.budget, nf.cfg.poll_us)
    finally:  # unanswered requests go with the ring (the backend's)
        host.tx_stats.slots_released += tx.in_flight()


def describe(e: BaseException) -> dict | None:
    """What ended a worker, for its master (None: it was asked to stop)."""
    if isinstance(e, Shutdown):
        return None
    if isinstance(e, ChannelClosed):
        return {"kind": "gone", "message": str(e)}
    if isinstance(e, BACKEND_FAULTS):
        return {"kind": "peer", "type": type(e).__name__, "message": str(e)}
    log.error("queue worker %d: internal error", os.getpid(), exc_info=e)
    return {"kind": kind_of(e), "type": type(e).__name__, "message": str(e)}
