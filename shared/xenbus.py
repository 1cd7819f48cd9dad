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
from dataclasses import dataclass

from shared.faults import PeerFault
from shared.netif import (
    EXTENSIONS,
    FRONTEND_KEYS,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
)


class XenbusState(enum.IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6


class NegotiationError(PeerFault, ValueError):
    """The peer asked for something that was not offered, or sent a malformed message."""


class NotNegotiated(NegotiationError):
    """The peer used, on the ring, a feature that was not negotiated: fatal for it."""


@dataclass(frozen=True)
class Agreement:
    """What each direction may use, computed the same way by both ends from the backend's
    offer and the frontend's keys (netif.h: a key's meaning depends on who wrote it)."""

    #: frontend -> backend (the backend's keys): multi-slot packets, GSO kinds
    tx_sg: bool
    tx_gso_tcpv4: bool
    tx_gso_tcpv6: bool
    #: backend -> frontend (the frontend's keys)
    rx_sg: bool
    rx_gso_tcpv4: bool
    rx_gso_tcpv6: bool
    #: pvnet extensions: offered by the backend and accepted by the frontend
    header_slots: bool
    persistent: bool
    rx_by_id: bool

    @classmethod
    def of(cls, offered: dict[str, bool], requested: dict[str, bool]) -> Agreement:
        def ext(k: str) -> bool:
            return bool(offered.get(k)) and bool(requested.get(k))
        return cls(bool(offered.get("feature-sg")), bool(offered.get("feature-gso-tcpv4")),
                   bool(offered.get("feature-gso-tcpv6")), bool(requested.get("feature-sg")),
                   bool(requested.get("feature-gso-tcpv4")),
                   bool(requested.get("feature-gso-tcpv6")), ext("feature-header-slots"),
                   ext("feature-persistent"), ext("feature-rx-by-id"))


def gso_accepted(ag: Agreement | None, rx: bool) -> frozenset[int]:
    """The netif GSO types one direction may carry (no agreement: both, as tests use)."""
    if ag is None:
        return frozenset((XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6))
    v4, v6 = (ag.rx_gso_tcpv4, ag.rx_gso_tcpv6) if rx else (ag.tx_gso_tcpv4, ag.tx_gso_tcpv6)
    return frozenset(t for t, on in ((XEN_NETIF_GSO_TYPE_TCPV4, v4),
                                     (XEN_NETIF_GSO_TYPE_TCPV6, v6)) if on)


def choose(offered: dict[str, bool], wanted: dict[str, bool]) -> dict[str, bool]:
    """The frontend's keys: its own RX capabilities as it wants them (netif.h: they do not
    depend on the backend's), ``request-rx-copy`` (the only RX mode there is, so a backend
    that does not offer ``feature-rx-copy`` cannot be used), and each extension it wants
    only if the backend offered it."""
    if not offered.get("feature-rx-copy"):
        raise NegotiationError("backend does not offer feature-rx-copy (flipping is not "
                               "implemented)")
    out = {k: bool(wanted.get(k)) for k in FRONTEND_KEYS}
    out["request-rx-copy"] = True
    for k in EXTENSIONS:
        out[k] = bool(wanted.get(k)) and bool(offered.get(k))
    return out


def check_request(offered: dict[str, bool], requested: object) -> dict[str, bool]:
    """The backend's check of the frontend's keys: only frontend keys and offered extensions,
    and request-rx-copy (Linux netback refuses a frontend without it, too)."""
    if not isinstance(requested, dict):
        raise NegotiationError("features must be an object")
    known = set(FRONTEND_KEYS) | set(EXTENSIONS)
    unknown = set(requested) - known
    if unknown:
        raise NegotiationError(f"unknown feature keys: {sorted(unknown)}")
    if any(not isinstance(v, bool) for v in requested.values()):
        raise NegotiationError("feature values must be true or false")
    chosen = {k: bool(requested.get(k)) for k in (*FRONTEND_KEYS, *EXTENSIONS)}
    refused = [k for k in EXTENSIONS if chosen[k] and not offered.get(k)]
    if refused:
        raise NotNegotiated(f"features not offered: {refused}")
    if not chosen["request-rx-copy"]:
        raise NegotiationError("frontend does not request-rx-copy (flipping is not "
                               "implemented)")
    return chosen
