"""Multi-queue negotiation, as netif.h and Linux's xen-net{back,front} do it.

The backend offers ``multi-queue-max-queues`` (an integer: how many queues it will serve); the
frontend writes ``multi-queue-num-queues`` (at most that) and, with more than one queue, per
queue ``queue-N/tx-ring-ref``, ``queue-N/rx-ring-ref`` and ``queue-N/event-channel``. With one
queue the frontend writes none of the per-queue keys: its rings are the region layout's and its
event channel is the handshake's (the "flat" keys, as Linux with one queue), so single-queue
and stock peers are unchanged.

What each key means here: a ring ref is the page of the region that holds the ring (pvnet's
stand-in for a granted ring page; it must lie in the layout's ring area), an event channel is
a number the placement resolves (``shared.plumbing.transport``: the Nth descriptor passed with
Initialised in the namespace placement, the virtio-serial port ``<port>-qN`` in QEMU's).

Everything a frontend writes is checked before use; a count beyond the offer, a queue's keys
missing or written for a queue that was not asked for, or values that collide are the
frontend's fault (``QueueError``, counted ``fatal_queues``), as Linux's ``connect()`` refuses
"guest requested %u queues, exceeding the maximum of %u".
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from shared.protocol.netif import MAX_QUEUES, MAX_QUEUES_KEY, NUM_QUEUES_KEY, QUEUE_KEYS, queue_key
from shared.protocol.xenbus import NegotiationError
from shared.text import printable


class QueueError(NegotiationError):
    """The queue keys do not add up: the peer is refused (``fatal_queues``)."""

    reason = "queues"


@dataclass(frozen=True)
class QueueKeys:
    """One queue as negotiated. None: the flat keys (the layout's rings, the handshake's
    channel) of a single queue."""

    index: int
    tx_ring_ref: int | None = None
    rx_ring_ref: int | None = None
    event_channel: int | None = None


FLAT = (QueueKeys(0),)


def is_queue_key(key: str) -> bool:
    return key.startswith("queue-")


def _count(value: object) -> int | None:
    """An integer queue count, or None (a JSON true is not 1)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def offered_max(offered: dict[str, object]) -> int | None:
    """Frontend: the backend's ``multi-queue-max-queues`` (None: not written, one queue).
    A value that is not a count of at least 1 is the backend's fault."""
    if MAX_QUEUES_KEY not in offered:
        return None
    most = _count(offered[MAX_QUEUES_KEY])
    if most is None or most < 1:
        raise NegotiationError(f"backend offers {MAX_QUEUES_KEY} "
                               f"{printable(repr(offered[MAX_QUEUES_KEY]), 32)}: not a queue "
                               "count")
    return most


def frontend_queue_keys(rings: list[tuple[int, int]], channels: list[int]) -> dict[str, int]:
    """The per-queue keys a frontend with ``len(rings)`` > 1 queues writes."""
    out: dict[str, int] = {}
    for q, ((tx, rx), ch) in enumerate(zip(rings, channels, strict=True)):
        out.update({queue_key(q, "tx-ring-ref"): tx, queue_key(q, "rx-ring-ref"): rx,
                    queue_key(q, "event-channel"): ch})
    return out


def check_queues(offered: int, requested: dict[str, object]) -> tuple[QueueKeys, ...]:
    """Backend: the frontend's queue keys against an offer of ``offered`` queues (Linux
    ``connect`` and ``connect_data_rings``). Returns one QueueKeys per queue; raises
    QueueError naming what does not add up."""
    raw = requested.get(NUM_QUEUES_KEY, 1)
    n = _count(raw)
    if n is None or n < 1:
        raise QueueError(f"{NUM_QUEUES_KEY} {printable(repr(raw), 32)}: not a queue count")
    if n > offered:
        raise QueueError(f"{NUM_QUEUES_KEY} {n}: more than the {offered} this backend offers "
                         f"({MAX_QUEUES_KEY})")
    written = {k for k in requested if is_queue_key(k)}
    if n == 1:
        if written:
            raise QueueError(f"{printable(min(written), 40)} written with one queue (one "
                             "queue uses the flat keys)")
        return FLAT
    expected = {queue_key(q, k) for q in range(n) for k in QUEUE_KEYS}
    missing, extra = sorted(expected - written), sorted(written - expected)
    if missing:
        raise QueueError(f"{NUM_QUEUES_KEY} is {n} but {missing[0]} is missing")
    if extra:
        raise QueueError(f"{printable(extra[0], 40)} written but {NUM_QUEUES_KEY} is {n}")
    out = []
    for q in range(n):
        values = []
        for k in QUEUE_KEYS:
            v = _count(requested[queue_key(q, k)])
            if v is None or v < 0:
                raise QueueError(f"{queue_key(q, k)} "
                                 f"{printable(repr(requested[queue_key(q, k)]), 32)}: not a "
                                 "page or channel number")
            values.append(v)
        out.append(QueueKeys(q, *values))
    rings = [r for k in out for r in (k.tx_ring_ref, k.rx_ring_ref)]
    if len(set(rings)) != len(rings):
        raise QueueError("two queues' rings on one page")
    channels = [k.event_channel for k in out]
    if len(set(channels)) != len(channels):
        raise QueueError("two queues on one event channel")
    return tuple(out)


def queue_count(text: str) -> int:
    """A ``--queues`` value (both ends' command lines): 1..MAX_QUEUES."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_QUEUES:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_QUEUES} (got {text!r})")
    return n


#: both ends refuse --doorbell with --queues > 1: a doorbell device has one vector
DOORBELL_ONE_QUEUE = "--doorbell serves one queue (one doorbell vector): give --queues 1"
