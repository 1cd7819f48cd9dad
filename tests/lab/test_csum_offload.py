"""IPv6 checksum offload on a real vif (full tier: root, a network namespace, a TAP): the
backend tells its TAP what the frontend's keys allow (TUNSETOFFLOAD), so a frontend that did
not write feature-ipv6-csum-offload gets IPv6 frames whose checksum the kernel completed, and
never csum_blank; one that wrote Linux's keys gets partial checksums and TSO (issue 22).

The netback runs on a thread of this process whose network namespace is a private one
(setns is per thread), its vif a real TAP there; the frontend is the stock one of
tests/stocknetif.py; the sender is a UDP socket in that namespace.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading

import pytest
from pyroute2.netns import setns

from backend.interface import Netback, NetbackConfig
from shared.plumbing.transport import connect_unix
from tests.inproc import wait_answering, wait_for
from tests.stocknetif import FRONTEND_KEYS, OLD_FRONTEND_KEYS, RXF_CSUM_BLANK, StockFrontend

pytestmark = [pytest.mark.full,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ethtool") is None,
                                 reason="needs root and ethtool")]
NS, VIF = "pvc22", "pvc22v0"
HERE, PEER, PEER_MAC = "fd22:22::1", "fd22:22::2", "02:00:00:00:22:02"
SEND = ("import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
        f"s.sendto(b'c' * 300, ('{PEER}', 9999))")


def ip(*args: str) -> None:
    subprocess.run(["ip", "-n", NS, *args], check=True, capture_output=True)


def offloads() -> dict[str, str]:
    out = subprocess.run(["ip", "netns", "exec", NS, "ethtool", "-k", VIF], check=True,
                         capture_output=True, text=True).stdout
    return dict(ln.strip().split(": ", 1)[:2] for ln in out.splitlines() if ": " in ln)


def udp6_checksum_ok(frame: bytes) -> bool:
    """The UDP checksum of an Ethernet/IPv6/UDP frame, checked over its pseudo-header."""
    ip6, udp = frame[14:54], frame[54:]
    data = ip6[8:40] + struct.pack("!I3xB", len(udp), 17) + udp
    data += b"\0" * (len(data) & 1)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


@pytest.fixture
def backend(tmp_path):
    subprocess.run(["ip", "netns", "add", NS], check=True)
    box: dict[str, object] = {}

    def serve() -> None:
        try:
            setns(NS, flags=0)
            nb = Netback(NetbackConfig(vif=VIF, domid=7, listen=str(tmp_path / "ev"),
                                       ctl=str(tmp_path / "b.ctl")))
            box["nb"] = nb
            nb.run()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        wait_answering(tmp_path / "b.ctl", 10)
        yield box["nb"], tmp_path / "ev"
    finally:
        if "nb" in box:
            box["nb"].stop()  # type: ignore[attr-defined]
        th.join(10)
        subprocess.run(["ip", "netns", "del", NS], check=False)
    assert "error" not in box, box.get("error")


@pytest.mark.parametrize("keys,partial", [(FRONTEND_KEYS, True), (OLD_FRONTEND_KEYS, False)],
                         ids=["linux-keys", "without-ipv6-csum-offload"])
def test_the_vif_hands_over_partial_ipv6_checksums_only_where_agreed(backend, keys, partial):
    nb, ev = backend
    sf = StockFrontend(connect_unix(str(ev), timeout=10))
    try:
        sf.handshake(keys=keys)
        wait_for(lambda: nb.rx is not None, 5, "backend Connected")
        k = offloads()
        assert k["tx-checksumming"].startswith("on" if partial else "off"), k
        assert k["tcp-segmentation-offload"].startswith("on" if partial else "off"), k
        ip("link", "set", VIF, "up")
        ip("-6", "addr", "add", f"{HERE}/64", "dev", VIF, "nodad")
        ip("-6", "neigh", "replace", PEER, "lladdr", PEER_MAC, "dev", VIF, "nud", "permanent")
        sf.keep_posted(32)
        subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", SEND], check=True)

        def udp() -> list:
            sf.pump()
            return [f for f in sf.rx_frames if f.data[12:14] == b"\x86\xdd"
                    and f.data[20] == 17 and f.data[56:58] == (9999).to_bytes(2, "big")]

        got = wait_for(udp, 10, "the UDP datagram at the frontend")
        assert len(got) == 1
        assert bool(got[0].flags & RXF_CSUM_BLANK) == partial
        if not partial:  # the kernel completed it: the frame is whole as it is
            assert udp6_checksum_ok(got[0].data)
        assert nb.rx_stats.drops_not_negotiated == 0
        assert sf.violations == []
    finally:
        sf.close()
