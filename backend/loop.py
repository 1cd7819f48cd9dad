"""The netback's data loop for one frontend connection (Linux: ``xenvif_poll`` and the
``xenvif_kthread_guest_rx`` thread in one poll loop): service both rings, and per wake-up,
never per packet, keep the slow books: notification storms (lateeoi), RX stalls (carrier),
lost wake-ups.
"""

from __future__ import annotations

import functools
import os
import select
import time
from typing import TYPE_CHECKING

from backend.listener import ACCEPT_BACKOFF
from shared.endpoint.connection import PeerRestarted
from shared.endpoint.lifecycle import Shutdown
from shared.plumbing.channel import ChannelClosed, EventChannel, kick_if
from shared.protocol.ring import RSP_PROD, BackRing
from shared.protocol.stats import RingStats

if TYPE_CHECKING:
    from backend.interface import Connection, Netback

#: consecutive notified wake-ups that find no work before the frontend's events are deferred
SPURIOUS_LIMIT = 16
#: longest deferral of a storming frontend's events (Linux lateeoi backs off up to 1 s)
MAX_EVENT_DELAY = 0.1
#: poll timeout when idle (ms): also the period of the lost-wake-up check
IDLE_MS = 1000
#: how often the RX ring is looked at, while it has no buffers, for a frontend that does not
#: notify for RX requests (no feature-rx-notify: Linux netback's drain_timeout of 30 ms)
RX_POLL_MS = 30


def serve(nb: Netback, conn: Connection) -> None:
    """Service both rings until the frontend goes (ChannelClosed), lies (a PeerFault) or
    starts again (PeerRestarted)."""
    chan, tx, rx = conn.chan, conn.tx, conn.rx
    txr, rxr = tx.ring, rx.ring
    poller = select.poll()
    cfd, vfd, wfd = chan.fileno(), nb.vif.fd, nb.wake_fd
    lfd = nb.listener.fileno() if nb.listener is not None else -1
    for fd in (cfd, wfd) if lfd < 0 else (cfd, wfd, lfd):
        poller.register(fd, select.POLLIN)
    vif_polled = False
    chan_polled = True
    timeout = 0
    budget = nb.cfg.budget
    txs, rxs = nb.tx_stats, nb.rx_stats
    counters = nb.counters
    spurious = 0  # consecutive notified wake-ups that found no work
    resume_at = 0.0  # deferred events: when to listen to the channel again
    listen_at = 0.0  # accept() failed: when to poll the event listener again
    # without feature-rx-notify the RX ring is polled and stall detection is off (Linux)
    rx_notify = conn.features.get("feature-rx-notify") is True
    stall_timeout = nb.cfg.rx_stall_timeout if rx_notify else 0.0
    stall_at = time.monotonic() + stall_timeout  # RX has no buffers yet
    t0 = r0 = 0
    spin_s, spin_until = nb.cfg.poll_us / 1e6, 0.0
    tx_publish = functools.partial(_publish, txr, chan, txs)
    while True:
        events = poller.poll(timeout)
        kicked = False
        if events:
            for fd, _ev in events:
                if fd == cfd:
                    got = chan.recv(keep_fds=False)
                    if got.messages:
                        frontend_says(got.messages)
                    kicked = True
                elif fd == lfd:
                    if not nb.listener.refuse():
                        poller.unregister(lfd)
                        listen_at = time.monotonic() + ACCEPT_BACKOFF
                elif fd == wfd:
                    raise Shutdown("stop requested")
            if kicked:
                t0, r0 = txr.req_cons, rxr.req_cons
        elif timeout and chan_polled:  # the timer, not the peer, woke us
            if txr.unconsumed_requests() or (not vif_polled and rx_notify
                                             and rxr.unconsumed_requests()):
                nb.found_unannounced(cfd, "requests")
        if listen_at and time.monotonic() >= listen_at:
            poller.register(lfd, select.POLLIN)
            listen_at = 0.0
        if not chan_polled and time.monotonic() >= resume_at:  # deferral over
            poller.register(cfd, select.POLLIN)
            chan_polled = True
        tc, rp = txr.req_cons, rxs.rx_packets
        more = tx.action(budget, tx_publish)
        _publish(txr, chan, txs)
        rx_more = rx.action(budget)
        _publish(rxr, chan, rxs)
        wait = tx.credit_wait()  # rate-limited: come back when the next window opens
        polling = False  # NAPI-like: after work, poll on (events unarmed) for spin_s
        if spin_s:
            now = time.monotonic()
            if txr.req_cons != tc or rxs.rx_packets != rp:
                spin_until = now + spin_s
            polling = not (more or rx_more) and now < spin_until
            counters["polls_empty" if polling and txr.req_cons == tc else "polls_busy"] += 1
        if not more and not wait and not polling:
            more = txr.final_check_for_requests()
        can_rx = rx.can_receive()
        if not can_rx and not polling:
            can_rx = rxr.final_check_for_requests() and rx.can_receive()
        if can_rx != vif_polled:
            if can_rx:
                poller.register(vfd, select.POLLIN)
                stall_at = 0.0
                if not nb.carrier:
                    nb.set_carrier(True)
                    nb.log.info("%s: frontend %s posts RX buffers again; carrier on",
                                nb.name, conn.name)
            else:
                poller.unregister(vfd)
                rxs.queue_stops += 1
                stall_at = time.monotonic() + stall_timeout
            vif_polled = can_rx
        timeout = 0 if (more or rx_more or polling) else \
            IDLE_MS if vif_polled or rx_notify else RX_POLL_MS
        if polling:
            os.sched_yield()  # nothing yet: let the others on this core run meanwhile
        if wait:
            timeout = min(timeout, int(wait * 1000) + 1)
        if kicked:
            if txr.req_cons != t0 or rxr.req_cons != r0:
                spurious = 0
            else:  # xen_irq_lateeoi(XEN_EOI_FLAG_SPURIOUS)
                spurious += 1
                counters["spurious_events"] += 1
                if spurious > SPURIOUS_LIMIT and chan_polled:
                    delay = min(0.001 * (spurious - SPURIOUS_LIMIT), MAX_EVENT_DELAY)
                    poller.unregister(cfd)
                    chan_polled = False
                    resume_at = time.monotonic() + delay
                    if not counters["events_deferred"]:
                        nb.log.warning("%s: notification storm from frontend %s: deferring "
                                       "its events", nb.name, conn.name)
                    counters["events_deferred"] += 1
        if not chan_polled:
            timeout = min(timeout, max(1, int((resume_at - time.monotonic()) * 1000) + 1))
        if listen_at:
            timeout = min(timeout, max(1, int((listen_at - time.monotonic()) * 1000) + 1))
        if not vif_polled and stall_at and stall_timeout > 0:
            left = stall_at - time.monotonic()
            if left <= 0:
                stall_at = 0.0
                if nb.carrier:
                    nb.set_carrier(False)
                    counters["rx_stalls"] += 1
                    nb.log.warning("%s: frontend %s posted no RX buffers for %gs; carrier "
                                   "off", nb.name, conn.name, stall_timeout)
            else:
                timeout = min(timeout, int(left * 1000) + 1)


def frontend_says(messages: list[dict]) -> None:
    """Control messages while connected: a goodbye, or a hello from a restarted frontend."""
    for msg in messages:
        state = msg.get("state")
        if state in ("Closing", "Closed"):
            raise ChannelClosed("frontend is closing")
        if state == "Initialising":
            raise PeerRestarted(msg)


def _publish(ring: BackRing, chan: EventChannel, stats: RingStats) -> None:
    """Push new responses; kick the frontend only if its rsp_event asks for it."""
    if ring.rsp_prod_pvt != ring.idx[RSP_PROD]:
        kick_if(ring.push_responses(), chan, stats)
