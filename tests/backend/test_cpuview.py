"""The CPU view: a payload page is there only while mapped (a real mmap, undone by a real
unmap), an unmapped one faults; lazy mode maps only on touch; the DMA view is used only by the
vif submit and the grant copies."""

import ctypes
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from backend.grants import cpuview, dmaview
from backend.grants.cpuview import STRIDE, CpuView, NotMapped
from backend.handshake import attach_region
from shared.plumbing.transport import create_memfd
from shared.protocol.mechanisms import names
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR
from shared.protocol.region import Region
from shared.protocol.stats import RingStats
from tests.conftest import frame, make_pair

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


def _memfd_at(addr: int) -> bool:
    """Does this process map a memfd page at ``addr`` (per the kernel's /proc/self/maps)?"""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, _, rest = line.partition("-")
            if int(lo, 16) <= addr < int(rest.split()[0], 16):
                return "/memfd:" in line
    return False


def _vma_at(addr: int) -> tuple[int, int] | None:
    """The bounds of whatever this process maps at ``addr``, if anything."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, _, rest = line.partition("-")
            if int(lo, 16) <= addr < int(rest.split()[0], 16):
                return int(lo, 16), int(rest.split()[0], 16)
    return None


def test_a_map_is_a_real_mapping_and_the_accessor_refuses_unmapped_pages():
    fd, mem = create_memfd(1 << 20)
    Region.create(mem)
    region, own = attach_region(fd, mem)
    st = RingStats()
    cpu = CpuView(own, region.layout, st)
    frame_no = region.layout.payload_page + 3
    mem[frame_no * 4096:frame_no * 4096 + 5] = b"hello"
    addr = cpu.base + 3 * STRIDE
    assert not _memfd_at(addr)
    with pytest.raises(NotMapped):
        cpu.page(frame_no)
    cpu.map(frame_no)
    assert _memfd_at(addr)  # the kernel's page tables now hold the memfd page there
    assert bytes(cpu.page(frame_no)[:5]) == b"hello"
    cpu.map(frame_no)  # nested: counted, no second mmap
    assert st.grant_maps == 1 and cpu.outstanding == 1
    cpu.unmap(frame_no)
    assert _memfd_at(addr)
    cpu.unmap(frame_no)
    assert not _memfd_at(addr) and st.grant_unmaps == 1 and cpu.outstanding == 0
    assert st.map_ns > 0 and st.unmap_ns > 0
    with pytest.raises(NotMapped):
        cpu.page(frame_no)
    with pytest.raises(NotMapped):
        cpu.page(region.layout.tx_ring_page)  # not a payload page at all
    cpu.close()
    region.close()
    os.close(own)
    os.close(fd)


def test_neighbouring_frames_never_share_a_mapping():
    """Frames that are neighbours in the region are mapped a guard page apart: each is a
    mapping (a VMA) of its own, so unmapping one never splits another's - which made an
    unmap next to a mapped page cost nearly twice another. The guard is never readable."""
    fd, mem = create_memfd(1 << 20)
    Region.create(mem)
    region, own = attach_region(fd, mem)
    cpu = CpuView(own, region.layout, RingStats())
    first = region.layout.payload_page
    for i in range(3, 7):
        cpu.map(first + i)

    for i in range(3, 7):
        assert _vma_at(cpu.base + i * STRIDE) == (cpu.base + i * STRIDE,
                                             cpu.base + i * STRIDE + 4096)
        assert not _memfd_at(cpu.base + i * STRIDE + 4096)  # the guard
    cpu.unmap(first + 4)
    assert _vma_at(cpu.base + 5 * STRIDE) == (cpu.base + 5 * STRIDE,
                                             cpu.base + 5 * STRIDE + 4096)
    assert bytes(cpu.page(first + 5)[:1]) == bytes(mem[(first + 5) * 4096:(first + 5) * 4096 + 1])
    cpu.close()
    region.close()
    os.close(own)
    os.close(fd)


def test_a_hole_taken_by_another_mapping_is_never_clobbered():
    """An unmapped page leaves a hole the kernel may give to any later mmap of this process
    (here: one placed there on purpose). Mapping that frame again must not clobber it: the
    frame is mapped elsewhere, read and written there, unmapped from there."""
    fd, mem = create_memfd(1 << 20)
    Region.create(mem)
    region, own = attach_region(fd, mem)
    st = RingStats()
    cpu = CpuView(own, region.layout, st)
    frame_no = region.layout.payload_page + 5
    mem[frame_no * 4096:frame_no * 4096 + 5] = b"guest"
    cpu.map(frame_no)
    cpu.unmap(frame_no)  # a hole now
    hole = cpu.base + 5 * STRIDE
    intruder = cpuview._mmap(hole, 4096, 3, cpuview._NONE_FLAGS | cpuview.MAP_FIXED_NOREPLACE,
                             -1, 0)
    assert intruder == hole  # someone else's page sits in our hole
    ctypes.memmove(hole, b"mine!", 5)
    cpu.map(frame_no, write=True)
    assert bytes(cpu.page(frame_no)[:5]) == b"guest"
    cpu.page(frame_no)[:5] = b"wrote"
    assert bytes(mem[frame_no * 4096:frame_no * 4096 + 5]) == b"wrote"
    assert ctypes.string_at(hole, 5) == b"mine!"  # untouched
    assert st.grant_maps == 2 and cpu.outstanding == 1
    cpu.unmap(frame_no)
    assert cpu.outstanding == 0 and st.grant_unmaps == 2
    with pytest.raises(NotMapped):
        cpu.page(frame_no)
    assert ctypes.string_at(hole, 5) == b"mine!"
    cpuview._munmap(hole, 4096)
    cpu.close()
    region.close()
    os.close(own)
    os.close(fd)


def test_closing_the_view_leaves_a_mapping_in_its_holes_alone():
    """At disconnect the view unmaps what it holds, never its holes: a mapping the kernel
    placed in one (here: on purpose, a page's worth, the most a hole between two guard pages
    holds) stays its owner's. Closing once unmapped the whole range,
    and the next user of that memory got EFAULT (a fast-tier run hit it: the next pair's
    region, ``readv`` into it failing with "Bad address")."""
    fd, mem = create_memfd(1 << 20)
    Region.create(mem)
    region, own = attach_region(fd, mem)
    cpu = CpuView(own, region.layout, RingStats())
    first = region.layout.payload_page
    for i in range(4, 8):  # a run of holes
        cpu.map(first + i)
        cpu.unmap(first + i)
    cpu.map(first + 10)  # and a page still mapped at close
    hole = cpu.base + 5 * STRIDE
    intruder = cpuview._mmap(hole, 4096, 3,
                             cpuview._NONE_FLAGS | cpuview.MAP_FIXED_NOREPLACE, -1, 0)
    assert intruder == hole
    ctypes.memmove(hole, b"mine!", 5)
    base = cpu.base
    cpu.close()
    r, w = os.pipe()
    try:  # the kernel reads it: EFAULT (not a crash) had close unmapped it
        os.write(w, (ctypes.c_char * 5).from_address(hole))
        assert os.read(r, 5) == b"mine!"
    finally:
        os.close(r)
        os.close(w)
    assert not _memfd_at(base + 10 * STRIDE)  # and the page the view held is gone
    assert _vma_at(base + 4 * STRIDE + 4096) is None  # as are the guards, a hole's too
    cpuview._munmap(hole, 4096)
    region.close()
    os.close(own)
    os.close(fd)


def test_reading_an_unmapped_page_faults():
    """Not merely counted: the bytes are not there. A raw read through the CPU view's range
    (bypassing the accessor) of a page that was mapped and then unmapped kills the process
    with SIGSEGV."""
    script = textwrap.dedent("""
        import os, sys
        from backend.grants.cpuview import STRIDE, CpuView, NotMapped
        from backend.handshake import attach_region
        from shared.protocol.region import Region
        from shared.protocol.stats import RingStats
        from shared.plumbing.transport import create_memfd
        fd, mem = create_memfd(1 << 20)
        Region.create(mem)
        region, own = attach_region(fd, mem)
        cpu = CpuView(own, region.layout, RingStats())
        f = region.layout.payload_page
        mem[f * 4096] = 42
        cpu.map(f)
        print("mapped", cpu.page(f)[0], flush=True)
        cpu.unmap(f)
        try:
            cpu.page(f)
        except NotMapped:
            print("refused", flush=True)
        print("raw read", cpu._raw[0], flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, timeout=30)
    assert r.stdout.splitlines() == ["mapped 42", "refused"], r.stderr
    assert r.returncode == -signal.SIGSEGV


def test_lazy_maps_only_on_touch_and_persistent_maps_stay_until_disconnect():
    p = make_pair("lazy", filters=["drop payload=text:SECRET"])
    p.send(frame(b"x" * 9000 + b"SECRET"))
    p.send(frame(b"y" * 9000))
    p.run_tx()
    bst = p.bstats[0]
    assert len(p.wire_frames()) == 1
    assert bst.grant_maps == bst.grant_maps_on_touch == bst.grant_unmaps > 0
    assert bst.maps_outstanding == 0 and p.btx.gntmap.cpu.outstanding == 0
    assert bst.grants_in_use == 0
    close(p)
    p = make_pair("map", persistent=True)
    for _ in range(3):
        p.send(frame(b"z" * 9000))
    p.run_tx()
    bst = p.bstats[0]
    assert len(p.wire_frames()) == 3
    # each persistent grant mapped once, on first use; none of those maps was a touch
    assert bst.grant_maps == p.btx.gntmap.cpu.outstanding == bst.maps_outstanding > 0
    assert bst.grant_maps_on_touch == 0 and bst.grant_unmaps == 0
    p.btx.gntmap.unmap_all()
    assert bst.maps_outstanding == 0 and p.btx.gntmap.cpu.outstanding == 0
    assert bst.grant_unmaps == bst.grant_maps
    close(p)


@pytest.fixture
def dma_fenced(monkeypatch):
    """The DMA view refuses to serve any call made from the code that reads payload for
    netback (filter, checksum, copy mode, ``SkBuff.payload``); counts the calls it serves."""
    forbidden = {"drops", "checksum_setup", "payload", "attach", "copy_rest", "header_fields"}
    served = []

    def guard(name):
        real = getattr(dmaview.DmaView, name)

        def fenced(self, *a, **kw):
            f = sys._getframe(1)
            while f is not None:
                if f.f_code.co_name in forbidden:
                    raise AssertionError(f"DMA view reached from {f.f_code.co_name}")
                f = f.f_back
            served.append(name)
            return real(self, *a, **kw)
        return fenced

    for name in ("iovecs", "copy", "readv", "rx_target"):
        monkeypatch.setattr(dmaview.DmaView, name, guard(name))
    return served


@pytest.mark.parametrize("mode", names("tx"))
def test_filter_checksum_and_copy_mode_use_only_the_cpu_view(dma_fenced, mode):
    p = make_pair(mode, header_slots=False,
                  filters=["drop payload=text:SECRET", "drop dst_port=9999"])
    csum = bytearray(VNET_HDR.size)
    VNET_HDR.pack_into(csum, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    sent = [frame(b"a" * 7000, dport=80), frame(b"b" * 3000 + b"SECRET"),
            frame(b"c" * 5000, dport=9999)]
    for f in sent:
        p.send(f, bytes(csum))
    p.run_tx()
    assert p.wire_frames() == sent[:1]
    bst = p.bstats[0]
    assert bst.drops_filtered == 2 and bst.maps_outstanding == 0 and bst.grants_in_use == 0
    assert "copy" in dma_fenced  # the header copy (no header slots) is a grant copy
    # a payload rule read every frame: the copy it judged is what was sent (issue 11), so
    # the vif submit needed no iovecs into the shared pages
    assert "iovecs" not in dma_fenced
    close(p)
