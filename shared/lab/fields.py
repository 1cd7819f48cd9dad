"""The topology file's reading: YAML with duplicate keys refused, and each mapping's fields
checked one by one, every error naming its file and field (``guests[1].tx_mode``)."""

from __future__ import annotations

import difflib
import ipaddress
import re
from typing import Any, NoReturn

import yaml


class TopologyError(ValueError):
    """A topology file is invalid; the message is ``<file>: <field>: <problem>``."""


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


class Fields:
    """Reads one mapping, remembering its path for error messages and flagging unknown keys."""

    def __init__(self, src: str, path: str, data: Any, known: tuple[str, ...]) -> None:
        self.src, self.path = src, path
        if not isinstance(data, dict):
            self.fail(f"must be a mapping (got {show(data)})")
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1) or [
                    k for k in known if str(key) and k.startswith(str(key))][:1]
                extra = f"; did you mean {hint[0]!r}?" if hint else f" (known: {', '.join(known)})"
                self.fail(f"unknown key {key!r}{extra}")
        self.data: dict = data

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, msg: str, key: str | None = None) -> NoReturn:
        where = self.field(key) if key is not None else (self.path or "(top level)")
        raise TopologyError(f"{self.src}: {where}: {msg}")

    def get(self, key: str, default: Any = ..., *, required: bool = False) -> Any:
        if key not in self.data or self.data[key] is None and required:
            if required or default is ...:
                self.fail("required", key)
            return default
        return self.data[key]

    def string(self, key: str, default: Any = ..., *, pattern: re.Pattern[str] | None = None,
               maxlen: int | None = None, what: str = "") -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value:
            self.fail(f"must be a non-empty string (got {show(value)})", key)
        if maxlen is not None and len(value) > maxlen:
            self.fail(f"must be at most {maxlen} characters (got {value!r})", key)
        if pattern is not None and not pattern.match(value):
            self.fail(f"{what or 'invalid name'} (got {value!r})", key)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"must be true or false (got {show(value)})", key)
        return value

    def integer(self, key: str, default: Any = ..., *, lo: int, hi: int) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.fail(f"must be an integer in {lo}..{hi} (got {show(value)})", key)
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, default)
        if value not in choices:
            self.fail(f"must be one of {', '.join(choices)} (got {show(value)})", key)
        return value

    def interface(self, key: str) -> ipaddress.IPv4Interface:
        value = self.get(key, required=True)
        if not isinstance(value, str) or "/" not in value:
            self.fail(f"must be an IPv4 address with prefix, like 10.77.0.11/24 "
                      f"(got {show(value)})", key)
        try:
            iface = ipaddress.IPv4Interface(value)
        except ValueError as exc:
            self.fail(f"invalid IPv4 address: {exc} (got {value!r})", key)
        net = iface.network
        if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
            self.fail(f"is the network or broadcast address of {net} (got {value!r})", key)
        return iface


def show(value: Any) -> str:
    return repr(value) if not isinstance(value, dict | list) else type(value).__name__
