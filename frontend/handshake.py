"""Netfront's side of the handshake (``xennet_connect`` / ``talk_to_netback``): say hello until
the backend answers, choose features from its offer, hand over the region, wait for Connected.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.plumbing.channel import ChannelClosed, EventChannel
from shared.plumbing.transport import TransportError
from shared.protocol.netif import BACKEND_KEYS, EXTENSIONS, MAX_QUEUES_KEY
from shared.protocol.queues import offered_max
from shared.protocol.region import Region
from shared.protocol.xenbus import NegotiationError, XenbusState, choose, log_ignored, unknown_keys

log = logging.getLogger("netfront")
#: the backend's keys this frontend reads (multi-queue-max-queues: how many queues it may ask)
BACKEND_READ = (*BACKEND_KEYS, *EXTENSIONS, MAX_QUEUES_KEY)

HELLO_INTERVAL = 1.0
#: DOMID_FIRST_RESERVED - 1
MAX_DOMID = 0x7FEF


@dataclass
class Offer:
    backend: str
    backend_domid: int
    features: dict[str, object]


@dataclass
class Laid:
    """A region laid out for a connection, and what describes it to the backend: the
    Initialised message's ``region``, the descriptors passed with it (closed once sent),
    the per-queue keys and, with several queues, each queue's event channel (ours)."""

    region: Region
    desc: dict
    fds: tuple[int, ...] = ()
    keys: dict[str, int] = field(default_factory=dict)
    channels: list[EventChannel] = field(default_factory=list)

    @property
    def queues(self) -> int:
        return len(self.channels) or 1

    def close_channels(self) -> None:
        for c in self.channels:
            c.close()


class Handshake:
    def __init__(self, chan: EventChannel, name: str, domid: int,
                 wanted: dict[str, bool], stop: Callable[[], bool] | None = None,
                 queues: int = 1) -> None:
        self.chan = chan
        self.name = name
        self.domid = domid
        self.wanted = wanted
        self.queues = queues  # how many this frontend would use (at most what is offered)
        self.stop = stop  # asked every poll round (200 ms); True gives up with TransportError
        self.state = XenbusState.Initialising

    def _wait(self, want: str, timeout: float | None, hello: bool) -> dict:
        poller = select.poll()
        poller.register(self.chan.fileno(), select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_hello = 0.0
        while True:
            if self.stop is not None and self.stop():
                raise TransportError("stopped during the handshake")
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise NegotiationError(f"backend did not answer {want} in time")
            if hello and now >= next_hello:
                self.chan.send({"state": "Initialising", "name": self.name,
                                "domid": self.domid})
                next_hello = now + HELLO_INTERVAL
            if not poller.poll(200):
                continue
            got = self.chan.recv(keep_fds=False)  # a backend has no descriptor to give us
            for msg in got.messages:
                state = msg.get("state")
                if state == want:
                    return msg
                if state in ("Closing", "Closed"):
                    raise ChannelClosed(f"backend closed: {msg.get('error', 'no reason')}")

    def run(self, make_region: Callable[[dict[str, object], int], Laid],
            timeout: float | None = None) -> tuple[Offer, dict[str, object], Laid]:
        """``make_region`` lays out a fresh region for the keys chosen (their queue count
        included) and says how to describe and pass it."""
        offer = parse_offer(self._wait("InitWait", timeout, hello=True))
        log_ignored(log, unknown_keys(offer.features, BACKEND_READ), "backend")
        chosen = choose(offer.features, self.wanted, self.queues, offered_max(offer.features))
        laid = make_region(chosen, offer.backend_domid)
        try:
            chosen.update(laid.keys)
            try:
                self.chan.send({"state": "Initialised", "name": self.name, "domid": self.domid,
                                "features": chosen, "region": laid.desc}, laid.fds)
            finally:
                for fd in laid.fds:  # the backend has its own copy now; the mapping keeps ours
                    os.close(fd)
            self.state = XenbusState.Initialised
            self._wait("Connected", 10.0, hello=False)
            self.chan.send({"state": "Connected"})
        except BaseException:
            laid.close_channels()
            raise
        self.state = XenbusState.Connected
        return offer, chosen, laid


def parse_offer(msg: dict) -> Offer:
    """The backend's InitWait, checked: it is a peer like any other, and a malformed offer
    must break the handshake (NegotiationError), not the frontend."""
    offered = msg.get("features")
    if not isinstance(offered, dict):
        raise NegotiationError("backend offered no features")
    domid = msg.get("domid", 0)
    if not isinstance(domid, int) or isinstance(domid, bool) or not 0 <= domid <= MAX_DOMID:
        raise NegotiationError(f"backend domid {domid!r} is not a domain id")
    name = msg.get("name", "?")
    # keys are true or false, but the queue count, an integer (checked by offered_max)
    return Offer(str(name)[:64], domid, {str(k): v if k == MAX_QUEUES_KEY else v is True
                                         for k, v in offered.items()})
