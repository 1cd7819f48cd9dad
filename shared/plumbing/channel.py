"""The event channel: notifications plus the xenbus-like handshake, over one byte stream.

A notification is the single byte ``!`` (Xen's event-channel kick: it carries no data, the
receiver looks at both rings). A control message is one JSON object on one line. Both travel
on the same stream, so the framing works unchanged over a unix socket (namespace placement,
where the region memfd rides along with SCM_RIGHTS) and over a virtio-serial port (QEMU
placement, where only bytes pass). Repeated kicks that arrive together count as one wake-up.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import time
from dataclasses import dataclass, field

from shared.faults import PeerFault
from shared.plumbing import jsonline
from shared.plumbing.fdpass import AncillaryError, close_all, recv_with_fds

NOTIFY = b"!"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4
#: reads per ``recv``: a peer that writes faster than we read (a notification storm) must not
#: keep one call draining forever; what is left is read on the next wake-up.
MAX_READS = 16
#: control messages per ``recv``: a correct peer sends a handful per connection, so more is a
#: flood that would otherwise cost us a dict per line.
MAX_MESSAGES = 256


class ChannelClosed(Exception):
    """The peer went away (EOF or a reset): the connection is over."""


class ChannelError(PeerFault):
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
        #: seconds a control message may wait for the peer to read (None: forever)
        self.send_timeout: float | None = None
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
        """Send one control message. Messages are rare and small, so by default this blocks
        until written (a guest's port to a host end that is not connected yet waits for it);
        with ``send_timeout`` set, a peer that does not read for that long is a ChannelError
        instead of a hang (the backend sets it: its peers are not trusted)."""
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if fds and self.sock is None:
            raise ChannelError("this transport cannot pass file descriptors")
        if self.send_timeout is None:
            os.set_blocking(self.fd, True)
        try:
            if self.send_timeout is None:
                self._send_all(data, fds)
            else:
                self._send_before(data, fds, time.monotonic() + self.send_timeout)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from e
        finally:
            if self.send_timeout is None:
                os.set_blocking(self.fd, False)

    def _send_all(self, data: bytes, fds: tuple[int, ...]) -> None:
        view = memoryview(data)
        if fds:
            view = view[socket.send_fds(self.sock, [view], list(fds)):]
        while view:
            view = view[os.write(self.fd, view):]

    def _send_before(self, data: bytes, fds: tuple[int, ...], deadline: float) -> None:
        view = memoryview(data)
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError("peer does not read its control messages")
            if not poller.poll(int(left * 1000) + 1):
                continue
            try:
                if fds:
                    n = socket.send_fds(self.sock, [view], list(fds))
                    fds = ()
                else:
                    n = os.write(self.fd, view)
            except BlockingIOError:
                continue
            view = view[n:]

    # --- receiving ----------------------------------------------------------------------
    def recv(self, keep_fds: bool = True) -> Received:
        """Drain what is readable now (at most MAX_READS reads): kicks, complete messages and
        passed descriptors. With ``keep_fds`` False, descriptors are closed on arrival: once
        connected nobody expects one, and a peer must not be able to make us hoard them."""
        got = Received()
        try:
            self._drain(got)
        except BaseException:
            close_all(got.fds)  # a bad message must not strand descriptors that came with it
            raise
        self.kicks_received += got.kicks
        if got.fds and not keep_fds:
            close_all(got.fds)
            got.fds = []
        return got

    def _drain(self, got: Received) -> None:
        for _ in range(MAX_READS):
            try:
                chunk = self._read(got)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    raise ChannelClosed(str(e)) from e
                raise
            if not chunk:
                if got.kicks or got.messages or got.fds:
                    return  # report what came before the EOF; the next call raises
                raise ChannelClosed("peer closed the event channel")
            self._parse(chunk, got)
            if len(chunk) < 4096:
                return

    def _read(self, got: Received) -> bytes:
        if self.sock is None:
            return os.read(self.fd, 65536)
        try:
            data, fds = recv_with_fds(self.sock, 65536, MAX_FDS)
        except AncillaryError as e:
            raise ChannelError(str(e)) from e
        got.fds.extend(fds)
        return data

    def _parse(self, chunk: bytes, got: Received) -> None:
        if not self._buf and chunk.count(NOTIFY) == len(chunk):
            got.kicks += len(chunk)  # the data-path common case: only kicks
            return
        start = len(self._buf)  # no newline before it: each byte is looked at once
        self._buf += chunk
        while self._buf:
            if self._buf[0] == NOTIFY[0]:
                n = len(self._buf) - len(self._buf.lstrip(NOTIFY))
                got.kicks += n
                del self._buf[:n]
                start = 0
                continue
            end = self._buf.find(b"\n", start)
            if end < 0:
                if len(self._buf) > MAX_MESSAGE:
                    raise ChannelError("control message longer than 64 KiB")
                return
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            start = 0
            try:
                message = jsonline.loads(line)
            except ValueError as e:
                raise ChannelError(f"bad control message ({e}): {line[:80]!r}") from e
            if not isinstance(message, dict):
                raise ChannelError(f"control message is not an object: {line[:80]!r}")
            if len(got.messages) >= MAX_MESSAGES:
                raise ChannelError(f"more than {MAX_MESSAGES} control messages at once")
            got.messages.append(message)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)


def kick_if(wanted: bool, chan: EventChannel, stats) -> None:
    """After a push: kick the peer if its event index asked for it (the push's answer), and
    count the kick as sent or suppressed in `stats` (a RingStats)."""
    if wanted:
        t = time.perf_counter_ns()
        chan.notify()
        stats.notify_ns += time.perf_counter_ns() - t
        stats.notify_sent += 1
    else:
        stats.notify_suppressed += 1
