"""A netback queue worker: one queue of a multi-queue connection, in a process of its own.

After the fork (``shared.endpoint.workers``) the worker builds its queue's paths over its area of
the region (its rings, its header slots, its grants: ``Layout.share``) with the very code a
single-queue netback uses (``backend.conn.build_paths``, the registered mechanisms), serves
them with the same data loop (``backend.loop.serve``) on its own event channel and TAP
queue, and releases them the same way when it stops. ``QueueHost`` is what that loop asks
of "the netback": this queue's counters and device queue, and the carrier, which only the
master can switch (a stalled RX queue is reported to it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend import loop
from backend.conn import FRONTEND_ERRORS, Connection, build_paths, fatal_reason, release
from backend.control import rings_of
from backend.grants.gntmap import Views
from backend.mechanisms import load, own_counters
from shared.endpoint.connection import Endpoint, PeerRestarted
from shared.endpoint.lifecycle import Shutdown
from shared.endpoint.workers import WorkerLink
from shared.faults import kind_of
from shared.plumbing.channel import ChannelClosed
from shared.protocol.stats import RingStats

if TYPE_CHECKING:
    from backend.handshake import Negotiated
    from backend.interface import Netback

log = logging.getLogger("netback")
#: the counters the data loop keeps per queue (and a queue's teardown)
LOOP_COUNTERS = ("lost_wakeups", "spurious_events", "events_deferred", "rx_stalls",
                 "polls_busy", "polls_empty", "slots_abandoned")


@dataclass
class QueueDevice:
    """One queue of the vif: the loop reads and writes ``fd``."""

    fd: int


class QueueHost:
    """What ``backend.loop.serve`` uses of a Netback, for one queue in its worker."""

    listener = None  # newer frontends knock at the master
    found_unannounced = Endpoint.found_unannounced

    def __init__(self, nb: Netback, queue: int, link: WorkerLink) -> None:
        self.cfg, self.log = nb.cfg, nb.log
        self.name = f"{nb.name} queue {queue}"
        self.vif = QueueDevice(nb.vif.fds[queue])
        self.link = link
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.tx_stats, self.rx_stats = RingStats(), RingStats()
        self.tx_own = own_counters(load("tx", nb.cfg.tx_mode))
        self.rx_own = own_counters(load("rx", nb.cfg.rx_mode))
        self.counters = dict.fromkeys(LOOP_COUNTERS, 0)
        self.filter = nb.filter  # this process's copy: its hits are this queue's
        #: this queue's RX is not stalled (the vif's carrier is the master's)
        self.carrier = True

    def set_carrier(self, on: bool) -> None:
        self.carrier = on
        self.link.event(stalled=not on)

    def stop(self) -> None:
        """The master asked (or went): the loop raises Shutdown at its next wake-up."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def snapshot(self, conn: Connection) -> dict:
        """This queue's counters (the link's thread, while the loop runs)."""
        return {"pid": os.getpid(), "counters": dict(self.counters),
                "rings": rings_of((self.tx_stats, self.rx_stats), (self.tx_own, self.rx_own),
                                  (conn.tx, conn.rx)),
                "filter_hits": list(self.filter.hits) if self.filter is not None else []}


def run(nb: Netback, neg: Negotiated, queue: int, link: WorkerLink) -> None:
    """Serve queue ``queue`` of the connection ``neg`` until stopped or a fault."""
    keys = neg.queues[queue]
    region = neg.region
    area = region.queue(region.layout.share(queue, len(neg.queues)), keys.tx_ring_ref,
                        keys.rx_ring_ref)
    host = QueueHost(nb, queue, link)
    views = Views(neg.fd, neg.dma_mem, region, host.tx_stats, shared=True)
    tx, rx, gntmaps = build_paths(area, views, nb.path_config(host.vif.fd, neg.agreement),
                                  (host.tx_stats, host.rx_stats), (host.tx_own, host.rx_own))
    conn = Connection(neg.channels[queue], area, tx, rx, gntmaps, views, neg.name,
                      neg.features)
    link.serve(lambda: host.snapshot(conn), host.stop)
    try:
        loop.serve(host, conn)
    finally:
        release(conn, host.tx_stats, host.counters)


def describe(e: BaseException) -> dict | None:
    """What ended a worker, for its master (None: it was asked to stop)."""
    if isinstance(e, Shutdown):
        return None
    if isinstance(e, ChannelClosed):
        return {"kind": "gone", "message": str(e)}
    if isinstance(e, PeerRestarted):  # a hello belongs on the handshake's channel
        return {"kind": "peer", "reason": "channel", "type": "ChannelError",
                "message": "a hello on a queue's event channel"}
    if isinstance(e, FRONTEND_ERRORS):
        return {"kind": "peer", "reason": fatal_reason(e), "type": type(e).__name__,
                "message": str(e)}
    log.error("queue worker %d: internal error", os.getpid(), exc_info=e)
    return {"kind": kind_of(e), "type": type(e).__name__, "message": str(e)}
