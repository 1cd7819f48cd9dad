import pytest

from shared.protocol.slots import HeaderSlots, SlotError


def test_alloc_release_and_check():
    hs = HeaderSlots(memoryview(bytearray(4096)), 128, 32)
    a = hs.alloc()
    assert hs.in_use == 1
    assert hs.check(a * 128, 0, 128) == a * 128
    hs.release(a)
    assert hs.in_use == 0
    got = [hs.alloc() for _ in range(32)]
    assert sorted(got) == list(range(32)) and hs.alloc() is None


@pytest.mark.parametrize("off,start,length", [(64, 0, 10), (4096, 0, 10), (0, 100, 29),
                                              (0, 0, 0), (128 * 32, 0, 1)])
def test_bad_references_are_refused(off, start, length):
    hs = HeaderSlots(memoryview(bytearray(4096)), 128, 32)
    with pytest.raises(SlotError):
        hs.check(off, start, length)
