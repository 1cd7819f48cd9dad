"""Staging grants, the backend's side: the frontend's pools mapped at connect, kept until
disconnect (``feature-staging-grants``; Xen ``docs/misc/netif-staging-grants.pandoc`` rev 4,
Oracle UEK's "xen-netback: introduce staging grant mapping ops").

With the Initialised message the frontend names, per ring, a granted page holding a list of
``struct xen_ext_gref_alloc`` (``tx-pool-ref``/``tx-pool-size``, ``rx-pool-ref``/
``rx-pool-size``). Before the first packet the backend reads each list (a grant copy),
validates every entry (granted to it, a payload page, writable for RX; read-only entries say
so in their flags), keeps it in use (GTF_reading/GTF_writing, so the frontend cannot revoke
it) and maps its page into the CPU view: a gref -> page table per ring (the persistent
grants' table, ``backend/grants/persistent.py``). Afterwards a packet on a staged gref costs no
grant operation: TX reads it with a CPU copy (the header pull from the mapping, ``GntMap.pull``),
RX writes it with one (the ``map`` RX mechanism finds it mapped). Only the pools' grefs may
carry the kept bit on the ring; any other is fatal (``not_negotiated``).

Like Xen's ADD_GREF_MAPPING ("on failure cases, none of the grant mappings specified get
added") a list is taken whole or not at all: an entry that names a gref twice or a page
another entry already stages (overlapping staging areas), more than 512 entries, a bad flag or
an invalid grant refuses the connection (a ``GrantError``: ``malformed``, ``fatal_grant``) and
nothing stays kept.
"""

from __future__ import annotations

from backend.grants.gntmap import GntMap
from shared.protocol.grant import GrantError
from shared.protocol.netif import (
    EXT_GREF_ALLOC,
    GREF_MASK,
    GREF_PERSISTENT,
    MAX_STAGING_GRANTS,
    XEN_EXTF_GREF_readonly,
)


def premap(pools: dict[str, int], tx: GntMap, rx: GntMap) -> int:
    """Map both rings' pools; returns how many pages were staged. Raises GrantError (and
    keeps nothing: the caller's teardown releases what was kept) for a bad list."""
    staged = 0
    for name, gm, write in (("tx", tx, False), ("rx", rx, True)):
        n = pools.get(f"{name}-pool-size", 0)
        if not n:
            continue
        if n > MAX_STAGING_GRANTS:
            raise GrantError(f"{name} pool of {n} grefs: at most {MAX_STAGING_GRANTS}")
        data = gm.copy_from(pools[f"{name}-pool-ref"], 0, n * EXT_GREF_ALLOC.size)
        frames: dict[int, int] = {}
        for i, (ref, flags) in enumerate(EXT_GREF_ALLOC.iter_unpack(data)):
            if ref & ~GREF_MASK or flags & ~XEN_EXTF_GREF_readonly:
                raise GrantError(f"{name} pool entry {i}: gref {ref:#x} flags {flags:#x}")
            if write and flags & XEN_EXTF_GREF_readonly:
                raise GrantError(f"rx pool entry {i}: gref {ref} is read-only")
            if ref | GREF_PERSISTENT in gm.kept.kept:
                raise GrantError(f"{name} pool lists gref {ref} twice")
            frame = gm.kept.keep(ref | GREF_PERSISTENT, write)
            if frame in frames:
                raise GrantError(f"{name} pool entries {frames[frame]} and {i} overlap: both "
                                 f"stage frame {frame}")
            frames[frame] = i
            gm.map(ref | GREF_PERSISTENT, frame, write=write)
        gm.kept.pools_only = not gm.kept.negotiated  # with feature-persistent too: any may
        gm.stats.staged_grants += n
        staged += n
    return staged
