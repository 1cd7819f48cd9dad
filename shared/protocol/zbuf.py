"""Zero-copy capture buffers with generation numbers (FreeBSD's zbuf BPF, BIOCSETZBUF).

Two equal buffers share one memfd between the producer (netback) and one reader. Each opens
with a 32-byte header (``HEADER``)::

    offset 0   u32 kernel_gen    producer's generation, bumped when it hands the buffer over
    offset 4   u32 kernel_len    bytes of records after the header (valid once handed over)
    offset 8   u32 user_gen      reader's generation, set equal to kernel_gen to hand it back
    offset 12  u32 kernel_drops  frames dropped by the producer in this capture (our addition)
    offset 16  16 bytes padding  (seed: _bzh_pad[5] out to 32 bytes)

Ownership rule: kernel_gen == user_gen -> the producer owns the buffer; kernel_gen != user_gen
-> the reader holds it until it writes user_gen = kernel_gen. The producer fills its *store*
buffer; when a record does not fit (or on a timeout, or when the reader asks) it *rotates*:
writes kernel_len and kernel_drops, then bumps kernel_gen -- the bump comes last, so length and
data are in memory before the reader can see the generation change (the correction to the
seed, whose note flags that ordering). x86-64 keeps stores in program order (TSO) and each
``pack_into`` is a separate C call, so program order is memory order here; a weaker machine
would need a release fence before the bump and an acquire fence after the reader's load.
The producer never waits: if the other buffer is still held, the frame is dropped and counted.

Generations are 32-bit and compared only for equality, so wrap-around needs nothing special.
The producer keeps its own copy of kernel_gen and never reads its fields back; it reads only
user_gen, so a reader that scribbles over a header can confuse itself, never the producer.

Records follow the header, 8-byte aligned (``RECORD``): u64 timestamp (ns since the epoch),
u32 captured length, u32 length on the wire, u8 direction (``OUT``/``IN``), then the bytes.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from shared.faults import OwnFault

HEADER = struct.Struct("<IIII16x")
RECORD = struct.Struct("<QIIB7x")
_U32 = struct.Struct("<I")
KERNEL_GEN, KERNEL_LEN, USER_GEN, KERNEL_DROPS = 0, 4, 8, 12
M32 = 0xFFFFFFFF
#: direction of a frame, as seen from the vif: OUT = netback wrote it to the vif (from the
#: guest), IN = netback read it from the vif (to the guest)
OUT, IN = 1, 2
#: smallest and largest buffer the producer accepts (each of the two)
MIN_BUFFER = 4096
MAX_BUFFER = 64 << 20

Buffer = bytearray | memoryview  # also an mmap: anything struct can pack into


def align8(n: int) -> int:
    return (n + 7) & ~7


class ZbufError(OwnFault):
    """The two buffers cannot be laid out as asked."""


class Producer:
    """The producer's side: append records to the store buffer, rotate, reclaim.

    Single-threaded by contract (the caller serialises ``append`` and ``rotate``); no blocking
    call in here. ``frames``/``drops``/``rotations``/``bad_acks`` count this capture only.
    """

    def __init__(self, mem: Buffer, size: int, gen: int = 0) -> None:
        if size < MIN_BUFFER or size > MAX_BUFFER or size % 8:
            raise ZbufError(f"buffer size {size}: must be a multiple of 8 in "
                            f"{MIN_BUFFER}..{MAX_BUFFER}")
        if len(mem) < 2 * size:
            raise ZbufError(f"memory of {len(mem)} bytes cannot hold two {size}-byte buffers")
        self.mem, self.size = mem, size
        self.kgen = [gen & M32, gen & M32]  # ours; never read back from shared memory
        self.store = 0
        self.held: int | None = None  # the buffer the reader holds, if any
        self.fill = HEADER.size  # next record's offset in the store buffer
        self.started = 0.0  # monotonic time of the store buffer's first record
        self.last = 0.0  # monotonic time of the latest record
        self.frames = self.drops = self.rotations = self.bad_acks = 0
        self._bad_seen = False
        for i in (0, 1):
            HEADER.pack_into(mem, i * size, gen & M32, 0, gen & M32, 0)

    @property
    def max_caplen(self) -> int:
        """Longest record body that fits in an empty buffer."""
        return self.size - HEADER.size - RECORD.size

    @property
    def pending(self) -> bool:
        """Records in the store buffer the reader has not been handed yet."""
        return self.fill > HEADER.size

    def _user_gen(self, i: int) -> int:
        return _U32.unpack_from(self.mem, i * self.size + USER_GEN)[0]

    def reclaim(self) -> bool:
        """Is the other buffer free (never held, or handed back)? Detects bogus acks: while
        held, user_gen may only be kernel_gen - 1 (not done) or kernel_gen (done)."""
        h = self.held
        if h is None:
            return True
        ugen = self._user_gen(h)
        if ugen == self.kgen[h]:
            self.held = None
            self._bad_seen = False
            return True
        if ugen != (self.kgen[h] - 1) & M32 and not self._bad_seen:
            self._bad_seen = True  # counted once per hold, not once per look
            self.bad_acks += 1
        return False

    def rotate(self) -> bool:
        """Hand the store buffer to the reader if the other one is free; False otherwise.
        Length and drop count are written before the generation bump that publishes them."""
        if not self.reclaim():
            return False
        s, mem = self.store, self.mem
        base = s * self.size
        if self._user_gen(s) != self.kgen[s]:  # the reader acked a buffer it did not hold
            self.bad_acks += 1
            _U32.pack_into(mem, base + USER_GEN, self.kgen[s])
        _U32.pack_into(mem, base + KERNEL_LEN, self.fill - HEADER.size)
        _U32.pack_into(mem, base + KERNEL_DROPS, self.drops & M32)
        gen = (self.kgen[s] + 1) & M32
        self.kgen[s] = gen
        _U32.pack_into(mem, base + KERNEL_GEN, gen)  # last: this store publishes the buffer
        self.held, self.store, self.fill = s, 1 - s, HEADER.size
        self.rotations += 1
        return True

    def room(self, caplen: int) -> bool:
        """Make room for a record of ``caplen`` bytes (rotating if need be); False = drop it.
        Checked before the frame's bytes are read, so a drop costs no payload access."""
        if self.fill + RECORD.size + caplen <= self.size:
            return True
        return self.fill > HEADER.size and self.rotate()

    def append(self, wirelen: int, direction: int, parts: Sequence[Buffer], caplen: int,
               ts_ns: int | None = None) -> None:
        """Write one record; the caller has checked ``room(caplen)``."""
        mem = self.mem
        at = self.store * self.size + self.fill
        RECORD.pack_into(mem, at, time.time_ns() if ts_ns is None else ts_ns, caplen,
                         wirelen, direction)
        at += RECORD.size
        for p in parts:
            n = len(p)
            mem[at:at + n] = p
            at += n
        self.last = time.monotonic()
        if self.fill == HEADER.size:
            self.started = self.last
        self.fill += align8(RECORD.size + caplen)
        self.frames += 1


@dataclass(frozen=True, slots=True)
class Held:
    """A buffer the reader holds: which one, the generation to ack, and what it says."""

    index: int
    gen: int
    length: int
    drops: int


@dataclass(frozen=True, slots=True)
class Record:
    ts_ns: int
    wirelen: int
    direction: int
    data: bytes


class Reader:
    """The reader's side: find the held buffer, walk its records, hand it back."""

    def __init__(self, mem: Buffer, size: int) -> None:
        if len(mem) < 2 * size or size < MIN_BUFFER:
            raise ZbufError(f"memory of {len(mem)} bytes cannot hold two {size}-byte buffers")
        self.mem, self.size = mem, size

    def held(self) -> Held | None:
        """The buffer the producer has handed over, if any. kernel_gen is read first, so the
        length read after it is the one written before the bump."""
        for i in (0, 1):
            base = i * self.size
            kgen = _U32.unpack_from(self.mem, base + KERNEL_GEN)[0]
            if kgen != _U32.unpack_from(self.mem, base + USER_GEN)[0]:
                length = _U32.unpack_from(self.mem, base + KERNEL_LEN)[0]
                drops = _U32.unpack_from(self.mem, base + KERNEL_DROPS)[0]
                return Held(i, kgen, min(length, self.size - HEADER.size), drops)
        return None

    def records(self, h: Held) -> Iterator[Record]:
        """The records of a held buffer, copied out; stops at the first malformed one."""
        mem = self.mem
        at = h.index * self.size + HEADER.size
        end = at + h.length
        while at + RECORD.size <= end:
            ts, caplen, wirelen, direction = RECORD.unpack_from(mem, at)
            body = at + RECORD.size
            if body + caplen > end:
                return
            yield Record(ts, wirelen, direction, bytes(mem[body:body + caplen]))
            at += align8(RECORD.size + caplen)

    def ack(self, h: Held) -> None:
        """Hand the buffer back: user_gen = the kernel_gen it was handed over with."""
        _U32.pack_into(self.mem, h.index * self.size + USER_GEN, h.gen)
