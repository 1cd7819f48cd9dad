"""``transient`` does its own work and no other's: a page is granted exactly when a request
naming it is published (before, never after), its gref carries no persistent bit, and its grant
is ended once the backend has answered it - at rest nothing is granted."""

from shared.protocol.grant import RESERVED_REFS, GTF_permit_access
from shared.protocol.netif import GREF_PERSISTENT, TX_REQUEST
from tests.conftest import frame, make_pair


def test_granted_for_each_request_and_ended_after_its_answer():
    p = make_pair(header_slots=False)
    grants = p.front_region.grants
    assert not any(grants.ref_flags[RESERVED_REFS:grants.count].tolist())  # nothing at connect
    p.send(frame(b"t" * 9000))
    assert p.tx.pump() == 1
    ring = p.tx.ring
    refs = [TX_REQUEST.unpack_from(ring.buf, ring.entry(i))[0] for i in range(3)]
    assert all(not r & GREF_PERSISTENT for r in refs)
    assert all(grants.ref_flags[r] & GTF_permit_access for r in refs)  # before the push
    p.tx.ring.push_requests()
    p.run_tx()
    assert p.wire_frames() == [frame(b"t" * 9000)]
    assert p.tx.in_flight() == 0
    assert all(grants.ref_flags[r] == 0 for r in refs)  # answered: revoked
    for s in (p.guest, p.wire, *p._keep):
        s.close()
