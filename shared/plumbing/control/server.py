"""The control socket server: a unix stream socket speaking shared/plumbing/control/protocol.py.

Every netback and netfront process serves one (shared/plumbing/control/client.py is the client). The
server runs on its own daemon thread with a selector and non-blocking sockets: a slow or stuck
client can never stall the caller's data-path thread, and one bad request never takes the server
down.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass, field

from shared.plumbing.control.client import ControlError
from shared.plumbing.control.protocol import (
    MAX_LINE,
    TOO_LONG,
    Handler,
    Handoff,
    answer,
    encode_reply,
)

MAX_OUTBUF = 4 * 1024 * 1024
"""A client that lets this many reply bytes pile up without reading is dropped."""

MAX_CLIENTS = 32
"""Clients served at once; more wait in the listen backlog (the socket stops being polled)."""

ACCEPT_BACKOFF = 0.1
"""Seconds the listener rests after accept() fails (EMFILE: no fd left) instead of spinning."""


@dataclass
class _Conn:
    """One connected client: its socket and unsent/unparsed bytes."""

    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # inside an oversized line: drop bytes until the next newline
    closing: bool = False  # peer finished sending: close once outbuf is flushed


class ControlServer:
    """Serve `handler` on a unix socket at `path` (mode 0600) from a daemon thread.

    `handler` receives the decoded request object and returns a dict, which is sent back as
    ``{"ok": true, **result}``. It signals a bad request (unknown ``cmd``, bad arguments) by
    raising KeyError or ValueError; any other exception is reported as an internal error. It runs
    on the server thread, so it must only read state (counters), never wait on the data path.
    """

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._conns: dict[int, _Conn] = {}
        self._listening = False
        self._resume_at = 0.0  # after an accept() failure: when to poll the listener again
        #: accept() failures (EMFILE, ENFILE, ENOBUFS), and times the client cap was reached
        self.accept_errors = self.clients_capped = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> ControlServer:
        """Bind, listen and serve; returns self so `ControlServer(...).start()` reads well."""
        if self._thread is not None:
            raise ControlError(f"{self.path}: server already started")
        self._remove_stale()
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            # chmod before listen(): until then connect() is refused, so there is no window in
            # which another user could talk to a socket that is still world-accessible.
            os.chmod(self.path, 0o600)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ControlError(f"{self.path}: cannot listen: {exc}") from exc
        self._listener = sock
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._listen(True)
        self._thread = threading.Thread(
            target=self._serve, name=f"control:{os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, drop all clients and remove the socket file. Idempotent."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._listener.close()
            self._listener = None
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        for s in (self._wake_r, self._wake_w):
            s.close()
        with contextlib.suppress(Exception):
            self._sel.close()

    def __enter__(self) -> ControlServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remove_stale(self) -> None:
        """Unlink a leftover socket file from a crashed process, but never steal a live one."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listening: stale
            return
        finally:
            probe.close()
        raise ControlError(f"{self.path}: another process is serving this control socket")

    # -- event loop ------------------------------------------------------------------------
    def _listen(self, on: bool) -> None:
        """Poll the listener or stop polling it (client cap reached, or no fd left)."""
        if on == self._listening or self._listener is None:
            return
        if on:
            self._sel.register(self._listener, selectors.EVENT_READ, None)
        else:
            self._sel.unregister(self._listener)
        self._listening = on

    def _serve(self) -> None:
        while not self._stop.is_set():
            timeout = 1.0
            if not self._listening and len(self._conns) < MAX_CLIENTS:
                timeout = self._resume_at - time.monotonic()
                if timeout <= 0:
                    self._listen(True)
                    timeout = 1.0
            for key, events in self._sel.select(timeout=timeout):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                else:
                    conn = self._conns.get(key.fd)
                    if conn is None:
                        continue
                    try:
                        if events & selectors.EVENT_READ:
                            self._read(conn)
                        alive = key.fd in self._conns
                        if alive and (events & selectors.EVENT_WRITE or conn.outbuf):
                            self._write(conn)
                    except OSError:
                        self._drop(conn)
                    except Exception:  # noqa: BLE001 - one client must not end the thread
                        self._drop(conn)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            if len(self._conns) >= MAX_CLIENTS:
                self.clients_capped += 1
                self._listen(False)  # the next one waits in the backlog until one goes
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. EMFILE: rest, keep serving the clients we have
                self.accept_errors += 1
                self._resume_at = time.monotonic() + ACCEPT_BACKOFF
                self._listen(False)
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, None)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            conn.closing = True
            if not conn.outbuf:
                self._drop(conn)
            else:
                self._sel.modify(conn.sock, selectors.EVENT_WRITE, None)
            return
        start = len(conn.inbuf)  # no newline before it: each byte is looked at once
        conn.inbuf += data
        while True:
            nl = conn.inbuf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(conn.inbuf[:nl])
            del conn.inbuf[: nl + 1]
            start = 0
            if conn.discarding:
                conn.discarding = False  # the tail of an oversized line: already answered
                continue
            if len(line) > MAX_LINE:
                conn.outbuf += TOO_LONG
                continue
            if line.strip():
                reply = self._dispatch(line)
                if isinstance(reply, Handoff):
                    self._hand_off(conn, reply)
                    return
                conn.outbuf += reply
        if len(conn.inbuf) > MAX_LINE:
            if not conn.discarding:
                conn.outbuf += TOO_LONG
            conn.discarding = True
            conn.inbuf.clear()
        if len(conn.outbuf) > MAX_OUTBUF:
            self._drop(conn)

    def _write(self, conn: _Conn) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            del conn.outbuf[:sent]
        if conn.outbuf:
            events = selectors.EVENT_WRITE | (0 if conn.closing else selectors.EVENT_READ)
            self._sel.modify(conn.sock, events, None)
        elif conn.closing:
            self._drop(conn)
        else:
            self._sel.modify(conn.sock, selectors.EVENT_READ, None)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _hand_off(self, conn: _Conn, h: Handoff) -> None:
        """Send the reply with its descriptors and give the socket away (see Handoff). The
        send may block for at most a second, on this thread only, never the data path's."""
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        sock = conn.sock
        try:
            sock.settimeout(1.0)
            if conn.outbuf:
                sock.sendall(conn.outbuf)
            socket.send_fds(sock, [encode_reply({"ok": True, **h.reply})], h.fds)
            sock.setblocking(False)
        except OSError:
            sock.close()
            h.abandon()
            return
        h.adopt(sock)

    def _dispatch(self, line: bytes) -> bytes | Handoff:
        return answer(self.handler, line)
