"""A netback's connections with several queues (Linux: ``xenvif_queue`` per queue, each with
its own NAPI instance and kthread): one worker process per queue, forked once the handshake
has mapped the region (``shared.endpoint.workers``), each serving its queue's rings, grants and TAP
queue exactly as a single-queue netback serves its one (``backend/queueworker.py``).

The netback's own process (the master) keeps the handshake channel, the event listener and
the control socket. Its loop only watches: a goodbye or a new hello from the frontend, a stop,
a newer frontend knocking, and the workers - when one ends on a fault (the frontend's, ours,
or a kill), the whole vif is disconnected, as Linux takes the vif down whichever queue failed,
and every worker is stopped and reaped before the region is unmapped. Counters: each queue's
own (from its worker, live) and the vif's, their sum; what ended queues counted is kept in
both, so totals survive connections as a single queue's do.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend import queueworker
from backend.conn import QueueFault
from backend.listener import ACCEPT_BACKOFF
from backend.loop import frontend_says
from shared.endpoint.queueset import QueueTotals, ended_error, pids, watch
from shared.endpoint.workers import Worker, WorkerCrashed, WorkerPool
from shared.plumbing.channel import EventChannel
from shared.protocol.region import Region

if TYPE_CHECKING:
    from backend.handshake import Negotiated
    from backend.interface import Netback


@dataclass
class MultiConnection:
    """What the master holds of a connection with several queues."""

    chan: EventChannel
    region: Region
    dma_mem: mmap.mmap
    fd: int
    shared: bool  # dma_mem is the QEMU placement's region, kept across connections
    pool: WorkerPool
    name: str
    features: dict[str, bool]


class Queues:
    """The queues of one netback: the current connection's workers and each queue's totals
    over the connections that ended."""

    def __init__(self, nb: Netback) -> None:
        self.nb = nb
        self.pool: WorkerPool | None = None
        self.totals = QueueTotals()
        self.stalled: set[int] = set()
        self._lock = threading.Lock()

    # --- the connection's steps ------------------------------------------------------------
    def attach(self, chan: EventChannel, neg: Negotiated) -> MultiConnection:
        nb = self.nb
        pool = WorkerPool(nb.name, on_event=self._event)
        try:
            pool.start(len(neg.queues), functools.partial(queueworker.run, nb, neg),
                       lambda q: (neg.fd, nb.vif.fds[q], neg.channels[q].fileno()),
                       queueworker.describe)
        except BaseException:
            pool.stop()
            raise
        finally:
            for c in neg.channels:  # the workers' now: a dead worker's channel closes with it
                c.close()
        with self._lock:
            self.pool = pool
            self.stalled.clear()
        for q in range(len(neg.queues)):
            self.totals.queue(q)
        return MultiConnection(chan, neg.region, neg.dma_mem, neg.fd,
                               neg.dma_mem is nb.shared_region, pool, neg.name, neg.features)

    def serve(self, conn: MultiConnection) -> None:
        """The master's loop while the workers serve: it ends only by an exception (the
        frontend's goodbye or new hello, a stop, a worker that ended)."""
        watch(conn.chan, self.nb.wake_fd, conn.pool, frontend_says, error_of,
              self.nb.listener, ACCEPT_BACKOFF)

    def detach(self, conn: MultiConnection) -> None:
        """Stop and reap every worker (each releases its queue: answers, unmaps, clears its
        in-use bits), keep what they counted, then unmap the region. Never raises."""
        nb = self.nb
        with self._lock:
            self.pool = None
            self.stalled.clear()
        try:
            for w in conn.pool.stop():
                rep = self.totals.fold(w, {"tx": (nb.tx_stats, nb.tx_own),
                                           "rx": (nb.rx_stats, nb.rx_own)}, nb.counters)
                if nb.filter is not None:
                    for i, h in enumerate(rep.get("filter_hits") or ()):
                        nb.filter.hits[i] += h
        finally:
            conn.region.close()
            if not conn.shared:
                try:
                    conn.dma_mem.close()
                except BufferError:  # a view still referenced: unmapped when collected
                    pass
            os.close(conn.fd)

    # --- counters ----------------------------------------------------------------------------
    def stats(self, rings: dict, counters: dict) -> dict:
        """The ``stats`` answer's multi-queue part: each queue's counters under ``queues``;
        the vif's ``rings`` and ``counters`` get the live ones added (control thread)."""
        pool = self.pool
        reports = pool.snapshot() if pool is not None else []
        hits = list(self.nb.filter.hits) if self.nb.filter is not None else []
        for rep in reports:
            for i, h in enumerate((rep or {}).get("filter_hits") or ()):
                hits[i] += h
        return {"queues": self.totals.merged(reports, rings, counters), "pids": pids(pool),
                "filter_hits": hits}

    def _event(self, q: int, what: dict) -> None:
        """A worker's news (its reader thread): a queue's RX stalled or resumed. The carrier
        is off while any queue is stalled, as Linux counts ``stalled_queues``."""
        if "stalled" not in what:
            return
        with self._lock:
            if self.pool is None:
                return  # the connection is ending: its carrier is the session's
            (self.stalled.add if what["stalled"] else self.stalled.discard)(q)
            self.nb.set_carrier(not self.stalled)


def error_of(w: Worker) -> BaseException:
    """What ends the connection when worker ``w`` ended unasked (the frontend's fault is
    booked under the reason the worker found)."""
    return ended_error(w, QueueFault, WorkerCrashed)
