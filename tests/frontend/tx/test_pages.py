"""Netfront's TX payload pages: a frame takes the pages it fills from the lowest run of free
pages the largest frame fits (one iovec, one template slice), pages answered are reused
first, and when no such run is left the queue stops until answers free one."""

from __future__ import annotations

from frontend.tx.pages import READ_PAGES, runs_of
from shared.protocol.grant import RESERVED_REFS
from shared.protocol.netif import PAGE_SIZE, TX_REQUEST
from tests.conftest import frame, make_pair


def requests(p, first: int, n: int) -> list[tuple[int, int, int, int, int]]:
    """The ``n`` TX requests on the frontend's ring from index ``first`` on."""
    ring = p.tx.ring
    return [TX_REQUEST.unpack_from(ring.buf, ring.entry(first + i)) for i in range(n)]


def test_small_frames_take_a_page_each_so_the_ring_bounds_what_is_in_flight():
    """With a 17-page chunk per frame, 120 chunks (30 in a staging pool) bounded the frames in
    flight; with a page per small frame, 200 one-slot frames are all queued at once."""
    p = make_pair(header_slots=False)
    pages = p.tx.pages
    out = [frame(bytes([i]) * 40) for i in range(200)]
    for f in out:
        p.send(f)
    assert p.tx.pump(budget=300) == 200 and not p.tx.stopped
    assert p.tx.in_flight() == 200 and pages.in_use() == 200
    reqs = requests(p, 0, 200)
    assert [r[3] for r in reqs] == list(range(200))  # page p: id p, lowest first
    assert [r[0] - RESERVED_REFS for r in reqs] == [pages.ref0 - RESERVED_REFS + i
                                                   for i in range(200)]
    p.tx.ring.push_requests()
    p.run_tx()
    assert p.wire_frames() == out
    assert pages.in_use() == 0


def test_every_frame_is_one_run_of_pages_and_answered_pages_are_reused_first():
    """Frames of 1 to 17 pages, answered in batches: each frame's fragment requests name
    consecutive grefs with their ids, whole pages but the last, and every frame sent after
    all answers starts again at page 0 (the working set stays small)."""
    p = make_pair(header_slots=False)
    sizes = [60, 5000, 9000, 30000, 64000, 200, 4096, 4097] * 6
    sent: list[bytes] = []
    seen = 0
    for i, n in enumerate(sizes):
        f = frame(bytes([i % 251]) * n)
        sent.append(f)
        p.send(f)
        first = p.tx.ring.req_prod_pvt
        idle = p.tx.pages.in_use() == 0
        assert p.tx.pump() == 1
        reqs = requests(p, first, p.tx.ring.req_prod_pvt - first)
        ids = [r[3] for r in reqs]
        assert ids == list(range(ids[0], ids[0] + len(ids))), (n, ids)
        assert [r[0] - p.tx.pages.ref0 for r in reqs] == ids
        assert [r[4] for r in reqs[1:-1]] == [PAGE_SIZE] * (len(reqs) - 2)
        assert len(reqs) == -(-len(f) // PAGE_SIZE) and reqs[0][4] == len(f)
        if idle:
            assert ids[0] == 0
        p.tx.ring.push_requests()
        if i % 3 == 2:  # answers every third frame
            p.run_tx()
            got = p.wire_frames()
            assert got == sent[seen:seen + len(got)]
            seen += len(got)
    p.run_tx()
    assert p.wire_frames() == sent[seen:]


def test_a_frame_in_flight_is_stepped_over_and_its_pages_reused_once_answered():
    """A 64 KB frame holds pages 0-15; the small frames after it take 16, 17...; once all
    are answered the next frame starts at page 0 again."""
    p = make_pair(header_slots=False)
    big = frame(b"B" * 64000)
    small = [frame(bytes([i]) * 100) for i in range(3)]
    for f in (big, *small):
        p.send(f)
    assert p.tx.pump() == 4
    reqs = requests(p, 0, p.tx.ring.req_prod_pvt)
    assert [r[3] for r in reqs] == list(range(16)) + [16, 17, 18]
    p.tx.ring.push_requests()
    p.run_tx()
    assert p.wire_frames() == [big, *small] and p.tx.pages.in_use() == 0
    p.send(small[0])
    first = p.tx.ring.req_prod_pvt
    assert p.tx.pump() == 1 and requests(p, first, 1)[0][3] == 0


def test_the_queue_stops_without_a_free_run_for_the_largest_frame_and_answers_restart_it():
    """A small region (52 TX pages): three 64 KB frames hold 48 pages, the 4 left cannot
    take the largest frame, so the queue stops (and asks for a completion kick); the
    answers restart it and every frame arrives bit-exact."""
    p = make_pair(header_slots=False, size=1280 << 10)
    pages = p.tx.pages
    out = [frame(bytes([0x41 + i]) * 64000) for i in range(5)]
    for f in out:
        p.send(f)
    # a 64 KB frame fills 16 pages; one more may start while 17 pages from it are free
    assert p.tx.pump() == (pages.count - READ_PAGES) // 16 + 1 == 3
    assert p.tx.stopped and not p.tx.flow.can_send()
    assert pages.count - pages.in_use() < READ_PAGES
    p.tx.ring.push_requests()
    p.run_tx()
    assert not p.tx.stopped and pages.in_use() == 0
    assert p.wire_frames() == out


def test_a_page_run_is_revoked_as_runs_of_consecutive_refs():
    assert runs_of([4, 5, 6, 9, 10, 3], 100) == [(104, 3), (109, 2), (103, 1)]
    assert runs_of([7], 0) == [(7, 1)]


def test_a_read_is_offered_one_iovec_for_the_pages(monkeypatch):
    """A read costs what a chunk's did: the vnet header, the header slot and one iovec for
    the pages, whatever size the frames are."""
    import frontend.tx.queue as queue

    seen: list[int] = []
    real = queue.os.readv

    def readv(fd, iov):
        seen.append(len(iov))
        return real(fd, iov)

    monkeypatch.setattr(queue.os, "readv", readv)
    p = make_pair(header_slots=True)
    out = [frame(bytes([i]) * n) for i, n in enumerate((60, 3000, 64000, 9000))]
    for f in out:
        p.send(f)
    p.run_tx()
    assert p.wire_frames() == out
    assert seen and set(seen) == {3}
