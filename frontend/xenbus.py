"""Netfront's side of the handshake (``xennet_connect`` / ``talk_to_netback``): say hello until
the backend answers, choose features from its offer, hand over the region, wait for Connected.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.channel import ChannelClosed, EventChannel
from shared.region import Region
from shared.xenbus import NegotiationError, XenbusState, choose

HELLO_INTERVAL = 1.0


@dataclass
class Offer:
    backend: str
    backend_domid: int
    features: dict[str, bool]


class Handshake:
    def __init__(self, chan: EventChannel, name: str, domid: int,
                 wanted: dict[str, bool]) -> None:
        self.chan = chan
        self.name = name
        self.domid = domid
        self.wanted = wanted
        self.state = XenbusState.Initialising

    def _wait(self, want: str, timeout: float | None, hello: bool) -> dict:
        poller = select.poll()
        poller.register(self.chan.fileno(), select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_hello = 0.0
        while True:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise NegotiationError(f"backend did not answer {want} in time")
            if hello and now >= next_hello:
                self.chan.send({"state": "Initialising", "name": self.name,
                                "domid": self.domid})
                next_hello = now + HELLO_INTERVAL
            if not poller.poll(200):
                continue
            for msg in self.chan.recv().messages:
                state = msg.get("state")
                if state == want:
                    return msg
                if state in ("Closing", "Closed"):
                    raise ChannelClosed(f"backend closed: {msg.get('error', 'no reason')}")

    def run(self, make_region: Callable[[], tuple[Region, dict, tuple[int, ...]]],
            timeout: float | None = None) -> tuple[Offer, dict[str, bool], Region]:
        """``make_region`` lays out a fresh region and says how to describe/pass it."""
        offer_msg = self._wait("InitWait", timeout, hello=True)
        offered = offer_msg.get("features")
        if not isinstance(offered, dict):
            raise NegotiationError("backend offered no features")
        offer = Offer(str(offer_msg.get("name", "?")), int(offer_msg.get("domid", 0)), offered)
        chosen = choose(offered, self.wanted)
        region, desc, fds = make_region(chosen, offer.backend_domid)
        try:
            self.chan.send({"state": "Initialised", "name": self.name, "domid": self.domid,
                            "features": chosen, "region": desc}, fds)
        finally:
            for fd in fds:  # the backend has its own copy now; the mapping keeps ours
                os.close(fd)
        self.state = XenbusState.Initialised
        self._wait("Connected", 10.0, hello=False)
        self.chan.send({"state": "Connected"})
        self.state = XenbusState.Connected
        return offer, chosen, region
