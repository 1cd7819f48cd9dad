"""The filter stage between the TX ring and the vif: where lazy mapping pays or costs.

A rule on header fields (``drop ip_proto=17``, ``drop dst_port=5201``) is decided from the
header copy in the skb and maps nothing. A rule on payload bytes (``drop payload=hex:dead``,
``drop payload=text:secret``) must read the fragments, so it maps them: the stats show which
rules forced a map. A dropped packet is freed at once, which releases its slots early.
"""

from __future__ import annotations

from backend.skb import SkBuff
from shared.filter_rules import Rule
from shared.headers import HeaderError, NeedMore, walk


def header_fields(head: bytes) -> dict[str, object]:
    """Ethernet/IP/L4 fields of the pulled header copy (never of the live payload), walked
    by ``shared.headers.walk`` - VLAN/QinQ tags and IPv6 extension headers included, the same
    walk as the checksum code's. A later IP fragment has ``ip_proto`` but no ports. Headers
    that are impossible or cut short yield only what was walked before the problem."""
    try:
        return walk(head).fields()
    except (NeedMore, HeaderError):
        return {"ethertype": int.from_bytes(head[12:14], "big")} if len(head) >= 14 else {}


class Filter:
    """An ordered rule list (grammar: ``shared.filter_rules``); ``drops`` says whether a
    packet is dropped, and counts the hit of the rule that dropped it."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.hits = [0] * len(rules)

    @classmethod
    def parse(cls, texts: list[str]) -> Filter:
        return cls([Rule.parse(t) for t in texts])

    def drops(self, skb: SkBuff, gntmap) -> bool:
        fields: dict[str, object] | None = None
        data: bytes | None = None
        for i, rule in enumerate(self.rules):
            if rule.field == "payload":
                if data is None:
                    data = skb.linearize(gntmap)  # judged and sent: the same bytes
                hit = rule.value in data
            else:
                if fields is None:  # the walk of the pulled private head
                    fields = (skb.hdrs.fields() if skb.hdrs is not None
                              else header_fields(skb.head))
                hit = fields.get(rule.field) == rule.value
            if hit:
                self.hits[i] += 1
                return True
        return False
