"""The grant region: the frontend's shared memory, laid out in pages.

Page 0 is a header (magic, version, area offsets) written by the frontend; the backend reads it
once at connect, checks every area lies inside the region, and never trusts it again. Then the
grant table, the TX and RX ring pages, the header-slot area and the payload pages. The backend
keeps a CPU mapping of everything but the payload from connect to disconnect (the persistent
areas); payload pages are reached only through grants.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import astuple, dataclass

from shared.faults import OwnFault, PeerFault, kind_of
from shared.protocol.grant import GRANT_ENTRY, RESERVED_REFS, GrantTable
from shared.protocol.netif import PAGE_SIZE

log = logging.getLogger("pvnet.region")
MAGIC = b"PVNETRG1"
VERSION = 1
_HEADER = struct.Struct("<8s13I")
DEFAULT_HDR_SLOT_SIZE = 128
DEFAULT_HDR_SLOTS = 256


class LayoutError(PeerFault, ValueError):
    """The region's header describes areas that do not fit: refuse the frontend."""


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each area lives, in pages (offsets) and counts. Packed into page 0."""

    version: int
    size_pages: int
    gnt_page: int
    gnt_count: int
    tx_ring_page: int
    rx_ring_page: int
    hdr_page: int
    hdr_slot_size: int
    hdr_slots: int
    payload_page: int
    payload_pages: int
    reserved0: int = 0
    reserved1: int = 0

    @classmethod
    def for_size(cls, size: int, hdr_slot_size: int = DEFAULT_HDR_SLOT_SIZE,
                 hdr_slots: int | None = None, queues: int = 1) -> Layout:
        """Carve a region of ``size`` bytes; the grant table covers every payload page. With
        ``queues`` > 1 the ring area holds a TX and an RX ring per queue (queue q's at
        ``tx_ring_page + 2q`` and ``+ 2q + 1``: the header names queue 0's, the frontend's
        ``queue-N/*-ring-ref`` keys every queue's) and there are DEFAULT_HDR_SLOTS header
        slots per queue."""
        if hdr_slots is None:
            hdr_slots = DEFAULT_HDR_SLOTS * queues
        total = size // PAGE_SIZE
        hdr_pages = _pages(hdr_slot_size * hdr_slots)
        rings = 2 * queues
        fixed = 1 + rings + hdr_pages  # header, the rings, header slots
        payload = total - fixed
        while payload > 0 and fixed + _pages((RESERVED_REFS + payload) * GRANT_ENTRY.size) \
                + payload > total:
            payload -= 1
        if payload < 64:
            raise LayoutError(f"region of {size} bytes is too small")
        gnt_pages = _pages((RESERVED_REFS + payload) * GRANT_ENTRY.size)
        return cls(VERSION, total, 1, RESERVED_REFS + payload, 1 + gnt_pages, 2 + gnt_pages,
                   1 + rings + gnt_pages, hdr_slot_size, hdr_slots,
                   1 + rings + gnt_pages + hdr_pages, payload)

    def pack_into(self, buf: memoryview) -> None:
        _HEADER.pack_into(buf, 0, MAGIC, *astuple(self))

    @classmethod
    def unpack(cls, buf: memoryview, region_size: int) -> Layout:
        """Read and validate page 0 against the real region size."""
        magic, *fields = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise LayoutError(f"bad region magic {magic!r}")
        lay = cls(*fields)
        lay.validate(region_size)
        return lay

    def validate(self, region_size: int) -> None:
        if self.version != VERSION:
            raise LayoutError(f"region version {self.version}, expected {VERSION}")
        if self.size_pages * PAGE_SIZE != region_size:
            raise LayoutError(f"header says {self.size_pages} pages, region has "
                              f"{region_size // PAGE_SIZE}")
        if not 16 <= self.hdr_slot_size <= PAGE_SIZE or self.hdr_slot_size % 16:
            raise LayoutError(f"header slot size {self.hdr_slot_size} invalid")
        areas = [
            ("grant table", self.gnt_page, _pages(self.gnt_count * GRANT_ENTRY.size)),
            ("tx ring", self.tx_ring_page, 1),
            ("rx ring", self.rx_ring_page, 1),
            ("header slots", self.hdr_page, _pages(self.hdr_slot_size * self.hdr_slots)),
            ("payload", self.payload_page, self.payload_pages),
        ]
        end = 1
        for name, start, count in areas:  # in order, no overlap, inside the region
            if start < end or count <= 0 or start + count > self.size_pages:
                raise LayoutError(f"{name} area (pages {start}+{count}) overlaps or overflows")
            end = start + count
        if self.hdr_slots <= 0 or self.hdr_slots > 65536:
            raise LayoutError(f"{self.hdr_slots} header slots")

    @property
    def payload_frames(self) -> range:
        return range(self.payload_page, self.payload_page + self.payload_pages)

    @property
    def hdr_area_bytes(self) -> int:
        return self.hdr_slot_size * self.hdr_slots

    @property
    def ring_area(self) -> range:
        """The pages rings may live in: from queue 0's TX ring up to the header slots."""
        return range(self.tx_ring_page, self.hdr_page)

    def queue_rings(self, queue: int) -> tuple[int, int]:
        """Where ``for_size`` puts queue ``queue``'s TX and RX rings (a frontend writes them
        as its ``queue-N/*-ring-ref`` keys; the backend checks, never assumes, them)."""
        return self.tx_ring_page + 2 * queue, self.tx_ring_page + 2 * queue + 1

    def share(self, queue: int, queues: int) -> QueueShare:
        """What queue ``queue`` of ``queues`` owns, computed alike by both ends: an equal
        part of the header slots, of the payload pages and of the grant references granting
        them (netfront grants payload page ``p`` with reference RESERVED_REFS + p). One
        queue owns everything, as before there were queues.

        A gref belongs to one queue: the backend's worker of that queue is the only one
        that sets or clears its GTF_reading/GTF_writing bits, so workers in different
        processes never race on an entry (docs/protocol.md, Memory ordering)."""
        if not 0 <= queue < queues:
            raise ValueError(f"queue {queue} of {queues}")
        p, s = self.payload_pages, self.hdr_slots
        lo, hi = queue * p // queues, (queue + 1) * p // queues
        refs = range(0 if queue == 0 else RESERVED_REFS + lo,
                     self.gnt_count if queue == queues - 1 else RESERVED_REFS + hi)
        return QueueShare(queue, queues, range(queue * s // queues, (queue + 1) * s // queues),
                          range(lo, hi), range(min(refs.start, self.gnt_count),
                                               min(refs.stop, self.gnt_count)))


@dataclass(frozen=True, slots=True)
class QueueShare:
    """One queue's part of a region: its header slots (indexes), its payload pages (indexes
    from ``payload_page``) and its grant references. See ``Layout.share``."""

    index: int
    queues: int
    hdr_slots: range
    payload: range
    refs: range

    @property
    def label(self) -> str:
        """How errors name the queue ("" with one queue: nothing changes for it)."""
        return f"queue {self.index}" if self.queues > 1 else ""


class RegionInUse(OwnFault):
    """``Region.close`` could not unmap: a view the Region did not hand out (a slice or cast
    someone made of one of its views, or their own ``memoryview`` of the mmap) is still alive.

    Our own fault: every holder is in this process, and the teardown order is ours to get
    right. Raised rather than swallowed because a swallowed one is a mapping (and, for a
    memfd, the frontend's memory) kept until garbage collection, invisible to the operator."""


class Region:
    """A mapped grant region: views of each area over one mmap.

    The Region owns the mmap and, when given one, the memfd ``fd``; ``close`` releases every
    view it handed out (``buf``, the areas, ``page()``s, the grant table's) and then unmaps and
    closes for real."""

    def __init__(self, mem: mmap.mmap, layout: Layout, fd: int | None = None,
                 owns_mem: bool = True) -> None:
        self.mem = mem
        #: False for a mapping someone else keeps (the guest's ivshmem BAR, mapped once per
        #: device and laid out again on every reconnect): close releases the views only
        self.owns_mem = owns_mem
        self.layout = layout
        self.fd = fd
        self.closed = False
        self._views: list[memoryview] = []
        self.buf = self._track(memoryview(mem))
        p = PAGE_SIZE
        self.grants = GrantTable(self._track(self.buf[layout.gnt_page * p:layout.tx_ring_page * p]),
                                 layout.gnt_count)
        self.tx_ring = self._view(layout.tx_ring_page * p, (layout.tx_ring_page + 1) * p)
        self.rx_ring = self._view(layout.rx_ring_page * p, (layout.rx_ring_page + 1) * p)
        self.hdr = self._view(layout.hdr_page * p, layout.hdr_page * p + layout.hdr_area_bytes)
        # the region as the area of its one queue (``QueueArea`` for one of several)
        self.share = layout.share(0, 1)
        self.hdr_slot_size, self.hdr_slots = layout.hdr_slot_size, layout.hdr_slots
        self.payload, self.refs = self.share.payload, self.share.refs

    def queue(self, share: QueueShare, tx_page: int, rx_page: int) -> QueueArea:
        """The views of one queue of several: its rings at ``tx_page``/``rx_page`` (already
        checked to lie in the ring area) and its part of the header slots."""
        return QueueArea(self, share, tx_page, rx_page)

    def _track(self, view: memoryview) -> memoryview:
        self._views.append(view)
        return view

    def _view(self, start: int, end: int) -> memoryview:
        return self._track(self.buf[start:end])

    def area(self, start: int, end: int) -> memoryview:
        """Bytes ``start``..``end`` of the region; released by ``close`` like the others."""
        return self._view(start, end)

    def page(self, frame: int) -> memoryview:
        """One page's view; released by ``close`` like the others."""
        return self._view(frame * PAGE_SIZE, (frame + 1) * PAGE_SIZE)

    def pages(self, frame: int, n: int) -> memoryview:
        """``n`` consecutive pages as one view (a run of them is then one slice)."""
        return self._view(frame * PAGE_SIZE, (frame + n) * PAGE_SIZE)

    @classmethod
    def create(cls, mem: mmap.mmap, fd: int | None = None, owns_mem: bool = True,
               **kw: int) -> Region:
        """Frontend: lay out a fresh (zeroed) region and write the header page."""
        layout = Layout.for_size(len(mem), **kw)
        with memoryview(mem) as view:
            view[: PAGE_SIZE * layout.payload_page] = bytes(PAGE_SIZE * layout.payload_page)
            layout.pack_into(view)
        return cls(mem, layout, fd, owns_mem)

    @classmethod
    def attach(cls, mem: mmap.mmap, fd: int | None = None) -> Region:
        """Backend: map a frontend's region after validating its header."""
        with memoryview(mem) as view:
            layout = Layout.unpack(view, len(mem))
        return cls(mem, layout, fd)

    def close(self, strict: bool = False) -> None:
        """Release every view handed out, unmap, close the memfd. Idempotent.

        A view made elsewhere (a ring's cast of ``tx_ring``, a slice of ``buf``) that is still
        alive pins the mapping: unmapping under it would turn its next access into a SIGSEGV,
        and no view can be released by anyone but its maker. So the mapping then stays until
        that view goes, and the pinning is logged as our own fault (RegionInUse), never
        swallowed silently: a teardown another thread may briefly overlap (netback's control
        thread reading a ring for ``pvnet stats``) must still finish. ``strict=True`` raises
        RegionInUse instead (the memfd is closed all the same; a later ``close`` tries the
        unmap again), for an owner that knows every view is gone."""
        if self.closed:
            return
        kept: list[memoryview] = []
        self.grants.release()
        for view in reversed(self._views):  # casts and slices before what they came from
            try:
                view.release()
            except BufferError:  # exported itself (a buffer someone made of it)
                kept.append(view)
        self._views = kept
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if not self.owns_mem:  # the mapping is its owner's; our views of it are gone
            self._views.clear()
            self.mem = None  # type: ignore[assignment]
            self.closed = True
            return
        try:
            self.mem.close()
        except BufferError as e:
            fault = RegionInUse(f"region of {len(self.mem)} bytes still exported elsewhere "
                                f"({e}): its views must go before the region does")
            if strict:
                raise fault from e
            log.warning("%s (%s fault); unmapped when the last view goes", fault,
                        kind_of(fault))
            self._views.clear()
            self.mem = None  # type: ignore[assignment]  # the last view's release unmaps
        self.closed = True


class QueueArea:
    """What one queue's TX and RX paths are built on, at either end: its own rings and header
    slots (views released with the region), and what all queues share - the grant table, of
    which the queue owns ``refs``, and the payload pages, of which it uses ``payload``. A
    ``Region`` has the same attributes for its one queue."""

    def __init__(self, region: Region, share: QueueShare, tx_page: int, rx_page: int) -> None:
        lay = region.layout
        self.layout, self.grants, self.buf = lay, region.grants, region.buf
        self.page, self.pages = region.page, region.pages
        self.share = share
        self.tx_ring = region.page(tx_page)
        self.rx_ring = region.page(rx_page)
        ss = lay.hdr_slot_size
        start = lay.hdr_page * PAGE_SIZE
        self.hdr = region.area(start + share.hdr_slots.start * ss,
                               start + share.hdr_slots.stop * ss)
        self.hdr_slot_size, self.hdr_slots = ss, len(share.hdr_slots)
        self.payload, self.refs = share.payload, share.refs


#: what a queue's paths take: a whole region (one queue) or one queue's area of it
Area = Region | QueueArea
