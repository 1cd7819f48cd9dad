"""The TX payload chunks and their per-page grants (the frontend's half of per-fragment grants).

A chunk is 17 consecutive payload pages (the largest frame, 64 KiB + headers, without a header
slot), each with a grant reference of its own; a frame is read straight into one chunk. Request
ids are fixed: page ``p`` of chunk ``c`` always has id ``c * CHUNK_PAGES + p`` and header slot
``s`` id ``SLOT_ID_BASE + s``, so an id says what a response releases. That also lets a chunk's
fragment requests and grant entries be built once (``req_tmpl``, ``gnt_tmpl``): per packet the
frontend copies a slice of them onto the ring and into the grant table (``grant``, inlined in
the TX pump). When every page of a chunk is answered the chunk's grants are revoked
(``release``), refused while the backend still holds one. Persistent grants are granted once,
here, for the life of the connection.
"""

from __future__ import annotations

from frontend.faults import BackendError
from shared.grant import GRANT_ENTRY, RESERVED_REFS, GTF_permit_access, GTF_readonly
from shared.netif import (
    MAX_FRAME_PAGES,
    MAX_PERSISTENT_GRANTS,
    PAGE_SIZE,
    TX_REQUEST,
    NETTXF_more_data,
    ring_gref,
)
from shared.region import Region

#: pages per payload chunk: the largest frame (64 KiB + headers) without a header slot
CHUNK_PAGES = MAX_FRAME_PAGES
#: ids at and above this belong to header slots; below, id = chunk * CHUNK_PAGES + page
SLOT_ID_BASE = 0x8000
_RO = GTF_permit_access | GTF_readonly
_GE = GRANT_ENTRY.size


class TxChunks:
    """The chunks of one TX queue, from payload page ``first_page`` on."""

    def __init__(self, region: Region, first_page: int, persistent: bool,
                 backend_domid: int) -> None:
        lay = region.layout
        self.grants = region.grants
        self.persistent = persistent
        count = min((lay.payload_pages - first_page) // CHUNK_PAGES, SLOT_ID_BASE // CHUNK_PAGES)
        if persistent:  # the backend keeps at most this many persistent grants per ring
            count = min(count, MAX_PERSISTENT_GRANTS // CHUNK_PAGES)
        if count < 2:
            raise ValueError("region too small for TX payload chunks")
        self.views: list[memoryview] = []
        self.ref0: list[int] = []  # refs of a chunk's pages are consecutive
        #: per chunk: its fragment requests (whole pages, MORE_DATA), its grant entries, and
        #: the grant table's bytes they are copied into
        self.req_tmpl: list[memoryview] = []
        self.gnt_tmpl: list[memoryview] = []
        self.gnt_span: list[memoryview] = []
        for c in range(count):
            p0 = first_page + c * CHUNK_PAGES
            f0 = lay.payload_page + p0
            ref0 = RESERVED_REFS + p0
            self.views.append(region.buf[f0 * PAGE_SIZE:(f0 + CHUNK_PAGES) * PAGE_SIZE])
            self.ref0.append(ref0)
            self.req_tmpl.append(memoryview(b"".join(
                TX_REQUEST.pack(ring_gref(ref0 + p, persistent), 0, NETTXF_more_data,
                                c * CHUNK_PAGES + p, PAGE_SIZE) for p in range(CHUNK_PAGES))))
            entries = b"".join(GRANT_ENTRY.pack(_RO, backend_domid, f0 + p)
                               for p in range(CHUNK_PAGES))
            self.gnt_tmpl.append(memoryview(entries))
            self.gnt_span.append(self.grants.span(ref0, CHUNK_PAGES))
            if persistent:  # granted once, for the life of the connection
                self.gnt_span[c][:] = entries
        self.free = list(range(count))
        self.out = [0] * count  # fragment responses still awaited per chunk
        self.used = [0] * count  # pages granted per chunk (to revoke)

    def release(self, c: int) -> None:
        """All of a chunk's pages are answered: revoke their grants (refused if in use)."""
        if not self.persistent and not self.grants.end_access_run(self.ref0[c], self.used[c]):
            raise BackendError(f"backend still holds a grant of chunk {c}")
        self.free.append(c)
