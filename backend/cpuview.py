"""The backend's CPU view of a frontend's payload pages: present only while a grant is mapped.

Why: in Xen a backend can read a guest page only after a grant-map hypercall has put it in its
page tables, and it loses it at the unmap (a TLB flush). This module gives netback the same
machine-enforced rule. At connect it reserves an address range the size of the payload area
with ``PROT_NONE`` (nothing is readable there); a *map* is ``mmap(MAP_SHARED|MAP_FIXED)`` of
that one page of the region memfd at its place in the range, an *unmap* is
``mmap(PROT_NONE, MAP_FIXED|MAP_ANONYMOUS|MAP_NORESERVE)`` back over it: each is a real
page-table change, the unmap a real TLB invalidation. A raw read of an unmapped page faults
(SIGSEGV, see ``tests/backend/test_cpuview.py``); the accessor below refuses first.

The persistent areas (grant table, rings, header slots) are not here: the backend maps them
once at connect (``Region`` over a prefix mapping of the memfd). The DMA view (the vif write and
grant copies) is ``backend/dmaview.py``, owned by ``backend/gntmap.py``.

API (everything else is private; the grant bookkeeping - which gref, GTF bits, counters per
connection - stays in ``backend/gntmap.GntMap``, the only caller):

- ``CpuView(fd, layout, stats)``: reserve the range for this region's payload pages; ``fd`` is
  the region memfd (borrowed; the caller closes it); ``stats`` (a RingStats) gets
  ``grant_maps``/``map_ns`` and ``grant_unmaps``/``unmap_ns`` per real mmap (for op_us).
- ``map(frame, write=False)``: map one payload page (nested maps of one frame are counted;
  only the first does the mmap). Returns nothing: reach bytes through ``page``.
- ``unmap(frame)``: undo one ``map``; the last one puts ``PROT_NONE`` back.
- ``page(frame) -> memoryview``: the page's 4096 bytes, **only while mapped**; raises
  ``NotMapped`` otherwise. Never keep the view past the matching ``unmap``.
- ``mapped(frame) -> bool``, ``outstanding`` (pages mapped now), ``close()`` (unmap all,
  release the reservation).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time

from shared.netif import PAGE_SIZE
from shared.region import Layout
from shared.stats import RingStats

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_NONE = 0
MAP_FIXED = 0x10
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MAP_FAILED = ctypes.c_void_p(-1).value
_NONE_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
_now = time.perf_counter_ns


class NotMapped(Exception):
    """Backend code asked for a payload page it has not mapped: a bug, never the peer's."""


def _check(addr: int | None, what: str) -> int:
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return addr


class CpuView:
    """One connection's reserved payload range. Not thread-safe: the data loop owns it."""

    def __init__(self, fd: int, layout: Layout, stats: RingStats) -> None:
        self.fd = fd
        self.stats = stats
        self.first = layout.payload_page
        self.count = layout.payload_pages
        self.size = self.count * PAGE_SIZE
        self.base = _check(_mmap(None, self.size, PROT_NONE, _NONE_FLAGS, -1, 0),
                           "reserving the CPU view")
        # one view over the whole range; slicing it touches nothing, reading an unmapped
        # page through it faults, so only ``page`` hands slices out, after checking
        self._raw = memoryview((ctypes.c_char * self.size).from_address(self.base)).cast("B")
        self._refs = bytearray(self.count)  # nested maps per page (u8: at most 255 deep)
        self._write = bytearray(self.count)
        self.outstanding = 0

    def _index(self, frame: int) -> int:
        i = frame - self.first
        if not 0 <= i < self.count:
            raise NotMapped(f"frame {frame} is not a payload page")
        return i

    def map(self, frame: int, write: bool = False) -> None:
        i = self._index(frame)
        refs = self._refs[i]
        if refs:
            if refs == 255:
                raise NotMapped(f"frame {frame} mapped 255 times over")
            self._refs[i] = refs + 1
            if not write or self._write[i]:
                return
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        t = _now()
        _check(_mmap(self.base + i * PAGE_SIZE, PAGE_SIZE, prot, mmap.MAP_SHARED | MAP_FIXED,
                     self.fd, frame * PAGE_SIZE), f"mapping frame {frame}")
        st = self.stats
        st.map_ns += _now() - t
        st.grant_maps += 1
        if not refs:
            self._refs[i] = 1
            self.outstanding += 1
        self._write[i] = write

    def unmap(self, frame: int) -> None:
        i = self._index(frame)
        refs = self._refs[i]
        if not refs:
            raise NotMapped(f"frame {frame} unmapped but not mapped")
        self._refs[i] = refs - 1
        if refs == 1:
            self._unmap(i)

    def _unmap(self, i: int) -> None:
        t = _now()
        _check(_mmap(self.base + i * PAGE_SIZE, PAGE_SIZE, PROT_NONE,
                     _NONE_FLAGS | MAP_FIXED, -1, 0), "unmapping a payload page")
        st = self.stats
        st.unmap_ns += _now() - t
        st.grant_unmaps += 1
        self._write[i] = 0
        self.outstanding -= 1

    def mapped(self, frame: int) -> bool:
        i = frame - self.first
        return 0 <= i < self.count and self._refs[i] > 0

    def page(self, frame: int) -> memoryview:
        """The one accessor: a mapped page's bytes; refuses (``NotMapped``) anything else."""
        i = frame - self.first
        if not (0 <= i < self.count and self._refs[i]):
            raise NotMapped(f"payload frame {frame} read through the CPU view while unmapped")
        return self._raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]

    def close(self) -> None:
        """Disconnect: every page goes back to PROT_NONE with the whole reservation."""
        if self.base is None:
            return
        self._raw.release()
        _munmap(self.base, self.size)
        self.base = None
        self.outstanding = 0
        self._refs = bytearray(self.count)
