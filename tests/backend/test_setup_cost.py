"""Costs a frontend can impose at set-up are bounded by what it uses, not by what it declares
(issue 11, item 7), and the lab's --region-fd gets the checks a handshake's memfd gets (item 8)."""

from __future__ import annotations

import logging
import mmap
import os
import resource
import time
import tracemalloc

import pytest

from backend.grants.gntmap import GntMap, Views
from backend.interface import NetbackConfig
from backend.tx.path import TxPath
from shared.plumbing.transport import TransportError, create_memfd
from shared.protocol.region import Region
from shared.protocol.stats import RingStats
from tests.conftest import dgram_pair
from tests.hostile import HostileFrontend
from tests.inproc import BackendThread, InprocNetback, thread_cpu, wait_for

GIB = 1 << 30


def test_a_declared_1gib_region_with_65536_header_slots_costs_nothing_per_slot():
    fd, mem = create_memfd(GIB)
    Region.create(mem, hdr_slots=65536)
    dma = mmap.mmap(fd, GIB)
    region = Region.attach(dma)
    st = RingStats()
    views = Views(os.dup(fd), dma, region, st)
    tracemalloc.start()
    t = time.process_time()
    tx = TxPath(region, GntMap(region, views, 0, st, False), -1, st, "lazy", True)
    cpu = time.process_time() - t
    used = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert cpu < 0.05, f"TxPath set-up took {cpu:.3f}s of CPU"
    assert used < 1 << 20, f"TxPath set-up allocated {used / 2**20:.1f} MiB"
    assert tx.slots.check(65535 * 128, 0, 60) == 65535 * 128  # still validates every slot
    del tx
    views.close()
    mem.close()
    os.close(fd)


def test_reconnects_with_a_big_region_stay_cheap_and_forget_their_mappings(tmp_path):
    b = BackendThread(tmp_path)
    try:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu = []
        for i in range(4):
            c0 = thread_cpu(b.thread.native_id)
            h = HostileFrontend(str(b.ev), f"big{i}", b.domid, size=GIB, hdr_slots=65536)
            h.connect()
            wait_for(lambda: b.nb.tx is not None, 10, "Connected")
            cpu.append(thread_cpu(b.thread.native_id) - c0)
            assert len(b.nb._mapped) <= 1  # the previous connections' entries are gone
            h.close()
            b.idle()
            h.region.close()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0  # KiB
        assert max(cpu) < 0.3, f"backend CPU per connect: {cpu}"
        assert grown < 40 * 1024, f"peak RSS grew {grown / 1024:.0f} MiB over 4 reconnects"
    finally:
        b.stop()


def test_the_frontend_name_cannot_forge_log_lines(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="netback")
    b = BackendThread(tmp_path)
    try:
        h = HostileFrontend(str(b.ev), "evil\nnetback: forged line\x1b[31m", b.domid)
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 5, "Connected")
        assert b.nb.peer == "evil\\nnetback: forged line\\x1b[31m"
        h.close()
        b.idle()
    finally:
        b.stop()
    for r in caplog.records:
        msg = r.getMessage()
        assert "\n" not in msg and "\x1b" not in msg, msg
    assert any("evil\\nnetback" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["unsealed", "not-a-memfd", "odd-size"])
def test_region_fd_gets_the_seal_and_size_checks(tmp_path, kind):
    if kind == "unsealed":
        fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 20)
        match = "not sealed"
    elif kind == "not-a-memfd":
        path = tmp_path / "plain"
        path.write_bytes(bytes(1 << 20))
        fd = os.open(path, os.O_RDWR)
        match = "not a memfd"
    else:
        fd = os.memfd_create("odd", os.MFD_CLOEXEC)
        os.ftruncate(fd, (1 << 20) + 100)
        match = "page multiple"
    vif, wire = dgram_pair()
    try:
        with pytest.raises(TransportError, match=match):
            InprocNetback(NetbackConfig(vif="vifR", domid=3, connect=str(tmp_path / "port"),
                                        region_fd=fd), vif)
    finally:
        os.close(fd)
        vif.close()
        wire.close()
