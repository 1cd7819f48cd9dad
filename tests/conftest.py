"""Shared fixtures: an in-process netfront/netback pair for the fast tier.

Both ends run on one sealed memfd with their real code paths (the backend with its CPU view
and DMA view over it, as in the namespace placement); the TAP and the vif
are datagram socketpairs (one datagram per frame, readv/writev like a TAP), so every byte of
TX and RX crosses the real rings, grants and header slots without root.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest

from backend.grants.gntmap import GntMap, Views
from backend.handshake import attach_region
from backend.rx.path import RxPath
from backend.tx.filter import Filter
from backend.tx.path import TxPath
from frontend.mechanisms import grant_policy
from frontend.rx.queue import RX_BUFFERS, RxQueue
from frontend.tx.queue import TxQueue
from shared.plumbing.transport import create_memfd
from shared.protocol.offload import VNET_HDR
from shared.protocol.region import Region
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import Agreement

SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux <asm-generic/socket.h>; not in the socket module


def dgram_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
        # a TAP write never says EAGAIN; a socketpair does once its sender's buffer is full,
        # which a test's reader starved by a loaded machine lets happen: with CAP_NET_ADMIN
        # make the buffer larger than any test's traffic (the *FORCE options pass wmem_max)
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF),
                             (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                s.setsockopt(socket.SOL_SOCKET, force, 64 << 20)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, plain, 4 << 20)
    return a, b


@dataclass
class Pair:
    """Frontend queues and backend paths over one region, plus the far ends of their fds."""

    region: Region
    front_region: Region
    tx: TxQueue
    rx: RxQueue
    btx: TxPath
    brx: RxPath
    guest: socket.socket  # what the guest stack would write/read on its TAP
    wire: socket.socket  # what the bridge would see on the vif
    fstats: tuple[RingStats, RingStats]
    bstats: tuple[RingStats, RingStats]

    def send(self, frame: bytes, vnet: bytes = bytes(VNET_HDR.size)) -> None:
        self.guest.send(vnet + frame)

    def run_tx(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            self.tx.reap()
            self.tx.pump()
            self.tx.ring.push_requests()
            self.btx.action()
            self.btx.ring.push_responses()
        self.tx.reap()

    def wire_frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.wire.recv(1 << 17)[VNET_HDR.size:])
            except BlockingIOError:
                return out

    def run_rx(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            self.rx.refill()
            self.rx.ring.push_requests()
            self.brx.action()
            self.brx.ring.push_responses()
            self.rx.poll()

    def guest_frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.guest.recv(1 << 17))
            except BlockingIOError:
                return out


def agreement(header_slots: bool = True, persistent: bool = False, rx_by_id: bool = False,
              **stock: bool) -> Agreement:
    """Every netif.h feature on (``stock`` switches some off, e.g. ``rx_sg=False``), and the
    given extensions."""
    keys = dict(tx_sg=True, tx_gso_tcpv4=True, tx_gso_tcpv6=True, rx_sg=True,
                rx_gso_tcpv4=True, rx_gso_tcpv6=True)
    keys.update(stock)
    return Agreement(**keys, header_slots=header_slots, persistent=persistent,
                     rx_by_id=rx_by_id)


def make_pair(mode: str = "lazy", header_slots: bool = True, persistent: bool = False,
              filters: list[str] | None = None, size: int = 4 << 20,
              rx_by_id: bool = False, rx_mode: str = "copy", grants: str = "",
              recycle_pool: int = 2, **stock: bool) -> Pair:
    fd, mem = create_memfd(size)
    front_region = Region.create(mem)
    region, own_fd = attach_region(fd, mem)
    os.close(fd)
    guest, tap = dgram_pair()
    vif, wire = dgram_pair()
    fst, bst = (RingStats(), RingStats()), (RingStats(), RingStats())
    ag = agreement(header_slots, persistent, rx_by_id, **stock)
    opts = {"pool_rings": recycle_pool} if grants == "recycle" else {}

    def policy(st: RingStats):  # one per queue, on its ring's counters, as netfront does
        return grant_policy({"feature-persistent": persistent}, front_region.grants, st,
                            grants, **opts)
    rx = RxQueue(front_region, tap.fileno(), fst[1], policy(fst[1]), 0, ag)
    tx = TxQueue(front_region, tap.fileno(), fst[0], RX_BUFFERS, header_slots, policy(fst[0]),
                 0, ag)
    pf = Filter.parse(filters) if filters else None
    views = Views(own_fd, mem, region, bst[0], shared=True)
    btx = TxPath(region, GntMap(region, views, 0, bst[0], persistent), vif.fileno(), bst[0],
                 mode, header_slots, pf, ag)
    brx = RxPath(region, GntMap(region, views, 0, bst[1], persistent), vif.fileno(), bst[1], ag,
                 rx_mode)
    pair = Pair(region, front_region, tx, rx, btx, brx, guest, wire, fst, bst)
    pair._keep = (tap, vif)  # type: ignore[attr-defined]
    pair._views = views  # type: ignore[attr-defined]
    _OPEN.append(pair)
    return pair


#: every pair made during the running test, closed after it (``_close_pairs``)
_OPEN: list[Pair] = []


@pytest.fixture(autouse=True)
def _close_pairs():
    """Whatever a test did with its pairs, their descriptors and mappings go after it: a
    hypothesis test makes dozens, and a process has 1024 fds for select()."""
    yield
    while _OPEN:
        p = _OPEN.pop()
        for s in (p.guest, p.wire, *p._keep):
            s.close()
        p._views.close()


@pytest.fixture
def pair():
    p = make_pair()
    yield p
    for s in (p.guest, p.wire, *p._keep):
        s.close()


def frame(payload: bytes, proto: int = 17, dport: int = 5201) -> bytes:
    """An Ethernet/IPv4/UDP-or-TCP frame around ``payload`` (checksums not filled)."""
    l4 = (dport.to_bytes(2, "big") * 2 + len(payload).to_bytes(2, "big") + b"\0\0"
          if proto == 17 else dport.to_bytes(2, "big") * 2 + bytes(16))
    ip_len = 20 + len(l4) + len(payload)
    ip = (bytes([0x45, 0]) + ip_len.to_bytes(2, "big") + bytes(4) + bytes([64, proto])
          + bytes(2) + bytes([10, 0, 0, 1, 10, 0, 0, 2]))
    return bytes(6) + bytes.fromhex("00163e000001") + b"\x08\x00" + ip + l4 + payload


def l4_header(proto: int, dport: int, payload: bytes, tcp_options: bytes = b"") -> bytes:
    """A UDP header, or a TCP header with ``tcp_options`` (a multiple of 4 bytes)."""
    if proto == 17:
        return dport.to_bytes(2, "big") * 2 + (8 + len(payload)).to_bytes(2, "big") + b"\0\0"
    doff = (20 + len(tcp_options)) // 4
    return (dport.to_bytes(2, "big") * 2 + bytes(8) + bytes([doff << 4, 0x18]) + bytes(6)
            + tcp_options)


def ipv6_ext(kind: int, nxt: int, body_len: int = 6, frag_offset: int = 0) -> bytes:
    """One IPv6 extension header: Fragment (44) with an offset in 8-byte units, else a
    Hop-by-Hop/Routing/Destination Options header of 2 + ``body_len`` bytes (padded)."""
    if kind == 44:
        return bytes([nxt, 0]) + ((frag_offset << 3) | 1).to_bytes(2, "big") + bytes(4)
    n = -(-(2 + body_len) // 8)
    return bytes([nxt, n - 1]) + bytes(n * 8 - 2)


def frame6(payload: bytes, proto: int = 17, dport: int = 5201, exts: tuple = (),
           frag_offset: int = 0, tcp_options: bytes = b"") -> bytes:
    """An Ethernet/IPv6 frame with the extension headers ``exts`` (kinds, in order) before
    the UDP/TCP header (absent when a Fragment header has a nonzero ``frag_offset``)."""
    kinds = list(exts)
    chain = b""
    for i, kind in enumerate(kinds):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else proto
        chain += ipv6_ext(kind, nxt, frag_offset=frag_offset)
    l4 = b"" if frag_offset else l4_header(proto, dport, payload, tcp_options)
    body = chain + l4 + payload
    ip = (bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big")
          + bytes([kinds[0] if kinds else proto, 64]) + bytes(15) + b"\x01" + bytes(15) + b"\x02")
    return bytes(6) + bytes.fromhex("00163e000001") + b"\x86\xdd" + ip + body


def vlan(f: bytes, *tags: tuple[int, int]) -> bytes:
    """``f`` with (TPID, VID) tags inserted after the MAC addresses, outermost first."""
    return f[:12] + b"".join(t.to_bytes(2, "big") + v.to_bytes(2, "big") for t, v in tags) + f[12:]


def ipv4_options(f: bytes, options: bytes) -> bytes:
    """An IPv4 ``frame`` with ``options`` (a multiple of 4 bytes) added to its IP header."""
    ihl = 5 + len(options) // 4
    ip = bytes([0x40 | ihl]) + f[15:34] + options
    return f[:14] + ip + f[34:]


# -- the full tier must run where it can ------------------------------------------------------

def _full_tier_must_run() -> str:
    """Why a skipped full-tier test is a failure here ('' if a skip is allowed): CI, or root
    with QEMU installed (this machine can run every full-tier test, so a skip hides one)."""
    import os
    import shutil

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return "CI is set"
    if os.geteuid() == 0 and shutil.which("qemu-system-x86_64"):
        return "running as root with QEMU installed"
    return ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skipped full-tier test fails where it must run (see _full_tier_must_run)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("full") is not None:
        why = _full_tier_must_run()
        if why:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            reason = str(reason).removeprefix("Skipped: ")
            report.outcome = "failed"
            report.longrepr = (f"full-tier test skipped although it must run ({why}): "
                               f"{reason}")
        else:
            item.config._pvnet_full_not_run = getattr(item.config, "_pvnet_full_not_run", 0) + 1


def pytest_deselected(items):
    full = [i for i in items if i.get_closest_marker("full") is not None]
    if full:
        cfg = full[0].config
        cfg._pvnet_full_not_run = getattr(cfg, "_pvnet_full_not_run", 0) + len(full)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say plainly how many full-tier tests did not run (skipped or deselected)."""
    n = getattr(config, "_pvnet_full_not_run", 0)
    if n:
        terminalreporter.write_line(
            f"NOTE: {n} full-tier test(s) did NOT run (skipped or deselected: they need root, "
            "namespaces, TAPs or QEMU); this run proves nothing about them.", yellow=True,
            bold=True)


# -- a test run leaves the checkout as git has it -------------------------------------------

#: what Python, pytest, hypothesis, ruff and pip leave in any checkout (all in .gitignore)
_TOOL_DROPPINGS = ("__pycache__/", ".pytest_cache/", ".hypothesis/", ".ruff_cache/",
                   ".egg-info/")


def _checkout_changes(root) -> set[str] | None:
    """`git status --porcelain --ignored` lines of the checkout minus tool droppings (None:
    not a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=root,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {ln for ln in out.stdout.splitlines()
            if not any(ln.endswith(d) or f"/{d}" in ln or ln[3:].startswith(d)
                       for d in _TOOL_DROPPINGS)}


def pytest_sessionstart(session):
    session.config._pvnet_checkout = _checkout_changes(session.config.rootpath)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if it wrote anything into the checkout (keys, images, state, results):
    all of that belongs in ~/.cache/pvnet, the state dir or a tmp_path."""
    before = getattr(session.config, "_pvnet_checkout", None)
    if before is None:
        return
    after = _checkout_changes(session.config.rootpath) or set()
    new = sorted(after - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("FAILED: the test run wrote into the checkout (git status):",
                                red=True, bold=True)
            for line in new:
                reporter.write_line(f"  {line}", red=True)
        session.exitstatus = 1
