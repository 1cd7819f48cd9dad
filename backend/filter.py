"""The filter stage between the TX ring and the vif: where lazy mapping pays or costs.

A rule on header fields (``drop ip_proto=17``, ``drop dst_port=5201``) is decided from the
header copy in the skb and maps nothing. A rule on payload bytes (``drop payload=hex:dead``,
``drop payload=text:secret``) must read the fragments, so it maps them: the stats show which
rules forced a map. A dropped packet is freed at once, which releases its slots early.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from backend.skb import SkBuff
from shared.faults import OwnFault
from shared.headers import HeaderError, NeedMore, walk

HEADER_FIELDS = ("ethertype", "ip_proto", "src_ip", "dst_ip", "src_port", "dst_port")


class FilterError(OwnFault, ValueError):
    """A rule that cannot be parsed; the message names the rule."""


@dataclass(frozen=True, slots=True)
class Rule:
    action: str
    field: str
    value: object

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``drop FIELD=VALUE`` with FIELD one of HEADER_FIELDS or ``payload``."""
        action, _, cond = text.strip().partition(" ")
        name, eq, raw = cond.strip().partition("=")
        if action != "drop" or not eq:
            raise FilterError(f"filter rule {text!r}: expected 'drop FIELD=VALUE'")
        try:
            if name == "payload":
                kind, _, data = raw.partition(":")
                value: object = {"hex": bytes.fromhex, "text": str.encode}[kind](data)
                if not value:
                    raise ValueError("empty pattern")
            elif name in ("src_ip", "dst_ip"):
                value = ipaddress.ip_address(raw).packed
            elif name in HEADER_FIELDS:
                value = int(raw, 0)
            else:
                raise FilterError(f"filter rule {text!r}: unknown field {name!r} "
                                  f"(known: {', '.join(HEADER_FIELDS)}, payload)")
        except (KeyError, ValueError) as e:
            if isinstance(e, FilterError):
                raise
            raise FilterError(f"filter rule {text!r}: bad value {raw!r}") from e
        return cls(action, name, value)


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
    """An ordered rule list; ``verdict`` says whether a packet is dropped, and by which rule."""

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
