"""Whose fault is it: the one hierarchy every error of pvnet belongs to.

A backend that logs "OSError" for a frontend's malformed ring request blames the wrong side,
and an operator reading ``pvnet stats`` cannot tell a hostile guest from a full disk. So every
error pvnet raises on purpose is one of three kinds, and ``kind_of`` classifies anything else:

- ``PeerFault`` ("peer"): the other end broke the protocol (a bad index, grant, slot, header,
  message). The answer is to disconnect that peer, never to crash.
- ``OwnFault`` ("own"): this side is wrong (a bad config value, a bug caught by a check).
- ``OSFault`` ("os"): the operating system refused (a device, a mapping, a socket); an
  ``OSError`` that escapes unwrapped counts as this kind too.
"""

from __future__ import annotations

from typing import ClassVar

KINDS = ("peer", "own", "os")


class Fault(Exception):
    """The root of pvnet's own errors; ``kind`` names whose fault it is."""

    kind: ClassVar[str] = "own"


class PeerFault(Fault):
    """The peer (frontend, backend, capture reader, ivshmem server) broke the protocol."""

    kind = "peer"


class OwnFault(Fault):
    """This side is wrong: configuration or an internal check."""

    kind = "own"


class OSFault(Fault):
    """The operating system refused something this side asked for."""

    kind = "os"


def kind_of(exc: BaseException) -> str:
    """The kind of any exception: a Fault says its own; a bare OSError is the OS's; anything
    else is a bug of ours."""
    if isinstance(exc, Fault):
        return exc.kind
    if isinstance(exc, OSError):
        return "os"
    return "own"
