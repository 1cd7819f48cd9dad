"""A netback instance: its vif, its control socket, and the life of each frontend connection
(Linux ``interface.c``).

One process serves one guest interface. The vif (a TAP named ``vif<domid>.<devid>``, MAC
fe:ff:ff:ff:ff:ff, on the bridge) outlives connections. A frontend that misbehaves in any way
the validation catches is disconnected with a log line and a counter, its mappings released;
then the backend waits for that guest's next frontend.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import signal
from dataclasses import dataclass, field

from backend.filter import Filter
from backend.gntmap import GntMap
from backend.netback import FatalTxError, TxPath
from backend.rx import FatalRxError, RxPath
from backend.xenbus import Handshake, Negotiated
from shared.channel import ChannelClosed, ChannelError, EventChannel
from shared.control import ControlServer
from shared.grant import GrantError
from shared.region import LayoutError
from shared.ring import RSP_PROD, BackRing, RingError
from shared.stats import RingStats
from shared.tap import configure, open_tap
from shared.transport import TransportError, connect_unix, listen_unix
from shared.xenbus import NegotiationError, XenbusState

log = logging.getLogger("netback")
VIF_MAC = "fe:ff:ff:ff:ff:ff"
BACKEND_DOMID = 0
#: what disconnects a frontend (its fault), as opposed to a crash of ours
FRONTEND_ERRORS = (RingError, GrantError, FatalTxError, FatalRxError, ChannelError,
                   NegotiationError, LayoutError, TransportError)


class Shutdown(Exception):
    """SIGTERM/SIGINT: close the connection politely and exit."""


@dataclass
class NetbackConfig:
    vif: str
    domid: int
    bridge: str | None = None
    listen: str | None = None  # namespace placement: frontends connect here
    connect: str | None = None  # QEMU placement: the guest's virtio-serial port socket
    region_fd: int | None = None  # QEMU placement: the guest's memory, from the lab
    ctl: str | None = None
    tx_mode: str = "lazy"
    filters: list[str] = field(default_factory=list)
    budget: int = 64


class Netback:
    def __init__(self, cfg: NetbackConfig) -> None:
        if (cfg.listen is None) == (cfg.connect is None):
            raise ValueError("give exactly one of --listen and --connect")
        self.cfg = cfg
        self.tx_stats = RingStats()
        self.rx_stats = RingStats()
        self.counters = {"connects": 0, "disconnects": 0, "malformed": 0}
        self.last_error = ""
        self.state = XenbusState.Initialising
        self.peer = ""
        self.features: dict[str, bool] = {}
        self.filter = Filter.parse(cfg.filters) if cfg.filters else None
        self.tx: TxPath | None = None
        self.rx: RxPath | None = None
        self.shared_region = (mmap.mmap(cfg.region_fd, os.fstat(cfg.region_fd).st_size)
                              if cfg.region_fd is not None else None)
        self.vif_fd = open_tap(cfg.vif)
        configure(cfg.vif, mac=VIF_MAC, master=cfg.bridge)
        self.listener = listen_unix(cfg.listen) if cfg.listen else None
        self.ctl = ControlServer(cfg.ctl, self.control) if cfg.ctl else None

    # --- control socket (runs in the control thread) ----------------------------------------
    def control(self, request: dict) -> dict:
        if request.get("cmd") != "stats":
            raise KeyError(request.get("cmd"))
        rings = {}
        for name, st, path in (("tx", self.tx_stats, self.tx), ("rx", self.rx_stats, self.rx)):
            d = st.as_dict()
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
               "features": self.features, "rings": rings,
               "counters": dict(self.counters, last_error=self.last_error)}
        if self.filter is not None:
            out["filter"] = [{"rule": f"{r.action} {r.field}", "hits": h}
                             for r, h in zip(self.filter.rules, self.filter.hits, strict=True)]
        return out

    # --- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        def stop(signum, _frame):
            raise Shutdown(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if self.ctl:
            self.ctl.start()
        log.info("%s: serving domid %d (tx-mode %s)", self.cfg.vif, self.cfg.domid,
                 self.cfg.tx_mode)
        chan = None
        try:
            while True:
                chan = self._wait_channel()
                self.state = XenbusState.InitWait
                try:
                    neg = Handshake(chan, self.cfg.vif, self.cfg.domid,
                                    self.shared_region).run()
                    self._serve(chan, neg)
                except ChannelClosed as e:
                    log.info("%s: frontend %s went away (%s)", self.cfg.vif, self.peer or "?", e)
                except FRONTEND_ERRORS as e:
                    self.counters["malformed"] += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.error("%s: disconnecting frontend %s: %s", self.cfg.vif,
                              self.peer or "?", self.last_error)
                    try:
                        chan.send({"state": "Closing", "error": str(e)})
                    except (ChannelClosed, OSError):
                        pass
                finally:
                    self._disconnect(chan)
                    chan = None
        except Shutdown as e:
            log.info("%s: %s, shutting down", self.cfg.vif, e)
            if chan is not None:
                try:
                    chan.send({"state": "Closing"})
                except (ChannelClosed, OSError):
                    pass
                self._disconnect(chan)
        finally:
            self.close()

    def _wait_channel(self) -> EventChannel:
        if self.listener is not None:
            sock, _ = self.listener.accept()
            return EventChannel(sock=sock)
        return connect_unix(self.cfg.connect)

    def _serve(self, chan: EventChannel, neg: Negotiated) -> None:
        # grants name the domain allowed to use them: ours (the driver domain, 0)
        gntmap = GntMap(neg.region, BACKEND_DOMID, self.tx_stats,
                        neg.features["feature-persistent"])
        rx_gntmap = GntMap(neg.region, BACKEND_DOMID, self.rx_stats,
                           neg.features["feature-persistent"])
        self.tx = tx = TxPath(neg.region, gntmap, self.vif_fd, self.tx_stats, self.cfg.tx_mode,
                              neg.features["feature-header-slots"], self.filter)
        self.rx = rx = RxPath(neg.region, rx_gntmap, self.vif_fd, self.rx_stats)
        self._region = neg.region
        self._gntmaps = (gntmap, rx_gntmap)
        self.peer = neg.name
        self.features = neg.features
        self.state = XenbusState.Connected
        self.counters["connects"] += 1
        log.info("%s: frontend %s connected, features %s", self.cfg.vif, neg.name,
                 ",".join(k for k, v in neg.features.items() if v))
        self._loop(chan, tx, rx)

    def _loop(self, chan: EventChannel, tx: TxPath, rx: RxPath) -> None:
        poller = select.poll()
        cfd, vfd = chan.fileno(), self.vif_fd
        poller.register(cfd, select.POLLIN)
        if self.listener is not None:
            poller.register(self.listener.fileno(), select.POLLIN)
        vif_polled = False
        timeout = 0
        budget = self.cfg.budget
        txs, rxs = self.tx_stats, self.rx_stats
        while True:
            for fd, _ev in poller.poll(timeout):
                if fd == cfd:
                    for msg in chan.recv().messages:
                        if msg.get("state") in ("Closing", "Closed"):
                            raise ChannelClosed("frontend is closing")
                elif fd != vfd:
                    self._refuse_second_frontend()
            more = tx.action(budget)
            _publish(tx.ring, chan, txs)
            rx_more = rx.action(budget)
            _publish(rx.ring, chan, rxs)
            if not more:
                more = tx.ring.final_check_for_requests()
            can_rx = rx.can_receive()
            if not can_rx:
                can_rx = rx.ring.final_check_for_requests() and rx.can_receive()
            if can_rx != vif_polled:
                if can_rx:
                    poller.register(vfd, select.POLLIN)
                else:
                    poller.unregister(vfd)
                    rxs.queue_stops += 1
                vif_polled = can_rx
            timeout = 0 if (more or rx_more) else 1000

    def _refuse_second_frontend(self) -> None:
        sock, _ = self.listener.accept()
        with sock:
            msg = b'{"state":"Closing","error":"this vif already has a frontend"}\n'
            try:
                sock.sendall(msg)
            except OSError:
                pass

    def _disconnect(self, chan: EventChannel | None) -> None:
        if self.tx is not None:
            self.tx.release_all()
        if self.rx is not None:
            self.rx.release_all()
        for g in getattr(self, "_gntmaps", ()):
            g.unmap_all()
        self._gntmaps = ()
        region = getattr(self, "_region", None)
        if region is not None and self.shared_region is None:
            region.close()
        self._region = None
        self.tx = self.rx = None
        if chan is not None:
            chan.close()
            if self.state == XenbusState.Connected:
                self.counters["disconnects"] += 1
        self.state = XenbusState.Closed

    def close(self) -> None:
        if self.ctl:
            self.ctl.close()
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.cfg.listen)
            except FileNotFoundError:
                pass
        os.close(self.vif_fd)


def _publish(ring: BackRing, chan: EventChannel, stats: RingStats) -> None:
    """Push new responses; kick the frontend only if its rsp_event asks for it."""
    if ring.rsp_prod_pvt == ring.idx[RSP_PROD]:
        return
    if ring.push_responses():
        chan.notify()
        stats.notify_sent += 1
    else:
        stats.notify_suppressed += 1
