"""What both ends' masters do alike with a multi-queue connection's workers
(``shared.endpoint.workers``): watch the connection while the workers serve, turn a worker that
ended unasked into the error that ends the connection, and keep each queue's counters - its totals
over the connections that ended, plus its worker's live ones - and the device's sum.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from typing import NoReturn, Protocol

from shared.endpoint.lifecycle import Shutdown
from shared.endpoint.workers import Worker, WorkerDied, WorkerPool
from shared.plumbing.channel import ChannelClosed, EventChannel
from shared.protocol.stats import add_counts, ended_totals, fold_into


class Listener(Protocol):
    """A backend's event listener, as the master's watch uses it."""

    def fileno(self) -> int: ...

    def refuse(self) -> bool: ...


def watch(chan: EventChannel, wake_fd: int, pool: WorkerPool,
          says: Callable[[list[dict]], None], ended: Callable[[Worker], BaseException],
          listener: Listener | None = None, backoff: float = 0.1) -> NoReturn:
    """The master's loop while its workers serve: the peer's messages on the handshake
    channel (``says`` raises to end the connection), a stop (Shutdown), a worker that ended
    (``ended`` turns it into the error to raise) and, at a backend, newer frontends knocking
    (refused; the listener rests ``backoff`` seconds when accept fails)."""
    poller = select.poll()
    cfd, efd = chan.fileno(), pool.event_fd
    lfd = listener.fileno() if listener is not None else -1
    for fd in (cfd, wake_fd, efd) if lfd < 0 else (cfd, wake_fd, efd, lfd):
        poller.register(fd, select.POLLIN)
    listen_at = 0.0
    while True:
        for fd, _ev in poller.poll(int(backoff * 1000) if listen_at else None):
            if fd == cfd:
                says(chan.recv(keep_fds=False).messages)
            elif fd == wake_fd:
                raise Shutdown("stop requested")
            elif fd == efd:
                worker = pool.failed()
                if worker is not None:
                    raise ended(worker)
            elif fd == lfd and not listener.refuse():
                poller.unregister(lfd)
                listen_at = time.monotonic() + backoff
        if listen_at and time.monotonic() >= listen_at:
            poller.register(lfd, select.POLLIN)
            listen_at = 0.0


def ended_error(w: Worker, peer: Callable[[str, str], BaseException],
                own: Callable[[str], BaseException]) -> BaseException:
    """What ends the connection when worker ``w`` ended unasked: the peer left (it closed
    the queue's channel), a fault of the peer's (``peer(message, reason)``), one of ours
    (``own(message)``), or, with nothing reported, WorkerDied (killed, crashed)."""
    f = w.fault
    if f is None:
        return WorkerDied(w.why())
    if f.get("kind") == "gone":
        return ChannelClosed(f"queue {w.index}: {f.get('message', '')}")
    message = f"queue {w.index}: {f.get('type', '?')}: {f.get('message', '')}"
    if f.get("kind") == "peer":
        return peer(message, str(f.get("reason", "")))
    return own(message)


class QueueTotals:
    """Each queue's counters over the connections that ended (``fold``), and the answer to
    ``stats`` with the live ones merged in (``merged``)."""

    def __init__(self) -> None:
        self.totals: list[dict] = []

    def queue(self, q: int) -> dict:
        while len(self.totals) <= q:
            self.totals.append({"rings": {"tx": {}, "rx": {}}, "counters": {}})
        return self.totals[q]

    def fold(self, w: Worker, rings: dict[str, tuple[object, ...]],
             counters: dict[str, int]) -> dict:
        """Worker ``w`` ended: its last report's counts (``ended_totals``: no levels, no
        positions) go into its queue's totals and into the end's own counters - each
        ring's into the objects ``rings[ring]`` (a RingStats, a mechanism's counters), the
        rest into ``counters`` (known keys only). Slots a killed worker left in flight
        count as ``slots_abandoned`` where the end counts that. Returns the report."""
        rep = w.report or {}
        live = rep.get("rings") or {}
        tot = self.queue(w.index)
        tx = live.get("tx") or {}
        lost = max(tx.get("slots_consumed", 0) - tx.get("slots_released", 0), 0)
        for name, into in rings.items():
            ended = ended_totals(live.get(name) or {})
            for obj in into:
                fold_into(obj, ended)
            add_counts(tot["rings"][name], ended)
        counts = dict(rep.get("counters") or {})
        if "slots_abandoned" in counters:
            counts["slots_abandoned"] = counts.get("slots_abandoned", 0) + lost
        for k, v in counts.items():
            if k in counters and isinstance(v, int):
                counters[k] += v
        add_counts(tot["counters"], counts)
        return rep

    def merged(self, reports: list[dict | None], rings: dict[str, dict],
               counters: dict) -> list[dict]:
        """Each queue's counters (totals plus its worker's live report, positions kept),
        and the live counts added to the device's ``rings`` and ``counters`` (its sum)."""
        queues = []
        for q in range(max(len(self.totals), len(reports))):
            tot = self.queue(q)
            live = (reports[q] if q < len(reports) else None) or {}
            mine = {}
            for r in ("tx", "rx"):
                now = (live.get("rings") or {}).get(r) or {}
                mine[r] = add_counts(dict(now), tot["rings"][r])
                add_counts(rings[r], now)
            add_counts(counters, live.get("counters") or {})
            queues.append({"queue": q, "pid": live.get("pid"), "rings": mine,
                           "counters": add_counts(dict(live.get("counters") or {}),
                                                  tot["counters"])})
        return queues


def pids(pool: WorkerPool | None) -> list[int]:
    """The processes of an end: itself and its live workers (the bench adds their CPU)."""
    return [os.getpid(), *(pool.pids if pool is not None else ())]
