"""SCM_RIGHTS parsing (shared/plumbing/fdpass.py): descriptors kept or closed, never leaked or
trusted."""

from __future__ import annotations

import array
import gc
import os
import socket

import pytest

from shared.plumbing.channel import ChannelError, EventChannel
from shared.plumbing.fdpass import AncillaryError, fds_from, recv_with_fds
from shared.plumbing.ivshmem import ProtocolError, recv_msg


def open_fds() -> set[int]:
    gc.collect()
    return {int(n) for n in os.listdir("/proc/self/fd")}


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def rights(*fds: int) -> tuple[int, int, bytes]:
    return socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_descriptors_are_returned_in_order(pair) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        socket.send_fds(a, [b"x"], [r, w])
        data, fds = recv_with_fds(b, 16, 4)
        assert data == b"x" and len(fds) == 2
        assert [os.fstat(f).st_ino for f in fds] == [os.fstat(r).st_ino, os.fstat(w).st_ino]
        for f in fds:
            os.close(f)
    finally:
        os.close(r)
        os.close(w)


def test_a_truncated_scm_rights_payload_is_refused_and_its_fds_closed() -> None:
    r, w = os.pipe()
    level, kind, payload = rights(r, w)
    with pytest.raises(AncillaryError, match="truncated"):
        fds_from([(level, kind, payload[:-1])])
    assert not is_open(r)  # the whole one was ours and is closed
    os.close(w)  # the cut one never was ours (the parser cannot know it)


def test_a_control_message_of_another_kind_is_refused_and_every_fd_closed() -> None:
    r, w = os.pipe()
    creds = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, bytes(12))
    with pytest.raises(AncillaryError, match="unexpected control message"):
        fds_from([rights(r), creds, rights(w)])
    assert not is_open(r) and not is_open(w)
    with pytest.raises(AncillaryError):
        fds_from([(socket.IPPROTO_IP, socket.SCM_RIGHTS, b"")])


def test_credentials_on_a_real_socket_are_refused_without_a_leak(pair) -> None:
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    r, w = os.pipe()
    before = open_fds()
    socket.send_fds(a, [b"x"], [r])
    with pytest.raises(AncillaryError):
        recv_with_fds(b, 16, 8)
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_more_descriptors_than_room_keeps_those_that_fit_and_leaks_none(pair) -> None:
    a, b = pair
    r, w = os.pipe()
    before = open_fds()
    socket.send_fds(a, [b"x"], [r] * 6)
    data, fds = recv_with_fds(b, 16, 2)
    assert data == b"x" and len(fds) == 2  # the kernel closed the other four
    for f in fds:
        os.close(f)
    assert open_fds() == before
    os.close(r)
    os.close(w)


def test_the_event_channel_reports_bad_ancillary_data_as_a_peer_fault(pair) -> None:
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    chan = EventChannel(sock=b)
    a.send(b"!")
    with pytest.raises(ChannelError):
        chan.recv()


def test_the_ivshmem_client_reports_bad_ancillary_data_as_a_protocol_error(pair) -> None:
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    r, w = os.pipe()
    before = open_fds()
    socket.send_fds(a, [(0).to_bytes(8, "little")], [r])
    with pytest.raises(ProtocolError):
        recv_msg(b)
    assert open_fds() == before
    os.close(r)
    os.close(w)
