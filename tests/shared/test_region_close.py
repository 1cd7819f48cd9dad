"""Region.close for real: every view it handed out released, the mapping and the memfd gone."""

from __future__ import annotations

import gc
import logging
import os

import pytest

from shared.faults import OwnFault
from shared.plumbing.transport import create_memfd
from shared.protocol.region import Region, RegionInUse


def mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(f"/memfd:{name} " in line for line in f)


def fd_open(fd: int, name: str) -> bool:
    """Is ``fd`` still that memfd? (A closed number may already be reused by another file.)"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:{name} (deleted)"
    except FileNotFoundError:
        return False


@pytest.fixture
def region(request):
    name = f"pvnet-test-{request.node.name[:40]}"
    fd, mem = create_memfd(1 << 20, name)
    r = Region.create(mem, fd)
    yield r, fd, name
    r.close()


def test_close_releases_the_views_unmaps_and_closes_the_memfd(region) -> None:
    r, fd, name = region
    page = r.page(r.layout.payload_page)
    views = [r.buf, r.tx_ring, r.rx_ring, r.hdr, r.grants.buf, r.grants.flags, page]
    assert mapped(name) and fd_open(fd, name)
    r.close()
    assert not mapped(name)
    assert not fd_open(fd, name)
    for view in views:
        with pytest.raises(ValueError):
            view[0]
    r.close()  # idempotent
    assert r.closed


def test_a_view_made_elsewhere_pins_the_mapping_strict_close_says_so(region) -> None:
    r, fd, name = region
    ring = r.tx_ring[:16].cast("I")  # what a ring keeps
    with pytest.raises(RegionInUse) as info:
        r.close(strict=True)
    assert isinstance(info.value, OwnFault)
    assert not fd_open(fd, name)  # the memfd goes all the same
    assert mapped(name) and ring[0] == 0  # still safe to read: nothing unmapped under it
    del ring
    r.close(strict=True)  # the holder went: now it unmaps
    assert not mapped(name) and r.closed


def test_a_lenient_close_logs_the_pinning_and_unmaps_with_the_last_view(caplog) -> None:
    name = "pvnet-test-lenient"
    fd, mem = create_memfd(1 << 20, name)
    r = Region.create(mem, fd)
    del mem  # the Region's alone, as in netback
    ring = r.rx_ring[:16].cast("I")
    with caplog.at_level(logging.WARNING, logger="pvnet.region"):
        r.close()
    assert "still exported elsewhere" in caplog.text and "own fault" in caplog.text
    assert r.closed and not fd_open(fd, name) and mapped(name)
    del ring
    gc.collect()
    assert not mapped(name)


def test_a_region_without_a_memfd_closes_its_mapping_only() -> None:
    fd, mem = create_memfd(1 << 20, "pvnet-test-nofd")
    try:
        r = Region.create(mem)
        r.close()
        assert mem.closed and fd_open(fd, "pvnet-test-nofd")  # the fd was not the Region's to close
    finally:
        os.close(fd)


def test_a_region_over_someone_elses_mapping_releases_its_views_and_leaves_the_mapping():
    """The guest's BAR: mapped once per device, laid out again on every reconnect. Closing the
    region releases what it handed out; the mapping stays open and usable for the next one."""
    fd, mem = create_memfd(1 << 20, "pvnet-test-bar")
    try:
        r = Region.create(mem, owns_mem=False)
        views = [r.buf, r.tx_ring, r.grants.flags, r.page(r.layout.payload_page)]
        r.close()
        for view in views:
            with pytest.raises(ValueError):
                view[0]
        assert r.closed and not mem.closed and fd_open(fd, "pvnet-test-bar")
        again = Region.create(mem, owns_mem=False)  # the next connection lays it out anew
        again.close()
        mem.close()  # nothing of either region pins it: this would raise BufferError
    finally:
        os.close(fd)
