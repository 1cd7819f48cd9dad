"""``persistent`` does its own work and no other's: every page the queues will name is granted
at connect, the grefs on the ring carry bit 31, and no grant is ended while connected - the
backend validates each once (``persistent_hits`` afterwards)."""

from backend.grants.tx import KEPT
from shared.protocol.grant import RESERVED_REFS, GTF_permit_access
from shared.protocol.netif import GREF_MASK, GREF_PERSISTENT, TX_REQUEST
from tests.conftest import frame, make_pair


def test_granted_once_at_connect_and_never_revoked():
    p = make_pair(header_slots=False, persistent=True)
    grants = p.front_region.grants
    granted = [r for r in range(RESERVED_REFS, grants.count)
               if grants.ref_flags[r] & GTF_permit_access]
    assert len(granted) >= 256 + 2 * 17  # every RX buffer and every TX chunk page
    before = bytes(grants.buf)
    for i in range(3):
        p.send(frame(bytes([i]) * 9000))
    assert p.tx.pump() == 3
    ring = p.tx.ring
    refs = [TX_REQUEST.unpack_from(ring.buf, ring.entry(i))[0] for i in range(3)]
    assert all(r & GREF_PERSISTENT for r in refs)
    p.tx.ring.push_requests()
    p.run_tx()
    p.send(frame(b"x" * 9000))  # a chunk used again: the backend finds its grants kept
    p.run_tx()
    assert len(p.wire_frames()) == 4
    assert [r for r in range(RESERVED_REFS, grants.count)
            if grants.ref_flags[r] & GTF_permit_access] == granted  # none ended
    assert all(grants.ref_flags[r & GREF_MASK] & GTF_permit_access for r in refs)
    assert p.bstats[0].persistent_hits > 0
    assert len(before) == len(bytes(grants.buf))
    for s in (p.guest, p.wire, *p._keep):
        s.close()


def test_a_packet_on_a_kept_grant_is_a_lookup_with_nothing_held():
    """Once kept, a persistent grant costs a packet a lookup (Linux: the persistent-grant
    tree): the entry is neither re-read nor marked and unmarked; a persistent gref met for
    the first time still takes the full validation, which keeps it."""
    p = make_pair(header_slots=False, persistent=True)
    p.send(frame(b"k" * 22))
    p.run_tx()
    assert len(p.wire_frames()) == 1
    tx, kept = p.btx.gntmap.tx, p.btx.gntmap.kept.kept
    (ref, frame_), = kept.items()
    flags = p.region.grants.ref_flags
    before, hits, in_use = bytes(flags), p.bstats[0].persistent_hits, p.bstats[0].grants_in_use
    frames, flags0 = tx.resolve([ref])
    assert (frames, flags0) == ([frame_], KEPT)
    assert tx.hold([ref], frames, flags0) == KEPT
    tx.release([ref], KEPT)
    assert bytes(flags) == before and p.bstats[0].grants_in_use == in_use
    assert p.bstats[0].persistent_hits == hits + 1
    new = next(r for r in range(RESERVED_REFS, p.region.grants.count)
               if flags[r] & GTF_permit_access and r | GREF_PERSISTENT not in kept)
    frames, flags0 = tx.resolve([new | GREF_PERSISTENT])
    assert flags0 != KEPT and kept[new | GREF_PERSISTENT] == frames[0]  # validated, kept
