"""A netfront device: the guest's TAP, the handshake, and the data loop (``xen-netfront.c``).

The device survives its backend: when the backend closes or dies, the frontend goes back to
the handshake and reconnects, keeping its TAP (and so the guest's addresses and sockets). That
connection life is the one both ends share (``shared.connection``); this module plugs in the
netfront's steps and holds its data loop.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import time
import weakref
from dataclasses import dataclass

from frontend.faults import BackendError
from frontend.grants.staging import write_pools
from frontend.mechanisms import grant_policy
from frontend.rx import RX_BUFFERS, RxQueue
from frontend.tx import TxQueue
from frontend.txflow import REAP_INTERVAL
from frontend.xenbus import Handshake
from shared.channel import ChannelClosed, ChannelError, EventChannel, kick_if
from shared.connection import Endpoint
from shared.control_port import PortControl
from shared.control_server import ControlServer
from shared.doorbell_guest import guest_doorbell
from shared.kickchannel import KickChannel
from shared.lifecycle import Shutdown
from shared.netdev import NetDevice, offload_flags
from shared.netif import EXTENSIONS, FRONTEND_KEYS
from shared.region import Region
from shared.ring import FrontRing, RingError
from shared.stats import RingStats
from shared.transport import (
    TransportError,
    connect_unix,
    create_memfd,
    map_pci_bar,
    open_port,
)
from shared.xenbus import Agreement, NegotiationError, XenbusState

log = logging.getLogger("netfront")
#: largest GSO packet the guest stack may hand us: tx_request.size is 16 bits
GSO_MAX_SIZE = 0xFFFF - 320


#: what marks the device broken: the backend (or the path to it) misbehaved
BACKEND_FAULTS = (NegotiationError, ChannelError, TransportError, RingError, BackendError,
                  OSError)
#: poll timeout when idle (ms): also the period of the lost-wake-up check
IDLE_MS = 1000
#: poll timeout (ms) while TX requests are in flight without completion kicks
REAP_MS = max(1, int(REAP_INTERVAL * 1000))
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
        self.bar: mmap.mmap | None = None
        self._mapped: list[weakref.ref] = []  # memfd regions, to prove old ones are unmapped
        self.tap = self.open_device()
        self.ctl = ControlServer(cfg.ctl, self.control) if cfg.ctl else None
        self.ctl_port = PortControl(cfg.ctl_port, self.control) if cfg.ctl_port else None

    def open_device(self) -> NetDevice:
        """The guest's TAP. netfront: netif_set_tso_max_size(XEN_NETIF_MAX_TX_SIZE -
        MAX_TCP_HEADER)."""
        c = self.cfg
        return NetDevice.open(c.tap, mac=c.mac, ip=c.ip, mtu=c.mtu, gso_max_size=GSO_MAX_SIZE)

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
                               grants_active=rx.active())
        return dict(self.stats("netfront", self.cfg.domid), rings=rings,
                    regions_mapped=self.regions_mapped(),
                    counters=dict(self.counters, last_error=self.last_error))

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
        if self.cfg.doorbell:  # doorbell: kicks over ivshmem-doorbell (shared/doorbell.py)
            chan = KickChannel.around(chan, guest_doorbell, own_doorbell=False)
        return chan

    def _make_region(self, chosen: dict[str, bool], backend_domid: int):
        """Lay out a fresh region: a sealed memfd (namespaces) or the ivshmem BAR (QEMU); with
        staging grants agreed, its pool lists granted and named (``tx-pool-ref``...)."""
        region, desc, fds = self._new_region()
        if chosen.get("feature-staging-grants"):
            desc.update(write_pools(region, backend_domid, RX_BUFFERS))
        return region, desc, fds

    def _new_region(self):
        if self.cfg.region == "memfd":
            fd, mem = create_memfd(self.cfg.region_size, f"pvnet-{self.cfg.name}")
            self._mapped.append(weakref.ref(mem))
            region = Region.create(mem)
            return region, {"size": len(mem)}, (fd,)
        if self.bar is None:  # doorbell: BAR2 through VFIO, as vfio-pci owns the device
            self.bar = (guest_doorbell().region() if self.cfg.doorbell
                        else map_pci_bar(self.cfg.region))
        return Region.create(self.bar, owns_mem=False), {"size": len(self.bar)}, ()

    def handshake(self, chan: EventChannel, first: dict | None):
        hs = Handshake(chan, self.cfg.name, self.cfg.domid, self.wanted(), stop=self.stopping)
        return hs.run(self._make_region)

    def attach(self, chan: EventChannel, negotiated) -> Connection:
        offer, chosen, region = negotiated
        ag = Agreement.of(offer.features, chosen)
        self.tap.set_offload(tap_offloads(ag, self.cfg.gso))
        rx = RxQueue(region, self.tap.fd, self.rx_stats, self._policy(chosen, region,
                     self.rx_stats), offer.backend_domid, ag)
        tx = TxQueue(region, self.tap.fd, self.tx_stats, RX_BUFFERS, ag.header_slots,
                     self._policy(chosen, region, self.tx_stats), offer.backend_domid, ag)
        self.tx, self.rx = tx, rx
        self.peer = offer.backend
        self.features = chosen
        log.info("%s: connected to %s, features %s", self.cfg.name, offer.backend,
                 ",".join(k for k, v in chosen.items() if v))
        return Connection(chan, region, tx, rx)

    def _policy(self, chosen: dict[str, bool], region, stats):
        """One queue's grant policy (the frontend's side of a mechanism), on its counters."""
        c = self.cfg
        opts = {"pool_rings": c.recycle_pool} if c.grants == "recycle" else {}
        return grant_policy(chosen, region.grants, stats, c.grants, **opts)

    def serve(self, conn: Connection) -> None:
        conn.rx.refill()
        _push(conn.rx.ring, conn.chan, self.rx_stats)
        self._loop(conn.chan, conn.tx, conn.rx)

    def detach(self, conn: Connection) -> None:
        """Unanswered requests go with the ring (the backend's); the queues are the region's
        last users, so the region is closed now: a memfd region unmapped, a BAR region's views
        released (the BAR itself stays mapped: it is the device's, laid out again next time)."""
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

    def _loop(self, chan: EventChannel, tx: TxQueue, rx: RxQueue) -> None:
        """The data loop, NAPI-like: a wake-up is followed by polling (ring and TAP, events
        unarmed, so the backend need not kick) until ``poll_us`` pass without work; only then
        are the events armed (RING_FINAL_CHECK: arm, re-check) and the loop sleeps. It never
        sleeps unarmed: a timeout other than 0 is only chosen right after a final check that
        found nothing. Empty polls yield the CPU, so the guest's own tasks run meanwhile."""
        poller = select.poll()
        cfd, tfd, wfd = chan.fileno(), self.tap.fd, self.wake_fd
        poller.register(cfd, select.POLLIN)
        poller.register(wfd, select.POLLIN)
        tap_polled = False
        budget = self.cfg.budget
        spin_s = self.cfg.poll_us / 1e6
        txs, rxs = self.tx_stats, self.rx_stats
        counters = self.counters
        clock, yield_cpu = time.monotonic, os.sched_yield
        timeout = 0
        spin_until = 0.0
        while True:
            events = poller.poll(timeout)
            tap_ready = not tap_polled  # not polled: let pump find out (it stops cheaply)
            if events:
                for fd, _ev in events:
                    if fd == tfd:
                        tap_ready = True
                    elif fd == cfd:
                        for msg in chan.recv(keep_fds=False).messages:
                            if msg.get("state") in ("Closing", "Closed"):
                                raise ChannelClosed(msg.get("error", "backend is closing"))
                    elif fd == wfd:
                        raise Shutdown("stop requested")
            elif timeout == IDLE_MS:  # the idle timer, not the backend, woke us
                self._lost_wakeup(cfd, tx, rx)
            reaped = tx.reap()
            sent = tx.pump(budget) if tap_ready else 0
            if sent:
                _push(tx.ring, chan, txs)
            got = rx.poll(budget)
            if rx.refill():
                _push(rx.ring, chan, rxs)
            busy = sent == budget or got == budget
            want_tap = not tx.stopped
            if want_tap != tap_polled:
                if want_tap:
                    poller.register(tfd, select.POLLIN)
                else:
                    poller.unregister(tfd)
                tap_polled = want_tap
            if busy:
                timeout = 0
                continue
            if sent or got or reaped:  # work: poll on, events unarmed, for spin_s more
                now = clock()
                spin_until = now + spin_s
                counters["polls_busy"] += 1
                if spin_s:
                    timeout = 0
                    continue
            elif spin_s and clock() < spin_until:
                counters["polls_empty"] += 1
                yield_cpu()  # nothing yet: let the guest's tasks (the sender) run
                timeout = 0
                continue
            # about to sleep: arm both rings' events and look once more (no lost wake-up)
            if tx.arm_completions() or rx.ring.final_check_for_responses():
                timeout = 0
                continue
            counters["sleeps"] += 1
            # TX completions come without kicks while the queue runs: reap them soon anyway
            timeout = REAP_MS if tx.in_flight() else IDLE_MS

    def _lost_wakeup(self, cfd: int, tx: TxQueue, rx: RxQueue) -> None:
        """Responses that no notification announced (rsp_event was armed) mean a lost
        wake-up; the timer saved us, the counter says it had to."""
        waiting = rx.ring.unconsumed_responses()
        if tx.stopped:  # only a stopped queue asked for TX-completion kicks
            waiting += tx.ring.unconsumed_responses()
        if waiting:
            self.found_unannounced(cfd, "responses")

def tap_offloads(ag: Agreement, gso: bool = True) -> int:
    """What the guest stack may hand us follows what the backend offered (netfront's
    xennet_fix_features): no TSO kind the backend's feature-gso-* keys do not accept, and no
    partial checksum without its feature-ipv6-csum-offload (a TAP has one switch for both
    families: the guest kernel then completes every checksum itself). With ``--no-gso`` (gso
    False) the TAP offers no TSO at all, whatever the backend offers: the guest stack then
    segments before the TAP, so TX frames are MTU-sized like RX ones (the bench's tcp-nogso
    workload measured 63 KB TX frames while only the RX keys were off)."""
    return offload_flags(ag.tx_gso_tcpv4 and gso, ag.tx_gso_tcpv6 and gso, ag.tx_csum)

def _push(ring: FrontRing, chan: EventChannel, stats: RingStats) -> None:
    kick_if(ring.push_requests(), chan, stats)
