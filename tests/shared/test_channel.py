"""Event channel framing over a real unix socket: kicks, messages, fd passing, bad input."""

import os
import socket

import pytest

from shared.plumbing.channel import ChannelClosed, ChannelError, EventChannel
from shared.plumbing.transport import TransportError, create_memfd, map_memfd


@pytest.fixture
def ends():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ea, eb = EventChannel(sock=a), EventChannel(sock=b)
    yield ea, eb
    ea.close()
    eb.close()


def test_kicks_and_messages_interleave(ends):
    a, b = ends
    a.notify()
    a.send({"state": "InitWait", "features": {"feature-sg": True}})
    a.notify()
    a.notify()
    got = b.recv()
    assert got.kicks == 3
    assert got.messages == [{"state": "InitWait", "features": {"feature-sg": True}}]


def test_partial_message_waits_for_its_newline(ends):
    a, b = ends
    os.write(a.fileno(), b'{"state": "Conn')
    assert b.recv().messages == []
    os.write(a.fileno(), b'ected"}\n!')
    got = b.recv()
    assert got.messages == [{"state": "Connected"}] and got.kicks == 1


def test_memfd_passes_with_scm_rights(ends):
    a, b = ends
    fd, mem = create_memfd(1 << 20)
    mem[:5] = b"hello"
    a.send({"state": "Initialised"}, (fd,))
    got = b.recv()
    assert len(got.fds) == 1
    peer = map_memfd(got.fds[0], 1 << 20)
    assert peer[:5] == b"hello"
    for f in (fd, got.fds[0]):
        os.close(f)


def test_unsealed_or_wrong_size_region_is_refused():
    fd = os.memfd_create("x")
    os.ftruncate(fd, 1 << 20)
    with pytest.raises(TransportError, match="sealed"):
        map_memfd(fd)
    sealed, _mem = create_memfd(1 << 20)
    with pytest.raises(TransportError, match="handshake said"):
        map_memfd(sealed, 2 << 20)
    os.close(fd)
    os.close(sealed)


@pytest.mark.parametrize("junk", [b"{not json}\n", b"[1,2]\n", b"x" * (70 * 1024)])
def test_garbage_is_a_channel_error(ends, junk):
    a, b = ends
    a.sock.sendall(junk)
    with pytest.raises(ChannelError):
        for _ in range(10):
            b.recv()


def test_eof_is_channel_closed(ends):
    a, b = ends
    a.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ChannelClosed):
        b.recv()
