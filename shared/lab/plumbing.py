"""Device plumbing in network namespaces: netlink handles, links, addresses, sysctls.

Small, idempotent steps the placements build the lab from; none of them creates a namespace
or a device by itself (the callers decide what is theirs)."""

from __future__ import annotations

import contextlib
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS


def netns_exec(ns: str | None) -> list[str]:
    """argv prefix that runs a command inside namespace `ns` (nothing for the root namespace)."""
    return ["ip", "netns", "exec", ns] if ns else []


@contextlib.contextmanager
def rtnl(ns: str | None) -> Iterator[Any]:
    """A pyroute2 handle on namespace `ns` (root if None); never creates the namespace."""
    handle = NetNS(ns, flags=0) if ns else IPRoute()
    try:
        yield handle
    finally:
        handle.close()


def link_kinds(handle: Any) -> dict[str, tuple[int, str | None]]:
    """ifname -> (index, kind) for every link in a namespace."""
    return {
        link.get("ifname"): (link["index"], link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"))
        for link in handle.get_links()
    }


def ensure_addr(handle: Any, index: int, iface: Any) -> bool:
    """Add `iface` (IPv4Interface) to link `index` unless present; True if added."""
    have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in handle.get_addr(index=index)}
    if (str(iface.ip), iface.network.prefixlen) in have:
        return False
    handle.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    return True


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False



def bridge_nf_on(ns: str | None) -> bool:
    """Is bridge-nf-call-iptables on in namespace `ns` (root if None)?"""
    proc = subprocess.run([*netns_exec(ns), "sysctl", "-n", "net.bridge.bridge-nf-call-iptables"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() == "1"


def disable_ipv6_on(ifname: str) -> None:
    """Disable IPv6 on one of our interfaces in the root namespace (never a global setting)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")

