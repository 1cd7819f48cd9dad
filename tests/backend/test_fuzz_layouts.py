"""Fuzz over header layouts (issue 11): any frame - IPv4 with options, IPv6 with extension
chains and fragments, VLAN/QinQ tags, truncated headers - cut anywhere into a header slot
and fragments at any offsets, in every mode, with or without csum_blank, under a header or a
payload rule. The verdict must be what the rules say about the *whole* frame, and a frame
that is sent must leave exactly as described, with the checksum set-up of its real headers.

``PVNET_FUZZ_EXAMPLES=N`` runs it longer (as the other fuzz tests)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.tx.filter import Filter
from backend.tx.skb import HEADER_PULL_MAX, TX_COPY_LEN
from shared.protocol.headers import CSUM_OFFSET, HeaderError, NeedMore, walk
from shared.protocol.netif import PAGE_SIZE, NETTXF_csum_blank
from shared.protocol.offload import VIRTIO_NET_HDR_F_NEEDS_CSUM
from tests.backend.test_netback import close
from tests.backend.txhand import Slot, drain, put_packet, wire
from tests.conftest import frame, frame6, ipv4_options, l4_header, make_pair, vlan

EXAMPLES = int(os.environ.get("PVNET_FUZZ_EXAMPLES", "15")) * 4
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                derandomize="PVNET_FUZZ_RANDOM" not in os.environ,
                suppress_health_check=list(HealthCheck))
RULES = ["drop dst_port=5201", "drop ip_proto=17", "drop ip_proto=6", "drop src_port=5201",
         "drop ethertype=0x86dd", "drop payload=text:SECRET", "drop payload=hex:0a000002"]


@st.composite
def frames(draw) -> bytes:
    payload = draw(st.sampled_from([b"", b"SECRET", b"p" * 700, b"q" * 2500 + b"SECRET"]))
    proto = draw(st.sampled_from([6, 17, 1]))
    dport = draw(st.sampled_from([5201, 80]))
    if draw(st.booleans()):
        exts = tuple(draw(st.lists(st.sampled_from([0, 43, 44, 60]), max_size=4)))
        off = draw(st.sampled_from([0, 0, 90])) if 44 in exts else 0
        f = frame6(payload, proto=proto, dport=dport, exts=exts, frag_offset=off,
                   tcp_options=bytes(draw(st.sampled_from([0, 12, 40]))))
    else:
        f = frame(payload, proto=proto, dport=dport)
        if proto == 6:
            f = f[:34] + l4_header(6, dport, b"", bytes(draw(st.sampled_from([0, 40])))) \
                + f[54:]
        f = ipv4_options(f, bytes(draw(st.sampled_from([0, 8, 40]))))
    tags = draw(st.lists(st.sampled_from([0x8100, 0x88A8]), max_size=2))
    f = vlan(f, *[(t, 5) for t in tags])
    cut = draw(st.one_of(st.none(), st.integers(14, len(f))))  # headers cut short
    return f[:cut] if cut is not None else f


@st.composite
def layouts(draw, f: bytes, header_slot: bool) -> list[Slot]:
    first_max = min(len(f), 128 if header_slot else PAGE_SIZE)
    first = draw(st.integers(1, first_max))
    cuts, at = [], first
    while at < len(f) and len(cuts) < 17:
        step = draw(st.integers(1, min(PAGE_SIZE, len(f) - at)))
        cuts.append((at, at + step))
        at += step
    if at < len(f):
        cuts[-1] = (cuts[-1][0], len(f))  # the rest in the last fragment (may need a page)
        if cuts[-1][1] - cuts[-1][0] > PAGE_SIZE:
            return []
    slots = [Slot(f[:first]) if header_slot else Slot(f[:first], 8, 0)]
    for i, (a, b) in enumerate(cuts):
        size = b - a
        off = draw(st.integers(0, PAGE_SIZE - size))
        slots.append(Slot(f[a:b], 9 + i, off))
    return slots


def expected(f: bytes, rules: list[str], csum: bool) -> str:
    """The verdict the rules give the whole frame: drops_headers, drops_csum, filtered (a rule,
    headers a header rule cannot walk: unparsed, a later fragment with no first one seen:
    fragment) or sent."""
    try:
        h = walk(f)
        if max(h.end, min(len(f), TX_COPY_LEN)) > HEADER_PULL_MAX:
            return "headers"
    except NeedMore:
        if len(f) > HEADER_PULL_MAX:
            return "headers"
        h = None
    except HeaderError:
        h = None
    if csum and (h is None or h.l4 is None or h.fragment or h.ip_proto not in CSUM_OFFSET):
        return "csum"
    parsed = Filter.parse(rules).rules
    fields_needed = [r.field for r in parsed if r.field != "payload"]
    if fields_needed and h is None:
        return "unparsed"
    if h is not None and h.later_fragment and set(fields_needed) - {"ethertype"}:
        return "fragment"
    fields = h.fields() if h is not None else {}
    for rule in parsed:
        hit = rule.value in f if rule.field == "payload" else fields.get(rule.field) == rule.value
        if hit:
            return "filtered"
    return "sent"


@FUZZ
@given(data=st.data(), mode=st.sampled_from(["lazy", "map", "copy"]),
       header_slot=st.booleans(), csum=st.booleans(),
       rules=st.lists(st.sampled_from(RULES), max_size=2))
def test_any_layout_gets_the_verdict_of_its_whole_frame(data, mode, header_slot, csum, rules):
    f = data.draw(frames())
    slots = data.draw(layouts(f, header_slot))
    if not slots:
        return
    p = make_pair(mode, header_slots=header_slot, filters=rules or None)
    try:
        put_packet(p, slots, NETTXF_csum_blank if csum else 0)
        drain(p)
        st_ = p.bstats[0]
        out = wire(p)
        want = expected(f, rules, csum)
        assert st_.slots_consumed == st_.slots_released == len(slots)
        if want == "sent":
            assert [fr for _v, fr in out] == [f] and st_.drops == 0
            if csum:
                h = walk(f)
                assert out[0][0][0] == VIRTIO_NET_HDR_F_NEEDS_CSUM
                assert out[0][0][4:6] == (h.l4, CSUM_OFFSET[h.ip_proto])
        else:
            assert out == [] and st_.drops == 1
            counter = {"filtered": "drops_filtered"}.get(want, f"drops_{want}")
            assert getattr(st_, counter) == 1, (want, st_)
            if want in ("unparsed", "fragment"):  # the filter's verdicts
                assert st_.drops_filtered == 1, st_
        assert st_.maps_outstanding == 0 and st_.grants_in_use == 0
    finally:
        close(p)
