"""The netfront's data loop for one queue (``xennet_poll`` and the TX path in one poll loop):
the same whether the netfront's own process serves its one queue or a queue worker serves
one of several (``frontend/queueworker.py``). ``LoopHost`` is what it needs of the end.
"""

from __future__ import annotations

import os
import select
import time
from typing import Protocol

from frontend.rx.queue import RxQueue
from frontend.tx.flow import REAP_INTERVAL
from frontend.tx.queue import TxQueue
from shared.endpoint.lifecycle import Shutdown
from shared.plumbing.channel import ChannelClosed, EventChannel, kick_if
from shared.protocol.ring import FrontRing
from shared.protocol.stats import RingStats

#: poll timeout when idle (ms): also the period of the lost-wake-up check
IDLE_MS = 1000
#: poll timeout (ms) while TX requests are in flight without completion kicks
REAP_MS = max(1, int(REAP_INTERVAL * 1000))
#: the counters the loop keeps
LOOP_COUNTERS = ("sleeps", "polls_busy", "polls_empty", "lost_wakeups")


class LoopHost(Protocol):
    """The end the loop serves: its wake-up pipe, settings, counters."""

    wake_fd: int
    tx_stats: RingStats
    rx_stats: RingStats
    counters: dict[str, int]

    def found_unannounced(self, cfd: int, what: str) -> None: ...


def serve(host: LoopHost, chan: EventChannel, tap_fd: int, tx: TxQueue, rx: RxQueue,
          budget: int, poll_us: int) -> None:
    """The data loop, NAPI-like: a wake-up is followed by polling (ring and TAP, events
    unarmed, so the backend need not kick) until ``poll_us`` pass without work; only then
    are the events armed (RING_FINAL_CHECK: arm, re-check) and the loop sleeps. It never
    sleeps unarmed: a timeout other than 0 is only chosen right after a final check that
    found nothing. Empty polls yield the CPU, so the guest's own tasks run meanwhile."""
    rx.refill()
    push(rx.ring, chan, host.rx_stats)
    poller = select.poll()
    cfd, tfd, wfd = chan.fileno(), tap_fd, host.wake_fd
    poller.register(cfd, select.POLLIN)
    poller.register(wfd, select.POLLIN)
    tap_polled = False
    spin_s = poll_us / 1e6
    txs, rxs = host.tx_stats, host.rx_stats
    counters = host.counters
    clock, yield_cpu = time.monotonic, os.sched_yield
    timeout = 0
    spin_until = 0.0
    while True:
        events = poller.poll(timeout)
        tap_ready = not tap_polled  # not polled: let pump find out (it stops cheaply)
        if events:
            for fd, _ev in events:
                if fd == tfd:
                    tap_ready = True
                elif fd == cfd:
                    backend_says(chan.recv(keep_fds=False).messages)
                elif fd == wfd:
                    raise Shutdown("stop requested")
        elif timeout == IDLE_MS:  # the idle timer, not the backend, woke us
            lost_wakeup(host, cfd, tx, rx)
        reaped = tx.reap()
        sent = tx.pump(budget) if tap_ready else 0
        if sent:
            push(tx.ring, chan, txs)
        got = rx.poll(budget)
        if rx.refill():
            push(rx.ring, chan, rxs)
        busy = sent == budget or got == budget
        want_tap = not tx.stopped
        if want_tap != tap_polled:
            if want_tap:
                poller.register(tfd, select.POLLIN)
            else:
                poller.unregister(tfd)
            tap_polled = want_tap
        if busy:
            timeout = 0
            continue
        if sent or got or reaped:  # work: poll on, events unarmed, for spin_s more
            now = clock()
            spin_until = now + spin_s
            counters["polls_busy"] += 1
            if spin_s:
                timeout = 0
                continue
        elif spin_s and clock() < spin_until:
            counters["polls_empty"] += 1
            yield_cpu()  # nothing yet: let the guest's tasks (the sender) run
            timeout = 0
            continue
        # about to sleep: arm both rings' events and look once more (no lost wake-up)
        if tx.arm_completions() or rx.ring.final_check_for_responses():
            timeout = 0
            continue
        counters["sleeps"] += 1
        # TX completions come without kicks while the queue runs: reap them soon anyway
        timeout = REAP_MS if tx.in_flight() else IDLE_MS


def backend_says(messages: list[dict]) -> None:
    """Messages on a connected channel: only a goodbye means anything."""
    for msg in messages:
        if msg.get("state") in ("Closing", "Closed"):
            raise ChannelClosed(msg.get("error", "backend is closing"))


def lost_wakeup(host: LoopHost, cfd: int, tx: TxQueue, rx: RxQueue) -> None:
    """Responses that no notification announced (rsp_event was armed) mean a lost
    wake-up; the timer saved us, the counter says it had to."""
    waiting = rx.ring.unconsumed_responses()
    if tx.stopped:  # only a stopped queue asked for TX-completion kicks
        waiting += tx.ring.unconsumed_responses()
    if waiting:
        host.found_unannounced(cfd, "responses")


def push(ring: FrontRing, chan: EventChannel, stats: RingStats) -> None:
    kick_if(ring.push_requests(), chan, stats)


def rings_of(stats: tuple[RingStats, RingStats], tx: TxQueue | None,
             rx: RxQueue | None) -> dict[str, dict]:
    """One queue's ``rings`` answer (the device's with one queue): each ring's counters and,
    while connected, its indices and what it holds."""
    rings = {"tx": stats[0].as_dict(), "rx": stats[1].as_dict()}
    if tx is not None:
        rings["tx"].update(tx.ring.indices(), req_prod_pvt=tx.ring.req_prod_pvt,
                           rsp_cons=tx.ring.rsp_cons, slots_in_flight=tx.in_flight(),
                           header_slots_in_use=tx.header_slots_in_use())
    else:
        rings["tx"].update(slots_in_flight=0, header_slots_in_use=0)
    if rx is not None:
        rings["rx"].update(rx.ring.indices(), req_prod_pvt=rx.ring.req_prod_pvt,
                           rsp_cons=rx.ring.rsp_cons, slots_in_flight=0,
                           grants_active=rx.active())
    return rings
