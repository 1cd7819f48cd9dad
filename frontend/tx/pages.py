"""The TX payload pages and their per-page grants (the frontend's half of per-fragment grants).

A frame is read straight into free payload pages: ``readv`` is offered the lowest run of
``READ_PAGES`` free pages (the largest frame, 64 KiB + headers, without a header slot) as one
iovec, and the frame keeps only the pages it filled - a 64-byte frame takes one page, not a
17-page chunk. Which pages are free is the queue's in-flight byte per id (``busy``: a page's
id is its number), so the run is one ``bytearray.find`` of zeros (C speed) and nothing else
keeps page state. Lowest first keeps the working set small - the pages answered
last are the ones reused, which is what grant recycling and the backend's kept mappings hit -
and a frame's pages are always consecutive: its requests and grant entries are one slice of
templates built once (``req_tmpl``, ``gnt_tmpl``), and the backend resolves and holds them as
one strided run.

Why pages and not chunks: with a 17-page chunk per frame, the pages bounded the frames in
flight, not the ring - 120 chunks, 30 in the 512-entry staging pool where UEK's netfront puts
a small frame in one pool page - and a queue short of chunks stopped and waited for a kick
where it would otherwise have kept queueing (docs/performance.md: TX payload pages).

Request ids are fixed: page ``p`` of the queue always has id ``p`` and header slot ``s`` id
``SLOT_ID_BASE + s``, so an id says what a response releases. The grant policy in force
(``frontend/grants/``) copies the pages' grant entries into the table - per packet, or once
for the life of the connection - and revokes them when answered, refused while the backend
still holds one.
"""

from __future__ import annotations

from frontend.faults import BackendError
from frontend.grants.base import GrantPolicy, RefRun
from shared.protocol.grant import GRANT_ENTRY, RESERVED_REFS, GTF_permit_access, GTF_readonly
from shared.protocol.netif import MAX_FRAME_PAGES, PAGE_SIZE, TX_REQUEST, NETTXF_more_data
from shared.protocol.region import Area

#: pages a read is offered: the largest frame (64 KiB + headers) without a header slot
READ_PAGES = MAX_FRAME_PAGES
#: ids at and above this belong to header slots; below, the id is the queue's page number
SLOT_ID_BASE = 0x8000
#: ``busy.find(ALL_FREE, 0, count)``: the lowest page from which a read may fill
#: ``READ_PAGES`` (none of them in flight)
ALL_FREE = bytes(READ_PAGES)
_RO = GTF_permit_access | GTF_readonly


def runs_of(pages: list[int], ref0: int) -> list[RefRun]:
    """``pages`` as runs of consecutive grant references ``(first_ref, count)``."""
    runs: list[RefRun] = []
    start = prev = pages[0]
    for p in pages[1:]:
        if p != prev + 1:
            runs.append((ref0 + start, prev - start + 1))
            start = p
        prev = p
    runs.append((ref0 + start, prev - start + 1))
    return runs


class TxPages:
    """The payload pages of one TX queue, from payload page ``first_page`` on (to its area's
    end, less the pages the policy keeps at the region's end, at most ``max_grants``)."""

    def __init__(self, region: Area, first_page: int, policy: GrantPolicy,
                 backend_domid: int) -> None:
        lay = region.layout
        self.grants = region.grants
        self.policy = policy
        count = min(policy.tx_pages(region.payload.stop - first_page), SLOT_ID_BASE)
        if count < 2 * READ_PAGES:
            raise ValueError("region too small for TX payload pages")
        self.count = count
        #: the grant reference of page p is ref0 + p (with the policy's bit on the ring)
        self.ref0 = ref0 = RESERVED_REFS + first_page
        f0 = lay.payload_page + first_page
        area = region.buf[f0 * PAGE_SIZE:(f0 + count) * PAGE_SIZE]
        #: what a read from page c is offered: pages c .. c + READ_PAGES - 1, one iovec
        self.spans = [area[c * PAGE_SIZE:(c + READ_PAGES) * PAGE_SIZE]
                      for c in range(count - READ_PAGES + 1)]
        #: every page's fragment request (a whole page, MORE_DATA) and grant entry, and the
        #: grant table's bytes they are copied into: a run of pages is one slice of each
        self.req_tmpl = memoryview(b"".join(
            TX_REQUEST.pack((ref0 + p) | policy.ref_bit, 0, NETTXF_more_data, p, PAGE_SIZE)
            for p in range(count)))
        self.gnt_tmpl = memoryview(b"".join(GRANT_ENTRY.pack(_RO, backend_domid, f0 + p)
                                            for p in range(count)))
        self.gnt_span = self.grants.span(ref0, count)
        policy.setup([(self.gnt_span, self.gnt_tmpl)])
        #: ids in flight, 1 byte each - pages below SLOT_ID_BASE, header slots from it on: a
        #: response for any other is a lie (``TxFlow.reap``); a page is free while its is 0
        self.busy = bytearray(1 << 16)

    def can_read(self) -> bool:
        """Somewhere a run of free pages holds the largest frame."""
        return self.busy.find(ALL_FREE, 0, self.count) >= 0

    def in_use(self) -> int:
        """Pages in flight."""
        return self.busy.count(1, 0, self.count)

    def release(self, done: list[int]) -> None:
        """Pages ``done`` were answered (``reap`` has marked them free): the policy revokes
        their grants, refused if the backend still holds one."""
        policy, ref0 = self.policy, self.ref0
        if policy.revokes and not policy.revoke(runs_of(done, ref0)):
            bad = next((p for p in done if self.grants.in_use(ref0 + p)), done[0])
            raise BackendError(f"backend still holds a grant: TX page {bad}")
