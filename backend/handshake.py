"""Netback's side of the handshake (Linux ``xenbus.c``): offer features, check what the
frontend chose, map its region. Everything the frontend says is validated here; a bad value
ends the connection with a "Closing" message naming the problem, never with a crash."""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.plumbing.channel import ChannelClosed, EventChannel, Received
from shared.plumbing.transport import TransportError, connect_unix, map_memfd, queue_channel
from shared.protocol.netif import (
    BACKEND_KEYS,
    EXTENSIONS,
    MAX_QUEUES_KEY,
    NUM_QUEUES_KEY,
    PAGE_SIZE,
    STAGING_POOL_KEYS,
)
from shared.protocol.queues import FLAT, QueueError, QueueKeys, check_queues, is_queue_key
from shared.protocol.region import Layout, Region
from shared.protocol.xenbus import (
    FRONTEND_READ,
    Agreement,
    NegotiationError,
    XenbusState,
    check_request,
    log_ignored,
    unknown_keys,
)
from shared.text import printable

log = logging.getLogger("netback")
HANDSHAKE_TIMEOUT = 10.0


class HandshakeAbandoned(ChannelClosed):
    """The caller gave up waiting for a silent frontend (a newer one is knocking): it is
    dropped without a word, as if it had gone; nobody's fault."""


@dataclass
class Negotiated:
    """What a successful handshake produced."""

    name: str
    domid: int
    features: dict[str, bool]  # the frontend's keys, as checked
    #: the persistent areas (page 0, grant table, rings, header slots), mapped for the CPU
    region: Region
    #: the whole region (the DMA view's mapping), and a descriptor of the memfd (ours to close)
    dma_mem: mmap.mmap
    fd: int
    offered: dict[str, bool]
    agreement: Agreement
    #: the queues (``FLAT``: one, on the layout's rings and this channel) and, with several,
    #: each queue's own event channel (ours to close)
    queues: tuple[QueueKeys, ...] = FLAT
    channels: list[EventChannel] = field(default_factory=list)
    #: staging grants: the frontend's pool lists (``tx-pool-ref``... from its region message)
    pools: dict[str, int] = field(default_factory=dict)


def pool_keys(region_msg: dict) -> dict[str, int]:
    """Staging grants: the pool lists' keys (integers; a missing size is an empty pool)."""
    out = {}
    for k in STAGING_POOL_KEYS:
        v = region_msg.get(k, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise NegotiationError(f"{k} must be a non-negative integer (got {v!r})")
        out[k] = v
    return out


def attach_region(fd: int, mem: mmap.mmap) -> tuple[Region, int]:
    """Validate a region's header (read from ``mem``, the whole region: the DMA view's
    mapping) and map its persistent areas for the CPU - everything before the payload pages,
    which the CPU view maps one grant at a time. Returns that Region and a dup of ``fd``."""
    layout = Layout.unpack(memoryview(mem), len(mem))
    cpu = mmap.mmap(fd, layout.payload_page * PAGE_SIZE)
    try:
        return Region(cpu, layout), os.dup(fd)
    except BaseException:
        cpu.close()
        raise


#: everything this netback implements, and so may offer
IMPLEMENTED = (*BACKEND_KEYS, *EXTENSIONS)


def offered_features(without: tuple[str, ...] = (), queues: int = 1) -> dict[str, object]:
    """The offer: every key this backend implements, minus those switched off (--no-offer),
    and ``multi-queue-max-queues`` (as Linux netback always writes it). feature-rx-copy
    cannot be switched off: copying is the only RX mode."""
    bad = set(without) - set(IMPLEMENTED)
    if bad or "feature-rx-copy" in without:
        raise ValueError(f"cannot withhold {sorted(bad or {'feature-rx-copy'})}: not an "
                         f"optional feature of this backend ({', '.join(IMPLEMENTED)})")
    offer: dict[str, object] = {k: k not in without for k in IMPLEMENTED}
    offer[MAX_QUEUES_KEY] = queues
    return offer


class Handshake:
    """Drive one frontend from Initialising to Connected."""

    def __init__(self, chan: EventChannel, vif: str, domid: int,
                 shared_region: mmap.mmap | None = None, shared_fd: int | None = None,
                 offered: dict[str, object] | None = None,
                 channel_base: str | None = None) -> None:
        self.chan = chan
        #: QEMU placement: the socket of the handshake's port; a queue's event channel N is
        #: the port QEMU serves at ``queue_channel(channel_base, N)``
        self.channel_base = channel_base
        self.vif = vif
        self.domid = domid
        self.shared_region = shared_region  # QEMU placement: the region is already ours
        self.shared_fd = shared_fd  # ... and its memfd
        self.offered = offered if offered is not None else offered_features()
        self.state = XenbusState.InitWait
        self.said_initwait = False

    def run(self, keep_going: Callable[[], bool] = lambda: True,
            first: dict | None = None) -> Negotiated:
        """Blocking; waits indefinitely for the first hello (a guest may still be booting),
        then at most HANDSHAKE_TIMEOUT for each further step. ``first`` is a hello already
        read by the caller (a frontend that restarted on the same stream, QEMU placement).
        ``keep_going`` is asked every 250 ms; False ends the wait with HandshakeAbandoned."""
        deadline = None
        poller = select.poll()
        poller.register(self.chan.fileno(), select.POLLIN)
        pending = [first] if first is not None else []
        while True:
            if pending:
                got = Received(messages=pending)
                pending = []
            else:
                if not keep_going():
                    raise HandshakeAbandoned("handshake abandoned")
                if deadline is not None and time.monotonic() > deadline:
                    raise NegotiationError("frontend did not finish the handshake in time")
                if not poller.poll(250):
                    continue
                got = self.chan.recv()
            result = self._handle(got)
            if result is not None:
                return result
            if deadline is None and self.said_initwait:
                deadline = time.monotonic() + HANDSHAKE_TIMEOUT

    def _handle(self, got: Received) -> Negotiated | None:
        """One batch of messages; the passed descriptor (at most one is used) is always closed
        here, whatever happens: the mapping, if any, holds the region."""
        fds = list(got.fds)
        try:
            for msg in got.messages:
                state = msg.get("state")
                if state == "Initialising":
                    self._send_initwait()
                elif state == "Initialised":
                    if not self.said_initwait:
                        raise NegotiationError("Initialised before Initialising")
                    try:
                        result = self._accept(msg, fds)
                    except (NegotiationError, ValueError, OSError, TransportError) as e:
                        try:
                            self.chan.send({"state": "Closing", "error": str(e)})
                        except (ChannelClosed, OSError):
                            pass
                        if isinstance(e, NegotiationError):
                            raise  # keeps its kind (NotNegotiated is counted apart)
                        raise NegotiationError(str(e)) from e
                    self.chan.send({"state": "Connected"})
                    return result
                elif state in ("Closing", "Closed"):
                    raise ChannelClosed("frontend closed during the handshake")
            return None
        finally:
            for fd in fds:
                os.close(fd)

    def _send_initwait(self) -> None:
        self.said_initwait = True
        self.chan.send({"state": "InitWait", "name": self.vif, "domid": 0,
                        "features": self.offered})

    def _accept(self, msg: dict, fds: list[int]) -> Negotiated:
        fd = fds[0] if fds else None
        if msg.get("domid") != self.domid:
            raise NegotiationError(f"frontend says domid {msg.get('domid')!r}, "
                                   f"this vif serves domid {self.domid}")
        features = check_request(self.offered, msg.get("features"))
        queues = check_queues(int(self.offered.get(MAX_QUEUES_KEY, 1)), msg["features"])
        log_ignored(log, [k for k in unknown_keys(msg["features"], (*FRONTEND_READ,
                                                                    NUM_QUEUES_KEY))
                          if not is_queue_key(k)], "frontend")
        region_msg = msg.get("region")
        if not isinstance(region_msg, dict) or not isinstance(region_msg.get("size"), int):
            raise NegotiationError("region must be an object with an integer size")
        if self.shared_region is not None:
            if region_msg["size"] != len(self.shared_region):
                raise NegotiationError(f"region size {region_msg['size']} does not match the "
                                       f"shared region ({len(self.shared_region)})")
            mem = self.shared_region
            fd = self.shared_fd
        else:
            if fd is None:
                raise NegotiationError("no region memfd passed with Initialised")
            mem = map_memfd(fd, region_msg["size"])
        try:
            region, own_fd = attach_region(fd, mem)
        except BaseException:
            if mem is not self.shared_region:
                mem.close()  # unmapped now, not whenever the traceback is collected
            raise
        name = msg.get("name")
        ag = Agreement.of(self.offered, features)
        try:
            if ag.staging and len(queues) > 1:
                raise QueueError(f"feature-staging-grants with {len(queues)} queues: the "
                                 "pools name one queue's pages (staging serves one queue)")
            pools = pool_keys(region_msg) if ag.staging else {}
            _check_rings(queues, region.layout)
            channels = self._channels(queues, fds)
        except BaseException:
            region.close()
            os.close(own_fd)
            if mem is not self.shared_region:
                mem.close()
            raise
        # the name is the frontend's to choose: escaped once here, for every log line
        return Negotiated(printable(str(name), 64) if name else "?", self.domid, features,
                          region, mem, own_fd, self.offered, ag, queues, channels, pools)

    def _channels(self, queues: tuple[QueueKeys, ...], fds: list[int]) -> list[EventChannel]:
        """Each queue's event channel (several queues): the descriptor passed as number N
        with Initialised (namespace placement), or QEMU's port N (QEMU placement)."""
        if len(queues) == 1:
            return []
        numbers = [q.event_channel for q in queues]
        if self.channel_base is None and len(fds) != 1 + len(queues):
            raise QueueError(f"{len(fds) - 1} event channels passed for {len(queues)} queues")
        out: list[EventChannel] = []
        try:
            for n in numbers:
                if self.channel_base is not None:
                    chan = connect_unix(queue_channel(self.channel_base, n), timeout=2.0)
                elif not 1 <= n < len(fds):
                    raise QueueError(f"event channel {n}: not a descriptor passed (1.."
                                     f"{len(fds) - 1})")
                else:
                    chan = EventChannel(sock=_stream(fds[n], n))
                chan.send_timeout = self.chan.send_timeout
                out.append(chan)
        except BaseException:
            for chan in out:
                chan.close()
            raise
        return out


def _stream(fd: int, n: int) -> socket.socket:
    """A passed descriptor as a queue's event channel: it must be a unix stream socket."""
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError as e:
        os.close(dup)
        raise QueueError(f"event channel {n} is not a socket ({e.strerror})") from e
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise QueueError(f"event channel {n} is not a unix stream socket")
    return sock


def _check_rings(queues: tuple[QueueKeys, ...], layout: Layout) -> None:
    """Every queue's rings must be pages of the layout's ring area (mapped for the CPU from
    connect to disconnect, apart from the grant table and the header slots)."""
    area = layout.ring_area
    for q in queues:
        for key, page in (("tx-ring-ref", q.tx_ring_ref), ("rx-ring-ref", q.rx_ring_ref)):
            if page is not None and page not in area:
                raise QueueError(f"queue-{q.index}/{key} {page}: not a page of the ring area "
                                 f"({area.start}..{area.stop - 1})")
