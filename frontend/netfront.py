"""A netfront device: the guest's TAP, the handshake, and the data loop (``xen-netfront.c``).

The device survives its backend: when the backend closes or dies, the frontend goes back to
the handshake and reconnects, keeping its TAP (and so the guest's addresses and sockets).
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import signal
import time
from dataclasses import dataclass

from frontend.rx import RX_BUFFERS, RxQueue
from frontend.tx import BackendError, TxQueue
from frontend.xenbus import Handshake
from shared.channel import ChannelClosed, ChannelError, EventChannel
from shared.control import ControlServer, PortControl
from shared.netif import FEATURES
from shared.region import Region
from shared.ring import FrontRing, RingError
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
from shared.transport import (
    TransportError,
    connect_unix,
    create_memfd,
    map_pci_bar,
    open_port,
)
from shared.xenbus import NegotiationError, XenbusState

log = logging.getLogger("netfront")
#: largest GSO packet the guest stack may hand us: tx_request.size is 16 bits
GSO_MAX_SIZE = 0xFFFF - 320


class Shutdown(Exception):
    pass


@dataclass
class NetfrontConfig:
    name: str
    domid: int
    tap: str = "eth0"
    mac: str | None = None
    ip: str | None = None
    mtu: int | None = None
    ctl: str | None = None
    ctl_port: str | None = None  # QEMU placement: serve stats on this virtio-serial port
    connect: str | None = None  # namespace placement: the backend's event socket
    channel: str | None = None  # QEMU placement: the virtio-serial port device
    region: str = "memfd"  # "memfd" (namespace placement) or "pci[:sysfs-dir]" (QEMU)
    region_size: int = 8 << 20
    header_slots: bool = True
    persistent: bool = False
    gso: bool = True
    budget: int = 64


class Netfront:
    def __init__(self, cfg: NetfrontConfig) -> None:
        if (cfg.connect is None) == (cfg.channel is None):
            raise ValueError("give exactly one of --connect and --channel")
        self.cfg = cfg
        self.tx_stats = RingStats()
        self.rx_stats = RingStats()
        self.counters = {"connects": 0, "disconnects": 0, "broken": 0}
        self.last_error = ""
        self.state = XenbusState.Initialising
        self.peer = ""
        self.features: dict[str, bool] = {}
        self.tx: TxQueue | None = None
        self.rx: RxQueue | None = None
        self.bar: mmap.mmap | None = None
        self.tap_fd = open_tap(cfg.tap)
        # netfront: netif_set_tso_max_size(XEN_NETIF_MAX_TX_SIZE - MAX_TCP_HEADER)
        configure(cfg.tap, mac=cfg.mac, ip=cfg.ip, mtu=cfg.mtu, gso_max_size=GSO_MAX_SIZE)
        self.ctl = ControlServer(cfg.ctl, self.control) if cfg.ctl else None
        self.ctl_port = PortControl(cfg.ctl_port, self.control) if cfg.ctl_port else None

    def wanted(self) -> dict[str, bool]:
        c = self.cfg
        w = dict.fromkeys(FEATURES, True)
        w["feature-header-slots"] = c.header_slots
        w["feature-persistent"] = c.persistent
        w["feature-gso-tcpv4"] = w["feature-gso-tcpv6"] = c.gso
        return w

    # --- control socket ------------------------------------------------------------------
    def control(self, request: dict) -> dict:
        if request.get("cmd") != "stats":
            raise KeyError(request.get("cmd"))
        rings = {"tx": self.tx_stats.as_dict(), "rx": self.rx_stats.as_dict()}
        tx, rx = self.tx, self.rx
        if tx is not None:
            rings["tx"].update(tx.ring.indices(), req_prod_pvt=tx.ring.req_prod_pvt,
                               rsp_cons=tx.ring.rsp_cons, slots_in_flight=tx.in_flight(),
                               header_slots_in_use=tx.header_slots_in_use())
        else:
            rings["tx"].update(slots_in_flight=0, header_slots_in_use=0)
        if rx is not None:
            rings["rx"].update(rx.ring.indices(), req_prod_pvt=rx.ring.req_prod_pvt,
                               rsp_cons=rx.ring.rsp_cons, slots_in_flight=0,
                               grants_active=RX_BUFFERS - len(rx.free))
        return {"role": "netfront", "name": self.cfg.name, "peer": self.peer,
                "pid": os.getpid(), "domid": self.cfg.domid, "state": self.state.name,
                "features": self.features, "rings": rings,
                "counters": dict(self.counters, last_error=self.last_error)}

    # --- lifecycle ----------------------------------------------------------------------
    def _open_channel(self) -> EventChannel:
        if self.cfg.connect:
            return connect_unix(self.cfg.connect)
        return open_port(self.cfg.channel)

    def _make_region(self, chosen: dict[str, bool], backend_domid: int):
        """Lay out a fresh region: a sealed memfd (namespaces) or the ivshmem BAR (QEMU)."""
        if self.cfg.region == "memfd":
            fd, mem = create_memfd(self.cfg.region_size, f"pvnet-{self.cfg.name}")
            region = Region.create(mem)
            return region, {"size": len(mem)}, (fd,)
        if self.bar is None:
            self.bar = map_pci_bar(self.cfg.region)
        return Region.create(self.bar), {"size": len(self.bar)}, ()

    def run(self) -> None:
        def stop(signum, _frame):
            raise Shutdown(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if self.ctl:
            self.ctl.start()
        if self.ctl_port:
            self.ctl_port.start()
        chan = None
        try:
            while True:
                try:
                    chan = self._open_channel()
                    self.state = XenbusState.Initialising
                    hs = Handshake(chan, self.cfg.name, self.cfg.domid, self.wanted())
                    offer, chosen, region = hs.run(self._make_region)
                    self._serve(chan, offer, chosen, region)
                except ChannelClosed as e:
                    log.info("%s: backend gone (%s); reconnecting", self.cfg.name, e)
                except (NegotiationError, ChannelError, TransportError, RingError,
                        BackendError, OSError) as e:
                    self.counters["broken"] += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.error("%s: device broken: %s; reconnecting", self.cfg.name,
                              self.last_error)
                    time.sleep(0.5)
                finally:
                    if self.state == XenbusState.Connected:
                        self.counters["disconnects"] += 1
                    self.state = XenbusState.Closed
                    self.tx = self.rx = None
                    if chan is not None:
                        chan.close()
                        chan = None
                    time.sleep(0.1)
        except Shutdown as e:
            log.info("%s: %s, shutting down", self.cfg.name, e)
            if chan is not None:
                try:
                    chan.send({"state": "Closing"})
                except (ChannelClosed, OSError):
                    pass
        finally:
            if self.ctl:
                self.ctl.close()
            os.close(self.tap_fd)

    def _serve(self, chan: EventChannel, offer, chosen: dict[str, bool],
               region: Region) -> None:
        cfg = self.cfg
        persistent = chosen["feature-persistent"]
        gso = chosen["feature-gso-tcpv4"] or chosen["feature-gso-tcpv6"]
        set_offload(self.tap_fd, TUN_F_CSUM | ((TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
                                               if gso else 0))
        self.rx = rx = RxQueue(region, self.tap_fd, self.rx_stats, persistent,
                               offer.backend_domid)
        self.tx = tx = TxQueue(region, self.tap_fd, self.tx_stats, RX_BUFFERS,
                               chosen["feature-header-slots"], persistent,
                               offer.backend_domid)
        self.peer = offer.backend
        self.features = chosen
        self.state = XenbusState.Connected
        self.counters["connects"] += 1
        log.info("%s: connected to %s, features %s", cfg.name, offer.backend,
                 ",".join(k for k, v in chosen.items() if v))
        rx.refill()
        _push(rx.ring, chan, self.rx_stats)
        self._loop(chan, tx, rx)

    def _loop(self, chan: EventChannel, tx: TxQueue, rx: RxQueue) -> None:
        poller = select.poll()
        cfd, tfd = chan.fileno(), self.tap_fd
        poller.register(cfd, select.POLLIN)
        tap_polled = False
        budget = self.cfg.budget
        txs, rxs = self.tx_stats, self.rx_stats
        timeout = 0
        while True:
            for fd, _ev in poller.poll(timeout):
                if fd == cfd:
                    for msg in chan.recv().messages:
                        if msg.get("state") in ("Closing", "Closed"):
                            raise ChannelClosed(msg.get("error", "backend is closing"))
            tx.reap()
            sent = tx.pump(budget)
            if sent:
                _push(tx.ring, chan, txs)
            got = rx.poll(budget)
            if rx.refill():
                _push(rx.ring, chan, rxs)
            busy = sent == budget or got == budget
            if not busy:
                busy = tx.ring.final_check_for_responses() or \
                    rx.ring.final_check_for_responses()
            want_tap = not tx.stopped
            if want_tap != tap_polled:
                if want_tap:
                    poller.register(tfd, select.POLLIN)
                else:
                    poller.unregister(tfd)
                tap_polled = want_tap
            timeout = 0 if busy else 1000


def _push(ring: FrontRing, chan: EventChannel, stats: RingStats) -> None:
    if ring.push_requests():
        chan.notify()
        stats.notify_sent += 1
    else:
        stats.notify_suppressed += 1
