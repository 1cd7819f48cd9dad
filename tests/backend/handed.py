"""Test-only: what the data path *hands* each party, recorded in order - the way to prove a
mechanism does its own work and no other's without trusting its counters.

``TxSpy`` wraps, on one in-process pair: the CPU view's ``map``/``unmap`` (page-table work),
the TX mechanism's four hooks, the slot answers (``TxRelease.release``) and the vif
``writev`` - each iovec classified as a slice of the frontend's memory (the DMA view, with its
byte offset) or the backend's own bytes. ``RxSpy`` does the same for RX: the reads from the
vif (where each iovec points) and the CPU view's maps.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

from shared.protocol.netif import PAGE_SIZE
from tests.conftest import Pair


def _address(buf) -> int:
    obj = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(obj)
    finally:
        del obj


@dataclass
class Piece:
    """One iovec of a vif write or read: the frontend's memory (``offset`` into the region,
    i.e. frame * 4096 + offset in the page) or the backend's own (``offset`` None)."""

    offset: int | None
    data: bytes

    @property
    def frame(self) -> int:
        return self.offset // PAGE_SIZE


@dataclass
class Attached:
    """A packet as the mechanism's ``attach`` received it (fragments before the pull)."""

    idx: int
    frames: list[int]
    offs: list[int]
    sizes: list[int]


@dataclass
class _Spy:
    """What both spies share: the frontend's memory (to tell its iovecs from the backend's
    own) and the CPU view's maps and unmaps, recorded in ``events``."""

    pair: Pair
    events: list[tuple] = field(default_factory=list)

    def _watch(self, cpu) -> None:
        mem = self.pair.front_region.mem
        self._base, self._size = _address(memoryview(mem)), len(mem)
        self._wrap(cpu, "map", lambda frame, write=False: self.events.append(
            ("map", frame, write)))
        self._wrap(cpu, "unmap", lambda frame: self.events.append(("unmap", frame)))

    @staticmethod
    def _wrap(obj, name: str, before) -> None:
        real = getattr(obj, name)

        def wrapped(*a, **kw):
            before(*a, **kw)
            return real(*a, **kw)
        setattr(obj, name, wrapped)

    def _piece(self, buf) -> Piece:
        """An iovec: the frontend's memory (its offset there) or the backend's own bytes."""
        data = bytes(buf)
        if isinstance(buf, memoryview) and not buf.readonly and len(buf):
            at = _address(buf) - self._base
            if 0 <= at < self._size:
                return Piece(at, data)
        return Piece(None, data)

    def maps(self, events: list[tuple] | None = None) -> list[int]:
        return [ev[1] for ev in (self.events if events is None else events) if ev[0] == "map"]


@dataclass
class TxSpy(_Spy):
    #: ("map", frame, writable), ("unmap", frame), ("hook", name), ("answer", ids),
    #: ("write", n)
    writes: list[list[Piece]] = field(default_factory=list)
    attached: list[Attached] = field(default_factory=list)
    #: per packet at ``pulled``: its fragments' sizes after the header pull
    pulled: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        btx = self.pair.btx
        mech, release = btx.mech, btx.release
        self._watch(btx.gntmap.cpu)
        self._wrap(release, "release",
                   lambda ids, extras: self.events.append(("answer", list(ids))))
        for hook in ("attach", "pulled", "xmit", "free"):
            self._wrap(mech, hook, self._hooked(hook))
        real, vif = os.writev, btx.vif_fd

        def writev(fd, iov):
            if fd == vif:
                self.writes.append([self._piece(b) for b in iov])
                self.events.append(("write", len(self.writes) - 1))
            return real(fd, iov)

        self._writev = (real, writev)

    def _hooked(self, name: str):
        def record(skbs):
            self.events.append(("hook", name))
            if name == "attach":
                self.attached += [Attached(s.idx, list(s.frames), list(s.offs), list(s.sizes))
                                  for s in skbs]
            elif name == "pulled":
                self.pulled += [list(s.sizes) for s in skbs]
        return record

    def run(self, monkeypatch, frames: list[bytes]) -> list[bytes]:
        """Send ``frames`` through the pair with the vif's writev watched; the wire's frames."""
        monkeypatch.setattr(os, "writev", self._writev[1])
        for f in frames:
            self.pair.send(f)
        self.pair.run_tx()
        monkeypatch.setattr(os, "writev", self._writev[0])
        return self.pair.wire_frames()

    def between(self, start: str, end: str | None) -> list[tuple]:
        """The events after the first hook ``start`` and before the next hook ``end``."""
        out, inside = [], False
        for ev in self.events:
            if ev == ("hook", start):
                inside = True
                continue
            if inside and end is not None and ev == ("hook", end):
                break
            if inside:
                out.append(ev)
        return out

def payload_offsets(a: Attached, sizes_after_pull: list[int]) -> list[tuple[int, int]]:
    """(region offset, size) of what the pull left of each fragment, skipping empty ones."""
    out = []
    for frame, off, size, left in zip(a.frames, a.offs, a.sizes, sizes_after_pull,
                                      strict=True):
        if left:
            out.append((frame * PAGE_SIZE + off + size - left, left))
    return out


def spans(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, size) ranges with touching neighbours merged: the bytes a list of iovecs
    covers, however the DMA view split or joined them."""
    out: list[list[int]] = []
    for off, size in pieces:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += size
        else:
            out.append([off, size])
    return [(o, s) for o, s in out]


#: frames for the own-work tests: no payload, within the header copy, one page, many pages
FRAMES_SIZES = (60, 100, 1400, 5000, 30000, 65000)


@dataclass
class RxSpy(_Spy):
    """RX: every read from the vif (where each iovec points) and the CPU view's maps, in
    order: ("read", index into ``reads``), ("map", frame, writable), ("unmap", frame)."""

    reads: list[list[Piece]] = field(default_factory=list)

    def __post_init__(self) -> None:
        brx = self.pair.brx
        self._watch(brx.gntmap.cpu)
        real, vif = os.readv, brx.vif_fd

        def readv(fd, iov):
            n = real(fd, iov)
            if fd == vif:
                self.reads.append([self._piece(b) for b in iov])
                self.events.append(("read", len(self.reads) - 1))
            return n

        self._readv = (real, readv)

    def run(self, monkeypatch, frames: list[bytes], vnets: list[bytes] | None = None):
        """Frames from the wire to the guest with the vif's reads watched; what arrived."""
        monkeypatch.setattr(os, "readv", self._readv[1])
        for i, f in enumerate(frames):
            self.pair.wire.send((vnets[i] if vnets else bytes(12)) + f)
        self.pair.run_rx()
        monkeypatch.setattr(os, "readv", self._readv[0])
        return [g[12:] for g in self.pair.guest_frames()]

    def map_events(self) -> list[tuple]:
        return [ev for ev in self.events if ev[0] == "map"]


def split_head_only(writes: list[list[Piece]]) -> tuple[list, list]:
    """A TX spy's vif writes: those of packets the mechanism's hooks saw (a fragment iovec
    follows the head, if only an empty one) and the head-only ones (vnet header and head:
    a packet wholly in its header slot, sent by ``backend/tx/small.py``)."""
    return [w for w in writes if len(w) > 2], [w for w in writes if len(w) == 2]


def tx_through(mode: str, header_slots: bool, monkeypatch) -> tuple[Pair, TxSpy]:
    """Frames of every size (``FRAMES_SIZES``) through a pair in ``mode``, watched; they must
    arrive intact."""
    from tests.conftest import frame, make_pair

    p = make_pair(mode, header_slots)
    spy = TxSpy(p)
    frames = [frame(bytes([i]) * n) for i, n in enumerate(FRAMES_SIZES)]
    assert spy.run(monkeypatch, frames) == frames
    return p, spy
