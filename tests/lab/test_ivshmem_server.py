"""The lab's ivshmem server, fast tier: fake clients speak the protocol over real unix sockets.

The fake QEMU client below reads raw messages with recvmsg (not shared/plumbing/ivshmem.py), so the
wire format is checked independently of our own client code.
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.lab.ivshmem_server import IvshmemServer
from shared.plumbing.doorbell.host import HostDoorbell
from shared.plumbing.ivshmem import BACKEND_PEER
from shared.plumbing.transport import create_memfd

VECTORS = 2


def raw_msg(sock: socket.socket, timeout: float = 2.0) -> tuple[int, int | None]:
    """One protocol message the hard way: 8 bytes little-endian, maybe one SCM_RIGHTS fd."""
    sock.settimeout(timeout)
    data, anc, _flags, _addr = sock.recvmsg(8, socket.CMSG_SPACE(4 * 4))
    assert len(data) == 8, f"short message {data!r}"
    fds = array.array("i")
    for level, kind, payload in anc:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.frombytes(payload[: len(payload) - len(payload) % 4])
    assert len(fds) <= 1, "one fd per message"
    return struct.unpack("<q", data)[0], (fds[0] if fds else None)


def nothing_pending(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0.1)[0]


@dataclass
class FakeClient:
    """What a client learned: its id, the memory fd, peers' eventfds (in arrival order)."""

    sock: socket.socket
    own: int
    shm: int
    peers: dict[int, list[int]]
    order: list[int]  # peer ids in the order their eventfds arrived

    @classmethod
    def connect(cls, path: Path, expect_fds: int) -> FakeClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        assert raw_msg(sock) == (0, None)  # protocol version 0, no fd
        own, fd = raw_msg(sock)
        assert fd is None and 0 <= own <= 0xFFFF
        minus_one, shm = raw_msg(sock)  # the memory comes before any eventfd
        assert minus_one == -1 and shm is not None
        client = cls(sock, own, shm, {}, [])
        for _ in range(expect_fds):
            client.take(*raw_msg(sock))
        return client

    def take(self, peer: int, fd: int | None) -> None:
        assert fd is not None, f"unexpected removal of {peer}"
        self.peers.setdefault(peer, []).append(fd)
        self.order.append(peer)

    def close(self) -> None:
        self.sock.close()
        for fds in self.peers.values():
            for fd in fds:
                os.close(fd)
        os.close(self.shm)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IvshmemServer]:
    fd, mem = create_memfd(1 << 20, "ivshmem-test")
    mem.close()
    srv = IvshmemServer(tmp_path / "ivsh.sock", fd, VECTORS, tmp_path / "ivsh-backend.sock",
                        say=lambda _msg: None)
    srv.listen()
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    th.join(5)
    srv.close()
    os.close(fd)


def test_listening_before_anyone_connects_and_paths_removed_on_close(tmp_path: Path) -> None:
    fd, mem = create_memfd(1 << 20, "ivshmem-test")
    mem.close()
    srv = IvshmemServer(tmp_path / "a.sock", fd, 1, tmp_path / "b.sock", say=lambda _m: None)
    srv.listen()
    try:
        assert (tmp_path / "a.sock").exists() and (tmp_path / "b.sock").exists()
        assert not (tmp_path / "a.sock.tmp").exists()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(tmp_path / "a.sock"))  # accepted by the backlog: QEMU can start now
        s.close()
    finally:
        srv.close()
        os.close(fd)
    assert not (tmp_path / "a.sock").exists() and not (tmp_path / "b.sock").exists()


def test_guest_gets_version_id_memory_then_backend_peer_then_itself(server) -> None:
    g = FakeClient.connect(server.socket_path, 2 * VECTORS)
    try:
        assert g.own != BACKEND_PEER
        assert g.order == [BACKEND_PEER] * VECTORS + [g.own] * VECTORS  # own vectors last
        assert os.fstat(g.shm).st_ino == os.fstat(server.shm_fd).st_ino  # the grant region
        assert nothing_pending(g.sock)
    finally:
        g.close()


def test_new_peer_is_announced_and_its_departure_too(server) -> None:
    g1 = FakeClient.connect(server.socket_path, 2 * VECTORS)
    g2 = FakeClient.connect(server.socket_path, 3 * VECTORS)
    try:
        assert g2.own != g1.own
        assert g2.order == [BACKEND_PEER] * VECTORS + [g1.own] * VECTORS + [g2.own] * VECTORS
        for _ in range(VECTORS):  # g1 hears of g2: one message per vector
            g1.take(*raw_msg(g1.sock))
        assert g1.order[-VECTORS:] == [g2.own] * VECTORS
        # the eventfds really are shared: g1 rings g2's vector 1, g2 sees it on its own fd
        os.eventfd_write(g1.peers[g2.own][1], 1)
        assert os.eventfd_read(g2.peers[g2.own][1]) == 1
        g2.sock.close()
        assert raw_msg(g1.sock) == (g2.own, None)  # removal: the id without an fd
        assert nothing_pending(g1.sock)
    finally:
        g1.close()
        g2.sock.close()


def test_backend_peer_has_a_fixed_id_and_eventfds_kept_across_reconnects(server) -> None:
    g = FakeClient.connect(server.socket_path, 2 * VECTORS)
    b1 = FakeClient.connect(server.backend_path, 2 * VECTORS)
    try:
        assert b1.own == BACKEND_PEER
        assert b1.order == [g.own] * VECTORS + [BACKEND_PEER] * VECTORS
        b1.sock.close()  # a netback restart ...
        b2 = FakeClient.connect(server.backend_path, 2 * VECTORS)
        try:
            # ... is the same peer: the guest rings the eventfd it learned at start-up
            os.eventfd_write(g.peers[BACKEND_PEER][0], 3)
            assert os.eventfd_read(b2.peers[BACKEND_PEER][0]) == 3
            os.eventfd_write(b2.peers[g.own][0], 1)  # and the backend rings the guest
            assert os.eventfd_read(g.peers[g.own][0]) == 1
            assert nothing_pending(g.sock)  # backend clients coming and going are no news
        finally:
            b2.close()
    finally:
        g.close()
        b1.close()


def test_backend_hears_of_guests_joining_and_leaving(server) -> None:
    b = FakeClient.connect(server.backend_path, VECTORS)
    try:
        assert b.order == [BACKEND_PEER] * VECTORS
        g = FakeClient.connect(server.socket_path, 2 * VECTORS)
        for _ in range(VECTORS):
            b.take(*raw_msg(b.sock))
        assert b.order[-1] == g.own
        g.close()
        assert raw_msg(b.sock) == (g.own, None)
    finally:
        b.close()


def test_host_doorbell_finds_a_guest_that_connects_later(server) -> None:
    bell = HostDoorbell.connect(str(server.backend_path), timeout=5)
    try:
        assert bell.peer_id == BACKEND_PEER and bell.guest_id is None
        bell.notify()  # nobody to ring yet: dropped, not an error
        assert bell.dropped == 1
        g = FakeClient.connect(server.socket_path, 2 * VECTORS)
        try:
            bell.notify()
            assert bell.guest_id == g.own
            assert os.eventfd_read(g.peers[g.own][0]) == 1  # guest vector 0 rang
            os.eventfd_write(g.peers[BACKEND_PEER][0], 2)  # the guest's Doorbell write
            assert select.select([bell.fileno()], [], [], 1)[0]
            assert bell.drain() == 2 and bell.drain() == 0
        finally:
            g.close()
    finally:
        bell.close()


def test_server_ids_skip_the_backend_and_are_not_reused_at_once(server) -> None:
    seen = []
    for _ in range(3):
        g = FakeClient.connect(server.socket_path, 2 * VECTORS)
        seen.append(g.own)
        g.close()
    assert BACKEND_PEER not in seen and len(set(seen)) == 3
