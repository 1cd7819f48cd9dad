"""KickChannel and the ping-pong tool, fast tier: socketpair channels plus eventfd doorbells."""

from __future__ import annotations

import os
import select
import socket
import threading

import pytest

from shared.plumbing.channel import ChannelClosed, EventChannel
from shared.plumbing.doorbell import drain_eventfd
from shared.plumbing.doorbell.kickchannel import STREAM_EVERY, KickChannel
from shared.plumbing.doorbell.roundtrip import RoundTrips, follow, lead


class FakeBell:
    """A doorbell between two eventfds: notify rings the other side's, fileno is ours."""

    def __init__(self, mine: int, theirs: int) -> None:
        self.mine, self.theirs = mine, theirs
        self.closed = False

    def notify(self) -> None:
        os.eventfd_write(self.theirs, 1)

    def fileno(self) -> int:
        return self.mine

    def drain(self) -> int:
        return drain_eventfd(self.mine)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def ends():
    a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ea, eb = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2))
    a = KickChannel(EventChannel(sock=a_sock), FakeBell(ea, eb))
    b = KickChannel(EventChannel(sock=b_sock), FakeBell(eb, ea))
    yield a, b
    for ch in (a, b):
        try:
            ch.close()
        except OSError:
            pass
    os.close(ea)
    os.close(eb)


def readable(fd: int, timeout: float = 0.5) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


def test_kicks_go_through_the_doorbell_not_the_stream(ends) -> None:
    a, b = ends
    assert not readable(b.fileno(), 0.05)
    a.notify()
    a.notify()
    assert not readable(b.chan.fileno(), 0.05)  # nothing on the message stream
    assert readable(b.fileno())  # the epoll fd wakes the caller's poll()
    got = b.recv()
    assert got.kicks == 2 and got.messages == []
    assert not readable(b.fileno(), 0.05)
    assert (a.kicks_sent, b.kicks_received) == (2, 2)


def test_messages_and_stream_kicks_still_arrive(ends) -> None:
    a, b = ends
    a.send({"state": "Initialising", "name": "g1"})
    a.chan.notify()  # a peer on the plain EventChannel: a "!" kick is still counted
    a.notify()
    assert readable(b.fileno())
    got = b.recv()
    while got.kicks < 2 or not got.messages:
        assert readable(b.fileno())
        more = b.recv()
        got.kicks += more.kicks
        got.messages += more.messages
    assert got.messages == [{"state": "Initialising", "name": "g1"}]
    assert got.kicks == 2


def test_fds_pass_with_messages(ends) -> None:
    a, b = ends
    r, w = os.pipe()
    a.send({"state": "Initialised"}, (r,))
    assert readable(b.fileno())
    got = b.recv()
    assert got.messages == [{"state": "Initialised"}] and len(got.fds) == 1
    os.write(w, b"x")
    assert os.read(got.fds[0], 1) == b"x"
    for fd in (r, w, *got.fds):
        os.close(fd)


def test_peer_closing_raises_channel_closed(ends) -> None:
    a, b = ends
    a.chan.close()
    assert readable(b.fileno())
    with pytest.raises(ChannelClosed):
        b.recv()


def test_close_closes_all_or_leaves_a_shared_doorbell(ends) -> None:
    a, b = ends
    ep, chan_fd = a.fileno(), a.chan.fileno()
    a.close()
    assert a.doorbell.closed
    for fd in (ep, chan_fd):
        with pytest.raises(OSError):
            os.fstat(fd)
    s1, s2 = socket.socketpair()
    bell = FakeBell(*(os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)))
    c = KickChannel(EventChannel(sock=s1), bell, own_doorbell=False)
    c.close()
    s2.close()
    assert not bell.closed  # the netfront keeps its VFIO device across reconnections
    os.close(bell.mine)
    os.close(bell.theirs)


def test_ping_pong_measures_round_trips(ends) -> None:
    a, b = ends
    answered: list[int] = []
    th = threading.Thread(target=lambda: answered.append(follow(b, timeout=20)))
    th.start()
    samples, lost, extra = lead(a, rounds=200, warmup=10)
    th.join(20)
    assert lost == 0 and extra == 0 and len(samples) == 200 and answered == [210]
    rt = RoundTrips.of("fake", samples, lost, extra)
    assert 0 < rt.min_us <= rt.p50_us <= rt.p99_us


def test_a_kick_storm_cannot_hold_back_messages(ends) -> None:
    a, b = ends
    a.send({"state": "Closing"})
    seen = []
    for _ in range(STREAM_EVERY + 1):
        a.notify()  # a kick before every wake-up: the fast path would skip the stream
        assert readable(b.fileno())
        seen += b.recv().messages
    assert seen == [{"state": "Closing"}]


def test_kick_channel_offers_the_event_channel_api(ends) -> None:
    """KickChannel stands in for EventChannel in code others change: every public name of an
    EventChannel must exist on it too (this fails when the EventChannel API grows)."""
    a, _b = ends
    names = {n for n in dir(a.chan) if not n.startswith("_")} - {"sock", "fd"}
    assert names <= set(dir(a)), names - set(dir(a))
    a.send_timeout = 1.5
    assert a.chan.send_timeout == 1.5 == a.send_timeout
    assert a.recv(keep_fds=False).kicks == 0


def test_around_closes_the_stream_when_the_doorbell_fails() -> None:
    s1, s2 = socket.socketpair()
    chan = EventChannel(sock=s1)

    def broken():
        raise OSError("no device")

    with pytest.raises(OSError):
        KickChannel.around(chan, broken)
    assert s1.fileno() == -1
    s2.close()
