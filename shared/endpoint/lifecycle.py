"""What both ends' processes do the same way around their data loops: stop on a signal, and
tell a peer goodbye without trusting it to listen. The connection's life itself (states,
reconnect, teardown) is ``shared.endpoint.connection``."""

from __future__ import annotations

import signal
import threading

from shared.plumbing.channel import ChannelClosed, ChannelError, EventChannel


class Shutdown(BaseException):
    """SIGTERM/SIGINT or stop(): close the connection politely and exit. A BaseException so
    that no handler meant for a peer's faults can swallow it."""


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise Shutdown in the main thread (a no-op in any other thread,
    where the tests run an end in-process)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, _frame):
        raise Shutdown(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def send_quietly(chan: EventChannel, msg: dict, timeout: float = 1.0) -> None:
    """Best effort, bounded: the peer may be gone, or not reading."""
    chan.send_timeout = min(chan.send_timeout or timeout, timeout)
    try:
        chan.send(msg)
    except (ChannelClosed, ChannelError, OSError):
        pass
