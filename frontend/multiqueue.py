"""A netfront's connections with several queues (Linux: ``netfront_queue`` per queue, each
with its own NAPI instance): one worker process per queue, forked once the handshake has
laid out the region (``shared.endpoint.workers``); the guest's TAP is multi-queue, so the guest
kernel spreads its flows over the queues. The netfront's own process (the master) keeps the
handshake channel and the control socket and watches; when a worker ends on a fault or is
killed, the device goes down and reconnects, as when the backend fails.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from frontend import queueworker
from frontend.faults import BackendError
from frontend.loop import backend_says
from shared.endpoint.queueset import QueueTotals, ended_error, pids, watch
from shared.endpoint.workers import Worker, WorkerCrashed, WorkerPool
from shared.plumbing.channel import EventChannel
from shared.protocol.region import Region

if TYPE_CHECKING:
    from frontend.handshake import Laid, Offer
    from frontend.netfront import Netfront


@dataclass
class MultiConnection:
    """What the master holds of a connection with several queues."""

    chan: EventChannel
    region: Region
    pool: WorkerPool


class Queues:
    """The queues of one netfront: the current connection's workers, each queue's totals."""

    def __init__(self, nf: Netfront) -> None:
        self.nf = nf
        self.pool: WorkerPool | None = None
        self.totals = QueueTotals()

    def attach(self, chan: EventChannel, offer: Offer, chosen: dict[str, object],
               laid: Laid) -> MultiConnection:
        nf = self.nf
        pool = WorkerPool(nf.name)
        try:
            pool.start(laid.queues, functools.partial(queueworker.run, nf, offer, chosen, laid),
                       lambda q: (nf.tap.fds[q], laid.channels[q].fileno()),
                       queueworker.describe)
        except BaseException:
            pool.stop()
            raise
        finally:
            laid.close_channels()  # the workers' now
        self.pool = pool
        for q in range(laid.queues):
            self.totals.queue(q)
        return MultiConnection(chan, laid.region, pool)

    def serve(self, conn: MultiConnection) -> None:
        watch(conn.chan, self.nf.wake_fd, conn.pool, backend_says, error_of)

    def detach(self, conn: MultiConnection) -> None:
        """Stop and reap every worker, keep what they counted, release the region."""
        nf = self.nf
        self.pool = None
        try:
            for w in conn.pool.stop():
                self.totals.fold(w, {"tx": (nf.tx_stats,), "rx": (nf.rx_stats,)},
                                 nf.counters)
        finally:
            conn.region.close()

    def stats(self, rings: dict, counters: dict) -> dict:
        pool = self.pool
        reports = pool.snapshot() if pool is not None else []
        return {"queues": self.totals.merged(reports, rings, counters), "pids": pids(pool)}


def error_of(w: Worker) -> BaseException:
    return ended_error(w, lambda message, _reason: BackendError(message), WorkerCrashed)
