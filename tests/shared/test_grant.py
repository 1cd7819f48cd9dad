"""Grant table: permission checks and refusal to revoke a grant in use."""

import pytest

from shared.protocol.grant import GrantError, GrantTable, GTF_reading

FRAMES = range(10, 20)


@pytest.fixture
def table():
    return GrantTable(memoryview(bytearray(4096)), 64)


def test_granted_frame_is_returned(table):
    table.grant(9, domid=0, frame=12)
    assert table.check(9, 0, write=True, frames=FRAMES) == 12


@pytest.mark.parametrize("ref,domid,write,frame,msg", [
    (64, 0, False, 12, "outside the table"),
    (9, 3, False, 12, "granted to domain"),
    (9, 0, True, 12, "read-only"),
    (9, 0, False, 99, "outside the payload"),
])
def test_bad_use_is_refused(table, ref, domid, write, frame, msg):
    table.grant(9, domid=0, frame=frame, readonly=True)
    with pytest.raises(GrantError, match=msg):
        table.check(ref, domid, write, FRAMES)


def test_not_granted_is_refused(table):
    with pytest.raises(GrantError, match="not granted"):
        table.check(8, 0, False, FRAMES)
    table.grant(8, 0, 12)
    assert table.end_access(8)
    with pytest.raises(GrantError, match="not granted"):
        table.check(8, 0, False, FRAMES)


def test_revoking_a_grant_in_use_is_refused(table):
    table.grant(8, 0, 12)
    table.mark(8, write=False)
    assert table.flags[8 * 4] & GTF_reading
    assert table.in_use(8)
    assert not table.end_access(8)
    assert table.check(8, 0, False, FRAMES) == 12  # still granted
    table.unmark(8)
    assert table.end_access(8)


def test_a_run_is_revoked_whole_or_not_at_all(table):
    for ref in range(10, 15):
        table.grant(ref, 0, ref)
    table.mark(13, write=False)  # the backend holds one of them
    assert table.end_access_run(10, 5) is False
    assert [table.read(r).flags for r in range(10, 15)] == [1, 1, 1, 1 | GTF_reading, 1]
    table.unmark(13)
    assert table.end_access_run(10, 5) is True
    assert [table.read(r).flags for r in range(9, 16)] == [0] * 7
    assert table.end_access_run(10, 0) is True  # an empty run (a ring wrap's second half)
