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

HEADER_FIELDS = ("ethertype", "ip_proto", "src_ip", "dst_ip", "src_port", "dst_port")


class FilterError(ValueError):
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
    """Parse Ethernet/IP/L4 fields from the header copy (never from the payload)."""
    out: dict[str, object] = {}
    if len(head) < 14:
        return out
    etype = int.from_bytes(head[12:14], "big")
    off = 14
    if etype == 0x8100 and len(head) >= 18:
        etype, off = int.from_bytes(head[16:18], "big"), 18
    out["ethertype"] = etype
    if etype == 0x0800 and len(head) >= off + 20:
        out["ip_proto"] = proto = head[off + 9]
        out["src_ip"], out["dst_ip"] = head[off + 12:off + 16], head[off + 16:off + 20]
        off += (head[off] & 0x0F) * 4
    elif etype == 0x86DD and len(head) >= off + 40:
        out["ip_proto"] = proto = head[off + 6]
        out["src_ip"], out["dst_ip"] = head[off + 8:off + 24], head[off + 24:off + 40]
        off += 40
    else:
        return out
    if proto in (6, 17) and len(head) >= off + 4:
        out["src_port"] = int.from_bytes(head[off:off + 2], "big")
        out["dst_port"] = int.from_bytes(head[off + 2:off + 4], "big")
    return out


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
                    data = skb.payload(gntmap)
                hit = rule.value in data
            else:
                if fields is None:
                    fields = header_fields(skb.head)
                hit = fields.get(rule.field) == rule.value
            if hit:
                self.hits[i] += 1
                return True
        return False
