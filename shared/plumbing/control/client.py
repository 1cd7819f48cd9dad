"""The control socket's client side: ask a running end one question (`pvnet stats`, the lab).

Every netback and netfront process serves a control socket (shared/plumbing/control/server.py;
inside a guest, shared/plumbing/control/port.py), so `pvnet stats`, the lab and the tests can ask a
running end for its counters without touching the data path. The wire format is in
shared/plumbing/control/protocol.py: one JSON object per line each way.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from shared.faults import OwnFault
from shared.plumbing import jsonline

MAX_REPLY = 16 * 1024 * 1024
"""Longest reply line the client accepts (stats replies are a few KiB)."""


class ControlError(OwnFault):
    """A control request failed: no socket, no answer, or an error reply from the server.

    `reply` holds the server's error reply when there was one (None for transport failures), so
    a caller can tell "the process is gone" from "the process said no".
    """

    def __init__(self, message: str, reply: dict | None = None) -> None:
        super().__init__(message)
        self.reply = reply


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
        # the whole reply within ``timeout``, each byte looked at once: a process that
        # trickles a long reply cannot keep us (it is not trusted either)
        deadline = time.monotonic() + timeout
        buf = bytearray()
        nl = -1
        while nl < 0:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError(f"{path}: connection closed before a reply")
            nl = chunk.find(b"\n")
            if nl >= 0:
                nl += len(buf)
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
        reply = jsonline.loads(buf[:nl])
    except ValueError as exc:  # the replying process is not trusted either
        raise ControlError(f"{path}: malformed reply: {exc}") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"{path}: reply is not a control response: {reply!r:.200}")
    if not reply.pop("ok"):
        raise ControlError(f"{path}: {reply.get('error', 'request failed')}", reply)
    return reply
