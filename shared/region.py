"""The grant region: the frontend's shared memory, laid out in pages.

Page 0 is a header (magic, version, area offsets) written by the frontend; the backend reads it
once at connect, checks every area lies inside the region, and never trusts it again. Then the
grant table, the TX and RX ring pages, the header-slot area and the payload pages. The backend
keeps a CPU mapping of everything but the payload from connect to disconnect (the persistent
areas); payload pages are reached only through grants.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import astuple, dataclass

from shared.faults import PeerFault
from shared.grant import GRANT_ENTRY, RESERVED_REFS, GrantTable
from shared.netif import PAGE_SIZE

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
                 hdr_slots: int = DEFAULT_HDR_SLOTS) -> Layout:
        """Carve a region of ``size`` bytes; the grant table covers every payload page."""
        total = size // PAGE_SIZE
        hdr_pages = _pages(hdr_slot_size * hdr_slots)
        fixed = 1 + 2 + hdr_pages  # header, two rings, header slots
        payload = total - fixed
        while payload > 0 and fixed + _pages((RESERVED_REFS + payload) * GRANT_ENTRY.size) \
                + payload > total:
            payload -= 1
        if payload < 64:
            raise LayoutError(f"region of {size} bytes is too small")
        gnt_pages = _pages((RESERVED_REFS + payload) * GRANT_ENTRY.size)
        return cls(VERSION, total, 1, RESERVED_REFS + payload, 1 + gnt_pages, 2 + gnt_pages,
                   3 + gnt_pages, hdr_slot_size, hdr_slots, 3 + gnt_pages + hdr_pages, payload)

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


class Region:
    """A mapped grant region: views of each area over one mmap."""

    def __init__(self, mem: mmap.mmap, layout: Layout) -> None:
        self.mem = mem
        self.layout = layout
        self.buf = memoryview(mem)
        p = PAGE_SIZE
        self.grants = GrantTable(self.buf[layout.gnt_page * p:layout.tx_ring_page * p],
                                 layout.gnt_count)
        self.tx_ring = self.buf[layout.tx_ring_page * p:(layout.tx_ring_page + 1) * p]
        self.rx_ring = self.buf[layout.rx_ring_page * p:(layout.rx_ring_page + 1) * p]
        self.hdr = self.buf[layout.hdr_page * p:layout.hdr_page * p + layout.hdr_area_bytes]

    def page(self, frame: int) -> memoryview:
        return self.buf[frame * PAGE_SIZE:(frame + 1) * PAGE_SIZE]

    @classmethod
    def create(cls, mem: mmap.mmap, **kw: int) -> Region:
        """Frontend: lay out a fresh (zeroed) region and write the header page."""
        layout = Layout.for_size(len(mem), **kw)
        memoryview(mem)[: PAGE_SIZE * (layout.payload_page)] = bytes(
            PAGE_SIZE * layout.payload_page)
        layout.pack_into(memoryview(mem))
        return cls(mem, layout)

    @classmethod
    def attach(cls, mem: mmap.mmap) -> Region:
        """Backend: map a frontend's region after validating its header."""
        return cls(mem, Layout.unpack(memoryview(mem), len(mem)))

    def close(self) -> None:
        """Unmap. Views still held elsewhere (rings) pin the mapping until they are collected,
        so a BufferError here only means the unmap happens at garbage collection."""
        try:
            self.mem.close()
        except BufferError:
            pass
