"""Where a netback finds its frontend: the event socket frontends connect to (namespace
placement), which admits one frontend at a time, or the guest's virtio-serial port socket
(QEMU placement), which carries the guest's successive frontends on one stream.

A full fd table (EMFILE) makes accept() fail while the socket stays readable: the listener
then rests ACCEPT_BACKOFF instead of spinning, and counts it.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Callable

from shared.endpoint.connection import FAULT_LABEL
from shared.faults import kind_of
from shared.plumbing.channel import EventChannel
from shared.plumbing.transport import listen_unix

log = logging.getLogger("netback")
#: seconds the event listener rests after accept() fails (EMFILE) instead of spinning
ACCEPT_BACKOFF = 0.1
_TAKEN = b'{"state":"Closing","error":"this vif already has a frontend"}\n'


class EventListener:
    """The event socket of one vif. ``wake_fd`` becomes readable when the netback is asked
    to stop; ``counters`` gets ``accept_errors``."""

    def __init__(self, path: str, vif: str, wake_fd: int, counters: dict[str, int]) -> None:
        self.path = path
        self.vif = vif
        self.wake_fd = wake_fd
        self.counters = counters
        self._last_errno = 0
        self.sock = listen_unix(path)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, check_stop: Callable[[], bool]) -> EventChannel:
        """The next frontend's channel (``check_stop`` raises Shutdown to end the wait)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
        while True:
            check_stop()
            if poller.poll(1000):
                check_stop()
                try:
                    sock, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:  # EMFILE/ENFILE: rest instead of spinning or dying
                    self._accept_failed(e)
                    rest = select.poll()  # the listener stays readable: wait on stop only
                    rest.register(self.wake_fd, select.POLLIN)
                    rest.poll(int(ACCEPT_BACKOFF * 1000))
                    continue
                return EventChannel(sock=sock)

    def knocking(self) -> bool:
        """Is another frontend knocking?"""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def refuse(self) -> bool:
        """Tell a second frontend this vif is taken. False if accept() failed (no fd left):
        the caller then stops polling the listener for ACCEPT_BACKOFF."""
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            self._accept_failed(e)
            return False
        with sock:
            sock.setblocking(False)
            try:
                sock.send(_TAKEN)
            except OSError:
                pass
        return True

    def _accept_failed(self, e: OSError) -> None:
        """A connection that failed before it began: the OS's fault, booked as one (the log
        line only for the first and for each new errno, as it may repeat every backoff)."""
        kind = kind_of(e)
        self.counters["accept_errors"] += 1
        self.counters[f"faults_{kind}"] += 1
        if self.counters["accept_errors"] == 1 or e.errno != self._last_errno:
            log.warning("%s: %s: accept() on the event socket failed: %s; retrying in %gs",
                        self.vif, FAULT_LABEL[kind], e, ACCEPT_BACKOFF)
        self._last_errno = e.errno or 0

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

