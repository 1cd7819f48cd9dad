"""The Xen shared ring (``ring.h``) over one page of the grant region.

Layout: ``req_prod, req_event, rsp_prod, rsp_event`` (u32 each), 48 bytes private, then
``RING_SIZE`` entries. Indices are free-running u32 counters; every difference is taken mod 2**32
so the ring is correct across wrap-around. The notification rules are exactly
``RING_PUSH_*_AND_CHECK_NOTIFY`` and ``RING_FINAL_CHECK_FOR_*``: a producer notifies only when
its new batch crosses the consumer's ``*_event`` mark, and a consumer re-arms that mark and
re-checks before it sleeps, so no wake-up is lost.

Like Snabb's ``link.lua`` the ring only moves indices; entries are packed by the caller with the
``Struct``s of ``shared.protocol.netif`` at ``entry(idx)``. Run ``python -m shared.protocol.ring``
for a selftest.
"""

from __future__ import annotations

import platform
import struct
import threading
from collections.abc import Callable

from shared.faults import OwnFault, PeerFault
from shared.protocol.netif import RING_SIZE

HEADER_SIZE = 64
MASK32 = 0xFFFFFFFF
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = range(4)

_fence = threading.Lock()


def mb() -> None:
    """Full memory barrier: a locked instruction (x86), needed between arming an event index
    and re-reading the producer (the one store->load ordering x86 does not give for free)."""
    _fence.acquire()
    _fence.release()


#: machines whose stores become visible in program order and whose loads are not reordered
#: with older loads (x86-TSO; s390x is as strong): what the shared-memory code relies on
TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "s390x"})


class OrderingError(OwnFault, RuntimeError):
    """This CPU may reorder plain stores or loads: the rings and grants would be unsafe."""


def require_tso(machine: str | None = None) -> None:
    """Refuse to run where the ordering the ring and grant code relies on does not hold.

    Both ends publish entries and then an index with plain stores, and read an index and then
    entries with plain loads; Python exposes no release/acquire store on shared memory, so
    the code relies on the CPU keeping stores in order (and loads in order), as x86 does. The
    one store->load ordering x86 does not give (arming an event index, then re-reading the
    producer) is ``mb()``. On ARM, POWER or RISC-V a peer could see an index before the
    entry it publishes: refuse, rather than corrupt a frame silently."""
    m = (machine or platform.machine()).lower()
    if m not in TSO_MACHINES:
        raise OrderingError(f"pvnet needs a CPU with total store order (x86); this is {m!r}, "
                            "where the ring's plain stores may be reordered (docs/protocol.md: "
                            "Memory ordering)")


class RingError(PeerFault):
    """The peer moved an index to a value no correct peer could produce."""


class _Ring:
    """Common part: the shared indices, where entry ``idx`` lives in ``buf``, and the two
    protocol steps both ends take (push and check-notify; final check)."""

    def __init__(self, buf: memoryview, entry_size: int, size: int = RING_SIZE) -> None:
        self.buf = buf
        self.idx = buf[:16].cast("I")  # atomic aligned u32 loads and stores
        self.entry_size = entry_size
        self.size = size
        self.mask = size - 1
        if HEADER_SIZE + size * entry_size > len(buf) or size & self.mask:
            raise ValueError("ring does not fit its page or size is not a power of two")
        #: ``offsets[idx & mask]`` is ``entry(idx)``: what hot loops index instead of a call
        self.offsets = tuple(HEADER_SIZE + i * entry_size for i in range(size))

    def entry(self, idx: int) -> int:
        """Byte offset in ``buf`` of the entry for free-running index ``idx``."""
        return HEADER_SIZE + (idx & self.mask) * self.entry_size

    def column(self, code: str, offset: int) -> memoryview:
        """One field of every entry as a strided view: element ``i`` is the field at byte
        ``offset`` of the entry at position ``i`` (``code``: its struct type, e.g. "H"). A run
        of entries' field is then one slice, read or stored in one operation."""
        itemsize = struct.calcsize(code)
        start = HEADER_SIZE + offset
        if start % itemsize or self.entry_size % itemsize:
            raise ValueError(f"field at {offset} is not aligned for {code!r}")
        return self.buf[start:start + self.size * self.entry_size].cast(code)[
            ::self.entry_size // itemsize]

    def indices(self) -> dict[str, int]:
        i = self.idx
        return {"req_prod": i[0], "req_event": i[1], "rsp_prod": i[2], "rsp_event": i[3]}

    def _push(self, prod: int, event: int, new: int) -> bool:
        """RING_PUSH_*_AND_CHECK_NOTIFY: publish ``new`` at index ``prod``; True when the new
        batch crosses the peer's ``event`` mark (notify it)."""
        old = self.idx[prod]
        self.idx[prod] = new  # x86 keeps the entry stores before this one
        mb()
        return ((new - self.idx[event]) & MASK32) < ((new - old) & MASK32)

    def _final_check(self, unconsumed: Callable[[], int], event: int, cons: int) -> bool:
        """RING_FINAL_CHECK_FOR_*: nothing to consume? arm ``event`` just past ``cons``, then
        look once more (the peer may have published while it was armed)."""
        if unconsumed():
            return True
        self.idx[event] = (cons + 1) & MASK32
        mb()
        return unconsumed() > 0


class FrontRing(_Ring):
    """The frontend's view: produces requests, consumes responses (FRONT_RING_INIT)."""

    def __init__(self, buf: memoryview, entry_size: int, size: int = RING_SIZE,
                 init: bool = True) -> None:
        super().__init__(buf, entry_size, size)
        if init:  # SHARED_RING_INIT
            self.idx[REQ_PROD] = self.idx[RSP_PROD] = 0
            self.idx[REQ_EVENT] = self.idx[RSP_EVENT] = 1
        self.req_prod_pvt = self.idx[REQ_PROD]
        self.rsp_cons = self.idx[RSP_PROD]

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS: slots the frontend may still fill."""
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & MASK32)

    def full(self) -> bool:
        return self.free_requests() == 0

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish, return whether to notify."""
        return self._push(REQ_PROD, REQ_EVENT, self.req_prod_pvt)

    def unconsumed_responses(self) -> int:
        """Responses published and not yet consumed; raises if the backend ran ahead."""
        n = (self.idx[RSP_PROD] - self.rsp_cons) & MASK32
        if n > ((self.req_prod_pvt - self.rsp_cons) & MASK32):
            raise RingError(f"rsp_prod {self.idx[RSP_PROD]} ahead of requests {self.req_prod_pvt}")
        return n

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: arm rsp_event, then look once more."""
        return self._final_check(self.unconsumed_responses, RSP_EVENT, self.rsp_cons)


class BackRing(_Ring):
    """The backend's view: consumes requests, produces responses (BACK_RING_ATTACH)."""

    def __init__(self, buf: memoryview, entry_size: int, size: int = RING_SIZE) -> None:
        super().__init__(buf, entry_size, size)
        self.req_cons = self.idx[RSP_PROD]  # BACK_RING_ATTACH: nothing consumed unanswered
        self.rsp_prod_pvt = self.idx[RSP_PROD]

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS; raises if the frontend's producer ran ahead of the ring
        (Linux: "Impossible number of requests", a fatal error for that frontend)."""
        req = (self.idx[REQ_PROD] - self.req_cons) & MASK32
        if req > self.size:
            raise RingError(f"req_prod {self.idx[REQ_PROD]} is {req} ahead of req_cons "
                            f"{self.req_cons} (ring holds {self.size})")
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt) & MASK32)
        return req if req < rsp else rsp

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY."""
        return self._push(RSP_PROD, RSP_EVENT, self.rsp_prod_pvt)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: arm req_event, then look once more."""
        return self._final_check(self.unconsumed_requests, REQ_EVENT, self.req_cons)

    def pending(self) -> int:
        """Requests consumed but not yet answered."""
        return (self.req_cons - self.rsp_prod_pvt) & MASK32


def selftest() -> None:
    """Push many requests through a tiny ring across the u32 wrap and check every rule."""
    page = memoryview(bytearray(4096))
    fmt = struct.Struct("<I")
    front = FrontRing(page, 4, size=8)
    start = MASK32 - 20  # start just short of the wrap
    for i in range(4):
        front.idx[i] = start if i in (REQ_PROD, RSP_PROD) else start + 1
    front.req_prod_pvt = front.rsp_cons = start
    back = BackRing(page, 4, size=8)
    sent = got = 0
    while got < 100:
        while front.free_requests() and sent < 100:
            fmt.pack_into(page, front.entry(front.req_prod_pvt), sent)
            front.req_prod_pvt = (front.req_prod_pvt + 1) & MASK32
            sent += 1
        front.push_requests()
        while back.unconsumed_requests():
            (v,) = fmt.unpack_from(page, back.entry(back.req_cons))
            back.req_cons = (back.req_cons + 1) & MASK32
            fmt.pack_into(page, back.entry(back.rsp_prod_pvt), v)
            back.rsp_prod_pvt = (back.rsp_prod_pvt + 1) & MASK32
        back.push_responses()
        while front.unconsumed_responses():
            (v,) = fmt.unpack_from(page, front.entry(front.rsp_cons))
            assert v == got, (v, got)
            front.rsp_cons = (front.rsp_cons + 1) & MASK32
            got += 1
    assert not back.final_check_for_requests() and not front.final_check_for_responses()
    print("ring selftest: ok, 100 requests across the u32 wrap")


if __name__ == "__main__":
    selftest()
