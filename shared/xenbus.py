"""Connection states and feature negotiation, as xenbus does them (``xenbus.h``).

The handshake, over the event channel (the frontend speaks first so that a late or restarted
peer on a byte stream with no connect event still hears it):

    frontend -> {"state": "Initialising", "name", "domid"}            (repeated until answered)
    backend  -> {"state": "InitWait", "name", "domid", "features"}     (what it offers)
    frontend -> {"state": "Initialised", "features", "region"} [+ memfd] (what it uses)
    backend  -> {"state": "Connected"}  or  {"state": "Closing", "error"}
    frontend -> {"state": "Connected"}
Either side may send {"state": "Closing"} and close; the other goes back to the start.
"""

from __future__ import annotations

import enum

from shared.netif import FEATURES


class XenbusState(enum.IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6


class NegotiationError(ValueError):
    """The peer asked for something that was not offered, or sent a malformed message."""


def choose(offered: dict[str, bool], wanted: dict[str, bool]) -> dict[str, bool]:
    """The frontend's choice: what it wants, limited to what the backend offers."""
    return {k: bool(wanted.get(k)) and bool(offered.get(k)) for k in FEATURES}


def check_request(offered: dict[str, bool], requested: object) -> dict[str, bool]:
    """The backend's check of the frontend's choice: only known, offered features."""
    if not isinstance(requested, dict):
        raise NegotiationError("features must be an object")
    unknown = set(requested) - set(FEATURES)
    if unknown:
        raise NegotiationError(f"unknown feature keys: {sorted(unknown)}")
    chosen = {k: bool(requested.get(k)) for k in FEATURES}
    refused = [k for k, on in chosen.items() if on and not offered.get(k)]
    if refused:
        raise NegotiationError(f"features not offered: {refused}")
    return chosen
