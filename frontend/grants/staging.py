"""``staging`` (``feature-staging-grants``): staging grants - pages the backend keeps mapped.

Xen's ``docs/misc/netif-staging-grants.pandoc`` (rev 4) and Oracle UEK's netback/netfront
(Orabug 26107942, "xen-netback: introduce staging grant mapping ops"): the frontend grants a
fixed set of pages once, at connect, and hands the backend a list of them per ring (a page of
``struct xen_ext_gref_alloc`` entries named by ``tx-pool-ref``/``tx-pool-size`` and
``rx-pool-ref``/``rx-pool-size``, the UEK keys); the backend maps every one of them before the
first packet and keeps the mappings (a gref -> page table), so a packet's linear part (and here
its whole payload) is read or written with a CPU copy instead of a grant copy or a map. The
frontend keeps using those pages for every packet: no grant operation per packet either side.

Where pvnet differs: the grefs on the ring carry bit 31 (``GREF_PERSISTENT``), so the backend's
lookup is the persistent grants' table; a bit-31 gref outside the declared pools is fatal
(``not_negotiated``), as a gref UEK's table lacks would fall back to a grant map. The pools
cover every page netfront names (its RX buffers, and TX payload pages up to the list's 512
entries, a frame taking the pages it fills: one for a small frame), which the UEK netfront
reaches by copying into its pool ("use gref mappings for Tx buffers"); pvnet's netfront reads
a frame straight into its pool pages (``frontend/tx/pages.py``). pvnet's header slots are the
staged linear area of TX (see docs/design.md).

The pools' pages are granted before the Initialised message that names them (``write_pools``),
as UEK's netfront grants its pool before it writes the xenstore keys: the backend maps them as
soon as it has answered Connected, which may be before this end has built its queues (it was,
every time, with the netfront in a QEMU guest under TCG: "gref 264 is not granted"). The
queues' set-up then leaves those entries alone, since rewriting one would clear the in-use
marks the backend's mapping set.
"""

from __future__ import annotations

from frontend.grants.base import Run
from frontend.grants.persistent import Persistent
from shared.protocol.grant import RESERVED_REFS
from shared.protocol.netif import (
    EXT_GREF_ALLOC,
    MAX_STAGING_GRANTS,
    PAGE_SIZE,
    XEN_EXTF_GREF_readonly,
)
from shared.protocol.region import Region


class Staging(Persistent):
    """Granted once at connect (as ``persistent``); what the pools list is the backend's."""

    max_grants = MAX_STAGING_GRANTS
    #: the TX and RX pool lists: the region's last two payload pages (``write_pools``)
    tail_pages = 2

    def setup(self, runs: list[Run]) -> None:
        """Nothing: every page the queues name is in a pool, granted before Initialised
        (``write_pools``) and perhaps already mapped and marked in use by the backend, which
        rewriting the entries would undo (a page outside the pools could not be named with
        the kept bit anyway: ``not_negotiated``)."""


def pool_refs(region: Region, rx_buffers: int) -> tuple[list[int], list[int]]:
    """The grefs netfront's queues will name (TX payload pages from page ``rx_buffers`` on, RX
    buffers ``0..rx_buffers-1``): the refs of payload page p are ``RESERVED_REFS + p``, and
    the TX queue names as many pages as the list holds, short of the two list pages
    (``GrantPolicy.tx_pages``, the count the queue itself uses)."""
    lay = region.layout
    tx = [RESERVED_REFS + rx_buffers + p
          for p in range(Staging.tx_pages(lay.payload_pages - rx_buffers))]
    rx = [RESERVED_REFS + p for p in range(rx_buffers)]
    return tx, rx


def write_pools(region: Region, backend_domid: int, rx_buffers: int) -> dict[str, int]:
    """Grant the pools' pages (TX read-only, RX writable) and their list pages (the
    region's last two payload pages, read-only) with the lists written in, and return the
    keys that name them for the Initialised message: everything the backend reads when it
    maps the pools is granted before it can be named."""
    lay = region.layout
    keys: dict[str, int] = {}
    tx, rx = pool_refs(region, rx_buffers)
    grant = region.grants.grant
    for i, (name, refs, readonly) in enumerate((("tx", tx, True), ("rx", rx, False))):
        page = lay.payload_pages - 1 - i
        at = (lay.payload_page + page) * PAGE_SIZE
        buf = region.buf
        for j, ref in enumerate(refs):
            grant(ref, backend_domid, lay.payload_page + ref - RESERVED_REFS, readonly=readonly)
            EXT_GREF_ALLOC.pack_into(buf, at + j * EXT_GREF_ALLOC.size, ref,
                                     XEN_EXTF_GREF_readonly if readonly else 0)
        list_ref = RESERVED_REFS + page
        region.grants.grant(list_ref, backend_domid, lay.payload_page + page, readonly=True)
        keys[f"{name}-pool-ref"], keys[f"{name}-pool-size"] = list_ref, len(refs)
    return keys


MECHANISM = Staging
