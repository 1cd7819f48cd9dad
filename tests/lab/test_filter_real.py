"""The filter bypasses of issue 22 (findings 1 and 2) against the real thing (full tier):
frames written by the kernel of a guest namespace onto its netfront's TAP (AF_PACKET), carried
by the real netfront and netback processes over the bridge to the wire namespace, whose
kernel is the judge of what got through: it reassembles fragments and walks every IPv6
extension header. Blocked: a UDP datagram behind 12 Destination Options headers, tiny TCP
fragments carrying a SYN, the fragments of a UDP datagram to the blocked port. Delivered:
the same to a port no rule blocks."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from shared.lab.topology import loads
from shared.plumbing.control.client import query
from tests.inproc import wait_for
from tests.lab.labs import netns_lab, topology_yaml

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]

TOPOLOGY = topology_yaml("pvb", "10.95.0", [{"domid": 951,
                                             "filters": '["drop dst_port=5201"]'}]) \
    + "ipv6: true\n"
BLOCKED, OPEN = 5201, 5202

RECEIVER = textwrap.dedent("""\
    import json, select, socket, sys
    socks = []
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for port in (5201, 5202):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            socks.append((s, "udp%d/%d" % (4 if fam == socket.AF_INET else 6, port)))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    socks.append((raw, "tcp4"))
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([s for s, _ in socks] + [sys.stdin], [], [])
        if sys.stdin in ready:
            break
        for s, name in socks:
            if s in ready:
                data = s.recv(65536)
                if name == "tcp4":
                    ihl = (data[0] & 15) * 4
                    name = "tcp4/%d" % int.from_bytes(data[ihl + 2:ihl + 4], "big")
                print(json.dumps([name, len(data)]), flush=True)
""")
SENDER = textwrap.dedent("""\
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((sys.argv[1], 0))
    for line in open(sys.argv[2]):
        s.send(bytes.fromhex(line.strip()))
""")


def csum(data: bytes) -> int:
    data += b"\0" * (len(data) & 1)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip4(src: bytes, dst: bytes, proto: int, body: bytes, ident: int, frag: int = 0) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, frag, 64, proto, 0,
                       src, dst)
    return head[:10] + struct.pack("!H", csum(head)) + head[12:] + body


def fragments4(src: bytes, dst: bytes, proto: int, l4: bytes, cuts: list[int],
               ident: int) -> list[bytes]:
    """IPv4 packets carrying ``l4`` cut at ``cuts`` (multiples of 8): MF on all but the last."""
    edges = [0, *cuts, len(l4)]
    return [ip4(src, dst, proto, l4[a:b], ident,
                (0x2000 if b < len(l4) else 0) | (a // 8))
            for a, b in zip(edges, edges[1:], strict=False)]


def udp6(src: bytes, dst: bytes, dport: int, payload: bytes, dstopts: int) -> bytes:
    """IPv6 with ``dstopts`` Destination Options headers (8 bytes of Pad1 each), then UDP with
    its (mandatory) checksum."""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    pseudo = src + dst + struct.pack("!I3xB", len(udp), 17)
    udp = udp[:6] + struct.pack("!H", csum(pseudo + udp) or 0xFFFF) + udp[8:]
    chain = b"".join(bytes([60 if i + 1 < dstopts else 17, 0]) + bytes(6)
                     for i in range(dstopts))
    body = chain + udp
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), 60 if dstopts else 17, 64, src,
                       dst) + body


def mac(text: str) -> bytes:
    return bytes.fromhex(text.strip().replace(":", ""))


def ns_out(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, text=True,
                          capture_output=True).stdout


def wire_ll(ns: str, dev: str) -> str:
    """The wire's IPv6 link-local address, once DAD has made it usable."""
    out = ns_out(ns, "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link")
    return out.split()[3].split("/")[0] if out and "tentative" not in out else ""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    topo = loads(TOPOLOGY, state_dir=tmp_path_factory.mktemp("pvb-state"))
    with netns_lab(topo):
        yield topo


def test_bypass_frames_are_blocked_and_their_honest_twins_delivered(lab, tmp_path: Path):
    g, w = lab.guests[0], lab.wire
    ll = wait_for(lambda: wire_ll(w.netns, w.dev), 10, "the wire's link-local address")
    dst_mac = mac(ns_out(w.netns, "cat", f"/sys/class/net/{w.dev}/address"))
    src_mac = mac(g.mac)
    gip, wip = bytes(g.ip.ip.packed), bytes(w.ip.ip.packed)
    l6s, l6d = ipaddress.IPv6Address("fe80::1").packed, ipaddress.IPv6Address(ll).packed
    eth4 = dst_mac + src_mac + b"\x08\x00"
    eth6 = dst_mac + src_mac + b"\x86\xdd"
    syn = struct.pack("!HHIIBBHHH", 40001, BLOCKED, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    udp_payload = b"f" * 2000

    def udp4(port: int) -> bytes:
        return struct.pack("!HHHH", 40002, port, 8 + len(udp_payload), 0) + udp_payload

    frames = [
        *[eth6 + udp6(l6s, l6d, BLOCKED, b"six", n) for n in (9, 12)],   # finding 1
        *[eth4 + f for f in fragments4(gip, wip, 6, syn, [8], 0x1111)],  # finding 2
        *[eth4 + f for f in fragments4(gip, wip, 17, udp4(BLOCKED), [1480], 0x2222)],
        *[eth6 + udp6(l6s, l6d, OPEN, b"six", n) for n in (9, 12)],      # their twins
        *[eth4 + f for f in fragments4(gip, wip, 17, udp4(OPEN), [1480], 0x3333)],
    ]
    (tmp_path / "frames").write_text("".join(f.hex() + "\n" for f in frames))
    (tmp_path / "send.py").write_text(SENDER)
    before = query(str(lab.backend_ctl(g)), {"cmd": "stats"})["rings"]["tx"]
    rx = subprocess.Popen(["ip", "netns", "exec", w.netns, sys.executable, "-c", RECEIVER],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    got: list[list] = []
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        reader = threading.Thread(target=lambda: got.extend(json.loads(ln) for ln in rx.stdout),
                                  daemon=True)
        reader.start()
        subprocess.run(["ip", "netns", "exec", g.netns, sys.executable,
                        str(tmp_path / "send.py"), "eth0", str(tmp_path / "frames")],
                       check=True, timeout=30)
        wait_for(lambda: sum(1 for name, _n in got if name.endswith(f"/{OPEN}")) >= 3, 20,
                 "the honest twins at the wire")
    finally:
        rx.communicate("stop\n", timeout=10)
    # frames cross the ring in order: a blocked frame that got through came before its twins
    assert sorted(got) == [["udp4/5202", len(udp_payload)], ["udp6/5202", 3],
                           ["udp6/5202", 3]], got
    after = query(str(lab.backend_ctl(g)), {"cmd": "stats"})["rings"]["tx"]
    delta = {k: after[k] - before[k] for k in ("drops_filtered", "drops_unparsed",
                                                "drops_fragment")}
    # 2 by the rule through 9/12 headers, the tiny TCP pair (unparsed, fragment), the UDP
    # datagram to 5201 (its first fragment by the rule, its second: fragment)
    assert delta == {"drops_filtered": 6, "drops_unparsed": 1, "drops_fragment": 2}, delta


