"""A netfront device: the guest's TAP, the handshake, and the data loop (``xen-netfront.c``).

The device survives its backend: when the backend closes or dies, the frontend goes back to
the handshake and reconnects, keeping its TAP (and so the guest's addresses and sockets). That
connection life is the one both ends share (``shared.endpoint.connection``); this module plugs in
the netfront's steps and holds its data loop.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import weakref
from dataclasses import dataclass

from frontend import loop
from frontend.faults import BACKEND_FAULTS
from frontend.grants.staging import write_pools
from frontend.handshake import Handshake, Laid
from frontend.mechanisms import grant_policy
from frontend.multiqueue import MultiConnection, Queues
from frontend.rx.queue import RX_BUFFERS, RxQueue
from frontend.tx.queue import TxQueue
from shared.endpoint.connection import Endpoint
from shared.plumbing.channel import ChannelClosed, EventChannel
from shared.plumbing.control.port import PortControl
from shared.plumbing.control.server import ControlServer
from shared.plumbing.doorbell.guest import guest_doorbell
from shared.plumbing.doorbell.kickchannel import KickChannel
from shared.plumbing.netdev import NetDevice, offload_flags
from shared.plumbing.transport import (
    connect_unix,
    create_memfd,
    map_pci_bar,
    open_port,
    queue_channel,
)
from shared.protocol.netif import EXTENSIONS, FRONTEND_KEYS, GSO_MAX_SIZE, NUM_QUEUES_KEY
from shared.protocol.queues import frontend_queue_keys
from shared.protocol.region import Region
from shared.protocol.xenbus import Agreement, XenbusState

log = logging.getLogger("netfront")


#: pause before reconnecting after a fault, so a broken backend cannot make us spin
BROKEN_BACKOFF = 0.5
#: pause before reconnecting after any connection
RECONNECT_PAUSE = 0.1
#: a poll budget (µs) worth trying where a wake-up is dear (bench mode lazy-poll)
POLL_US = 1000


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
    doorbell: bool = False  # QEMU placement: kicks and region via ivshmem-doorbell + VFIO
    region_size: int = 8 << 20
    header_slots: bool = True
    persistent: bool = False
    #: the grant policy to use where no extension decides (``recycle``); "" the default
    grants: str = ""
    #: recycling's pool, in rings' worth of pages (``frontend/grants/recycle.py``)
    recycle_pool: int = 2
    gso: bool = True
    rx_by_id: bool = False  # pvnet extension feature-rx-by-id (out-of-order RX completion)
    #: write feature-ipv6-csum-offload (as Linux does): IPv6 RX frames may come csum_blank
    ipv6_csum_offload: bool = True
    budget: int = 64
    #: NAPI-like poll budget (µs): after a round that did work, keep polling ring and TAP
    #: (events unarmed) until this long has passed without work; 0: arm and sleep at once.
    #: Off by default: in a 1-vCPU TCG guest the polling took the CPU the guest's sender needs
    #: (measured: docs/performance.md, "The guest path", the poll budget)
    poll_us: int = 0
    #: queues to use (at most the backend's multi-queue-max-queues): the TAP gets a queue
    #: each, a connection with several gets a worker process each (frontend/multiqueue.py)
    queues: int = 1


@dataclass
class Connection:
    """What one backend connection holds: the channel, the region and the queues over it."""

    chan: EventChannel
    region: Region
    tx: TxQueue
    rx: RxQueue


class Netfront(Endpoint[Connection]):
    waiting = XenbusState.Initialising
    peer_errors = BACKEND_FAULTS

    def __init__(self, cfg: NetfrontConfig) -> None:
        if (cfg.connect is None) == (cfg.channel is None):
            raise ValueError("give exactly one of --connect and --channel")
        self.cfg = cfg
        super().__init__(cfg.name, log)
        self.counters.update({"broken": 0, "sleeps": 0, "polls_busy": 0, "polls_empty": 0})
        self.tx: TxQueue | None = None
        self.rx: RxQueue | None = None
        #: the queues' workers and totals (several queues wanted; None: one)
        self.queues = Queues(self) if cfg.queues > 1 else None
        self.bar: mmap.mmap | None = None
        self._mapped: list[weakref.ref] = []  # memfd regions, to prove old ones are unmapped
        self.tap = self.open_device()
        self.ctl = ControlServer(cfg.ctl, self.control) if cfg.ctl else None
        self.ctl_port = PortControl(cfg.ctl_port, self.control) if cfg.ctl_port else None

    def open_device(self) -> NetDevice:
        """The guest's TAP. netfront: netif_set_tso_max_size(XEN_NETIF_MAX_TX_SIZE -
        MAX_TCP_HEADER)."""
        c = self.cfg
        return NetDevice.open(c.tap, queues=c.queues, mac=c.mac, ip=c.ip, mtu=c.mtu,
                              gso_max_size=GSO_MAX_SIZE)

    def wanted(self) -> dict[str, bool]:
        c = self.cfg
        w = dict.fromkeys((*FRONTEND_KEYS, *EXTENSIONS), True)
        w["feature-header-slots"] = c.header_slots
        w["feature-persistent"] = c.persistent or c.grants == "persistent"
        w["feature-staging-grants"] = c.grants == "staging"
        w["feature-rx-by-id"] = c.rx_by_id
        w["feature-gso-tcpv4"] = w["feature-gso-tcpv6"] = c.gso
        w["feature-ipv6-csum-offload"] = c.ipv6_csum_offload
        return w

    # --- control socket ------------------------------------------------------------------
    def control(self, request: dict) -> dict:
        if request.get("cmd") != "stats":
            raise KeyError(request.get("cmd"))
        rings = loop.rings_of((self.tx_stats, self.rx_stats), self.tx, self.rx)
        counters = dict(self.counters)
        out = self.queues.stats(rings, counters) if self.queues is not None else {}
        out.update(self.stats("netfront", self.cfg.domid), rings=rings,
                   regions_mapped=self.regions_mapped(),
                   counters=dict(counters, last_error=self.last_error))
        return out

    def regions_mapped(self) -> int:
        """Grant regions this process maps: 1 while connected (0 between memfd regions)."""
        self._mapped = [r for r in self._mapped if r() is not None and not r().closed]
        return len(self._mapped) + (self.bar is not None)

    def services(self) -> list:
        return [s for s in (self.ctl, self.ctl_port) if s is not None]

    def close(self) -> None:
        try:
            super().close()  # the control sockets, the wake-up pipe
        finally:
            self.tap.close()

    # --- the connection's steps -----------------------------------------------------------
    def open_channel(self) -> EventChannel:
        if self.cfg.connect:
            return connect_unix(self.cfg.connect, stop=self.stopping)
        chan = open_port(self.cfg.channel)
        # doorbell: kicks over ivshmem-doorbell (shared/plumbing/doorbell/__init__.py)
        if self.cfg.doorbell:
            chan = KickChannel.around(chan, guest_doorbell, own_doorbell=False)
        return chan

    def _make_region(self, chosen: dict[str, object], backend_domid: int) -> Laid:
        """Lay out a fresh region for the queues chosen: a sealed memfd (namespaces) or the
        ivshmem BAR (QEMU); with several queues, an event channel each; with staging grants
        agreed (one queue), its pool lists granted and named (``tx-pool-ref``...)."""
        n = int(chosen.get(NUM_QUEUES_KEY, 1))
        if self.cfg.region == "memfd":
            fd, mem = create_memfd(self.cfg.region_size, f"pvnet-{self.cfg.name}")
            self._mapped.append(weakref.ref(mem))
            laid = Laid(Region.create(mem, queues=n), {"size": len(mem)}, (fd,))
        else:
            if self.bar is None:  # doorbell: BAR2 through VFIO, as vfio-pci owns the device
                self.bar = (guest_doorbell().region() if self.cfg.doorbell
                            else map_pci_bar(self.cfg.region))
            laid = Laid(Region.create(self.bar, owns_mem=False, queues=n),
                        {"size": len(self.bar)})
        if n > 1:
            numbers = self._queue_channels(laid, n)
            lay = laid.region.layout
            laid.keys = frontend_queue_keys([lay.queue_rings(q) for q in range(n)], numbers)
        elif chosen.get("feature-staging-grants"):
            laid.desc.update(write_pools(laid.region, backend_domid, RX_BUFFERS))
        return laid

    def _queue_channels(self, laid: Laid, n: int) -> list[int]:
        """Each queue's event channel and its number (``queue-N/event-channel``): a socket
        pair whose other end is passed with Initialised (namespace placement: the number is
        its place among the descriptors), or the virtio-serial port ``<channel>-qN``."""
        numbers = []
        try:
            for q in range(n):
                if self.cfg.connect:
                    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    laid.channels.append(EventChannel(sock=mine))
                    laid.fds = (*laid.fds, theirs.detach())
                    numbers.append(len(laid.fds) - 1)
                else:
                    laid.channels.append(open_port(queue_channel(self.cfg.channel, q)))
                    numbers.append(q)
        except BaseException:
            laid.close_channels()
            for fd in laid.fds:
                os.close(fd)
            raise
        return numbers

    def handshake(self, chan: EventChannel, first: dict | None):
        hs = Handshake(chan, self.cfg.name, self.cfg.domid, self.wanted(), stop=self.stopping,
                       queues=self.cfg.queues)
        return hs.run(self._make_region)

    def attach(self, chan: EventChannel, negotiated) -> Connection | MultiConnection:
        offer, chosen, laid = negotiated
        ag = Agreement.of(offer.features, chosen)
        self.tap.use_queues(laid.queues)
        self.tap.set_offload(tap_offloads(ag, self.cfg.gso))
        if laid.queues > 1:
            assert self.queues is not None  # it asked for no more than it wants
            conn: Connection | MultiConnection = self.queues.attach(chan, offer, chosen, laid)
        else:
            region = laid.region
            rx = RxQueue(region, self.tap.fd, self.rx_stats, self.policy(chosen, region,
                         self.rx_stats), offer.backend_domid, ag)
            tx = TxQueue(region, self.tap.fd, self.tx_stats, RX_BUFFERS, ag.header_slots,
                         self.policy(chosen, region, self.tx_stats), offer.backend_domid, ag)
            self.tx, self.rx = tx, rx
            conn = Connection(chan, region, tx, rx)
        self.peer = offer.backend
        self.features = chosen
        log.info("%s: connected to %s, %d queue%s, features %s", self.cfg.name, offer.backend,
                 laid.queues, "s" if laid.queues > 1 else "",
                 ",".join(k for k, v in chosen.items() if v is True))
        return conn

    def policy(self, chosen: dict[str, bool], region, stats):
        """One queue's grant policy (the frontend's side of a mechanism), on its counters."""
        c = self.cfg
        opts = {"pool_rings": c.recycle_pool} if c.grants == "recycle" else {}
        return grant_policy(chosen, region.grants, stats, c.grants, **opts)

    def serve(self, conn: Connection | MultiConnection) -> None:
        if isinstance(conn, MultiConnection):
            self.queues.serve(conn)
        else:
            c = self.cfg
            loop.serve(self, conn.chan, self.tap.fd, conn.tx, conn.rx, c.budget, c.poll_us)

    def detach(self, conn: Connection | MultiConnection) -> None:
        """Unanswered requests go with the ring (the backend's); the queues are the region's
        last users, so the region is closed now: a memfd region unmapped, a BAR region's views
        released (the BAR itself stays mapped: it is the device's, laid out again next time).
        With several queues, their workers are stopped first."""
        if isinstance(conn, MultiConnection):
            self.queues.detach(conn)
            return
        self.tx_stats.slots_released += conn.tx.in_flight()
        self.tx = self.rx = None
        region = conn.region
        conn.tx = conn.rx = conn.region = None  # type: ignore[assignment]
        region.close()

    # --- how a connection ends ------------------------------------------------------------
    def peer_left(self, e: ChannelClosed) -> None:
        log.info("%s: backend gone (%s); reconnecting", self.cfg.name, e)

    def booked(self, e: Exception, internal: bool, why: str) -> str:
        """xennet: the backend answered nonsense (or we did). Say so, drop the connection,
        and come back after a pause (the backend may be restarting, or hostile)."""
        self.counters["broken"] += 1
        return why

    def fault_line(self, why: str) -> str:
        return f"device broken: {why}; reconnecting"

    def session_ended(self, faulted: bool) -> None:
        self.rest((BROKEN_BACKOFF if faulted else 0) + RECONNECT_PAUSE)

def tap_offloads(ag: Agreement, gso: bool = True) -> int:
    """What the guest stack may hand us follows what the backend offered (netfront's
    xennet_fix_features): no TSO kind the backend's feature-gso-* keys do not accept, and no
    partial checksum without its feature-ipv6-csum-offload (a TAP has one switch for both
    families: the guest kernel then completes every checksum itself). With ``--no-gso`` (gso
    False) the TAP offers no TSO at all, whatever the backend offers: the guest stack then
    segments before the TAP, so TX frames are MTU-sized like RX ones (the bench's tcp-nogso
    workload measured 63 KB TX frames while only the RX keys were off)."""
    return offload_flags(ag.tx_gso_tcpv4 and gso, ag.tx_gso_tcpv6 and gso, ag.tx_csum)
