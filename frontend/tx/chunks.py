"""The TX payload chunks and their per-page grants (the frontend's half of per-fragment grants).

A chunk is 17 consecutive payload pages (the largest frame, 64 KiB + headers, without a header
slot), each with a grant reference of its own; a frame is read straight into one chunk. Request
ids are fixed: page ``p`` of chunk ``c`` always has id ``c * CHUNK_PAGES + p`` and header slot
``s`` id ``SLOT_ID_BASE + s``, so an id says what a response releases. That also lets a chunk's
fragment requests and grant entries be built once (``req_tmpl``, ``gnt_tmpl``): per packet the
frontend copies a slice of them onto the ring, and the grant policy in force
(``frontend/grants/``) copies the grant entries into the table - per packet, or once for the
life of the connection. When every page of a chunk is answered its grants are revoked by the
policy (``release``), refused while the backend still holds one.
"""

from __future__ import annotations

from frontend.faults import BackendError
from frontend.grants.base import GrantPolicy
from shared.protocol.grant import GRANT_ENTRY, RESERVED_REFS, GTF_permit_access, GTF_readonly
from shared.protocol.netif import MAX_FRAME_PAGES, PAGE_SIZE, TX_REQUEST, NETTXF_more_data
from shared.protocol.region import Area

#: pages per payload chunk: the largest frame (64 KiB + headers) without a header slot
CHUNK_PAGES = MAX_FRAME_PAGES
#: ids at and above this belong to header slots; below, id = chunk * CHUNK_PAGES + page
SLOT_ID_BASE = 0x8000
_RO = GTF_permit_access | GTF_readonly
_GE = GRANT_ENTRY.size


class TxChunks:
    """The chunks of one TX queue, from payload page ``first_page`` on (to its area's end)."""

    def __init__(self, region: Area, first_page: int, policy: GrantPolicy,
                 backend_domid: int) -> None:
        lay = region.layout
        self.grants = region.grants
        self.policy = policy
        # up to the end of this queue's payload pages (all of them with one queue)
        count = min((region.payload.stop - first_page) // CHUNK_PAGES,
                    SLOT_ID_BASE // CHUNK_PAGES)
        if policy.max_grants:  # e.g. the backend keeps only so many persistent grants
            count = min(count, policy.max_grants // CHUNK_PAGES)
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
                TX_REQUEST.pack((ref0 + p) | policy.ref_bit, 0, NETTXF_more_data,
                                c * CHUNK_PAGES + p, PAGE_SIZE) for p in range(CHUNK_PAGES))))
            entries = b"".join(GRANT_ENTRY.pack(_RO, backend_domid, f0 + p)
                               for p in range(CHUNK_PAGES))
            self.gnt_tmpl.append(memoryview(entries))
            self.gnt_span.append(self.grants.span(ref0, CHUNK_PAGES))
        policy.setup(list(zip(self.gnt_span, self.gnt_tmpl, strict=True)))
        self.free = list(range(count))
        self.out = [0] * count  # fragment responses still awaited per chunk
        self.used = [0] * count  # pages granted per chunk (to revoke)

    def release(self, done: list[int]) -> None:
        """Every page of chunks ``done`` is answered: the policy revokes their grants
        (refused if the backend still holds one)."""
        ref0, used = self.ref0, self.used
        if not self.policy.revoke([(ref0[c], used[c]) for c in done]):
            bad = next(c for c in done if not self.policy.revoke([(ref0[c], used[c])]))
            raise BackendError(f"backend still holds a grant of chunk {bad}")
        self.free += done
