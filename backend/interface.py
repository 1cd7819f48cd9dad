"""A netback instance: its vif, its control socket, and the life of each frontend connection
(Linux ``interface.c``).

One process serves one guest interface. The vif (a TAP named ``vif<domid>.<devid>``, MAC
fe:ff:ff:ff:ff:ff, on the bridge) outlives connections; its carrier is on only while a
frontend is connected and keeps RX buffers posted (``rx_stall_timeout``), so the bridge stops
queueing frames for a guest that cannot take them. A frontend that misbehaves in any way the
validation catches is disconnected with a log line and a counter, everything it held released
(slots, maps, grants, the region mapping); then the backend waits for that guest's next
frontend. A frontend that only floods notifications is not disconnected but slowed down, as
Linux's lateeoi does for spurious events: its own events are deferred, nobody else's.

The connection's life (channel, handshake, attach, data loop, teardown) is the one both ends
share (``shared.endpoint.connection``); this module plugs in the netback's steps. The data loop is
in ``backend.loop``, the event socket in ``backend.listener``, the control socket in
``backend.control``.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

from backend import loop
from backend.capture import CaptureTap
from backend.conn import (
    FRONTEND_ERRORS,
    REASONS,
    Connection,
    PathConfig,
    build_paths,
    fatal_reason,
    release,
)
from backend.control import PacedControlServer, control
from backend.grants.gntmap import Views
from backend.handshake import Handshake, HandshakeAbandoned, Negotiated, offered_features
from backend.listener import EventListener
from backend.mechanisms import load, own_counters
from backend.multiqueue import MultiConnection, Queues
from backend.rx.path import RxPath
from backend.tx.filter import Filter
from backend.tx.path import TxPath
from shared.endpoint.connection import Endpoint
from shared.endpoint.workers import WorkerDied
from shared.plumbing.channel import ChannelClosed, EventChannel
from shared.plumbing.control.protocol import Handoff
from shared.plumbing.doorbell.host import HostDoorbell
from shared.plumbing.doorbell.kickchannel import KickChannel
from shared.plumbing.netdev import VIF_MAC, NetDevice, offload_flags
from shared.plumbing.transport import connect_unix, map_memfd
from shared.protocol.mechanisms import default
from shared.protocol.xenbus import Agreement, NotNegotiated, XenbusState

log = logging.getLogger("netback")
#: Linux xen-netback's rx_stall_timeout default (seconds)
RX_STALL_TIMEOUT = 60.0
#: how long a control message to a frontend may wait for it to read (it is not trusted)
SEND_TIMEOUT = 5.0


@dataclass
class NetbackConfig:
    vif: str
    domid: int
    bridge: str | None = None
    listen: str | None = None  # namespace placement: frontends connect here
    connect: str | None = None  # QEMU placement: the guest's virtio-serial port socket
    region_fd: int | None = None  # QEMU placement: the guest's memory, from the lab
    doorbell: str | None = None  # QEMU placement: ivshmem server backend socket (kicks)
    ctl: str | None = None
    tx_mode: str = default("tx")
    rx_mode: str = default("rx")
    filters: list[str] = field(default_factory=list)
    budget: int = 64
    #: seconds without posted RX buffers before the vif's carrier goes off (0: never)
    rx_stall_timeout: float = RX_STALL_TIMEOUT
    #: implemented features not to offer (--no-offer), e.g. to test a frontend against less
    no_offer: tuple[str, ...] = ()
    #: Linux's ``rate`` key: TX limited to credit_bytes per credit_usec (None: unlimited)
    rate: tuple[int, int] | None = None
    #: NAPI-like poll budget (µs): after work, keep polling the rings and the vif (events
    #: unarmed) until this long passes without work; 0: arm and sleep at once
    poll_us: int = 0
    #: queues offered (multi-queue-max-queues): the vif gets a TAP queue each, a connection
    #: with several gets a worker process each (backend/multiqueue.py)
    queues: int = 1


class Netback(Endpoint[Connection]):
    waiting = XenbusState.InitWait
    peer_errors = (*FRONTEND_ERRORS, WorkerDied)

    def __init__(self, cfg: NetbackConfig) -> None:
        if (cfg.listen is None) == (cfg.connect is None):
            raise ValueError("give exactly one of --listen and --connect")
        self.cfg = cfg
        super().__init__(cfg.vif, log)
        self.counters.update({"malformed": 0, "frontend_restarts": 0, "spurious_events": 0,
                              "events_deferred": 0, "rx_stalls": 0, "slots_abandoned": 0,
                              "accept_errors": 0, "not_negotiated": 0,
                              "polls_busy": 0, "polls_empty": 0})
        self.counters["workers_died"] = 0
        for reason in REASONS:
            self.counters[f"fatal_{reason}"] = 0
        self.filter = Filter.parse(cfg.filters) if cfg.filters else None
        #: the mechanisms' own counters, kept across connections like tx_stats/rx_stats
        self.tx_own = own_counters(load("tx", cfg.tx_mode))
        self.rx_own = own_counters(load("rx", cfg.rx_mode))
        self.offered = offered_features(tuple(cfg.no_offer), cfg.queues)
        self.tx: TxPath | None = None
        self.rx: RxPath | None = None
        #: the queues' workers and totals (several queues offered; None: one)
        self.queues = Queues(self) if cfg.queues > 1 else None
        self.carrier = True
        self._mapped: list[weakref.ref] = []  # region mmaps, to prove they really go away
        # the same seal and size checks as a memfd passed in a handshake (the layout is
        # checked at every handshake): an unsealed fd could be truncated under us (SIGBUS)
        self.shared_region = (map_memfd(cfg.region_fd) if cfg.region_fd is not None else None)
        self.vif = self.open_device()
        self.set_carrier(False)  # Linux: carrier off until a frontend connects
        self.listener = (EventListener(cfg.listen, cfg.vif, self.wake_fd, self.counters)
                         if cfg.listen else None)
        self.capture = CaptureTap(cfg.vif)
        self.ctl = PacedControlServer(cfg.ctl, self.control) if cfg.ctl else None

    def open_device(self) -> NetDevice:
        """The vif TAP, on the bridge."""
        return NetDevice.open(self.cfg.vif, queues=self.cfg.queues, mac=VIF_MAC,
                              master=self.cfg.bridge)

    def control(self, request: dict) -> dict | Handoff:
        return control(self, request)

    def services(self) -> list:
        return [self.ctl] if self.ctl else []

    def regions_mapped(self) -> int:
        """Frontend regions this process still maps (QEMU placement: the guest's, always 1)."""
        self._mapped = [r for r in self._mapped if r() is not None and not r().closed]
        return len(self._mapped) + (self.shared_region is not None)

    def run(self) -> None:
        log.info("%s: serving domid %d (tx-mode %s, rx-mode %s, rx-stall-timeout %gs)",
                 self.cfg.vif, self.cfg.domid, self.cfg.tx_mode, self.cfg.rx_mode,
                 self.cfg.rx_stall_timeout)
        super().run()

    # --- the connection's steps -----------------------------------------------------------
    def open_channel(self) -> EventChannel:
        if self.listener is None:
            chan = connect_unix(self.cfg.connect, stop=self.check_stop)
        else:
            chan = self.listener.accept(self.check_stop)
        chan.send_timeout = SEND_TIMEOUT
        # doorbell: kicks over ivshmem-doorbell (shared/plumbing/doorbell/__init__.py)
        if self.cfg.doorbell:
            chan = KickChannel.around(chan, lambda: HostDoorbell.connect(self.cfg.doorbell))
        return chan

    def handshake(self, chan: EventChannel, first: dict | None) -> Negotiated:
        hs = Handshake(chan, self.cfg.vif, self.cfg.domid, self.shared_region,
                       self.cfg.region_fd, offered=self.offered, channel_base=self.cfg.connect)
        # a frontend that has not even said hello gives way to a newer one
        return hs.run(lambda: not self.check_stop()
                      and (hs.said_initwait or not self._newer_frontend()), first)

    def _newer_frontend(self) -> bool:
        """Is another frontend knocking on the event socket? (namespace placement only)"""
        return self.listener is not None and self.listener.knocking()

    def attach(self, chan: EventChannel, neg: Negotiated) -> Connection | MultiConnection:
        ag = neg.agreement
        if neg.dma_mem is not self.shared_region:  # bounded: only live mappings are kept
            self.regions_mapped()
            self._mapped.append(weakref.ref(neg.dma_mem))
        self.vif.use_queues(len(neg.queues))
        if len(neg.queues) > 1:
            assert self.queues is not None  # the handshake offered more than one
            conn: Connection | MultiConnection = self.queues.attach(chan, neg)
        else:
            conn = self._attach_one(chan, neg)
        self.peer = neg.name
        self.features = neg.features
        self._set_offload(ag)
        self.set_carrier(True)
        log.info("%s: frontend %s connected, %d queue%s, features %s", self.cfg.vif, neg.name,
                 len(neg.queues), "s" if len(neg.queues) > 1 else "",
                 ",".join(k for k, v in neg.features.items() if v))
        return conn

    def path_config(self, vif_fd: int, ag: Agreement) -> PathConfig:
        c = self.cfg
        return PathConfig(vif_fd, c.tx_mode, c.rx_mode, ag, self.filter, c.rate)

    def _attach_one(self, chan: EventChannel, neg: Negotiated) -> Connection:
        """One queue: served by this process, on the layout's rings and this channel."""
        views = Views(neg.fd, neg.dma_mem, neg.region, self.tx_stats,
                      shared=neg.dma_mem is self.shared_region)
        try:
            tx, rx, gntmaps = build_paths(
                neg.region, views, self.path_config(self.vif.fd, neg.agreement),
                (self.tx_stats, self.rx_stats), (self.tx_own, self.rx_own), neg.pools)
        except BaseException:
            views.close()
            raise
        tx.capture = rx.capture = self.capture
        self.tx, self.rx = tx, rx
        return Connection(chan, neg.region, tx, rx, gntmaps, views, neg.name, neg.features)

    def serve(self, conn: Connection | MultiConnection) -> None:
        if isinstance(conn, MultiConnection):
            self.queues.serve(conn)
        else:
            loop.serve(self, conn)

    def restarted(self, conn: Connection | MultiConnection) -> None:
        self.counters["frontend_restarts"] += 1
        log.info("%s: frontend %s started again; releasing its old connection",
                 self.cfg.vif, conn.name)

    def detach(self, conn: Connection | MultiConnection) -> None:
        """Disconnect (xenvif_disconnect_data): answer what is queued, drop every mapping and
        persistent grant (clearing their in-use bits), forget posted RX buffers, unmap; with
        several queues, stop their workers first (each releases its queue so)."""
        self.tx = self.rx = None
        if isinstance(conn, MultiConnection):
            self.queues.detach(conn)
            return
        region = conn.region
        try:
            release(conn, self.tx_stats, self.counters)
        finally:
            region.close()  # the mmaps go when their last views do, i.e. now

    # --- how a connection ends ------------------------------------------------------------
    def peer_left(self, e: ChannelClosed) -> None:
        if isinstance(e, HandshakeAbandoned):
            log.info("%s: a newer frontend is waiting; dropping the silent one", self.cfg.vif)
        else:
            log.info("%s: frontend %s went away (%s)", self.cfg.vif, self.peer or "?", e)

    def booked(self, e: Exception, internal: bool, why: str) -> str:
        if internal:
            return "backend internal error"
        if isinstance(e, WorkerDied):  # ours, not the frontend's: it is told, not blamed
            self.counters["workers_died"] += 1
            return f"backend {e}"
        self.counters["malformed"] += 1
        reason = fatal_reason(e)
        self.counters[f"fatal_{reason}"] += 1
        if isinstance(e, NotNegotiated) or reason == "not_negotiated":
            self.counters["not_negotiated"] += 1
        return str(e)

    def fault_line(self, why: str) -> str:
        return f"disconnecting frontend {self.peer or '?'}: {why}"

    def session_ended(self, faulted: bool) -> None:
        self.set_carrier(False)

    # --- the vif --------------------------------------------------------------------------
    def _set_offload(self, ag: Agreement) -> None:
        """What the vif may hand us follows what the frontend negotiated (Linux netback's
        xenvif_fix_features): without feature-gso-tcpv4/6 the bridge must segment first,
        without partial checksums of both families (``offload_flags``) checksum too."""
        flags = offload_flags(ag.rx_gso_tcpv4, ag.rx_gso_tcpv6, ag.rx_csum)
        try:
            self.vif.set_offload(flags)
        except OSError as e:
            log.warning("%s: TUNSETOFFLOAD %#x failed: %s", self.cfg.vif, flags, e)

    def set_carrier(self, on: bool) -> None:
        if on == self.carrier:
            return
        self.carrier = on
        try:
            self.vif.set_carrier(on)
        except OSError as e:
            log.warning("%s: TUNSETCARRIER %d failed: %s", self.cfg.vif, on, e)

    def close(self) -> None:
        try:
            super().close()  # the control socket, the wake-up pipe
        finally:
            self.capture.close()
            if self.listener is not None:
                self.listener.close()
            self.vif.close()
