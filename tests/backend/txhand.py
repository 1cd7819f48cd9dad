"""Hand-built TX ring entries for the hostile-layout tests: a frontend that puts exactly the
bytes, offsets, sizes and grants a test names on the ring, and reads back what left."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from shared.protocol.netif import TX_REQUEST, NETTXF_header_slot, NETTXF_more_data
from shared.protocol.offload import VNET_HDR
from shared.protocol.ring import MASK32

_ids = itertools.count(1)


@dataclass
class Slot:
    """One request's bytes: in header slot ``slot`` (gref None) or granted page ``ref``."""

    data: bytes
    ref: int | None = None
    off: int = 0
    slot: int = 0
    #: > 0: a fragment of this many bytes whose content and grant entry the test owns
    #: (a concurrent writer): put_packet writes neither
    live: int = 0

    @property
    def size(self) -> int:
        return self.live or len(self.data)


def page(p, ref: int) -> memoryview:
    """The frontend's page that ``ref`` grants (granted here, readonly, to domain 0)."""
    frame = p.front_region.layout.payload_page + ref
    p.front_region.grants.grant(ref, 0, frame, True)
    return p.front_region.page(frame)


def put_packet(p, slots: list[Slot], flags: int = 0) -> int:
    """Write the slots' bytes and their requests (first one carries ``flags`` and the total
    size); publish them. Returns the first request's id."""
    ring = p.tx.ring
    size = sum(s.size for s in slots)
    first_id = 0
    for i, s in enumerate(slots):
        more = NETTXF_more_data if i < len(slots) - 1 else 0
        rid = next(_ids) & 0x7FFF
        if s.ref is None:
            ss = p.front_region.layout.hdr_slot_size
            p.front_region.hdr[s.slot * ss:s.slot * ss + len(s.data)] = s.data
            gref, off, fl = s.slot * ss, 0, NETTXF_header_slot
        else:
            if not s.live:
                page(p, s.ref)[s.off:s.off + len(s.data)] = s.data
            gref, off, fl = s.ref, s.off, 0
        if i == 0:
            fl |= flags
            first_id = rid
        TX_REQUEST.pack_into(ring.buf, ring.entry(ring.req_prod_pvt), gref, off, fl | more, rid,
                             size if i == 0 else s.size)
        ring.req_prod_pvt = (ring.req_prod_pvt + 1) & MASK32
    ring.push_requests()
    return first_id


def split(frame: bytes, cuts: list[int], first_in_slot: bool = True, base_ref: int = 8,
          offs: list[int] | None = None) -> list[Slot]:
    """``frame`` cut at ``cuts`` into slots: the first in header slot 0 (or a grant), the
    rest on pages base_ref, base_ref + 1, ... at offsets ``offs`` (default 0)."""
    bounds = [0, *cuts, len(frame)]
    parts = [frame[a:b] for a, b in itertools.pairwise(bounds)]
    offs = offs or [0] * len(parts)
    out = []
    for i, part in enumerate(parts):
        if i == 0 and first_in_slot:
            out.append(Slot(part))
        else:
            out.append(Slot(part, base_ref + i, offs[i]))
    return out


def drain(p) -> None:
    """Run the backend over what is published and retire its responses on the front side."""
    while p.btx.ring.unconsumed_requests():
        p.btx.action()
    p.btx.ring.push_responses()
    p.tx.ring.rsp_cons = p.btx.ring.rsp_prod_pvt


def wire(p) -> list[tuple[tuple, bytes]]:
    """What left on the vif: (virtio_net_hdr fields, frame) per packet."""
    out = []
    while True:
        try:
            raw = p.wire.recv(1 << 17)
        except BlockingIOError:
            return out
        out.append((VNET_HDR.unpack_from(raw), raw[VNET_HDR.size:]))
