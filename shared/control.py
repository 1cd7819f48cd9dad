"""Per-process control socket: a unix stream socket speaking line-delimited JSON.

Every netback and netfront process serves one, so `pvnet stats`, the lab and the tests can ask a
running end for its counters without touching the data path. The server runs on its own daemon
thread with a selector and non-blocking sockets: a slow or stuck client can never stall the
caller's data-path thread, and one bad request never takes the server down.

Protocol: the client sends one JSON object per line, e.g. ``{"cmd": "stats"}``; the server answers
each with one line, ``{"ok": true, ...handler result...}`` or ``{"ok": false, "error": "..."}``.
``{"cmd": "ping"}`` is answered by the server itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import jsonline

MAX_LINE = 64 * 1024
"""Longest request line accepted; longer ones are answered with an error and skipped."""

MAX_OUTBUF = 4 * 1024 * 1024
"""A client that lets this many reply bytes pile up without reading is dropped."""

MAX_CLIENTS = 32
"""Clients served at once; more wait in the listen backlog (the socket stops being polled)."""

ACCEPT_BACKOFF = 0.1
"""Seconds the listener rests after accept() fails (EMFILE: no fd left) instead of spinning."""

MAX_REPLY = 16 * 1024 * 1024
"""Longest reply line the client accepts (stats replies are a few KiB)."""

Handler = Callable[[dict], "dict | Handoff"]


class ControlError(Exception):
    """A control request failed: no socket, no answer, or an error reply from the server.

    `reply` holds the server's error reply when there was one (None for transport failures), so
    a caller can tell "the process is gone" from "the process said no".
    """

    def __init__(self, message: str, reply: dict | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass
class Handoff:
    """A handler's answer that takes the connection over (``pvnet capture``): the server sends
    ``reply`` with ``fds`` attached (SCM_RIGHTS), stops serving that socket and gives it to
    ``adopt``, whose it is from then on. If the reply cannot be sent, ``abandon`` runs instead
    so the handler can release what it made. Bytes the client sent after the request are
    dropped. Only a unix socket can carry descriptors: elsewhere this is an error reply."""

    reply: dict
    fds: list[int]
    adopt: Callable[[socket.socket], None]
    abandon: Callable[[], None]


def dispatch(commands: dict[str, Callable[[dict], dict]]) -> Handler:
    """Build a handler from a table ``{"stats": fn, ...}``; unknown commands become errors.

    Saves every data process from writing the same if/elif ladder and error wording.
    """

    def handler(request: dict) -> dict | Handoff:
        cmd = request["cmd"]
        if cmd not in commands:
            raise KeyError(f"{cmd!r} (known: {', '.join(sorted(['ping', *commands]))})")
        return commands[cmd](request)

    return handler


@dataclass
class _Conn:
    """One connected client: its socket and unsent/unparsed bytes."""

    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    discarding: bool = False  # inside an oversized line: drop bytes until the next newline
    closing: bool = False  # peer finished sending: close once outbuf is flushed


def _encode(reply: dict) -> bytes:
    return json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"


def _error(message: str) -> bytes:
    return _encode({"ok": False, "error": message})


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
        conn.inbuf += data
        while True:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                break
            line = bytes(conn.inbuf[:nl])
            del conn.inbuf[: nl + 1]
            if conn.discarding:
                conn.discarding = False  # the tail of an oversized line: already answered
                continue
            if len(line) > MAX_LINE:
                conn.outbuf += _error(f"request line longer than {MAX_LINE} bytes")
                continue
            if line.strip():
                reply = self._dispatch(line)
                if isinstance(reply, Handoff):
                    self._hand_off(conn, reply)
                    return
                conn.outbuf += reply
        if len(conn.inbuf) > MAX_LINE:
            if not conn.discarding:
                conn.outbuf += _error(f"request line longer than {MAX_LINE} bytes")
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
            socket.send_fds(sock, [_encode({"ok": True, **h.reply})], h.fds)
            sock.setblocking(False)
        except OSError:
            sock.close()
            h.abandon()
            return
        h.adopt(sock)

    def _dispatch(self, line: bytes) -> bytes | Handoff:
        return answer(self.handler, line)


def answer(handler: Handler, line: bytes) -> bytes | Handoff:
    """Decode one request and produce its reply line; never raises."""
    try:
        request = jsonline.loads(line)
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, TooDeep
        return _error(f"malformed JSON: {exc}")
    if not isinstance(request, dict):
        return _error(f"request must be a JSON object, got {type(request).__name__}")
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        return _error('request needs a string "cmd"')
    if cmd == "ping":
        return _encode({"ok": True, "pong": True, "pid": os.getpid()})
    try:
        result = handler(request)
    except KeyError as exc:
        detail = exc.args[0] if exc.args else cmd
        return _error(f"unknown command or key: {detail}")
    except ValueError as exc:
        return _error(f"bad request: {exc}")
    except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the server
        return _error(f"internal error in {cmd!r}: {type(exc).__name__}: {exc}")
    if isinstance(result, Handoff):
        return result
    if not isinstance(result, dict):
        return _error(f"internal error: handler returned {type(result).__name__}, not a dict")
    try:
        return _encode({"ok": True, **result})
    except (TypeError, ValueError) as exc:
        return _error(f"internal error: reply not serialisable: {exc}")


def _connect_hint(exc: OSError) -> str:
    """Turn a connect() failure into a message that says what to check."""
    if isinstance(exc, FileNotFoundError):
        return "no such control socket (is the process running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (stale socket? process gone?)"
    if isinstance(exc, PermissionError):
        return "permission denied (the socket is 0600; run as its owner)"
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    return f"cannot connect: {exc.strerror or exc}"


def query(path: str | os.PathLike[str], request: dict, timeout: float = 2.0) -> dict[str, Any]:
    """Send one request to the control socket at `path` and return the reply without "ok".

    Raises ControlError with a message that says what to check (process running? permissions?)
    for a missing socket, a refused or timed-out connection, a garbled reply or an error reply.
    """
    path = os.fspath(path)
    line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ControlError(f"{path}: {_connect_hint(exc)}") from None
        sock.sendall(line)
        buf = bytearray()
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError(f"{path}: connection closed before a reply")
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise ControlError(f"{path}: reply longer than {MAX_REPLY} bytes")
    except TimeoutError:
        raise ControlError(f"{path}: no reply within {timeout:g} s") from None
    except ControlError:
        raise
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = jsonline.loads(buf[: buf.index(b"\n")])
    except ValueError as exc:  # the replying process is not trusted either
        raise ControlError(f"{path}: malformed reply: {exc}") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"{path}: reply is not a control response: {reply!r:.200}")
    if not reply.pop("ok"):
        raise ControlError(f"{path}: {reply.get('error', 'request failed')}", reply)
    return reply


class PortControl:
    """The same protocol served on a character device: a virtio-serial port whose host end is
    a unix socket (QEMU chardev), so a frontend inside a guest answers `pvnet stats` on the
    host like any other end. One host client at a time (the port is one stream)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PortControl:
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"control:{os.path.basename(self.path)}")
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _serve(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        buf = bytearray()
        try:
            while not self._stop.is_set():
                if not poller.poll(500):
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # host side not connected: wait for the next client
                    buf.clear()
                    time.sleep(0.1)
                    continue
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    reply = (answer(self.handler, line) if len(line) <= MAX_LINE
                             else _error(f"request line longer than {MAX_LINE} bytes"))
                    if isinstance(reply, Handoff):  # no descriptors over a serial port
                        reply.abandon()
                        reply = _error("this control channel cannot pass descriptors")
                    if line.strip():
                        self._write(fd, reply)
                if len(buf) > MAX_LINE:
                    buf.clear()
                    self._write(fd, _error(f"request line longer than {MAX_LINE} bytes"))
        finally:
            os.close(fd)

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return
