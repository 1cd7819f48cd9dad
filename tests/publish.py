"""Test helper: write entries at a ring's producer and publish them, as that end would."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from shared.protocol.ring import MASK32, BackRing, FrontRing


def publish(ring: FrontRing | BackRing, fmt: struct.Struct, entries: Iterable[tuple]) -> None:
    """Requests onto a ``FrontRing`` or responses onto a ``BackRing``, then push them."""
    front = isinstance(ring, FrontRing)
    prod = ring.req_prod_pvt if front else ring.rsp_prod_pvt
    for e in entries:
        fmt.pack_into(ring.buf, ring.entry(prod), *e)
        prod = (prod + 1) & MASK32
    if front:
        ring.req_prod_pvt = prod
        ring.push_requests()
    else:
        ring.rsp_prod_pvt = prod
        ring.push_responses()
