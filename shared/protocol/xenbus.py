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
import logging
from dataclasses import dataclass

from shared.faults import PeerFault
from shared.protocol.netif import (
    EXTENSIONS,
    FRONTEND_KEYS,
    FRONTEND_OPTIONAL,
    MAX_QUEUES_KEY,
    NUM_QUEUES_KEY,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
)
from shared.text import printable


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
    offer and the frontend's keys (netif.h: a key's meaning depends on who wrote it; a key
    not written is off)."""

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
    #: csum_blank on IPv6 TX: the backend wrote feature-ipv6-csum-offload (IPv4 always)
    tx_csum_v6: bool = True
    #: csum_blank on RX: IPv4 unless the frontend wrote feature-no-csum-offload, IPv6 only if
    #: it wrote feature-ipv6-csum-offload
    rx_csum_v4: bool = True
    rx_csum_v6: bool = True
    #: the frontend notifies for new RX requests (feature-rx-notify); without it the backend
    #: polls for them, as Linux netback does
    rx_notify: bool = True
    #: staging grants (feature-staging-grants, Oracle UEK's key): pools the backend premaps
    staging: bool = False

    @classmethod
    def of(cls, offered: dict[str, object], requested: dict[str, object]) -> Agreement:
        def ext(k: str) -> bool:
            return offered.get(k) is True and requested.get(k) is True

        def fe(k: str) -> bool:
            return requested.get(k) is True
        return cls(offered.get("feature-sg") is True, offered.get("feature-gso-tcpv4") is True,
                   offered.get("feature-gso-tcpv6") is True, fe("feature-sg"),
                   fe("feature-gso-tcpv4"), fe("feature-gso-tcpv6"),
                   ext("feature-header-slots"), ext("feature-persistent"),
                   ext("feature-rx-by-id"),
                   tx_csum_v6=offered.get("feature-ipv6-csum-offload") is True,
                   rx_csum_v4=not fe("feature-no-csum-offload"),
                   rx_csum_v6=fe("feature-ipv6-csum-offload"),
                   rx_notify=fe("feature-rx-notify"),
                   staging=ext("feature-staging-grants"))

    @property
    def tx_csum(self) -> bool:
        """May TX frames of every family carry csum_blank? (A TAP has one checksum-offload
        switch for both families: ``shared.plumbing.netdev.offload_flags``.)"""
        return self.tx_csum_v6

    @property
    def rx_csum(self) -> bool:
        """May RX frames of every family carry csum_blank?"""
        return self.rx_csum_v4 and self.rx_csum_v6


def gso_accepted(ag: Agreement | None, rx: bool) -> frozenset[int]:
    """The netif GSO types one direction may carry (no agreement: both, as tests use)."""
    if ag is None:
        return frozenset((XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6))
    v4, v6 = (ag.rx_gso_tcpv4, ag.rx_gso_tcpv6) if rx else (ag.tx_gso_tcpv4, ag.tx_gso_tcpv6)
    return frozenset(t for t, on in ((XEN_NETIF_GSO_TYPE_TCPV4, v4),
                                     (XEN_NETIF_GSO_TYPE_TCPV6, v6)) if on)


#: keys already logged as ignored (a line per key per process, however often it comes back),
#: at most IGNORED_LOGGED_MAX of them: a peer inventing keys at every handshake gets no more
#: lines and no more memory
_IGNORED_LOGGED: set[str] = set()
IGNORED_LOGGED_MAX = 256


def log_ignored(log: logging.Logger, keys: list[str], who: str) -> None:
    """Log the keys a peer wrote that this end does not know, each once per process (as
    Linux, which reads only the keys it knows, ignores the rest - never fatal)."""
    room = IGNORED_LOGGED_MAX - len(_IGNORED_LOGGED)
    new = [k for k in keys if k not in _IGNORED_LOGGED][:max(room, 0)]
    if new:
        _IGNORED_LOGGED.update(new)
        full = len(_IGNORED_LOGGED) >= IGNORED_LOGGED_MAX
        log.info("ignoring %s feature keys this end does not know: %s%s", who,
                 ", ".join(printable(k, 64) for k in new[:16]),
                 "; no more such keys will be logged" if full else "")


def choose(offered: dict[str, object], wanted: dict[str, object], queues: int = 1,
           most: int | None = None) -> dict[str, object]:
    """The frontend's keys: its own RX capabilities as it wants them (netif.h: they do not
    depend on the backend's), ``request-rx-copy`` (the only RX mode there is, so a backend
    that does not offer ``feature-rx-copy`` cannot be used), each extension it wants only if
    the backend offered it, and ``multi-queue-num-queues`` - ``queues`` but at most ``most``
    (the backend's ``multi-queue-max-queues``, already checked) - to a backend that writes
    ``multi-queue-max-queues`` (as Linux's netfront does; the per-queue keys follow once the
    region is laid out, ``shared.protocol.queues``)."""
    if offered.get("feature-rx-copy") is not True:
        raise NegotiationError("backend does not offer feature-rx-copy (flipping is not "
                               "implemented)")
    out: dict[str, object] = {k: wanted.get(k) is True for k in FRONTEND_KEYS}
    out.update({k: True for k in FRONTEND_OPTIONAL if wanted.get(k) is True})
    out["request-rx-copy"] = True
    for k in EXTENSIONS:
        out[k] = wanted.get(k) is True and offered.get(k) is True
    if MAX_QUEUES_KEY in offered:
        out[NUM_QUEUES_KEY] = min(queues, most or 1)
    return out


def unknown_keys(keys: dict[str, object], known: tuple[str, ...]) -> list[str]:
    """The keys of ``keys`` not in ``known``, sorted: what a peer wrote that is ignored."""
    return sorted(k for k in keys if k not in known)


#: every key a frontend may write that this backend reads
FRONTEND_READ = (*FRONTEND_KEYS, *FRONTEND_OPTIONAL, *EXTENSIONS)


def check_request(offered: dict[str, object], requested: object) -> dict[str, bool]:
    """The backend's check of the frontend's keys (Linux ``read_xenbus_vif_flags`` and
    ``connect``): request-rx-copy is required (Linux refuses a frontend without it, too), an
    extension must have been offered, and the netif.h keys take true or false. The queue
    keys are ``shared.protocol.queues.check_queues``'s. Any other key is ignored (``unknown_keys``),
    never fatal. Returns the keys read, each true or false."""
    if not isinstance(requested, dict):
        raise NegotiationError("features must be an object")
    if any(not isinstance(requested[k], bool) for k in FRONTEND_READ if k in requested):
        raise NegotiationError("feature values must be true or false")
    chosen = {k: requested.get(k) is True for k in FRONTEND_READ}
    refused = [k for k in EXTENSIONS if chosen[k] and not offered.get(k)]
    if refused:
        raise NotNegotiated(f"features not offered: {refused}")
    if not chosen["request-rx-copy"]:
        raise NegotiationError("frontend does not request-rx-copy (flipping is not "
                               "implemented)")
    return chosen
