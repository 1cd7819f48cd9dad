"""The event channel: notifications plus the xenbus-like handshake, over one byte stream.

A notification is the single byte ``!`` (Xen's event-channel kick: it carries no data, the
receiver looks at both rings). A control message is one JSON object on one line. Both travel
on the same stream, so the framing works unchanged over a unix socket (namespace placement,
where the region memfd rides along with SCM_RIGHTS) and over a virtio-serial port (QEMU
placement, where only bytes pass). Repeated kicks that arrive together count as one wake-up.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
from dataclasses import dataclass, field

NOTIFY = b"!"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


class ChannelClosed(Exception):
    """The peer went away (EOF or a reset): the connection is over."""


class ChannelError(Exception):
    """The peer sent something that is not our protocol."""


@dataclass
class Received:
    """What one ``recv`` call drained."""

    kicks: int = 0
    messages: list[dict] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


class EventChannel:
    """One end of the event channel; ``sock`` is a connected unix socket or ``fd`` a char dev."""

    def __init__(self, sock: socket.socket | None = None, fd: int | None = None) -> None:
        if (sock is None) == (fd is None):
            raise ValueError("give a socket or a file descriptor")
        self.sock = sock
        self.fd = sock.fileno() if sock is not None else fd
        os.set_blocking(self.fd, False)
        self._buf = bytearray()
        self.kicks_sent = 0
        self.kicks_received = 0

    def fileno(self) -> int:
        return self.fd

    # --- sending ------------------------------------------------------------------------
    def notify(self) -> None:
        """Kick the peer. A full socket buffer already holds a kick, so EAGAIN is success."""
        try:
            os.write(self.fd, NOTIFY)
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from e
        self.kicks_sent += 1

    def send(self, message: dict, fds: tuple[int, ...] = ()) -> None:
        """Send one control message (blocking until written: messages are rare and small)."""
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        os.set_blocking(self.fd, True)
        try:
            if fds:
                if self.sock is None:
                    raise ChannelError("this transport cannot pass file descriptors")
                socket.send_fds(self.sock, [data], list(fds))
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from e
        finally:
            os.set_blocking(self.fd, False)

    # --- receiving ----------------------------------------------------------------------
    def recv(self) -> Received:
        """Drain what is readable now: kicks, complete messages and passed descriptors."""
        got = Received()
        while True:
            try:
                chunk = self._read(got)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    raise ChannelClosed(str(e)) from e
                raise
            if not chunk:
                if got.kicks or got.messages or got.fds:
                    break  # report what came before the EOF; the next call raises
                raise ChannelClosed("peer closed the event channel")
            self._parse(chunk, got)
            if len(chunk) < 4096:
                break
        self.kicks_received += got.kicks
        return got

    def _read(self, got: Received) -> bytes:
        if self.sock is None:
            return os.read(self.fd, 65536)
        data, anc, _flags, _addr = self.sock.recvmsg(
            65536, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                got.fds.extend(fds)
        return data

    def _parse(self, chunk: bytes, got: Received) -> None:
        if not self._buf and chunk.count(NOTIFY) == len(chunk):
            got.kicks += len(chunk)  # the data-path common case: only kicks
            return
        self._buf += chunk
        while self._buf:
            if self._buf[0] == NOTIFY[0]:
                n = len(self._buf) - len(self._buf.lstrip(NOTIFY))
                got.kicks += n
                del self._buf[:n]
                continue
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_MESSAGE:
                    raise ChannelError("control message longer than 64 KiB")
                return
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            try:
                message = json.loads(line)
            except ValueError as e:
                raise ChannelError(f"bad control message {line[:80]!r}") from e
            if not isinstance(message, dict):
                raise ChannelError(f"control message is not an object: {line[:80]!r}")
            got.messages.append(message)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)
