"""Descriptors passed over unix sockets (SCM_RIGHTS): the one place their ancillary data is read.

The event channel (a frontend's region memfd), the ivshmem client (the server's memory and
eventfds) and the capture reader (the netback's buffers) all receive descriptors from a peer
they do not trust. Every descriptor the kernel installs is ours to close from that moment, so
the parsing lives here once: anything malformed closes every descriptor that came with it and
raises, instead of each caller re-deriving how not to leak one.

What counts as malformed: an ancillary message that is not ``SOL_SOCKET``/``SCM_RIGHTS`` (on a
unix stream socket without SO_PASSCRED nothing else can arrive, so another kind means the
socket is not what we think), or a payload that is not a whole number of descriptors.
``MSG_CTRUNC`` (the peer sent more descriptors than the buffer holds) is not: the kernel has
already closed those that did not fit, nothing leaks, and the callers enforce their own limits
(one per ivshmem message; none at all on a connected event channel).
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterable

from shared.faults import PeerFault

FD_SIZE = array.array("i").itemsize
Ancillary = Iterable[tuple[int, int, bytes]]


class AncillaryError(PeerFault):
    """The peer's ancillary data is not a list of descriptors (its descriptors are closed)."""


def fd_space(max_fds: int) -> int:
    """The ancillary buffer size for up to ``max_fds`` descriptors in one message."""
    return socket.CMSG_SPACE(max_fds * FD_SIZE)


def close_all(fds: Iterable[int]) -> None:
    """Close each descriptor, ignoring those already closed (teardown must not stop halfway)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fds_from(ancillary: Ancillary) -> list[int]:
    """Every descriptor in ``ancillary`` (recvmsg's second item), in order. Refuses anything
    else with AncillaryError after closing every descriptor it found, so a caller that gets
    an exception owns nothing."""
    fds: list[int] = []
    bad = ""
    for level, kind, payload in ancillary:
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            bad = bad or f"unexpected control message (level {level}, type {kind})"
            continue
        whole = len(payload) - len(payload) % FD_SIZE
        got = array.array("i")
        got.frombytes(payload[:whole])
        fds.extend(got)
        if whole != len(payload):
            bad = bad or f"truncated SCM_RIGHTS message ({len(payload)} bytes)"
    if bad:
        close_all(fds)
        raise AncillaryError(bad)
    return fds


def recv_with_fds(sock: socket.socket, nbytes: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One recvmsg: up to ``nbytes`` bytes and the descriptors that came with them."""
    data, ancillary, _flags, _addr = sock.recvmsg(nbytes, fd_space(max_fds))
    return data, fds_from(ancillary)
