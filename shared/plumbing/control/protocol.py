"""The control socket's request/reply codec: what a line means, whoever carries it.

Protocol: the client sends one JSON object per line, e.g. ``{"cmd": "stats"}``; the server answers
each with one line, ``{"ok": true, ...handler result...}`` or ``{"ok": false, "error": "..."}``.
``{"cmd": "ping"}`` is answered by the server itself. An error reply also says whose fault it
was (``"fault": "peer"`` for a bad request, else the kind of what the handler raised).
The unix-socket server (shared/plumbing/control/server.py) and the virtio-serial one
(shared/plumbing/control/port.py) both answer through ``answer``, so a request means the same on
either.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from shared.faults import kind_of
from shared.plumbing import jsonline

MAX_LINE = 64 * 1024
"""Longest request line accepted; longer ones are answered with an error and skipped."""

Handler = Callable[[dict], "dict | Handoff"]


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


def encode_reply(reply: dict) -> bytes:
    """One reply line (anything JSON cannot encode is sent as its str)."""
    return json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n"


def error_reply(message: str, fault: str = "peer") -> bytes:
    """An error reply; ``fault`` says whose (shared/faults.py): by default the client's, who
    asked for something this end does not do."""
    return encode_reply({"ok": False, "error": message, "fault": fault})


TOO_LONG = error_reply(f"request line longer than {MAX_LINE} bytes")


def answer(handler: Handler, line: bytes) -> bytes | Handoff:
    """Decode one request and produce its reply line; never raises."""
    try:
        request = jsonline.loads(line)
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, TooDeep
        return error_reply(f"malformed JSON: {exc}")
    if not isinstance(request, dict):
        return error_reply(f"request must be a JSON object, got {type(request).__name__}")
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        return error_reply('request needs a string "cmd"')
    if cmd == "ping":
        return encode_reply({"ok": True, "pong": True, "pid": os.getpid()})
    try:
        result = handler(request)
    except KeyError as exc:
        detail = exc.args[0] if exc.args else cmd
        return error_reply(f"unknown command or key: {detail}")
    except ValueError as exc:
        return error_reply(f"bad request: {exc}")
    except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the server
        return error_reply(f"internal error in {cmd!r}: {type(exc).__name__}: {exc}",
                           kind_of(exc))
    if isinstance(result, Handoff):
        return result
    if not isinstance(result, dict):
        return error_reply(f"internal error: handler returned {type(result).__name__}, "
                           "not a dict", "own")
    try:
        return encode_reply({"ok": True, **result})
    except (TypeError, ValueError) as exc:
        return error_reply(f"internal error: reply not serialisable: {exc}", "own")
