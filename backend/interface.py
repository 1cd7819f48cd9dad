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
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import struct
import time
import weakref
from dataclasses import dataclass, field, fields

from backend.capture import CaptureTap
from backend.filter import Filter
from backend.gntmap import GntMap, Views
from backend.netback import TxPath
from backend.rx import FatalRxError, RxPath
from backend.txreq import FATAL_REASONS, FatalTxError
from backend.xenbus import Handshake, HandshakeAbandoned, Negotiated, offered_features
from shared.channel import ChannelClosed, ChannelError, EventChannel, kick_if
from shared.control_protocol import Handoff
from shared.control_server import ControlServer
from shared.doorbell_host import HostDoorbell
from shared.grant import GrantError
from shared.kickchannel import KickChannel
from shared.lifecycle import Shutdown, send_quietly, stop_on_signals
from shared.region import LayoutError, Region
from shared.ring import RSP_PROD, BackRing, RingError, require_tso
from shared.stats import RingStats
from shared.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    configure,
    open_tap,
    set_offload,
)
from shared.transport import TransportError, connect_unix, listen_unix, map_memfd
from shared.xenbus import NegotiationError, NotNegotiated, XenbusState

log = logging.getLogger("netback")
VIF_MAC = "fe:ff:ff:ff:ff:ff"
BACKEND_DOMID = 0
#: what disconnects a frontend (its fault), as opposed to a crash of ours
FRONTEND_ERRORS = (RingError, GrantError, FatalTxError, FatalRxError, ChannelError,
                   NegotiationError, LayoutError, TransportError)
#: the fatal_<reason> counter of a frontend error that carries no reason of its own
_ERROR_REASON = {NotNegotiated: "not_negotiated", RingError: "ring", GrantError: "grant",
                 FatalRxError: "rx", ChannelError: "channel", NegotiationError: "negotiation",
                 LayoutError: "layout", TransportError: "transport"}
#: _IOW('T', 226, int): netif_carrier_on/off on a TAP (Linux >= 5.0)
TUNSETCARRIER = 0x400454E2
#: Linux xen-netback's rx_stall_timeout default (seconds)
RX_STALL_TIMEOUT = 60.0
#: consecutive notified wake-ups that find no work before the frontend's events are deferred
SPURIOUS_LIMIT = 16
#: longest deferral of a storming frontend's events (Linux lateeoi backs off up to 1 s)
MAX_EVENT_DELAY = 0.1
#: poll timeout when idle (ms): also the period of the lost-wake-up check
IDLE_MS = 1000
#: how long a control message to a frontend may wait for it to read (it is not trusted)
SEND_TIMEOUT = 5.0
#: seconds the event listener rests after accept() fails (EMFILE) instead of spinning
ACCEPT_BACKOFF = 0.1
#: control requests per second (and burst) the control socket serves, whoever asks
CTL_RATE = 1000.0
CTL_BURST = 100
#: requests answered from one read of one client; the rest of a pipelined flood is refused
CTL_PIPELINE = 16
_CTL_TOO_MANY = b'{"ok":false,"error":"too many requests at once on one connection"}\n'
_STATS_FIELDS = tuple(f.name for f in fields(RingStats))


class FrontendRestarted(Exception):
    """A new hello arrived on a connected stream: the guest's frontend started again
    (QEMU placement: the virtio-serial stream survives the frontend process)."""

    def __init__(self, hello: dict) -> None:
        super().__init__("frontend sent a new hello")
        self.hello = hello


class PacedControlServer(ControlServer):
    """The control socket with a token bucket on requests. Its thread shares the GIL with
    the data path, so however many clients ask, it answers at most CTL_RATE requests a
    second; the wait is a sleep, which hands the GIL to the data path. One client cannot
    hold the others up by pipelining: beyond CTL_PIPELINE requests from one read, it gets a
    cheap error reply per request instead of an answer."""

    def __init__(self, path: str, handler) -> None:
        super().__init__(path, handler)
        self.tokens, self.t = float(CTL_BURST), time.monotonic()
        self.paced = self.refused = self._in_read = 0

    def _read(self, conn) -> None:
        self._in_read = 0
        super()._read(conn)

    def _dispatch(self, line: bytes) -> bytes:
        self._in_read += 1
        if self._in_read > CTL_PIPELINE:
            self.refused += 1
            return _CTL_TOO_MANY
        now = time.monotonic()
        tokens = min(CTL_BURST, self.tokens + (now - self.t) * CTL_RATE)
        if tokens < 1:
            time.sleep((1 - tokens) / CTL_RATE)
            self.paced += 1
            tokens, now = 1.0, time.monotonic()
        self.tokens, self.t = tokens - 1, now
        return super()._dispatch(line)


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
    tx_mode: str = "lazy"
    filters: list[str] = field(default_factory=list)
    budget: int = 64
    #: seconds without posted RX buffers before the vif's carrier goes off (0: never)
    rx_stall_timeout: float = RX_STALL_TIMEOUT
    #: implemented features not to offer (--no-offer), e.g. to test a frontend against less
    no_offer: tuple[str, ...] = ()
    #: tests only: an already open stand-in for the vif (a datagram socket); no TAP is made
    vif_fd: int | None = None


@dataclass
class Connection:
    """Everything one frontend connection holds, so that ending it releases all of it."""

    chan: EventChannel
    region: Region
    tx: TxPath
    rx: RxPath
    gntmaps: tuple[GntMap, GntMap]
    views: Views
    name: str
    features: dict[str, bool]


class Netback:
    def __init__(self, cfg: NetbackConfig) -> None:
        if (cfg.listen is None) == (cfg.connect is None):
            raise ValueError("give exactly one of --listen and --connect")
        require_tso()  # the shared-memory code relies on x86's ordering
        self.cfg = cfg
        self.tx_stats = RingStats()
        self.rx_stats = RingStats()
        self.counters = {"connects": 0, "disconnects": 0, "malformed": 0, "internal_errors": 0,
                         "frontend_restarts": 0, "spurious_events": 0, "events_deferred": 0,
                         "rx_stalls": 0, "lost_wakeups": 0, "slots_abandoned": 0,
                         "accept_errors": 0, "not_negotiated": 0}
        for reason in (*FATAL_REASONS, *_ERROR_REASON.values()):
            self.counters[f"fatal_{reason}"] = 0
        self.last_error = ""
        self.state = XenbusState.Initialising
        self.peer = ""
        self.features: dict[str, bool] = {}
        self.filter = Filter.parse(cfg.filters) if cfg.filters else None
        self.offered = offered_features(tuple(cfg.no_offer))
        self.tx: TxPath | None = None
        self.rx: RxPath | None = None
        self.carrier = True
        self._mapped: list[weakref.ref] = []  # region mmaps, to prove they really go away
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # the same seal and size checks as a memfd passed in a handshake (the layout is
        # checked at every handshake): an unsealed fd could be truncated under us (SIGBUS)
        self.shared_region = (map_memfd(cfg.region_fd) if cfg.region_fd is not None else None)
        if cfg.vif_fd is not None:
            self.vif_fd = cfg.vif_fd
        else:
            self.vif_fd = open_tap(cfg.vif)
            configure(cfg.vif, mac=VIF_MAC, master=cfg.bridge)
        self._set_carrier(False)  # Linux: carrier off until a frontend connects
        self.listener = listen_unix(cfg.listen) if cfg.listen else None
        self.capture = CaptureTap(cfg.vif)
        self.ctl = PacedControlServer(cfg.ctl, self.control) if cfg.ctl else None

    # --- control socket (runs in the control thread) ----------------------------------------
    def control(self, request: dict) -> dict | Handoff:
        if request.get("cmd") == "capture":
            return self.capture.attach(request)
        if request.get("cmd") != "stats":
            raise KeyError(request.get("cmd"))
        rings = {}
        tx, rx = self.tx, self.rx
        for name, st, path in (("tx", self.tx_stats, tx), ("rx", self.rx_stats, rx)):
            d = {k: getattr(st, k) for k in _STATS_FIELDS}
            if path is not None:
                r = path.ring
                d.update(r.indices())
                d["req_cons"] = r.req_cons
                d["rsp_prod_pvt"] = r.rsp_prod_pvt
            if name == "tx":
                d["slots_in_flight"] = st.slots_consumed - st.slots_released
            else:
                d["slots_in_flight"] = (path.ring.pending() - len(path.posted)) if path else 0
            rings[name] = d
        out = {"role": "netback", "name": self.cfg.vif, "peer": self.peer, "pid": os.getpid(),
               "domid": self.cfg.domid, "state": self.state.name, "tx_mode": self.cfg.tx_mode,
               "features": self.features, "offered": self.offered, "rings": rings,
               "carrier": self.carrier,
               "rx_stall_timeout": self.cfg.rx_stall_timeout,
               "regions_mapped": self.regions_mapped(),
               "counters": dict(self.counters, last_error=self.last_error,
                                ctl_paced=self.ctl.paced if self.ctl else 0,
                                ctl_refused=self.ctl.refused if self.ctl else 0,
                                ctl_accept_errors=self.ctl.accept_errors if self.ctl else 0,
                                ctl_clients_capped=self.ctl.clients_capped if self.ctl else 0,
                                **self.capture.counters())}
        if self.filter is not None:
            out["filter"] = [{"rule": f"{r.action} {r.field}", "hits": h}
                             for r, h in zip(self.filter.rules, self.filter.hits, strict=True)]
        return out

    def regions_mapped(self) -> int:
        """Frontend regions this process still maps (QEMU placement: the guest's, always 1)."""
        self._mapped = [r for r in self._mapped if r() is not None and not r().closed]
        return len(self._mapped) + (self.shared_region is not None)

    # --- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        stop_on_signals()
        if self.ctl:
            self.ctl.start()
        log.info("%s: serving domid %d (tx-mode %s, rx-stall-timeout %gs)", self.cfg.vif,
                 self.cfg.domid, self.cfg.tx_mode, self.cfg.rx_stall_timeout)
        try:
            while True:
                self._session(self._wait_channel())
        except Shutdown as e:
            log.info("%s: %s, shutting down", self.cfg.vif, e)
        finally:
            self.close()

    def stop(self) -> None:
        """Ask ``run`` (in another thread) to return; used by in-process tests."""
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _check_stop(self) -> bool:
        if self._stop:
            raise Shutdown("stop requested")
        return False

    def _wait_channel(self) -> EventChannel:
        chan = self._accept_channel()
        chan.send_timeout = SEND_TIMEOUT
        if self.cfg.doorbell:  # doorbell: kicks over ivshmem-doorbell (shared/doorbell.py)
            chan = KickChannel.around(chan, lambda: HostDoorbell.connect(self.cfg.doorbell))
        return chan

    def _accept_channel(self) -> EventChannel:
        if self.listener is None:
            return connect_unix(self.cfg.connect, stop=self._check_stop)
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            self._check_stop()
            if poller.poll(1000):
                self._check_stop()
                try:
                    sock, _ = self.listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:  # EMFILE/ENFILE: rest instead of spinning or dying
                    self._accept_failed(e)
                    rest = select.poll()  # the listener stays readable: wait on stop only
                    rest.register(self._wake_r, select.POLLIN)
                    rest.poll(int(ACCEPT_BACKOFF * 1000))
                    continue
                return EventChannel(sock=sock)

    def _newer_frontend(self) -> bool:
        """Is another frontend knocking on the event socket? (namespace placement only)"""
        if self.listener is None:
            return False
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def _session(self, chan: EventChannel) -> None:
        """Serve frontends on one event channel until it closes or a frontend misbehaves. In
        the QEMU placement one stream carries the guest's successive frontends."""
        conn: Connection | None = None
        hello: dict | None = None
        try:
            while True:
                self.state = XenbusState.InitWait
                hs = Handshake(chan, self.cfg.vif, self.cfg.domid, self.shared_region,
                               self.cfg.region_fd, offered=self.offered)
                # a frontend that has not even said hello gives way to a newer one
                conn = self._connect(chan, hs.run(
                    lambda h=hs: not self._check_stop()
                    and (h.said_initwait or not self._newer_frontend()), hello))
                try:
                    self._loop(conn)
                except FrontendRestarted as e:
                    self.counters["frontend_restarts"] += 1
                    log.info("%s: frontend %s started again; releasing its old connection",
                             self.cfg.vif, conn.name)
                    hello = e.hello
                self._release(conn)
                conn = None
        except ChannelClosed as e:
            log.info("%s: frontend %s went away (%s)", self.cfg.vif, self.peer or "?", e)
        except HandshakeAbandoned:
            log.info("%s: a newer frontend is waiting; dropping the silent one", self.cfg.vif)
        except FRONTEND_ERRORS as e:
            self.counters["malformed"] += 1
            self.counters[f"fatal_{fatal_reason(e)}"] += 1
            if isinstance(e, NotNegotiated):
                self.counters["not_negotiated"] += 1
            self._fault(chan, f"{type(e).__name__}: {e}", str(e))
        except Shutdown:
            send_quietly(chan, {"state": "Closing"})
            raise
        except Exception as e:  # noqa: BLE001 - a bug of ours must not take the vif down
            self.counters["internal_errors"] += 1
            log.exception("%s: internal error serving %s", self.cfg.vif, self.peer or "?")
            self._fault(chan, f"internal {type(e).__name__}: {e}", "backend internal error")
        finally:
            chan.close()
            if conn is not None:
                self._release(conn)
            self.state = XenbusState.Closed
            self._set_carrier(False)

    def _fault(self, chan: EventChannel, why: str, tell: str) -> None:
        self.last_error = why
        log.error("%s: disconnecting frontend %s: %s", self.cfg.vif, self.peer or "?", why)
        send_quietly(chan, {"state": "Closing", "error": tell})

    def _connect(self, chan: EventChannel, neg: Negotiated) -> Connection:
        # grants name the domain allowed to use them: ours (the driver domain, 0)
        ag = neg.agreement
        views = Views(neg.fd, neg.dma_mem, neg.region, self.tx_stats,
                      shared=neg.dma_mem is self.shared_region)
        gntmap = GntMap(neg.region, views, BACKEND_DOMID, self.tx_stats, ag.persistent)
        rx_gntmap = GntMap(neg.region, views, BACKEND_DOMID, self.rx_stats, ag.persistent)
        tx = TxPath(neg.region, gntmap, self.vif_fd, self.tx_stats, self.cfg.tx_mode,
                    ag.header_slots, self.filter, ag)
        rx = RxPath(neg.region, rx_gntmap, self.vif_fd, self.rx_stats, ag)
        tx.capture = rx.capture = self.capture
        if neg.dma_mem is not self.shared_region:  # bounded: only live mappings are kept
            self.regions_mapped()
            self._mapped.append(weakref.ref(neg.dma_mem))
        conn = Connection(chan, neg.region, tx, rx, (gntmap, rx_gntmap), views, neg.name,
                          neg.features)
        self.tx, self.rx = tx, rx
        self.peer = neg.name
        self.features = neg.features
        self.state = XenbusState.Connected
        self.counters["connects"] += 1
        self._set_offload(neg.features)
        self._set_carrier(True)
        log.info("%s: frontend %s connected, features %s", self.cfg.vif, neg.name,
                 ",".join(k for k, v in neg.features.items() if v))
        return conn

    def _set_offload(self, features: dict[str, bool]) -> None:
        """What the vif may hand us follows what the frontend negotiated (Linux netback's
        xenvif_fix_features): without feature-gso-tcpv4/6 the bridge must segment first."""
        v4, v6 = features.get("feature-gso-tcpv4"), features.get("feature-gso-tcpv6")
        flags = TUN_F_CSUM | (TUN_F_TSO4 if v4 else 0) | (TUN_F_TSO6 if v6 else 0)
        if v4 or v6:
            flags |= TUN_F_TSO_ECN
        try:
            set_offload(self.vif_fd, flags)
        except OSError:  # a test stand-in for the vif, not a TAP
            pass

    def _release(self, conn: Connection) -> None:
        """Disconnect (xenvif_disconnect_data): answer what is queued, drop every mapping and
        persistent grant (clearing their in-use bits), forget posted RX buffers, unmap."""
        self.tx = self.rx = None
        try:
            conn.tx.release_all()
            conn.rx.release_all()
        finally:
            # requests consumed and never answered (a packet cut short by a fatal error) go
            # with their ring: count them released, so consumed == released + in flight
            # still holds across connections
            abandoned = conn.tx.ring.pending()
            self.tx_stats.slots_released += abandoned
            self.counters["slots_abandoned"] += abandoned
            for g in conn.gntmaps:
                g.unmap_all()
            region, views = conn.region, conn.views
            conn.tx = conn.rx = conn.gntmaps = conn.region = None  # type: ignore[assignment]
            conn.views = None  # type: ignore[assignment]
            views.close()
            region.close()  # the mmaps go when their last views do, i.e. now
            if self.state == XenbusState.Connected:
                self.counters["disconnects"] += 1
            self.state = XenbusState.Closed

    def _set_carrier(self, on: bool) -> None:
        if on == self.carrier:
            return
        self.carrier = on
        try:
            fcntl.ioctl(self.vif_fd, TUNSETCARRIER, struct.pack("i", int(on)))
        except OSError as e:
            if self.cfg.vif_fd is None:  # a real TAP should take it; a test stand-in cannot
                log.warning("%s: TUNSETCARRIER %d failed: %s", self.cfg.vif, on, e)

    # --- the data loop --------------------------------------------------------------------
    def _loop(self, conn: Connection) -> None:
        """Service both rings until the frontend goes (ChannelClosed), lies (FRONTEND_ERRORS)
        or starts again (FrontendRestarted). Per wake-up, never per packet, it also keeps
        the slow books: notification storms, RX stalls, lost wake-ups."""
        chan, tx, rx = conn.chan, conn.tx, conn.rx
        txr, rxr = tx.ring, rx.ring
        poller = select.poll()
        cfd, vfd, wfd = chan.fileno(), self.vif_fd, self._wake_r
        lfd = self.listener.fileno() if self.listener is not None else -1
        for fd in (cfd, wfd) if lfd < 0 else (cfd, wfd, lfd):
            poller.register(fd, select.POLLIN)
        vif_polled = False
        chan_polled = True
        timeout = 0
        budget = self.cfg.budget
        txs, rxs = self.tx_stats, self.rx_stats
        counters = self.counters
        spurious = 0  # consecutive notified wake-ups that found no work
        resume_at = 0.0  # deferred events: when to listen to the channel again
        listen_at = 0.0  # accept() failed: when to poll the event listener again
        stall_timeout = self.cfg.rx_stall_timeout
        stall_at = time.monotonic() + stall_timeout  # RX has no buffers yet
        t0 = r0 = 0
        while True:
            events = poller.poll(timeout)
            kicked = False
            if events:
                for fd, _ev in events:
                    if fd == cfd:
                        got = chan.recv(keep_fds=False)
                        if got.messages:
                            _frontend_says(got.messages)
                        kicked = True
                    elif fd == lfd:
                        if not self._refuse_second_frontend():
                            poller.unregister(lfd)
                            listen_at = time.monotonic() + ACCEPT_BACKOFF
                    elif fd == wfd:
                        raise Shutdown("stop requested")
                if kicked:
                    t0, r0 = txr.req_cons, rxr.req_cons
            elif timeout and chan_polled:  # the timer, not the peer, woke us
                self._lost_wakeup(cfd, txr, rxr, vif_polled)
            if listen_at and time.monotonic() >= listen_at:
                poller.register(lfd, select.POLLIN)
                listen_at = 0.0
            if not chan_polled and time.monotonic() >= resume_at:  # deferral over
                poller.register(cfd, select.POLLIN)
                chan_polled = True
            more = tx.action(budget)
            _publish(txr, chan, txs)
            rx_more = rx.action(budget)
            _publish(rxr, chan, rxs)
            if not more:
                more = txr.final_check_for_requests()
            can_rx = rx.can_receive()
            if not can_rx:
                can_rx = rxr.final_check_for_requests() and rx.can_receive()
            if can_rx != vif_polled:
                if can_rx:
                    poller.register(vfd, select.POLLIN)
                    stall_at = 0.0
                    if not self.carrier:
                        self._set_carrier(True)
                        log.info("%s: frontend %s posts RX buffers again; carrier on",
                                 self.cfg.vif, conn.name)
                else:
                    poller.unregister(vfd)
                    rxs.queue_stops += 1
                    stall_at = time.monotonic() + stall_timeout
                vif_polled = can_rx
            timeout = 0 if (more or rx_more) else IDLE_MS
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
                            log.warning("%s: notification storm from frontend %s: deferring "
                                        "its events", self.cfg.vif, conn.name)
                        counters["events_deferred"] += 1
            if not chan_polled:
                timeout = min(timeout, max(1, int((resume_at - time.monotonic()) * 1000) + 1))
            if listen_at:
                timeout = min(timeout, max(1, int((listen_at - time.monotonic()) * 1000) + 1))
            if not vif_polled and stall_at and stall_timeout > 0:
                left = stall_at - time.monotonic()
                if left <= 0:
                    stall_at = 0.0
                    if self.carrier:
                        self._set_carrier(False)
                        counters["rx_stalls"] += 1
                        log.warning("%s: frontend %s posted no RX buffers for %gs; carrier off",
                                    self.cfg.vif, conn.name, stall_timeout)
                else:
                    timeout = min(timeout, int(left * 1000) + 1)

    def _lost_wakeup(self, cfd: int, txr: BackRing, rxr: BackRing, vif_polled: bool) -> None:
        """The timer woke us: had the frontend published requests it should have notified
        us of (req_event was armed), that notification was lost. Counted, never relied on:
        the timer is the safety net, the counter proves it was not needed."""
        if txr.unconsumed_requests() or (not vif_polled and rxr.unconsumed_requests()):
            quick = select.poll()
            quick.register(cfd, select.POLLIN)
            if not quick.poll(0):  # not merely a kick still on its way
                self.counters["lost_wakeups"] += 1
                log.warning("%s: found requests no notification announced (lost wake-up)",
                            self.cfg.vif)

    def _accept_failed(self, e: OSError) -> None:
        self.counters["accept_errors"] += 1
        if self.counters["accept_errors"] == 1 or e.errno != getattr(self, "_last_errno", 0):
            log.warning("%s: accept() on the event socket failed: %s; retrying in %gs",
                        self.cfg.vif, e, ACCEPT_BACKOFF)
        self._last_errno = e.errno

    def _refuse_second_frontend(self) -> bool:
        """Tell a second frontend this vif is taken. False if accept() failed (no fd left):
        the caller then stops polling the listener for ACCEPT_BACKOFF."""
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            self._accept_failed(e)
            return False
        with sock:
            sock.setblocking(False)
            msg = b'{"state":"Closing","error":"this vif already has a frontend"}\n'
            try:
                sock.send(msg)
            except OSError:
                pass
        return True

    def close(self) -> None:
        if self.ctl:
            self.ctl.close()
        self.capture.close()
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.cfg.listen)
            except FileNotFoundError:
                pass
        if self.cfg.vif_fd is None:
            os.close(self.vif_fd)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


def fatal_reason(e: BaseException) -> str:
    """The fatal_<reason> counter a frontend error is booked under."""
    reason = getattr(e, "reason", None)
    if reason in FATAL_REASONS:
        return reason
    for cls, name in _ERROR_REASON.items():
        if isinstance(e, cls):
            return name
    return "tx_malformed"


def _frontend_says(messages: list[dict]) -> None:
    """Control messages while connected: a goodbye, or a hello from a restarted frontend."""
    for msg in messages:
        state = msg.get("state")
        if state in ("Closing", "Closed"):
            raise ChannelClosed("frontend is closing")
        if state == "Initialising":
            raise FrontendRestarted(msg)




def _publish(ring: BackRing, chan: EventChannel, stats: RingStats) -> None:
    """Push new responses; kick the frontend only if its rsp_event asks for it."""
    if ring.rsp_prod_pvt != ring.idx[RSP_PROD]:
        kick_if(ring.push_responses(), chan, stats)

