"""The ivshmem server protocol (QEMU docs/specs/ivshmem-spec.rst), both ends' shared pieces.

Every message is one little-endian int64, optionally with one file descriptor (SCM_RIGHTS):

  on connect   version (0, no fd), the client's own peer id (no fd), -1 with the shared memory
               fd, then "<peer id> + eventfd" once per vector for every existing peer and
               finally for the client itself (its own vector N arrives as its N-th message)
  later        "<peer id> + eventfd" per vector when a peer joins; "<peer id>" without an fd
               when it leaves

Why the shared memory comes third (before any eventfd): QEMU reads these first messages
synchronously while the device is realized and sets up its MSI-X vectors only afterwards, so
an own eventfd received before the memory would be wired to vectors that do not exist yet.

Peer ids: the lab's server reserves ``BACKEND_PEER`` (0) for the netback, which is not a QEMU
process; a guest rings it with ``(0 << 16) | vector`` written to its Doorbell register. Guests
(QEMU clients) get ids from 1 up.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from shared.faults import OSFault, PeerFault
from shared.plumbing.fdpass import AncillaryError, close_all, recv_with_fds

PROTOCOL_VERSION = 0
BACKEND_PEER = 0
MAX_PEER = 0xFFFF  # the Doorbell register has 16 bits for the destination
SHM_MESSAGE = -1
MSG = struct.Struct("<q")
MAX_FDS = 4  # read per message, to close what a faulty server sends beyond the one


class ProtocolError(PeerFault):
    """The other end does not speak the ivshmem server protocol (or went away mid-setup)."""


class ServerUnreachable(OSFault):
    """No ivshmem server could be reached, or the socket failed under us: the OS's say, not a
    protocol breach (a log line must not blame a server that was never there)."""


def send_msg(sock: socket.socket, value: int, fd: int | None = None) -> None:
    """One message; an fd rides on its own message, as the protocol (and QEMU) expect."""
    data = MSG.pack(value)
    if fd is None:
        sock.sendall(data)
    else:
        socket.send_fds(sock, [data], [fd])


def recv_msg(sock: socket.socket) -> tuple[int, int | None]:
    """Read exactly one message (blocking, or BlockingIOError on a non-blocking socket before
    any byte of it arrived). EOF raises ProtocolError."""
    buf = bytearray()
    fd: int | None = None
    while len(buf) < MSG.size:
        try:
            data, fds = recv_with_fds(sock, MSG.size - len(buf), MAX_FDS)
        except AncillaryError as e:
            if fd is not None:
                os.close(fd)
            raise ProtocolError(f"ivshmem server: {e}") from e
        if fd is None and fds:
            fd = fds.pop(0)
        close_all(fds)  # one fd per message; anything else is not ours to keep
        if not data:
            if fd is not None:
                os.close(fd)
            raise ProtocolError("ivshmem server closed the connection")
        buf += data
        if len(buf) < MSG.size and not select.select([sock], [], [], 1.0)[0]:
            raise ProtocolError("ivshmem server sent half a message")
    return MSG.unpack(buf)[0], fd


@dataclass
class PeerTable:
    """What a client knows after the messages so far: its id, the memory, every peer's fds."""

    own_id: int = -1
    shm_fd: int | None = None
    peers: dict[int, list[int]] = field(default_factory=dict)

    def apply(self, value: int, fd: int | None) -> None:
        """One message after the id: the memory, a peer's next vector, or a peer leaving."""
        if value == SHM_MESSAGE:
            if fd is None or self.shm_fd is not None:
                raise ProtocolError("bad shared memory message")
            self.shm_fd = fd
        elif not 0 <= value <= MAX_PEER:
            if fd is not None:
                os.close(fd)
            raise ProtocolError(f"bad peer id {value}")
        elif fd is not None:
            self.peers.setdefault(value, []).append(fd)
        else:
            for old in self.peers.pop(value, []):
                os.close(old)

    def close(self) -> None:
        for fds in self.peers.values():
            for fd in fds:
                os.close(fd)
        self.peers.clear()
        if self.shm_fd is not None:
            os.close(self.shm_fd)
            self.shm_fd = None


class IvshmemClient:
    """A client of an ivshmem server that is not QEMU (the netback, tests).

    ``connect`` returns once the preamble is read and the client's own first eventfd arrived
    (the server sends other peers before it, so whoever was there is known by then); later
    joins and leaves are applied by ``pump``, which never blocks.
    """

    def __init__(self, sock: socket.socket, table: PeerTable) -> None:
        self.sock = sock
        self.table = table

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> IvshmemClient:
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        table = PeerTable()
        try:
            while True:
                try:
                    sock.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError) as e:
                    if time.monotonic() > deadline:
                        raise ServerUnreachable(f"no ivshmem server at {path}: {e}") from e
                    time.sleep(0.1)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            version, fd = recv_msg(sock)
            if version != PROTOCOL_VERSION or fd is not None:
                raise ProtocolError(f"server speaks protocol version {version}, not 0")
            own, fd = recv_msg(sock)
            if fd is not None or not 0 <= own <= MAX_PEER:
                raise ProtocolError(f"bad id message {own}")
            table.own_id = own
            while table.shm_fd is None or not table.peers.get(own):
                table.apply(*recv_msg(sock))
        except (OSError, ProtocolError, ServerUnreachable) as e:
            table.close()
            sock.close()
            if not isinstance(e, OSError):
                raise
            raise ServerUnreachable(f"ivshmem server at {path}: {e}") from e
        sock.setblocking(False)
        client = cls(sock, table)
        client.pump()
        return client

    @property
    def own_id(self) -> int:
        return self.table.own_id

    def own_eventfds(self) -> list[int]:
        return self.table.peers.get(self.own_id, [])

    def other_peers(self) -> dict[int, list[int]]:
        return {p: fds for p, fds in self.table.peers.items() if p != self.own_id}

    def pump(self) -> bool:
        """Apply what the server sent since; True if anything changed. EOF: ProtocolError."""
        changed = False
        while select.select([self.sock], [], [], 0)[0]:
            try:
                self.table.apply(*recv_msg(self.sock))
            except BlockingIOError:
                break
            changed = True
        return changed

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.table.close()
        self.sock.close()
