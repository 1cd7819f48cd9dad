"""Per-ring-end counters with canonical names (Linux names where one exists).

Plain attributes on a slotted dataclass: the data path bumps them with ``+=`` (no dict lookups,
no locks); the control thread takes a snapshot with ``as_dict``. A torn read of one counter is
harmless for a monitoring view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, make_dataclass


@dataclass(slots=True)
class RingStats:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_header_slot_packets: int = 0
    tx_frags: int = 0
    tx_zerocopy_sent: int = 0
    tx_zerocopy_success: int = 0
    tx_zerocopy_fail: int = 0
    tx_frag_overflow: int = 0
    grant_maps: int = 0
    grant_maps_avoided: int = 0
    grant_copies: int = 0
    persistent_hits: int = 0
    maps_outstanding: int = 0
    grants_in_use: int = 0
    grants_active: int = 0
    copy_bytes: int = 0
    slots_in_flight: int = 0
    slots_consumed: int = 0
    slots_released: int = 0
    header_slots_in_use: int = 0
    notify_sent: int = 0
    notify_suppressed: int = 0
    queue_stops: int = 0
    drops: int = 0
    drops_filtered: int = 0
    #: filter verdicts no rule decided (each also counts in drops and drops_filtered): headers
    #: a header rule needs that cannot be walked; a later IP fragment whose datagram's first
    #: fragment did not pass (backend/tx/filter.py)
    drops_unparsed: int = 0
    drops_fragment: int = 0
    drops_error: int = 0
    drops_no_buffer: int = 0
    #: TX drops by reason (each also counts in drops and drops_error): 19-20 follow-on slots,
    #: a size outside 14..MAX_FRAME, headers not pullable, a checksum that cannot be set up
    drops_slots: int = 0
    drops_size: int = 0
    drops_headers: int = 0
    drops_csum: int = 0
    #: TX frames the vif refused (queue full, device down)
    drops_vif: int = 0
    #: TX frames a map of whose pages the kernel refused (a filter's read counts in
    #: drops_filtered too)
    drops_map: int = 0
    #: frames the other end did not negotiate (too many slots without feature-sg, a GSO kind
    #: it does not accept): dropped here instead of being sent
    drops_not_negotiated: int = 0
    #: netfront: RX frames whose GSO extra says size 0 (xennet_set_skb_gso drops them)
    drops_gso: int = 0
    #: grant operations, counted and timed (ns totals) for the bench's op_us
    grant_maps_on_touch: int = 0
    grant_unmaps: int = 0
    map_ns: int = 0
    unmap_ns: int = 0
    faults: int = 0
    fault_ns: int = 0
    grant_copy_bytes: int = 0
    grant_copy_ns: int = 0
    notify_ns: int = 0
    #: RX buffers found revoked when the backend was about to write into them
    rx_grant_revoked: int = 0
    #: RX frames longer than the buffers marked for them, grant-copied on from a bounce buffer
    rx_spills: int = 0
    #: TX packets that waited for the vif's rate credit (Linux: rate_limited), not dropped
    tx_credit_waits: int = 0
    #: netfront, stock order: RX frames its batch did not take (partial when it looked, or
    #: not as a correct stock backend answers), delivered or judged one response at a time
    rx_unbatched: int = 0
    #: netfront, grant recycling (``frontend/grants/recycle.py``): pages named on the ring
    #: whose grant was still in the pool (reused: no grant written) and those granted afresh;
    #: the hit rate is recycled / (recycled + fresh)
    grants_recycled: int = 0
    grants_fresh: int = 0
    #: netfront: pool grants ended because the pool was full (the oldest idle ones)
    grants_evicted: int = 0
    #: netback, staging grants: pages of the frontend's pools mapped at connect; TX header
    #: pulls served by a CPU copy from a kept mapping instead of a grant copy
    staged_grants: int = 0
    staged_pulls: int = 0
    #: netback: TX header pulls served by a grant copy of a fragment the packet already holds
    #: (inside grant_copies: the cost model charges them the copy alone, the grant check and
    #: mark being the hold's)
    grant_pulls: int = 0
    #: netback: payload pages accessed through the CPU view for the first time since they
    #: were mapped (each such access is a page fault filling the PTE)
    first_touches: int = 0
    #: netback: payload bytes the CPU copied through a mapping of the frontend's pages (copy
    #: mode's TX copy; the mapping receiver's RX copy of a frame read into backend memory):
    #: the cost model's CPU-copy count, apart from grant copies and header pulls
    cpu_copy_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def counters(name: str, names: str, doc: str) -> type:
    """A slotted dataclass of int counters named in ``names`` (space-separated), all 0, with
    ``as_dict``: for a set of plain counters (the capture totals) that would
    otherwise be declared ``x: int = 0`` line after line, as RingStats is (it keeps its lines
    for the comments each counter carries)."""
    cls = make_dataclass(name, [(n, int, 0) for n in names.split()], slots=True,
                         namespace={"__doc__": doc, "as_dict": asdict})
    cls.__module__ = __name__
    return cls


#: keys of a ring's stats that are positions on that ring: meaningless summed over queues
RING_INDICES = frozenset("req_prod req_cons req_event rsp_prod rsp_event req_prod_pvt "
                         "rsp_prod_pvt rsp_cons".split())
#: counters that are levels (what is held now) rather than totals: a queue that ended holds
#: nothing, so its levels are not carried over (its slots in flight went with its ring)
LEVELS = frozenset("maps_outstanding grants_in_use grants_active slots_in_flight "
                   "header_slots_in_use".split())


def add_counts(into: dict, more: dict, skip: frozenset[str] = RING_INDICES) -> dict:
    """Add ``more``'s integer counters into ``into`` (a vif's sum over its queues, or a
    queue's totals over connections); positions on one ring (``skip``) are left out."""
    for k, v in more.items():
        if k not in skip and isinstance(v, int) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v
    return into


def summed(parts: list[dict]) -> dict:
    """The sum of several rings' (or queues') counters, positions left out."""
    out: dict = {}
    for p in parts:
        add_counts(out, p)
    return out


def ended_totals(ring: dict) -> dict:
    """What a ring that ended contributes to its totals: its counts without its levels and
    positions. Slots it consumed and never answered went with the ring (as at a single
    queue's teardown): counted released, so consumed == released still holds."""
    out = add_counts({}, ring, RING_INDICES | LEVELS)
    if "slots_consumed" in out:
        out["slots_released"] = out["slots_consumed"]
    return out


def fold_into(counters: object, counts: dict) -> None:
    """Add ``counts`` to the same-named int attributes of ``counters`` (a RingStats, a
    mechanism's own counters): an ended queue's totals into its end's."""
    for k, v in counts.items():
        if hasattr(counters, k):
            setattr(counters, k, getattr(counters, k) + v)
