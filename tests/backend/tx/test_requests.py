"""The request parser's shortcuts judge exactly as the general parse does: whatever
``TxRequests.slot_frag`` (a header slot and one fragment, the usual MTU packet) or
``TxRequests.lone_frag`` (one fragment, no header slot: every packet of Xen's own netif up to a
page) accepts, ``TxRequests.read`` accepts with the same fields and counters; whatever they
decline is left on the ring untouched for ``read``, which names the fault (hostile shapes drawn
by hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol.netif import (
    PAGE_SIZE,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_header_slot,
    NETTXF_more_data,
)
from shared.protocol.xenbus import NotNegotiated
from tests.backend.test_netback import close, put
from tests.conftest import make_pair

HS, MD = NETTXF_header_slot, NETTXF_more_data
#: the usual MTU packet (a 128-byte header slot, one 1386-byte fragment) ...
USUAL = dict(flags=HS | MD, slot=128, off=0, rid=1, size=1514, fgref=8, foff=0, fflags=0,
             fid=2, fsize=1386, busy=None, hs_on=True)
#: ... and each way a field can leave that shape (valid or not)
CHANGES = [("flags", HS), ("flags", MD), ("flags", HS | MD | NETTXF_extra_info),
           ("flags", HS | MD | NETTXF_csum_blank), ("slot", 100), ("slot", 128 * 4096),
           ("slot", 0xFFFFFF80), ("slot", 0), ("off", 10), ("off", 127), ("rid", 2),
           ("rid", 3), ("size", 13), ("size", 60), ("size", 65535), ("size", 1386),
           ("size", 1400), ("foff", 8), ("fflags", MD), ("fflags", NETTXF_csum_blank),
           ("fid", 1), ("fid", 3), ("fsize", 4097), ("fsize", 1514), ("fsize", 0),
           ("fsize", 1400), ("busy", 1), ("busy", 2), ("busy", 3), ("hs_on", False),
           ("fgref", 9)]


@settings(max_examples=400, deadline=None)
@given(changes=st.lists(st.sampled_from(CHANGES), max_size=3))
def test_slot_frag_accepts_only_what_read_accepts_and_the_same_way(changes):
    c = {**USUAL, **dict(changes)}
    flags, slot, off, rid, size = c["flags"], c["slot"], c["off"], c["rid"], c["size"]
    fgref, foff, fflags, fid, fsize = c["fgref"], c["foff"], c["fflags"], c["fid"], c["fsize"]
    busy, hs_on = c["busy"], c["hs_on"]
    reqs = [(slot, off, flags, rid, size), (fgref, foff, fflags, fid, fsize)]
    a, b = make_pair(), make_pair()
    try:
        for p in (a, b):
            p.btx.header_slots = hs_on
            if busy is not None:
                p.btx.release.pending[busy] = 1
            put(p, *reqs)
        ra, rb = a.btx.requests, b.btx.requests
        got = ra.slot_frag(2)
        if got is None:  # declined: nothing consumed, the general parse judges it
            assert a.btx.ring.req_cons == 0 and a.bstats[0].slots_consumed == 0
            assert list(a.btx.release.pending) == list(b.btx.release.pending)
            return
        pkt = rb.read(2)  # accepted: the general parse agrees, field by field
        assert pkt.drop is None
        assert got == (pkt.rid, pkt.hdr_start, pkt.first_len, pkt.flags, pkt.grefs[0],
                       pkt.ids[0], pkt.sizes[0], pkt.size)
        assert (pkt.grefs, pkt.offs, pkt.extras, pkt.gso_type) == ([fgref], [0], 0, 0)
        assert a.btx.ring.req_cons == b.btx.ring.req_cons == 2
        assert a.bstats[0].slots_consumed == b.bstats[0].slots_consumed == 2
        assert list(a.btx.release.pending) == list(b.btx.release.pending)
        assert fsize <= PAGE_SIZE
    except NotNegotiated:
        raise AssertionError("slot_frag accepted what the agreement refuses") from None
    finally:
        close(a)
        close(b)


#: the usual packet without header slots (a 64-byte frame in a page of its own) ...
LONE = dict(gref=8, off=0, flags=0, rid=1, size=64, busy=None, hs_on=False)
#: ... and each way a field can leave that shape (valid or not)
LONE_CHANGES = [("flags", HS), ("flags", MD), ("flags", NETTXF_extra_info),
                ("flags", NETTXF_csum_blank), ("flags", NETTXF_data_validated),
                ("flags", 0x40), ("off", 10), ("off", 4032), ("off", 4033), ("off", 4095),
                ("rid", 255), ("size", 13), ("size", 14), ("size", 4096), ("size", 4097),
                ("size", 65535), ("size", 0), ("busy", 1), ("busy", 2), ("hs_on", True),
                ("gref", 0), ("gref", 0xFFFFFFFF)]


@settings(max_examples=300, deadline=None)
@given(changes=st.lists(st.sampled_from(LONE_CHANGES), max_size=3))
def test_lone_frag_accepts_only_what_read_accepts_and_the_same_way(changes):
    c = {**LONE, **dict(changes)}
    gref, off, flags, rid, size = c["gref"], c["off"], c["flags"], c["rid"], c["size"]
    a, b = make_pair(header_slots=False), make_pair(header_slots=False)
    try:
        for p in (a, b):
            p.btx.header_slots = c["hs_on"]
            if c["busy"] is not None:
                p.btx.release.pending[c["busy"]] = 1
            put(p, (gref, off, flags, rid, size))
        got = a.btx.requests.lone_frag()
        if got is None:  # declined: nothing consumed, the general parse judges it
            assert a.btx.ring.req_cons == 0 and a.bstats[0].slots_consumed == 0
            assert list(a.btx.release.pending) == list(b.btx.release.pending)
            return
        pkt = b.btx.requests.read(1)  # accepted: the general parse agrees, field by field
        assert pkt.drop is None and pkt.hdr_start == -1
        assert got == (pkt.rid, pkt.gref, pkt.off, pkt.size, pkt.flags)
        assert (pkt.grefs, pkt.first_len, pkt.extras, pkt.gso_type) == ([], size, 0, 0)
        assert a.btx.ring.req_cons == b.btx.ring.req_cons == 1
        assert a.bstats[0].slots_consumed == b.bstats[0].slots_consumed == 1
        assert list(a.btx.release.pending) == list(b.btx.release.pending)
    except NotNegotiated:
        raise AssertionError("lone_frag accepted what the agreement refuses") from None
    finally:
        close(a)
        close(b)
