"""The backend's CPU view of a frontend's payload pages: present only while a grant is mapped.

Why: in Xen a backend can read a guest page only after a grant-map hypercall has put it in its
page tables, and it loses it at the unmap (a TLB flush). This module gives netback the same
machine-enforced rule. At connect it reserves an address range twice the size of the payload area
with ``PROT_NONE`` (nothing is readable there); a *map* is ``mmap(MAP_SHARED)`` of that one
page of the region memfd at its place in the range, an *unmap* is ``munmap`` of it: each is a
real page-table change, the unmap a real TLB invalidation. A page's place is followed by a
guard page that is never mapped (``STRIDE``): two frames that are neighbours in the region
are never neighbours here, so the kernel never merges their mappings into one VMA, to split
it again at an unmap - which made an unmap of a page next to a mapped one cost nearly twice
another (measured in the bench's own op timings, docs/performance.md: TX payload pages). In
Xen a grant map costs the same whichever guest frame it maps; here too, since. An unmapped
page that was mapped before is a hole (absent), one never mapped is still ``PROT_NONE``; a
map into a hole uses ``MAP_FIXED_NOREPLACE``, so it can never clobber a mapping that is not
ours (it fails instead).
Why holes rather than ``mmap(PROT_NONE, MAP_FIXED)`` back over the page: on this machine that
doubles the cost of both operations (each FIXED mapping over another is an unmap plus a map),
measured by ``python -m backend.grants.cpuview``. A raw read of an unmapped page faults (SIGSEGV,
see ``tests/backend/test_cpuview.py``); the accessor below refuses first. Each hole splits the
reservation (one more VMA), and a process has at most ``vm.max_map_count`` (65530) of them: a
frontend granting scattered pages could make every later mmap of this process fail, Python's
own allocations included. So at most HOLE_LIMIT holes are left; past that an unmap puts
``PROT_NONE`` back over the page instead (the dearer way, which merges with the reservation).
A hole is free address space, though: the kernel may place any later mapping of this process
there (a one-page mapping fits a hole between two guards). ``MAP_FIXED_NOREPLACE`` then fails
(EEXIST) rather than clobber it, and the page is mapped wherever the kernel likes instead
(``_away``), at the same cost, until it is unmapped.

The persistent areas (grant table, rings, header slots) are not here: the backend maps them
once at connect (``Region`` over a prefix mapping of the memfd). The DMA view (the vif write and
grant copies) is ``backend/grants/dmaview.py``, owned by ``backend/grants/gntmap.py``.

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
import errno
import mmap
import os
import time
from array import array

from shared.faults import OwnFault
from shared.protocol.netif import PAGE_SIZE
from shared.protocol.region import Layout
from shared.protocol.stats import RingStats

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
MAP_FIXED_NOREPLACE = 0x100000  # Linux >= 4.17
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MAP_FAILED = ctypes.c_void_p(-1).value
_NONE_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
#: holes left in the reservation at most (each one a VMA more; see the module's docstring):
#: more than an honest frontend's TX payload pages and RX buffers, far below vm.max_map_count
HOLE_LIMIT = 8192
#: bytes from one page's place to the next: the page, then its guard page (never mapped)
STRIDE = 2 * PAGE_SIZE
_now = time.perf_counter_ns


class NotMapped(OwnFault):
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
        self.size = self.count * STRIDE
        self.base = _check(_mmap(None, self.size, PROT_NONE, _NONE_FLAGS, -1, 0),
                           "reserving the CPU view")
        # one view over the whole range; slicing it touches nothing, reading an unmapped
        # page through it faults, so only ``page`` hands slices out, after checking
        self._raw = memoryview((ctypes.c_char * self.size).from_address(self.base)).cast("B")
        #: nested maps per page (u32: persistent grants of one frame are each a map)
        self._refs = array("I", bytes(4 * self.count))
        self._write = bytearray(self.count)
        self._holes = bytearray(self.count)  # unmapped after a map: absent, not PROT_NONE
        #: mapped since the last access through ``page``: the next access is a first touch
        #: (the page fault that fills the PTE; counted, for the paper's cost model)
        self._fresh = bytearray(self.count)
        #: pages mapped elsewhere because their place was taken: index -> (address, view)
        self._away: dict[int, tuple[int, memoryview]] = {}
        self.holes = 0
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
            self._refs[i] = refs + 1
            if not write or self._write[i]:
                return
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        # over the reservation (never mapped yet) or our own mapping (a remap for writing),
        # else into our hole - unless something else has been placed there meanwhile
        away = self._away.get(i)
        addr = away[0] if away else self.base + i * STRIDE
        how = MAP_FIXED if refs or not self._holes[i] else MAP_FIXED_NOREPLACE
        t = _now()
        got = _mmap(addr, PAGE_SIZE, prot, mmap.MAP_SHARED | how, self.fd, frame * PAGE_SIZE)
        if got in (None, MAP_FAILED) and ctypes.get_errno() == errno.EEXIST:
            got = _mmap(None, PAGE_SIZE, prot, mmap.MAP_SHARED, self.fd, frame * PAGE_SIZE)
            if got not in (None, MAP_FAILED):
                view = memoryview((ctypes.c_char * PAGE_SIZE).from_address(got)).cast("B")
                self._away[i] = away = (got, view)
                addr = got
        _check(got, f"mapping frame {frame}")
        st = self.stats
        st.map_ns += _now() - t
        st.grant_maps += 1
        self._fresh[i] = 1
        if got != addr:  # an old kernel ignoring NOREPLACE: never use a page elsewhere
            _munmap(got, PAGE_SIZE)
            raise OSError(f"payload frame {frame}: its place in the CPU view is taken")
        if not away and self._holes[i]:
            self._holes[i] = 0
            self.holes -= 1
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
        away = self._away.pop(i, None)
        if away:  # mapped elsewhere: its place stays the hole someone else took
            away[1].release()
            t = _now()
            if _munmap(away[0], PAGE_SIZE):
                _check(None, "unmapping a payload page")
        else:
            addr = self.base + i * STRIDE
            hole = self.holes < HOLE_LIMIT
            t = _now()
            if hole:
                if _munmap(addr, PAGE_SIZE):
                    _check(None, "unmapping a payload page")
            else:  # PROT_NONE back over it: no hole, no VMA more
                _check(_mmap(addr, PAGE_SIZE, PROT_NONE, _NONE_FLAGS | MAP_FIXED, -1, 0),
                       "unmapping a payload page")
        st = self.stats
        st.unmap_ns += _now() - t
        st.grant_unmaps += 1
        if not away:
            self._holes[i] = hole
            self.holes += hole
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
        if self._fresh[i]:
            self._fresh[i] = 0
            self.stats.first_touches += 1
        away = self._away.get(i) if self._away else None
        if away:
            return away[1][:]
        return self._raw[i * STRIDE:i * STRIDE + PAGE_SIZE]

    def close(self) -> None:
        """Disconnect: every page this view still holds goes, with the reservation around
        it - but never a hole: the kernel may since have placed another mapping there (a
        region the next frontend attaches, another connection's page, the heap), and
        unmapping the whole range once took that away from under its owner (EFAULT, or a
        crash, in code that had nothing to do with this connection)."""
        if self.base is None:
            return
        self._raw.release()
        for addr, view in self._away.values():
            view.release()
            _munmap(addr, PAGE_SIZE)
        self._away.clear()
        holes, n, i = self._holes, self.count, 0
        while i < n:  # each run of places that are still ours (with their guards), in one
            if holes[i]:  # munmap; a hole's guard is still ours, its place is not
                _munmap(self.base + i * STRIDE + PAGE_SIZE, PAGE_SIZE)
                i += 1
                continue
            end = holes.find(1, i)
            end = n if end < 0 else end
            _munmap(self.base + i * STRIDE, (end - i) * STRIDE)
            i = end
        self.base = None
        self.outstanding = self.holes = 0
        self._refs = array("I", bytes(4 * self.count))


def _microbench(rounds: int = 20000) -> dict[str, float]:
    """Bare mmap/munmap of one memfd page (ctypes, no bookkeeping) against CpuView.map/unmap:
    how much of op_us.map/unmap is the kernel's page-table work.
    ``python -m backend.grants.cpuview``."""
    from shared.plumbing.transport import create_memfd
    from shared.protocol.region import Region

    fd, mem = create_memfd(4 << 20)
    layout = Region.create(mem).layout
    st = RingStats()
    view = CpuView(fd, layout, st)
    frames = [layout.payload_page + i % 64 for i in range(rounds)]
    t_map = t_unmap = 0
    for f in frames:  # bare: a fresh address each time, then munmap (no touch)
        t = _now()
        a = _check(_mmap(None, PAGE_SIZE, mmap.PROT_READ, mmap.MAP_SHARED, fd, f * PAGE_SIZE),
                   "bare mmap")
        t_map += _now() - t
        t = _now()
        _munmap(a, PAGE_SIZE)
        t_unmap += _now() - t
    touch_ns = 0
    for f in frames:  # the CPU view: into the reservation (or its hole), then munmap
        view.map(f)
        t = _now()
        view.page(f)[0]  # first touch: the page fault that fills the PTE
        touch_ns += _now() - t
        view.unmap(f)
    view.close()
    mem.close()
    os.close(fd)
    return {"bare_mmap_us": t_map / rounds / 1e3, "bare_munmap_us": t_unmap / rounds / 1e3,
            "cpuview_map_us": st.map_ns / st.grant_maps / 1e3,
            "cpuview_unmap_us": st.unmap_ns / st.grant_unmaps / 1e3,
            "first_touch_us": touch_ns / rounds / 1e3}


if __name__ == "__main__":
    import json

    print(json.dumps({k: round(v, 3) for k, v in _microbench().items()}))
