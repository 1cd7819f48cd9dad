"""One queue's connection at the netback: how it is built over a queue's area of the region
and how it is released, whether the netback's own process serves it (one queue) or a queue
worker does (``backend/queueworker.py``), and how its faults are booked.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.grants.gntmap import GntMap, Views
from backend.grants.staging import premap
from backend.rx.path import FatalRxError, RxPath
from backend.tx.filter import Filter
from backend.tx.path import TxPath
from backend.tx.requests import FATAL_REASONS, FatalTxError
from shared.faults import PeerFault
from shared.plumbing.channel import ChannelError, EventChannel
from shared.plumbing.transport import TransportError
from shared.protocol.grant import GrantError
from shared.protocol.queues import QueueError
from shared.protocol.region import Area, LayoutError
from shared.protocol.ring import RingError
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import Agreement, NegotiationError, NotNegotiated

#: grants name the domain allowed to use them: ours (the driver domain, 0)
BACKEND_DOMID = 0


class QueueFault(PeerFault):
    """A queue worker ended on a fault of the frontend's: the master books it under the
    reason the worker found (``reason``), and the whole vif disconnects (Linux:
    ``xenvif_fatal_tx_err`` takes the vif down, whichever queue erred)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


#: what disconnects a frontend (its fault), as opposed to a crash of ours
FRONTEND_ERRORS = (RingError, GrantError, FatalTxError, FatalRxError, ChannelError,
                   NegotiationError, LayoutError, TransportError, QueueFault)
#: the fatal_<reason> counter of a frontend error that carries no reason of its own
ERROR_REASON = {NotNegotiated: "not_negotiated", QueueError: "queues", RingError: "ring",
                GrantError: "grant", FatalRxError: "rx", ChannelError: "channel",
                NegotiationError: "negotiation", LayoutError: "layout",
                TransportError: "transport"}
#: every fatal_<reason> counter
REASONS = (*FATAL_REASONS, *dict.fromkeys(ERROR_REASON.values()))


def fatal_reason(e: BaseException) -> str:
    """The fatal_<reason> counter a frontend error is booked under."""
    reason = getattr(e, "reason", None)
    if reason in REASONS:
        return reason
    for cls, name in ERROR_REASON.items():
        if isinstance(e, cls):
            return name
    return "tx_malformed"


@dataclass
class Connection:
    """Everything one queue of one frontend connection holds, so that ending it releases
    all of it."""

    chan: EventChannel
    region: Area
    tx: TxPath
    rx: RxPath
    gntmaps: tuple[GntMap, GntMap]
    views: Views
    name: str
    features: dict[str, bool]


@dataclass
class PathConfig:
    """What a queue's paths are built from besides its area: the netback's settings."""

    vif_fd: int
    tx_mode: str
    rx_mode: str
    ag: Agreement
    pkt_filter: Filter | None
    rate: tuple[int, int] | None


def build_paths(area: Area, views: Views, cfg: PathConfig, stats: tuple[RingStats, RingStats],
                own: tuple[object, object], pools: dict[str, int] | None = None,
                ) -> tuple[TxPath, RxPath, tuple[GntMap, GntMap]]:
    """A queue's TX and RX paths over its area, counted into ``stats``/``own`` (TX, RX);
    with staging grants agreed, the frontend's ``pools`` mapped before the first packet."""
    ag = cfg.ag
    gntmap = GntMap(area, views, BACKEND_DOMID, stats[0], ag.persistent)
    rx_gntmap = GntMap(area, views, BACKEND_DOMID, stats[1], ag.persistent)
    if ag.staging:
        try:
            premap(pools or {}, gntmap, rx_gntmap)
        except BaseException:
            gntmap.unmap_all()
            rx_gntmap.unmap_all()
            raise
    tx = TxPath(area, gntmap, cfg.vif_fd, stats[0], cfg.tx_mode, ag.header_slots,
                cfg.pkt_filter, ag, own[0], cfg.rate)
    rx = RxPath(area, rx_gntmap, cfg.vif_fd, stats[1], ag, cfg.rx_mode, own[1])
    return tx, rx, (gntmap, rx_gntmap)


def release(conn: Connection, tx_stats: RingStats, counters: dict[str, int]) -> None:
    """Disconnect one queue (xenvif_disconnect_data): answer what is queued, drop every
    mapping and persistent grant (clearing their in-use bits), forget posted RX buffers,
    release the views (the caller closes the region: it may be shared by queues)."""
    try:
        conn.tx.release_all()
        conn.rx.release_all()
    finally:
        # requests consumed and never answered (a packet cut short by a fatal error) go
        # with their ring: count them released, so consumed == released + in flight
        # still holds across connections
        abandoned = conn.tx.ring.pending()
        tx_stats.slots_released += abandoned
        counters["slots_abandoned"] += abandoned
        conn.gntmaps[0].unmap_all()  # (no loop variable: it would pin a map's views)
        conn.gntmaps[1].unmap_all()
        views = conn.views
        # every holder of a view of the region goes first: then it can really unmap
        conn.tx = conn.rx = conn.gntmaps = conn.region = None  # type: ignore[assignment]
        conn.views = None  # type: ignore[assignment]
        views.close()
