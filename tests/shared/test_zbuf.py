"""The zbuf generation protocol (shared/protocol/zbuf.py) on a plain bytearray: ownership, rotation,
wrap-around, and the readers that break the rules (never ack, ack what they do not hold,
scribble over headers). The producer must never lose track and never raise."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shared.protocol.zbuf as zbuf
from shared.protocol.zbuf import (
    HEADER,
    IN,
    KERNEL_GEN,
    KERNEL_LEN,
    OUT,
    RECORD,
    USER_GEN,
    Producer,
    Reader,
    ZbufError,
)

SIZE = 4096


def pair(gen: int = 0) -> tuple[bytearray, Producer, Reader]:
    mem = bytearray(2 * SIZE)
    return mem, Producer(mem, SIZE, gen), Reader(mem, SIZE)


def put(p: Producer, data: bytes, direction: int = OUT) -> bool:
    """What the netback does per frame: room first (may rotate), then append."""
    if not p.room(len(data)):
        p.drops += 1
        return False
    p.append(len(data) + 1, direction, [data[:3], data[3:]], len(data), ts_ns=len(data))
    return True


def u32(mem: bytearray, buf: int, field: int) -> int:
    return struct.unpack_from("<I", mem, buf * SIZE + field)[0]


def drain(r: Reader) -> list[bytes]:
    h = r.held()
    if h is None:
        return []
    out = [rec.data for rec in r.records(h)]
    r.ack(h)
    return out


def test_header_is_the_seeds_32_bytes() -> None:
    assert HEADER.size == 32 and (KERNEL_GEN, KERNEL_LEN, USER_GEN) == (0, 4, 8)
    assert RECORD.size % 8 == 0


def test_equal_generations_mean_the_producer_owns_both_at_start() -> None:
    mem, p, r = pair()
    assert r.held() is None
    put(p, b"a" * 100)
    assert r.held() is None  # in the store buffer: still the producer's
    assert p.rotate()
    h = r.held()
    assert h is not None and h.index == 0 and h.gen == 1 and h.length == 128
    recs = list(r.records(h))
    assert [(x.data, x.wirelen, x.direction, x.ts_ns) for x in recs] == [
        (b"a" * 100, 101, OUT, 100)]
    r.ack(h)
    assert u32(mem, 0, USER_GEN) == u32(mem, 0, KERNEL_GEN) == 1
    assert p.reclaim() and p.held is None


def test_full_store_rotates_by_itself_and_records_arrive_in_order() -> None:
    _, p, r = pair()
    frames = [bytes([i]) * (50 + i * 13) for i in range(60)]
    got: list[bytes] = []
    for f in frames:
        assert put(p, f, IN)
        got += drain(r)  # a reader that keeps up
    assert p.rotate()
    got += drain(r)
    assert got == frames and p.drops == 0 and p.rotations >= 3


def test_generations_wrap_around_32_bits() -> None:
    mem, p, r = pair(gen=0xFFFFFFFE)
    frames = [bytes([i]) * 200 for i in range(12)]
    got = []
    for f in frames:
        put(p, f)
        assert p.rotate()  # one rotation per frame: each buffer's generation passes 2**32
        got += drain(r)
    assert got == frames
    assert p.rotations == 12 and p.drops == 0
    assert u32(mem, 0, KERNEL_GEN) == u32(mem, 1, KERNEL_GEN) == (0xFFFFFFFE + 6) & 0xFFFFFFFF
    assert u32(mem, 0, KERNEL_GEN) == 4  # really wrapped


def test_reader_that_never_acks_costs_drops_not_a_stall() -> None:
    mem, p, r = pair()
    kept = 0
    for i in range(200):
        kept += put(p, bytes([i]) * 500)
    assert p.rotations == 1  # the one held buffer is never handed back
    assert p.drops == 200 - kept and p.drops > 150
    h = r.held()
    first = [rec.data for rec in r.records(h)]
    assert first == [bytes([i]) * 500 for i in range(len(first))]  # static while held
    r.ack(h)
    assert p.rotate()  # handed back: rotation resumes, and the drop count is published
    h2 = r.held()
    assert h2.drops == p.drops and len(list(r.records(h2))) == kept - len(first)


def test_ack_of_the_store_buffer_is_undone_and_counted() -> None:
    """A reader acks a buffer it does not hold (the store buffer, ahead of time): the producer
    notices at rotation, restores user_gen and counts it; the buffer is then properly held."""
    mem, p, r = pair()
    put(p, b"x" * 64)
    struct.pack_into("<I", mem, 0 * SIZE + USER_GEN, 1)  # the generation it *will* have
    assert p.rotate()
    assert p.bad_acks == 1
    h = r.held()
    assert h is not None and h.index == 0 and [x.data for x in r.records(h)] == [b"x" * 64]
    assert not p.reclaim()  # still the reader's: not mistaken for handed back


def test_garbage_ack_of_the_held_buffer_keeps_it_held() -> None:
    mem, p, r = pair()
    put(p, b"y" * 64)
    p.rotate()
    struct.pack_into("<I", mem, USER_GEN, 0xDEAD)  # neither "not done" nor "done"
    for _ in range(3):
        assert not p.reclaim()
    assert p.bad_acks == 1  # counted once per hold
    for i in range(20):
        put(p, bytes([i]) * 400)
    assert p.drops > 0 and p.rotations == 1


def test_scribbled_kernel_fields_do_not_confuse_the_producer() -> None:
    """The producer keeps its own generation and length; it never reads them back."""
    mem, p, r = pair()
    put(p, b"z" * 64)
    struct.pack_into("<II", mem, SIZE * 0, 77, 0xFFFFFFFF)  # kernel_gen, kernel_len of store
    struct.pack_into("<I", mem, SIZE * 0 + USER_GEN, 77)  # and made them "equal"
    assert p.rotate()
    h = r.held()
    assert h.gen == 1 and [x.data for x in r.records(h)] == [b"z" * 64]


def test_length_and_drops_are_written_before_the_generation(monkeypatch) -> None:
    """The seed's own note: the reader must not see the bump before the length."""
    order: list[int] = []
    real = zbuf._U32

    class Spy:
        unpack_from = staticmethod(real.unpack_from)

        @staticmethod
        def pack_into(buf, offset, value):
            order.append(offset % SIZE)
            real.pack_into(buf, offset, value)

    _, p, _r = pair()
    put(p, b"w" * 10)
    monkeypatch.setattr(zbuf, "_U32", Spy)
    p.rotate()
    assert order[-1] == KERNEL_GEN and KERNEL_LEN in order[:-1]


def test_reader_survives_a_lying_length() -> None:
    mem, p, r = pair()
    put(p, b"v" * 100)
    p.rotate()
    struct.pack_into("<I", mem, KERNEL_LEN, 10 ** 9)
    h = r.held()
    assert h.length == SIZE - HEADER.size
    assert [x.data for x in r.records(h)][0] == b"v" * 100  # then stops at the zeros/garbage


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ZbufError):
        Producer(bytearray(100), 4095)
    with pytest.raises(ZbufError):
        Producer(bytearray(SIZE), SIZE)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 1500), st.sampled_from(["ack", "rotate"])),
                max_size=120))
def test_every_kept_frame_arrives_exactly_once_in_order(ops) -> None:
    """Any interleaving of frames, reader acks and timed rotations: what was not dropped is
    delivered once, in order, and kept + dropped == offered."""
    _, p, r = pair(gen=0xFFFFFFFD)
    kept: list[bytes] = []
    got: list[bytes] = []
    n = 0
    for op in ops:
        if op == "ack":
            got += drain(r)
        elif op == "rotate":
            p.rotate()
        else:
            n += 1
            f = n.to_bytes(4, "little") * (op // 4 + 1)
            if put(p, f):
                kept.append(f)
    got += drain(r)
    p.rotate()
    got += drain(r)
    assert got == kept and len(kept) + p.drops == n
