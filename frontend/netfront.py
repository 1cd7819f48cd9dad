"""A netfront device: the guest's TAP, the handshake, and the data loop (``xen-netfront.c``).

The device survives its backend: when the backend closes or dies, the frontend goes back to
the handshake and reconnects, keeping its TAP (and so the guest's addresses and sockets).
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import threading
import time
import weakref
from dataclasses import dataclass

from frontend.faults import BackendError
from frontend.rx import RX_BUFFERS, RxQueue
from frontend.tx import TxQueue
from frontend.txflow import REAP_INTERVAL
from frontend.xenbus import Handshake
from shared.channel import ChannelClosed, ChannelError, EventChannel, kick_if
from shared.control_port import PortControl
from shared.control_server import ControlServer
from shared.doorbell_guest import guest_doorbell
from shared.kickchannel import KickChannel
from shared.lifecycle import Shutdown, send_quietly, stop_on_signals
from shared.netif import EXTENSIONS, FRONTEND_KEYS
from shared.region import Region
from shared.ring import FrontRing, RingError, require_tso
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
    gso: bool = True
    rx_by_id: bool = False  # pvnet extension feature-rx-by-id (out-of-order RX completion)
    budget: int = 64
    #: NAPI-like poll budget (µs): after a round that did work, keep polling ring and TAP
    #: (events unarmed) until this long has passed without work; 0: arm and sleep at once.
    #: Off by default: in a 1-vCPU TCG guest the polling took the CPU the guest's sender needs
    #: (issue 13's bench: TCP tx 0.035 with 1000 µs vs 0.076 Gbit/s without, rr p50 alike)
    poll_us: int = 0
    #: tests only: an already open stand-in for the TAP (a datagram socket); no device is made
    tap_fd: int | None = None


class Netfront:
    def __init__(self, cfg: NetfrontConfig) -> None:
        if (cfg.connect is None) == (cfg.channel is None):
            raise ValueError("give exactly one of --connect and --channel")
        require_tso()  # the shared-memory code relies on x86's ordering
        self.cfg = cfg
        self.tx_stats = RingStats()
        self.rx_stats = RingStats()
        self.counters = {"connects": 0, "disconnects": 0, "broken": 0, "internal_errors": 0,
                         "lost_wakeups": 0, "sleeps": 0, "polls_busy": 0,
                         "polls_empty": 0}
        self.last_error = ""
        self.state = XenbusState.Initialising
        self.peer = ""
        self.features: dict[str, bool] = {}
        self.tx: TxQueue | None = None
        self.rx: RxQueue | None = None
        self.bar: mmap.mmap | None = None
        self._mapped: list[weakref.ref] = []  # memfd regions, to prove old ones are unmapped
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if cfg.tap_fd is not None:
            self.tap_fd = cfg.tap_fd
        else:
            self.tap_fd = open_tap(cfg.tap)
            # netfront: netif_set_tso_max_size(XEN_NETIF_MAX_TX_SIZE - MAX_TCP_HEADER)
            configure(cfg.tap, mac=cfg.mac, ip=cfg.ip, mtu=cfg.mtu, gso_max_size=GSO_MAX_SIZE)
        self.ctl = ControlServer(cfg.ctl, self.control) if cfg.ctl else None
        self.ctl_port = PortControl(cfg.ctl_port, self.control) if cfg.ctl_port else None

    def wanted(self) -> dict[str, bool]:
        c = self.cfg
        w = dict.fromkeys((*FRONTEND_KEYS, *EXTENSIONS), True)
        w["feature-header-slots"] = c.header_slots
        w["feature-persistent"] = c.persistent
        w["feature-rx-by-id"] = c.rx_by_id
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
                "regions_mapped": self.regions_mapped(),
                "counters": dict(self.counters, last_error=self.last_error)}

    def regions_mapped(self) -> int:
        """Grant regions this process maps: 1 while connected (0 between memfd regions)."""
        self._mapped = [r for r in self._mapped if r() is not None and not r().closed]
        return len(self._mapped) + (self.bar is not None)

    # --- lifecycle ----------------------------------------------------------------------
    def _open_channel(self) -> EventChannel:
        if self.cfg.connect:
            return connect_unix(self.cfg.connect, stop=self._stop.is_set)
        chan = open_port(self.cfg.channel)
        if self.cfg.doorbell:  # doorbell: kicks over ivshmem-doorbell (shared/doorbell.py)
            chan = KickChannel.around(chan, guest_doorbell, own_doorbell=False)
        return chan

    def _make_region(self, chosen: dict[str, bool], backend_domid: int):
        """Lay out a fresh region: a sealed memfd (namespaces) or the ivshmem BAR (QEMU)."""
        if self.cfg.region == "memfd":
            fd, mem = create_memfd(self.cfg.region_size, f"pvnet-{self.cfg.name}")
            self._mapped.append(weakref.ref(mem))
            region = Region.create(mem)
            return region, {"size": len(mem)}, (fd,)
        if self.bar is None:  # doorbell: BAR2 through VFIO, as vfio-pci owns the device
            self.bar = (guest_doorbell().region() if self.cfg.doorbell
                        else map_pci_bar(self.cfg.region))
        return Region.create(self.bar), {"size": len(self.bar)}, ()

    def run(self) -> None:
        stop_on_signals()
        if self.ctl:
            self.ctl.start()
        if self.ctl_port:
            self.ctl_port.start()
        try:
            while True:
                self._connection()
                if self._stop.wait(0.1):
                    raise Shutdown("stop requested")
        except Shutdown as e:
            log.info("%s: %s, shutting down", self.cfg.name, e)
        finally:
            if self.ctl:
                self.ctl.close()
            if self.ctl_port:
                self.ctl_port.close()
            if self.cfg.tap_fd is None:
                os.close(self.tap_fd)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)

    def stop(self) -> None:
        """Ask ``run`` (in another thread) to return; used by in-process tests."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _connection(self) -> None:
        """One connection, from opening the channel to its end. The device (the TAP, so the
        guest's addresses and sockets) survives it; a broken backend is told why."""
        chan = None
        try:
            chan = self._open_channel()
            self.state = XenbusState.Initialising
            hs = Handshake(chan, self.cfg.name, self.cfg.domid, self.wanted(),
                           stop=self._stop.is_set)
            offer, chosen, region = hs.run(self._make_region)
            self._serve(chan, offer, chosen, region)
        except ChannelClosed as e:
            log.info("%s: backend gone (%s); reconnecting", self.cfg.name, e)
        except Shutdown:
            if chan is not None:
                send_quietly(chan, {"state": "Closing"})
            raise
        except BACKEND_FAULTS as e:
            if self._stop.is_set():
                raise Shutdown("stop requested") from None
            self._broken(chan, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - a bug of ours must not take the device down
            self.counters["internal_errors"] += 1
            log.exception("%s: internal error", self.cfg.name)
            self._broken(chan, f"internal {type(e).__name__}: {e}")
        finally:
            if self.state == XenbusState.Connected:
                self.counters["disconnects"] += 1
            self.state = XenbusState.Closed
            if self.tx is not None:  # unanswered requests go with the ring (the backend's)
                self.tx_stats.slots_released += self.tx.in_flight()
            self.tx = self.rx = None  # the region's last views: the memfd mapping goes now
            if chan is not None:
                chan.close()

    def _broken(self, chan: EventChannel | None, why: str) -> None:
        """xennet: the backend answered nonsense. Say so, drop the connection, and come back
        after a pause (the backend may be restarting, or hostile)."""
        self.counters["broken"] += 1
        self.last_error = why
        log.error("%s: device broken: %s; reconnecting", self.cfg.name, why)
        if chan is not None:
            send_quietly(chan, {"state": "Closing", "error": why})
        if self._stop.wait(BROKEN_BACKOFF):
            raise Shutdown("stop requested")

    def _serve(self, chan: EventChannel, offer, chosen: dict[str, bool],
               region: Region) -> None:
        cfg = self.cfg
        ag = Agreement.of(offer.features, chosen)
        if cfg.tap_fd is None:  # a test's stand-in socket has no offloads to set
            set_offload(self.tap_fd, tap_offloads(ag))
        self.rx = rx = RxQueue(region, self.tap_fd, self.rx_stats, ag.persistent,
                               offer.backend_domid, ag)
        self.tx = tx = TxQueue(region, self.tap_fd, self.tx_stats, RX_BUFFERS,
                               ag.header_slots, ag.persistent, offer.backend_domid, ag)
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
        """The data loop, NAPI-like: a wake-up is followed by polling (ring and TAP, events
        unarmed, so the backend need not kick) until ``poll_us`` pass without work; only then
        are the events armed (RING_FINAL_CHECK: arm, re-check) and the loop sleeps. It never
        sleeps unarmed: a timeout other than 0 is only chosen right after a final check that
        found nothing. Empty polls yield the CPU, so the guest's own tasks run meanwhile."""
        poller = select.poll()
        cfd, tfd, wfd = chan.fileno(), self.tap_fd, self._wake_r
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
            quick = select.poll()
            quick.register(cfd, select.POLLIN)
            if not quick.poll(0):  # not merely a kick still on its way
                self.counters["lost_wakeups"] += 1
                log.warning("%s: found responses no notification announced (lost wake-up)",
                            self.cfg.name)




def tap_offloads(ag: Agreement) -> int:
    """What the guest stack may hand us follows what the backend offered (netfront's
    xennet_fix_features): no TSO kind the backend's feature-gso-* keys do not accept."""
    flags = TUN_F_CSUM | (TUN_F_TSO4 if ag.tx_gso_tcpv4 else 0) \
        | (TUN_F_TSO6 if ag.tx_gso_tcpv6 else 0)
    return flags | (TUN_F_TSO_ECN if ag.tx_gso_tcpv4 or ag.tx_gso_tcpv6 else 0)


def _push(ring: FrontRing, chan: EventChannel, stats: RingStats) -> None:
    kick_if(ring.push_requests(), chan, stats)
