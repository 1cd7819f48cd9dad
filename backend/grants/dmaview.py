"""The DMA view: all of a frontend's region, as the "hardware" and the "hypervisor" see it.

Why a module of its own: in Xen, netback's CPU never reads a payload page it has not mapped;
the NIC's DMA (here: ``writev`` to the vif TAP) and the hypervisor's grant copies (the header
copy, the RX copy) reach guest memory without a CPU mapping of the backend. This mapping stands
for those two, and only for those: everything that *reads payload bytes in netback code*
(filters, checksums, copy mode) must go through the CPU view (``backend/grants/cpuview.py``), which
has a page only while its grant is mapped.

Only the grant operations hold a ``DmaView`` (``backend/grants/gntmap.py`` and its RX copy,
``backend/rx/modes/copy.py``); they hand it out to nobody. Its users reach it through
``GntMap.tx_iovecs`` (the vif submit), ``GntMap.copy_from``/``pull`` (header copy and pull)
and ``GntMap.rx`` (the RX copy). The fast tier runs the filter, checksum and copy-mode tests with
these methods replaced by guards that raise when called from those code paths.

API:
- ``DmaView(mem)``: over a full-region ``mmap`` (the caller keeps ownership of ``mem``).
- ``iovecs(frames, offs, sizes, out)``: append one memoryview per fragment to ``out``.
- ``copy(frame, off, size) -> bytes``: a grant copy out of a page.
- ``rx_target(frame) -> memoryview``: a posted RX page as a readv destination (cached).
- ``readv(fd, iov) -> int``: read one frame from ``fd`` into ``iov`` (the RX grant copy).
"""

from __future__ import annotations

import mmap
import os

from shared.protocol.netif import PAGE_SIZE


class DmaView:
    def __init__(self, mem: mmap.mmap) -> None:
        self._buf = memoryview(mem)
        self._pages: dict[int, memoryview] = {}  # RX targets, made once per page

    def iovecs(self, frames: list[int], offs: list[int], sizes: list[int], out: list) -> None:
        """The fragments as iovecs for the vif write (the device's DMA, no CPU mapping)."""
        buf = self._buf
        f0, n = frames[0], len(frames)
        if n == 1:  # an MTU packet's one fragment
            a = f0 * PAGE_SIZE + offs[0]
            out.append(buf[a:a + sizes[0]])
            return
        if frames[-1] == f0 + n - 1 and offs.count(0) == n \
                and sizes[:-1].count(PAGE_SIZE) == n - 1 and frames == list(range(f0, f0 + n)):
            # whole pages, physically contiguous: one iovec (sizes[-1] may be short). Each
            # fragment's own offset and size decide, never the first one's
            start = f0 * PAGE_SIZE
            out.append(buf[start:start + (n - 1) * PAGE_SIZE + sizes[-1]])
            return
        for frame, off, fsize in zip(frames, offs, sizes, strict=True):
            a = frame * PAGE_SIZE + off
            out.append(buf[a:a + fsize])

    def copy(self, frame: int, off: int, size: int) -> bytes:
        a = frame * PAGE_SIZE + off
        return bytes(self._buf[a:a + size])

    def rx_target(self, frame: int) -> memoryview:
        view = self._pages.get(frame)
        if view is None:
            view = self._pages[frame] = self._buf[frame * PAGE_SIZE:(frame + 1) * PAGE_SIZE]
        return view

    def readv(self, fd: int, iov: list) -> int:
        """One frame from ``fd`` straight into the posted pages (the RX grant copy)."""
        return os.readv(fd, iov)

    def close(self) -> None:
        for view in self._pages.values():
            view.release()
        self._pages.clear()
        try:
            self._buf.release()
        except BufferError:  # an iovec still referenced: it goes with its last view
            pass
