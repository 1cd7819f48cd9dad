"""Region layout: areas fit, and a backend refuses any header that does not describe them."""

import mmap
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol.region import Layout, LayoutError, Region


@pytest.mark.parametrize("size", [1 << 20, 8 << 20, 64 << 20])
def test_layout_fits(size):
    lay = Layout.for_size(size)
    lay.validate(size)
    assert lay.gnt_count >= lay.payload_pages
    assert (lay.payload_page + lay.payload_pages) * 4096 <= size


def test_create_then_attach_round_trips():
    mem = mmap.mmap(-1, 2 << 20)
    front = Region.create(mem)
    back = Region.attach(mem)
    assert back.layout == front.layout


def test_bad_magic_and_size_are_refused():
    mem = mmap.mmap(-1, 2 << 20)
    Region.create(mem)
    with pytest.raises(LayoutError, match="pages"):
        Layout.unpack(memoryview(mem), 4 << 20)
    mem[0:8] = b"NOTPVNET"
    with pytest.raises(LayoutError, match="magic"):
        Region.attach(mem)


@settings(max_examples=200, deadline=None)
@given(field=st.integers(0, 10), value=st.integers(0, 2**32 - 1))
def test_any_corrupted_header_field_is_refused_or_still_inside(field, value):
    size = 2 << 20
    mem = mmap.mmap(-1, size)
    Region.create(mem)
    struct.pack_into("<I", mem, 8 + 4 * field, value)
    try:
        lay = Layout.unpack(memoryview(mem), size)
    except LayoutError:
        return
    assert (lay.payload_page + lay.payload_pages) * 4096 <= size
    assert lay.hdr_slot_size * lay.hdr_slots <= (lay.payload_page - lay.hdr_page) * 4096
