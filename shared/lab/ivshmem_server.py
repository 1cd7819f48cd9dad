"""Our own ivshmem server: one per doorbell guest, started by the lab before that guest's QEMU.

Why not QEMU's ivshmem-server binary: the netback is not a QEMU process, yet it must be a peer
the guest can ring and whose kicks raise MSI-X in the guest. This server therefore owns one
extra peer, the *backend peer* (``BACKEND_PEER``, id 0), whose eventfds live as long as the
server: QEMU clients learn it like any other peer (so the guest rings it with Doorbell
``(0 << 16) | vector``), and a netback connecting to the backend socket is told that id, its
eventfds and every guest's, over the very same protocol (see shared/plumbing/ivshmem.py). A
restarted netback reconnects and gets the same eventfds, so the guest never needs to learn a new id.

Two sockets because a client cannot say who it is (the server speaks first): ``socket`` is for
QEMU (``-chardev socket,path=...`` + ``-device ivshmem-doorbell,chardev=...``), each connection a
new guest peer with fresh eventfds; ``backend_socket`` is for the netback. Both paths appear
only once listening (bound under a temporary name, then renamed), so "the path exists" is the
readiness test; QEMU must find the server listening, because it reads the first messages
synchronously at start-up and fails without them.

``python -m shared.lab.ivshmem_server --socket P --backend-socket B --shm-fd N [--vectors V]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.plumbing.ivshmem import BACKEND_PEER, MAX_PEER, PROTOCOL_VERSION, SHM_MESSAGE, send_msg

SEND_TIMEOUT = 2.0  # a client that does not read its messages for this long is dropped


@dataclass
class Peer:
    """A peer and its eventfds (one per vector); ``sock`` None is the server-owned backend."""

    id: int
    eventfds: list[int]
    sock: socket.socket | None = None


@dataclass
class ServerStats:
    """What happened so far (tests and the log read it)."""

    guests_connected: int = 0
    guests_left: int = 0
    backends_connected: int = 0
    dropped: list[str] = field(default_factory=list)


def _new_eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def _listen(path: Path) -> socket.socket:
    """Bind under a temporary name and rename: the final path exists only once listening."""
    tmp = path.with_name(path.name + ".tmp")
    for p in (tmp, path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(str(tmp))
    os.chmod(tmp, 0o600)
    sock.listen(8)
    os.rename(tmp, path)
    return sock


class IvshmemServer:
    """Single-threaded (selectors); ``serve_forever`` until ``shutdown`` (any thread)."""

    def __init__(self, socket_path: Path, shm_fd: int, vectors: int = 1,
                 backend_path: Path | None = None, say=None) -> None:
        if not 1 <= vectors <= 64:
            raise ValueError("vectors must be 1..64")
        self.socket_path = Path(socket_path)
        self.backend_path = Path(backend_path) if backend_path is not None else None
        self.shm_fd = shm_fd
        self.vectors = vectors
        self.say = say or (lambda msg: print(f"ivshmem-server: {msg}", file=sys.stderr,
                                             flush=True))
        self.stats = ServerStats()
        self.backend = Peer(BACKEND_PEER, _new_eventfds(vectors)) if backend_path else None
        self.guests: dict[int, Peer] = {}
        self.backend_clients: list[socket.socket] = []
        self._next_id = BACKEND_PEER + 1 if backend_path else 0
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listeners: list[socket.socket] = []
        self._running = False

    # --- set-up -------------------------------------------------------------------------
    def listen(self) -> None:
        """Open both sockets, the backend's first: the QEMU path appearing means all is up."""
        if self.backend_path is not None:
            sock = _listen(self.backend_path)
            self._listeners.append(sock)
            self._sel.register(sock, selectors.EVENT_READ, self._accept_backend)
        sock = _listen(self.socket_path)
        self._listeners.append(sock)
        self._sel.register(sock, selectors.EVENT_READ, self._accept_guest)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.say(f"listening on {self.socket_path}"
                 + (f" (backend peer {BACKEND_PEER} on {self.backend_path})"
                    if self.backend_path else "") + f", {self.vectors} vectors")

    def serve_forever(self) -> None:
        if not self._listeners:
            self.listen()
        self._running = True
        while self._running:
            for key, _ev in self._sel.select():
                if key.data is None:
                    self._running = False
                    break
                key.data(key.fileobj)

    def shutdown(self) -> None:
        """Make ``serve_forever`` return (safe from other threads and signal handlers)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        for path in (self.socket_path, self.backend_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for peer in list(self.guests.values()):
            self._forget(peer)
        for sock in self.backend_clients:
            sock.close()
        self.backend_clients.clear()
        if self.backend is not None:
            for fd in self.backend.eventfds:
                os.close(fd)
            self.backend = None
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- connections ----------------------------------------------------------------------
    def _preamble(self, sock: socket.socket, own_id: int) -> None:
        send_msg(sock, PROTOCOL_VERSION)
        send_msg(sock, own_id)
        # before any eventfd: see shared/plumbing/ivshmem.py
        send_msg(sock, SHM_MESSAGE, self.shm_fd)

    @staticmethod
    def _announce(sock: socket.socket, peer: Peer) -> None:
        for fd in peer.eventfds:
            send_msg(sock, peer.id, fd)

    def _accept_guest(self, listener: socket.socket) -> None:
        sock, _ = listener.accept()
        sock.settimeout(SEND_TIMEOUT)
        peer_id = self._allocate_id()
        if peer_id is None:
            self.say("no free peer id; refusing a client")
            sock.close()
            return
        peer = Peer(peer_id, _new_eventfds(self.vectors), sock)
        try:
            self._preamble(sock, peer.id)
            # everyone else learns the newcomer ...
            for other in list(self.guests.values()):
                self._send_or_drop(other.sock, lambda s: self._announce(s, peer))
            for b in list(self.backend_clients):
                self._send_or_drop(b, lambda s: self._announce(s, peer))
            # ... the newcomer learns everyone else, then itself (its own vectors last)
            if self.backend is not None:
                self._announce(sock, self.backend)
            for other in self.guests.values():
                self._announce(sock, other)
            self._announce(sock, peer)
        except OSError as e:
            self.say(f"guest peer {peer.id}: set-up failed ({e})")
            for fd in peer.eventfds:
                os.close(fd)
            sock.close()
            return
        self.guests[peer.id] = peer
        self._sel.register(sock, selectors.EVENT_READ, self._readable)
        self.stats.guests_connected += 1
        self.say(f"guest peer {peer.id} connected")

    def _accept_backend(self, listener: socket.socket) -> None:
        sock, _ = listener.accept()
        sock.settimeout(SEND_TIMEOUT)
        assert self.backend is not None
        try:
            self._preamble(sock, BACKEND_PEER)
            for other in self.guests.values():
                self._announce(sock, other)
            self._announce(sock, self.backend)
        except OSError as e:
            self.say(f"backend client: set-up failed ({e})")
            sock.close()
            return
        self.backend_clients.append(sock)
        self._sel.register(sock, selectors.EVENT_READ, self._readable)
        self.stats.backends_connected += 1
        self.say(f"backend client connected (peer {BACKEND_PEER}, "
                 f"{len(self.backend_clients)} now)")

    def _readable(self, sock: socket.socket) -> None:
        """Clients never speak: readable means EOF (or junk, which is ignored)."""
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._drop(sock, "disconnected")

    def _send_or_drop(self, sock: socket.socket | None, send) -> None:
        if sock is None:
            return
        try:
            send(sock)
        except OSError as e:
            self._drop(sock, f"send failed ({e})")

    def _drop(self, sock: socket.socket, why: str) -> None:
        if sock in self.backend_clients:
            self.backend_clients.remove(sock)
            self._unregister_close(sock)
            self.say(f"backend client {why}")
            return
        for peer in list(self.guests.values()):
            if peer.sock is sock:
                self._forget(peer)
                self.stats.guests_left += 1
                self.stats.dropped.append(f"{peer.id}: {why}")
                self.say(f"guest peer {peer.id} {why}")
                for other in list(self.guests.values()):
                    self._send_or_drop(other.sock, lambda s, p=peer.id: send_msg(s, p))
                for b in list(self.backend_clients):
                    self._send_or_drop(b, lambda s, p=peer.id: send_msg(s, p))
                return

    def _forget(self, peer: Peer) -> None:
        self.guests.pop(peer.id, None)
        if peer.sock is not None:
            self._unregister_close(peer.sock)
        for fd in peer.eventfds:
            os.close(fd)
        peer.eventfds = []

    def _unregister_close(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()

    def _allocate_id(self) -> int | None:
        """Like QEMU's server: the next unused id, wrapping, never the backend's."""
        first = BACKEND_PEER + 1 if self.backend is not None else 0
        for _ in range(MAX_PEER + 1):
            candidate = self._next_id
            self._next_id = self._next_id + 1 if self._next_id < MAX_PEER else first
            if candidate not in self.guests and candidate >= first:
                return candidate
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ivshmem-server",
                                description="ivshmem server with a backend peer for pvnet")
    p.add_argument("--socket", required=True, type=Path, help="QEMU's chardev socket path")
    p.add_argument("--backend-socket", type=Path,
                   help="where the netback connects (peer id 0, eventfds kept across restarts)")
    p.add_argument("--shm-fd", type=int, required=True,
                   help="inherited fd of the shared memory (the grant region memfd)")
    p.add_argument("--vectors", type=int, default=1, help="interrupt vectors per peer")
    a = p.parse_args(argv)
    try:
        os.fstat(a.shm_fd)
    except OSError as e:
        p.error(f"--shm-fd {a.shm_fd}: {e}")
    server = IvshmemServer(a.socket, a.shm_fd, a.vectors, a.backend_socket)

    def stop(signum, _frame) -> None:
        server.say(f"{signal.Signals(signum).name}, stopping")
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    t0 = time.monotonic()
    try:
        server.serve_forever()
    finally:
        server.close()
        server.say(f"stopped after {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
