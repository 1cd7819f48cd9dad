"""The channel the data loops use when kicks ride a doorbell: KickChannel.

An EventChannel carries the handshake's messages, a doorbell (shared/plumbing/doorbell/__init__.py)
the kicks; KickChannel puts both behind the EventChannel API, so netback's and netfront's loops and
handshakes run unchanged over either transport.
"""

from __future__ import annotations

import select
from collections.abc import Callable

from shared.plumbing.channel import EventChannel, Received
from shared.plumbing.doorbell import Doorbell

STREAM_EVERY = 8  # KickChannel reads the message stream at least every this many kick wake-ups


class KickChannel:
    """An EventChannel for messages plus a doorbell for kicks, behind the EventChannel API.

    ``fileno()`` is an epoll fd that is readable when either is, so a caller's poll() loop
    works unchanged; ``recv()`` drains them (doorbell kicks counted like ``!`` bytes; stream
    kicks from a peer on a plain EventChannel still count).
    ``own_doorbell`` False leaves the doorbell open on close (the netfront keeps its VFIO
    device across reconnections).
    """

    def __init__(self, chan: EventChannel, doorbell: Doorbell, own_doorbell: bool = True
                 ) -> None:
        self.chan = chan
        self.doorbell = doorbell
        self.own_doorbell = own_doorbell
        self._bell_fd = doorbell.fileno()
        self._chan_fd = chan.fileno()
        self._ep = select.epoll(2)
        self._ep.register(self._chan_fd, select.EPOLLIN)
        self._ep.register(self._bell_fd, select.EPOLLIN)
        self.kicks_sent = 0
        self.kicks_received = 0
        self._kick_only = 0  # wake-ups since the message stream was last read

    @classmethod
    def around(cls, chan: EventChannel, open_doorbell: Callable[[], Doorbell],
               own_doorbell: bool = True) -> KickChannel:
        """Wrap ``chan``, opening the doorbell now; if that fails, ``chan`` is closed too
        (the one-line integration point of netback and netfront)."""
        try:
            return cls(chan, open_doorbell(), own_doorbell)
        except BaseException:
            chan.close()
            raise

    @property
    def send_timeout(self) -> float | None:
        """The message stream's (see EventChannel.send)."""
        return getattr(self.chan, "send_timeout", None)

    @send_timeout.setter
    def send_timeout(self, value: float | None) -> None:
        self.chan.send_timeout = value

    def fileno(self) -> int:
        return self._ep.fileno()

    def notify(self) -> None:
        self.doorbell.notify()
        self.kicks_sent += 1

    def send(self, message: dict, fds: tuple[int, ...] = ()) -> None:
        self.chan.send(message, fds)

    def recv(self, keep_fds: bool = True) -> Received:
        """Drain the doorbell, and the message stream unless this wake-up was a kick.

        The kick fast path is one eventfd read: in the guest, under TCG, every further syscall
        costs round-trip time (an epoll_wait(0) per wake-up to ask which fd is ready cost
        ~10 us). A stream left unread stays readable (level-triggered), so the caller's next
        poll returns at once; and it is read on every ``STREAM_EVERY``-th kick wake-up anyway,
        so a steady stream of kicks cannot hold back a "Closing" message or an EOF."""
        kicks = self.doorbell.drain()
        if kicks:
            self.kicks_received += kicks
            if self._kick_only < STREAM_EVERY:
                self._kick_only += 1
                return Received(kicks=kicks)
        self._kick_only = 0
        got = self.chan.recv() if keep_fds else self.chan.recv(keep_fds=False)
        self.kicks_received += got.kicks
        got.kicks += kicks
        return got

    def close(self) -> None:
        self._ep.close()
        self.chan.close()
        if self.own_doorbell:
            self.doorbell.close()
