"""The filter rule grammar: ``drop FIELD=VALUE``, parsed into a ``Rule``.

It lives in shared/ because two sides check rules: netback evaluates them on frames
(``backend.tx.filter``) and the lab checks a topology's rules before `up` starts anything
(``shared.lab.topology``), which must not import the backend to do so.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shared.faults import OwnFault

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
