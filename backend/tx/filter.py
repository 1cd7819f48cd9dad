"""The filter stage between the TX ring and the vif: where lazy mapping pays or costs.

A rule on header fields (``drop ip_proto=17``, ``drop dst_port=5201``) is decided from the
header copy in the skb and maps nothing. A rule on payload bytes (``drop payload=hex:dead``,
``drop payload=text:secret``) must read the fragments, so it maps them: the stats show which
rules forced a map. A dropped packet is freed at once, which releases its slots early.

The verdict is never "could not parse, so pass" (a bypass: the frontend chooses the layout):

- A frame whose headers cannot be walked (cut short, impossible, more VLAN tags than allowed)
  is dropped when a header rule exists (``drops_unparsed``). A rule on a layer the frame does
  not have (``ip_proto`` of ARP, ports of ICMP) does not apply to it.
- IP fragments are judged as a datagram, by its first fragment, as a firewall with
  reassembly would judge the whole (RFC 1858): the first fragment must hold its whole L4
  header (else it is cut short: dropped, so a "tiny fragment" never carries ports past a port
  rule), it meets every rule, and a later fragment (which has no ports, and in IPv6 maybe not
  even the protocol) goes only where its datagram's first fragment went before it: one seen
  and passed within FRAGMENT_TTL. Otherwise it is dropped (``drops_fragment``): a first
  fragment dropped, or never seen (out of order, or evicted from the FRAGMENT_SLOTS most
  recent ones). Only header rules need this; payload rules judge each frame as it is.
"""

from __future__ import annotations

import time

from backend.grants.gntmap import MapError
from backend.tx.skb import SkBuff
from shared.protocol.filter_rules import Rule
from shared.protocol.headers import HeaderError, NeedMore, walk
from shared.protocol.stats import RingStats

#: how long a passed first fragment lets its later fragments through (Linux ipfrag_time)
FRAGMENT_TTL = 30.0
#: datagrams remembered at once (the oldest goes first); a frontend filling it only loses
#: its own later fragments
FRAGMENT_SLOTS = 1024
#: the layer each header field needs walked: 0 Ethernet (and tags), 1 IP, 2 ports
_LAYER = {"ethertype": 0, "ip_proto": 1, "src_ip": 1, "dst_ip": 1, "src_port": 2,
          "dst_port": 2}


def header_fields(head: bytes) -> dict[str, object]:
    """Ethernet/IP/L4 fields of the pulled header copy (never of the live payload), walked
    by ``shared.protocol.headers.walk`` - VLAN/QinQ tags and IPv6 extension headers included, the
    same walk as the checksum code's. A later IP fragment has ``ip_proto`` but no ports. Headers
    that are impossible or cut short yield nothing: no field can be judged."""
    try:
        return walk(head).fields()
    except (NeedMore, HeaderError):
        return {}


class FirstFragments:
    """The datagrams whose first fragment passed the filter: their later fragments follow."""

    def __init__(self, ttl: float = FRAGMENT_TTL, slots: int = FRAGMENT_SLOTS) -> None:
        self.ttl, self.slots = ttl, slots
        self.passed: dict[bytes, float] = {}  # reassembly key -> expiry, oldest first

    def add(self, key: bytes) -> None:
        self.passed.pop(key, None)
        if len(self.passed) >= self.slots:
            del self.passed[next(iter(self.passed))]
        self.passed[key] = time.monotonic() + self.ttl

    def follows(self, key: bytes) -> bool:
        expiry = self.passed.get(key)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self.passed[key]
            return False
        return True


class Filter:
    """An ordered rule list (grammar: ``shared.protocol.filter_rules``); ``drops`` says whether a
    packet is dropped, and counts the hit of the rule that dropped it."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.hits = [0] * len(rules)
        #: the deepest layer a header rule needs (-1: payload rules only)
        self.need = max((_LAYER[r.field] for r in rules if r.field != "payload"), default=-1)
        self.fragments = FirstFragments()

    @classmethod
    def parse(cls, texts: list[str]) -> Filter:
        return cls([Rule.parse(t) for t in texts])

    def drops(self, skb: SkBuff, gntmap, stats: RingStats | None = None) -> str:
        """Why ``skb`` is dropped ('' to send it). Drops the rules did not decide count in
        ``stats``: ``drops_unparsed``, ``drops_fragment``, ``drops_map`` (a payload rule's
        read needed a map the kernel refused)."""
        h = skb.hdrs
        if self.need >= 0 and h is None:  # cut short or impossible: nothing can be judged
            if stats is not None:
                stats.drops_unparsed += 1
            return "headers that cannot be walked for a header rule"
        if h is not None and h.fragment and self.need >= 1:
            key = h.datagram()
            if h.later_fragment:
                if self.fragments.follows(key):
                    return ""
                if stats is not None:
                    stats.drops_fragment += 1
                return "a later fragment whose first fragment did not pass"
        fields: dict[str, object] | None = None
        data: bytes | None = None
        for i, rule in enumerate(self.rules):
            if rule.field == "payload":
                if data is None:
                    try:
                        data = skb.linearize(gntmap)  # judged and sent: the same bytes
                    except MapError as e:  # unread, so unjudged: not sent
                        if stats is not None:
                            stats.drops_map += 1
                        return f"payload not readable for a payload rule: {e}"
                hit = rule.value in data
            else:
                if fields is None:  # the walk of the pulled private head
                    fields = h.fields() if h is not None else {}
                hit = fields.get(rule.field) == rule.value
            if hit:
                self.hits[i] += 1
                return "a filter rule matched"
        if h is not None and h.fragment and self.need >= 1:
            self.fragments.add(key)  # its later fragments may follow
        return ""
