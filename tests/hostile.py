"""Hostile peers: the tools the tests use to check that each end survives the other lying.

``HostileFrontend`` does the handshake properly and then writes whatever it is told into the
shared region (ring entries and indices, grant entries, header slots, extra-info slots) and
onto the event channel (kick storms, garbage). ``ops()`` is the hypothesis strategy that
drives it: a case is a short list of ``Op``s, each a plain dataclass, so a failing case
shrinks to a readable list. ``HostileBackend`` is the mirror image for the frontend: it
accepts a netfront, negotiates, and then answers with lies (unknown/duplicate ids, responses
past a buffer, producers running ahead, grants left in use).

Why a case list and not a random byte blaster: most random bytes die at the first check
(an impossible producer index); mixing well-formed packets, valid grants and RX posts with the
garbage lets hypothesis reach the checks behind the first ones.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hypothesis import strategies as st

from backend.handshake import IMPLEMENTED, Negotiated
from backend.handshake import Handshake as BackHandshake
from frontend.handshake import Handshake, Laid
from shared.plumbing.channel import ChannelClosed, ChannelError, EventChannel
from shared.plumbing.transport import connect_unix, create_memfd, listen_unix
from shared.protocol.grant import GRANT_ENTRY, RESERVED_REFS, GTF_permit_access, GTF_readonly
from shared.protocol.netif import (
    EXTRA_INFO,
    GREF_PERSISTENT,
    PAGE_SIZE,
    RX_REQUEST,
    RX_RESPONSE,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_header_slot,
    NETTXF_more_data,
)
from shared.protocol.region import Region
from shared.protocol.ring import HEADER_SIZE, MASK32, BackRing, FrontRing

BASIC = {"feature-sg": True, "feature-header-slots": True, "request-rx-copy": True,
         "feature-rx-notify": True}



def polls(fd: int, event: int, seconds: float, ms: int) -> Iterator[None]:
    """Yield each time ``fd`` polls ready for ``event`` (waiting at most ``ms`` at a time),
    until ``seconds`` have passed."""
    end = time.monotonic() + seconds
    poller = select.poll()
    poller.register(fd, event)
    while time.monotonic() < end:
        if poller.poll(ms):
            yield


def settle(h: HostileFrontend, snapshot: Callable[[], object], seconds: float,
           look: float) -> str | None:
    """Until the backend disconnects ``h`` (its reason) or stops moving (None): what
    ``snapshot()`` returns (its state, counters, ring indices) is the same for three looks in a
    row, ``look`` seconds apart at least."""
    same, last = 0, None
    end = time.monotonic() + seconds
    while same < 3 and time.monotonic() < end:
        why = h.closed_within(look)
        if why is not None:
            return why
        now = snapshot()
        same = same + 1 if now == last else 0
        last = now
    return None

class HostileFrontend:
    """A frontend that negotiates like netfront and then lies on the ring."""

    def __init__(self, event_path: str, name: str, domid: int, size: int = 2 << 20,
                 **layout: int) -> None:
        self.chan = connect_unix(event_path, timeout=10)
        self.name, self.domid, self.size = name, domid, size
        self.layout = layout  # Region.create keywords (hdr_slots, ...)
        self.region: Region | None = None
        self.chosen: dict[str, bool] = {}
        self.next_id = 0

    def connect(self, wanted: dict[str, bool] | None = None,
                region_keys: Callable[[Region], dict] | None = None) -> dict[str, bool]:
        """Negotiate ``wanted``; ``region_keys(region)`` adds keys to the region message
        (staging grants' pool lists), after the region is laid out."""
        def make_region(chosen, backend_domid):
            fd, mem = create_memfd(self.size)
            self.region = Region.create(mem, **self.layout)
            extra = region_keys(self.region) if region_keys else {}
            return Laid(self.region, {"size": self.size, **extra}, (fd,))

        hs = Handshake(self.chan, self.name, self.domid, wanted or BASIC)
        _offer, self.chosen, _region = hs.run(make_region, timeout=10)
        self.area = self.region
        self.tx = FrontRing(self.region.tx_ring, TX_REQUEST.size, init=False)
        self.rx = FrontRing(self.region.rx_ring, RX_REQUEST.size, init=False)
        lay = self.region.layout
        self.payload = range(lay.payload_page, lay.payload_page + lay.payload_pages)
        return self.chosen

    # --- well-formed pieces, so a case can get past the first checks ---------------------
    def grant(self, ref: int, frame: int | None = None, readonly: bool = True) -> int:
        """Grant payload page ``ref - RESERVED_REFS`` (or ``frame``) to domain 0."""
        if frame is None:
            frame = self.payload.start + (ref - RESERVED_REFS) % len(self.payload)
        self.region.grants.grant(ref, 0, frame, readonly)
        return ref

    def fresh_id(self) -> int:
        self.next_id = (self.next_id + 1) & 0x7FFF
        return self.next_id

    def packet(self, size: int, header_slot: bool = True, persistent: bool = False,
               base: int = RESERVED_REFS + 300) -> None:
        """One correct TX packet of ``size`` bytes (header slot + granted payload pages, from
        gref ``base`` on: by default clear of the RX buffers a real netfront would post)."""
        reqs = []
        area = self.area  # the region, or one queue's part of it
        ss = area.hdr_slot_size
        head = min(size, ss) if header_slot else min(size, PAGE_SIZE)
        rest = size - head
        npages = -(-rest // PAGE_SIZE)
        flag = GREF_PERSISTENT if persistent else 0
        if header_slot:
            slot = self.fresh_id() % area.hdr_slots
            area.hdr[slot * ss:slot * ss + head] = os.urandom(head)
            reqs.append((slot * ss, 0, NETTXF_header_slot | (NETTXF_more_data if npages else 0),
                         self.fresh_id(), size))
        else:
            ref = self.grant(base + 20)
            reqs.append((ref | flag, 0, NETTXF_more_data if npages else 0, self.fresh_id(),
                         size))
        for p in range(npages):
            ref = self.grant(base + p)
            chunk = min(PAGE_SIZE, rest - p * PAGE_SIZE)
            last = p == npages - 1
            reqs.append((ref | flag, 0, 0 if last else NETTXF_more_data, self.fresh_id(),
                         chunk))
        self.put_tx(reqs)

    def post_rx(self, count: int, persistent: bool = False) -> None:
        """Post ``count`` correct RX buffers (ids unique among what this helper posted)."""
        for _ in range(min(count, self.rx.free_requests())):
            rid = self.fresh_id() & 0xFF
            ref = self.grant(RESERVED_REFS + rid, readonly=False)
            RX_REQUEST.pack_into(self.rx.buf, self.rx.entry(self.rx.req_prod_pvt), rid, 0,
                                 ref | (GREF_PERSISTENT if persistent else 0))
            self.rx.req_prod_pvt = (self.rx.req_prod_pvt + 1) & MASK32

    # --- raw writes -----------------------------------------------------------------------
    def put_tx(self, reqs: list[tuple[int, int, int, int, int]]) -> None:
        for r in reqs:
            TX_REQUEST.pack_into(self.tx.buf, self.tx.entry(self.tx.req_prod_pvt), *r)
            self.tx.req_prod_pvt = (self.tx.req_prod_pvt + 1) & MASK32

    def write_tx(self, *reqs: tuple[int, int, int, int, int]) -> None:
        self.put_tx(list(reqs))
        self.push()

    def push(self) -> None:
        """Publish both producers and kick, whatever the rings hold."""
        self.tx.push_requests()
        self.rx.push_requests()
        self.kick()

    def kick(self, n: int = 1) -> None:
        try:
            if n == 1:
                self.chan.notify()
            else:
                os.write(self.chan.fileno(), b"!" * n)
        except (BlockingIOError, ChannelClosed, OSError):
            pass

    def storm(self, seconds: float) -> int:
        """Flood the event channel with kicks for ``seconds``; returns how many went out."""
        sent, burst = 0, b"!" * 4096
        for _ in polls(self.chan.fileno(), select.POLLOUT, seconds, 20):
            try:
                sent += os.write(self.chan.fileno(), burst)
            except BlockingIOError:
                continue
            except OSError:
                break  # the backend hung up on us: also an answer
        return sent

    def garbage(self, data: bytes) -> None:
        try:
            os.write(self.chan.fileno(), data)
        except OSError:
            pass

    # --- the backend's reaction -----------------------------------------------------------
    def wait_closed(self, timeout: float = 10.0) -> str:
        """Block until the backend says Closing (returns its error) or hangs up."""
        why = self.closed_within(timeout)
        if why is None:
            raise TimeoutError("backend did not disconnect the hostile frontend")
        return why

    def closed_within(self, timeout: float) -> str | None:
        """The backend's reason if it disconnected us within ``timeout``, else None."""
        end = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.chan.fileno(), select.POLLIN)
        while True:
            left = end - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                if time.monotonic() >= end:
                    return None
                continue
            try:
                for msg in self.chan.recv(keep_fds=False).messages:
                    if msg.get("state") == "Closing":
                        return str(msg.get("error", "")) or "closing"
            except ChannelClosed:
                return "hung up"
            except ChannelError as e:
                return f"garbled: {e}"

    def close(self) -> None:
        self.chan.close()


# --- fuzz operations ---------------------------------------------------------------------
@dataclass(frozen=True)
class TxRequests:
    """Requests written at the producer (structured: every field a chosen or random value)."""

    reqs: tuple[tuple[int, int, int, int, int], ...]

    def apply(self, h: HostileFrontend) -> None:
        h.put_tx(list(self.reqs))


@dataclass(frozen=True)
class ExtraSlot:
    """An extra-info slot at the TX producer (GSO or not, any flags)."""

    etype: int
    eflags: int
    size: int
    gtype: int
    features: int

    def apply(self, h: HostileFrontend) -> None:
        EXTRA_INFO.pack_into(h.tx.buf, h.tx.entry(h.tx.req_prod_pvt), self.etype, self.eflags,
                             self.size, self.gtype, 0, self.features)
        h.tx.req_prod_pvt = (h.tx.req_prod_pvt + 1) & MASK32


@dataclass(frozen=True)
class RxRequests:
    reqs: tuple[tuple[int, int], ...]  # (id, gref)

    def apply(self, h: HostileFrontend) -> None:
        for rid, gref in self.reqs:
            RX_REQUEST.pack_into(h.rx.buf, h.rx.entry(h.rx.req_prod_pvt), rid, 0, gref)
            h.rx.req_prod_pvt = (h.rx.req_prod_pvt + 1) & MASK32


@dataclass(frozen=True)
class RawSlot:
    """Arbitrary bytes over one entry of a ring, published or not."""

    ring: str
    slot: int
    data: bytes

    def apply(self, h: HostileFrontend) -> None:
        r = h.tx if self.ring == "tx" else h.rx
        at = HEADER_SIZE + (self.slot & r.mask) * r.entry_size
        r.buf[at:at + r.entry_size] = self.data[:r.entry_size].ljust(r.entry_size, b"\0")


@dataclass(frozen=True)
class Index:
    """Set a shared index: absolute, or relative to the private producer."""

    ring: str
    field: int  # REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT
    value: int
    relative: bool

    def apply(self, h: HostileFrontend) -> None:
        r = h.tx if self.ring == "tx" else h.rx
        v = (r.req_prod_pvt + self.value) if self.relative else self.value
        r.idx[self.field] = v & MASK32
        if self.field == 0:
            r.req_prod_pvt = v & MASK32


@dataclass(frozen=True)
class GrantEntry:
    ref: int
    flags: int
    domid: int
    frame: int

    def apply(self, h: HostileFrontend) -> None:
        if 0 <= self.ref < h.region.grants.count:
            GRANT_ENTRY.pack_into(h.region.grants.buf, self.ref * GRANT_ENTRY.size,
                                  self.flags, self.domid, self.frame & 0xFFFFFFFF)


@dataclass(frozen=True)
class HeaderBytes:
    offset: int
    data: bytes

    def apply(self, h: HostileFrontend) -> None:
        off = self.offset % len(h.region.hdr)
        n = min(len(self.data), len(h.region.hdr) - off)
        h.region.hdr[off:off + n] = self.data[:n]


@dataclass(frozen=True)
class ValidPacket:
    size: int
    header_slot: bool

    def apply(self, h: HostileFrontend) -> None:
        h.packet(self.size, self.header_slot and h.chosen.get("feature-header-slots", False))


@dataclass(frozen=True)
class PostRx:
    count: int

    def apply(self, h: HostileFrontend) -> None:
        h.post_rx(self.count)


@dataclass(frozen=True)
class Kicks:
    count: int

    def apply(self, h: HostileFrontend) -> None:
        h.push()
        h.kick(self.count)


@dataclass(frozen=True)
class Garbage:
    """Bytes on the event channel that are not our protocol (or are, out of place)."""

    data: bytes

    def apply(self, h: HostileFrontend) -> None:
        h.garbage(self.data)


Op = (TxRequests | ExtraSlot | RxRequests | RawSlot | Index | GrantEntry | HeaderBytes
      | ValidPacket | PostRx | Kicks | Garbage)

_u16 = st.integers(0, 0xFFFF)
_u32 = st.integers(0, MASK32)
_TX_FLAGS = [0, NETTXF_more_data, NETTXF_header_slot, NETTXF_header_slot | NETTXF_more_data,
             NETTXF_extra_info, NETTXF_extra_info | NETTXF_header_slot | NETTXF_more_data,
             NETTXF_csum_blank | NETTXF_data_validated | NETTXF_header_slot]


def _gref() -> st.SearchStrategy[int]:
    """Mostly refs that exist (some granted by other ops), some persistent, some absurd."""
    near = st.integers(0, 700)
    return st.one_of(near, near.map(lambda r: r | GREF_PERSISTENT), _u32,
                     st.integers(0, 255).map(lambda s: s * 128))  # header-slot offsets


def _tx_request() -> st.SearchStrategy[tuple[int, int, int, int, int]]:
    return st.tuples(
        _gref(),
        st.one_of(st.just(0), st.integers(0, PAGE_SIZE + 16), _u16),
        st.one_of(st.sampled_from(_TX_FLAGS), _u16),
        st.one_of(st.integers(0, 40), _u16),
        st.one_of(st.integers(0, 200), st.integers(1400, 1600), st.just(PAGE_SIZE), _u16))


def ops(max_size: int = 10) -> st.SearchStrategy[list]:
    """A fuzz case: a short list of operations on a connected region and channel."""
    op = st.one_of(
        st.lists(_tx_request(), min_size=1, max_size=20).map(lambda r: TxRequests(tuple(r))),
        st.builds(ExtraSlot, st.one_of(st.just(XEN_NETIF_EXTRA_TYPE_GSO), st.integers(0, 255)),
                  st.integers(0, 255), _u16,
                  st.one_of(st.just(XEN_NETIF_GSO_TYPE_TCPV4), st.integers(0, 255)), _u16),
        st.lists(st.tuples(st.one_of(st.integers(0, 300), _u16), _gref()), min_size=1,
                 max_size=40).map(lambda r: RxRequests(tuple(r))),
        st.builds(RawSlot, st.sampled_from(["tx", "rx"]), st.integers(0, 255),
                  st.binary(min_size=8, max_size=12)),
        st.builds(Index, st.sampled_from(["tx", "rx"]), st.integers(0, 3),
                  st.one_of(st.integers(-300, 300), _u32), st.booleans()),
        st.builds(GrantEntry, st.integers(0, 700),
                  st.one_of(st.sampled_from([GTF_permit_access,
                                             GTF_permit_access | GTF_readonly, 0]), _u16),
                  st.one_of(st.just(0), _u16), st.one_of(st.integers(0, 700), _u32)),
        st.builds(HeaderBytes, st.integers(0, 1 << 16), st.binary(min_size=1, max_size=256)),
        st.builds(ValidPacket, st.integers(14, 0xFFFF), st.booleans()),
        st.builds(PostRx, st.integers(1, 64)),
        st.builds(Kicks, st.integers(1, 5000)),
        st.builds(Garbage, st.one_of(
            st.binary(min_size=1, max_size=64),
            st.sampled_from([b'{"state":"Connected"}\n', b"[1]\n", b"{}\n" * 300,
                             b"x" * (70 * 1024), b'{"state":"Bogus"}\n']))),
    )
    return st.lists(op, min_size=1, max_size=max_size)


# --- a lying backend ---------------------------------------------------------------------
class HostileBackend:
    """Listens like a netback, negotiates properly, then writes lies into the responses."""

    def __init__(self, path: str, vif: str = "vifH", domid: int = 1) -> None:
        self.path = path
        self.listener = listen_unix(path)
        self.vif, self.domid = vif, domid
        self.chan: EventChannel | None = None
        self.neg: Negotiated | None = None

    def accept(self, timeout: float = 10.0, features: dict[str, bool] | None = None) -> None:
        """Take the next frontend and negotiate (offering ``features``, default all)."""
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        sock.settimeout(None)
        self.chan = EventChannel(sock=sock)
        self.chan.send_timeout = 5.0
        hs = BackHandshake(self.chan, self.vif, self.domid)
        if features is not None:
            hs.offered = {k: bool(features.get(k)) for k in IMPLEMENTED}
        deadline = time.monotonic() + timeout
        self.neg = hs.run(lambda: time.monotonic() < deadline)
        self.region = self.neg.region
        self.tx = BackRing(self.region.tx_ring, TX_REQUEST.size)
        self.rx = BackRing(self.region.rx_ring, RX_REQUEST.size)

    def wait_requests(self, ring: str, n: int = 1, timeout: float = 10.0) -> list[tuple]:
        """Wait for ``n`` unconsumed requests on ``ring``; consume and return them."""
        r = self.tx if ring == "tx" else self.rx
        fmt = TX_REQUEST if ring == "tx" else RX_REQUEST
        end = time.monotonic() + timeout
        while r.unconsumed_requests() < n:
            if time.monotonic() > end:
                raise TimeoutError(f"frontend posted {r.unconsumed_requests()} {ring} "
                                   f"requests, waited for {n}")
            time.sleep(0.01)
        out = []
        for _ in range(r.unconsumed_requests()):
            out.append(fmt.unpack_from(r.buf, r.entry(r.req_cons)))
            r.req_cons = (r.req_cons + 1) & MASK32
        return out

    def tx_response(self, rid: int, status: int = 0) -> None:
        TX_RESPONSE.pack_into(self.tx.buf, self.tx.entry(self.tx.rsp_prod_pvt), rid, status)
        self.tx.rsp_prod_pvt = (self.tx.rsp_prod_pvt + 1) & MASK32

    def rx_response(self, rid: int, offset: int, flags: int, status: int) -> None:
        RX_RESPONSE.pack_into(self.rx.buf, self.rx.entry(self.rx.rsp_prod_pvt), rid, offset,
                              flags, status)
        self.rx.rsp_prod_pvt = (self.rx.rsp_prod_pvt + 1) & MASK32

    def rx_extra(self, etype: int, gtype: int, retired: int) -> None:
        EXTRA_INFO.pack_into(self.rx.buf, self.rx.entry(self.rx.rsp_prod_pvt), etype, 0, 1448,
                             gtype, 0, retired)
        self.rx.rsp_prod_pvt = (self.rx.rsp_prod_pvt + 1) & MASK32

    def push(self) -> None:
        """Publish both response producers and kick the frontend."""
        for r in (self.tx, self.rx):
            r.idx[2] = r.rsp_prod_pvt
        try:
            self.chan.notify()
        except ChannelClosed:
            pass

    def wait_closed(self, timeout: float = 10.0) -> str:
        """The frontend's Closing error (it says why it broke), or 'hung up'."""
        for _ in polls(self.chan.fileno(), select.POLLIN, timeout, 100):
            try:
                for msg in self.chan.recv(keep_fds=False).messages:
                    if msg.get("state") in ("Closing", "Closed"):
                        return str(msg.get("error", "")) or "closing"
            except ChannelClosed:
                return "hung up"
        raise TimeoutError("frontend did not give up on the lying backend")

    def drop(self) -> None:
        """End the current connection (the frontend will come back)."""
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.neg is not None:
            os.close(self.neg.fd)  # the memfd the handshake kept for a CPU view
        self.neg = None
        self.tx = self.rx = self.region = None  # type: ignore[assignment]

    def close(self) -> None:
        self.drop()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# --- lies a backend can tell ------------------------------------------------------------
def tx_in_flight(hb: HostileBackend, send_frame: Callable[[], None]) -> list[tuple]:
    """Make the guest send a frame and take requests off the ring until one of them is a
    granted payload page (other frames, e.g. a guest's own chatter, may come first)."""
    send_frame()
    reqs = hb.wait_requests("tx", 1)
    end = time.monotonic() + 10
    while not any(not r[2] & NETTXF_header_slot for r in reqs):
        if time.monotonic() > end:
            raise TimeoutError(f"no payload request among {reqs}")
        if hb.tx.unconsumed_requests():
            reqs += hb.wait_requests("tx", 1)
        time.sleep(0.01)
    return reqs


def lie_tx_unknown_id(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    tx_in_flight(hb, send_frame)
    hb.tx_response(999)
    return "not in flight"


def lie_tx_duplicate(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    reqs = tx_in_flight(hb, send_frame)
    hb.tx_response(reqs[0][3])
    hb.tx_response(reqs[0][3])
    return "not in flight"


def lie_tx_grant_still_held(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    reqs = tx_in_flight(hb, send_frame)
    gref = next(r[0] for r in reqs if not r[2] & NETTXF_header_slot)
    hb.region.grants.mark(gref, False)  # map it and "forget" to unmap
    for r in reqs:
        hb.tx_response(r[3])
    return "still holds a grant"


def lie_rx_unknown_id(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    hb.wait_requests("rx", 256)
    hb.rx_response(300, 0, 0, 100)
    return "not posted"


def lie_rx_past_buffer(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    rid = hb.wait_requests("rx", 256)[0][0]
    hb.rx_response(rid, 0, 0, 5000)
    return "past its buffer"


def lie_rx_bad_offset(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    rid = hb.wait_requests("rx", 256)[0][0]
    hb.rx_response(rid, 4000, 0, 200)
    return "past its buffer"


def lie_rx_duplicate(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    rid = hb.wait_requests("rx", 256)[0][0]
    hb.rx_response(rid, 0, NETRXF_more_data, 100)
    hb.rx_response(rid, 0, 0, 100)
    return "not posted"


def lie_rx_bad_extra(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    reqs = hb.wait_requests("rx", 256)
    hb.rx_response(reqs[0][0], 0, NETRXF_extra_info, 100)
    hb.rx_extra(7, 1, reqs[1][0])
    return "extra info"


def lie_rsp_prod_runs_ahead(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    hb.wait_requests("rx", 256)
    hb.rx.rsp_prod_pvt = (hb.rx.rsp_prod_pvt + 300) & MASK32
    return "ahead of requests"


def lie_garbage_on_channel(hb: HostileBackend, send_frame: Callable[[], None]) -> str:
    hb.chan.sock.sendall(b"{this is not json\n")
    return "bad control message"


#: each lie, run against a connected frontend, returns what the frontend's error must say
BACKEND_LIES = [lie_tx_unknown_id, lie_tx_duplicate, lie_tx_grant_still_held, lie_rx_unknown_id,
        lie_rx_past_buffer, lie_rx_bad_offset, lie_rx_duplicate, lie_rx_bad_extra,
        lie_rsp_prod_runs_ahead, lie_garbage_on_channel]


def assert_verdict(before: dict, after: dict, **deltas: int) -> None:
    """A hostile case's exact verdict: each named counter of the netback grew by exactly its
    delta (``malformed=1, fatal_grant=1``...), as a peer fault, and nothing was ours."""
    for name, n in deltas.items():
        assert after[name] - before[name] == n, (name, after[name] - before[name])
    assert after["faults_peer"] - before["faults_peer"] == 1 and after["internal_errors"] == 0
