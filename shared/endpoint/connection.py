"""One connection lifecycle for both ends (Linux: xenbus's otherend state machine, as
xen-netback's ``interface.c`` and xen-netfront's ``netfront_probe``/``netback_changed`` use it).

An end is long-lived (its device, control socket and counters survive every connection);
connections come and go. Each one runs the same way, whichever end:

1. open the channel (``open_channel``);
2. handshake (``handshake``) in the end's waiting state (InitWait for a backend,
   Initialising for a frontend);
3. attach the data paths (``attach``): Connected;
4. serve the data loop (``serve``) until the peer goes, lies, restarts or we stop;
5. tear down in one order: detach the data paths and their region (``detach``), close the
   channel, Closed.

A peer that restarts on the same stream (``PeerRestarted``) goes back to step 2 on it. A
fault is logged and counted by its kind (``shared.faults``), the peer is told why, and the
end goes back to step 1 after a pause. Shutdown tells the peer goodbye and ends ``run``.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import traceback
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

from shared.endpoint.lifecycle import Shutdown, send_quietly, stop_on_signals
from shared.faults import KINDS, kind_of
from shared.plumbing.channel import ChannelClosed, EventChannel
from shared.plumbing.netdev import NetDevice
from shared.protocol.ring import require_tso
from shared.protocol.stats import RingStats
from shared.protocol.xenbus import XenbusState

#: how a log line names each kind of fault
FAULT_LABEL = {"peer": "peer fault", "own": "own fault", "os": "OS fault"}

Conn = TypeVar("Conn")


class PeerRestarted(Exception):
    """A new hello arrived on a connected stream: the peer started again behind the same
    channel (QEMU placement: the virtio-serial stream survives the frontend process)."""

    def __init__(self, hello: dict) -> None:
        super().__init__("peer sent a new hello")
        self.hello = hello


class Endpoint(ABC, Generic[Conn]):
    """What both ends share: state, counters, the stop request, and the connection loop.
    Subclasses plug in the end-specific steps (the abstract methods)."""

    #: the state while the handshake waits for the peer
    waiting: ClassVar[XenbusState]
    #: the errors that are the peer's doing (or the path to it): it is told, we carry on.
    #: Anything else that escapes a connection is also survived, but logged as our bug.
    peer_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, name: str, log: logging.Logger) -> None:
        require_tso()  # the shared-memory code relies on x86's ordering
        self.name = name
        self.log = log
        self.tx_stats = RingStats()
        self.rx_stats = RingStats()
        self.counters: dict[str, int] = {"connects": 0, "disconnects": 0,
                                         "internal_errors": 0, "lost_wakeups": 0}
        for kind in KINDS:
            self.counters[f"faults_{kind}"] = 0
        self.last_error = ""
        self.state = XenbusState.Initialising
        self.peer = ""
        self.features: dict[str, bool] = {}
        self._stop = threading.Event()
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- the end-specific steps ---------------------------------------------------------
    @abstractmethod
    def open_device(self) -> NetDevice:
        """The TAP at this end's outer edge (made once, in ``__init__``; it outlives
        connections). Tests plug in a stand-in by overriding this."""

    @abstractmethod
    def open_channel(self) -> EventChannel:
        """Step 1: the channel to the next peer (blocking; ``check_stop`` ends the wait)."""

    @abstractmethod
    def handshake(self, chan: EventChannel, first: dict | None) -> Any:
        """Step 2: negotiate; ``first`` is a hello already read (a restarted peer)."""

    @abstractmethod
    def attach(self, chan: EventChannel, negotiated: Any) -> Conn:
        """Step 3: build the data paths over what the handshake produced."""

    @abstractmethod
    def serve(self, conn: Conn) -> None:
        """Step 4: the data loop; it ends only by an exception."""

    @abstractmethod
    def detach(self, conn: Conn) -> None:
        """Step 5: release the data paths, then their region: nothing of it stays mapped."""

    def restarted(self, conn: Conn) -> None:
        """The peer said hello again on a connected stream (before ``detach``)."""

    def peer_left(self, e: ChannelClosed) -> None:
        self.log.info("%s: %s went away (%s)", self.name, self.peer or "peer", e)

    def booked(self, e: Exception, internal: bool, why: str) -> str:
        """End-specific books of a fault; returns what the peer is told."""
        return why

    def fault_line(self, why: str) -> str:
        return f"disconnecting {self.peer or '?'}: {why}"

    def session_ended(self, faulted: bool) -> None:
        """After teardown, before the next channel (e.g. pause, carrier off)."""

    def services(self) -> list:
        """Servers (start()/close()) that live as long as ``run``: control sockets."""
        return []

    def close(self) -> None:
        """Release what the end holds besides its connections (the device, sockets)."""
        for s in self.services():
            s.close()
        for fd in (self.wake_fd, self._wake_w):
            os.close(fd)

    # --- the lifecycle ------------------------------------------------------------------
    def run(self) -> None:
        stop_on_signals()
        for s in self.services():
            s.start()
        try:
            while True:
                self.session_ended(self.session())
        except Shutdown as e:
            self.log.info("%s: %s, shutting down", self.name, e)
        finally:
            self.close()

    def stop(self) -> None:
        """Ask ``run`` (in another thread) to return."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def stopping(self) -> bool:
        return self._stop.is_set()

    def check_stop(self) -> bool:
        """False, or Shutdown if a stop was asked for: a ``stop`` callback for blocking waits."""
        if self._stop.is_set():
            raise Shutdown("stop requested")
        return False

    def rest(self, seconds: float) -> None:
        """Pause, but not past a stop request."""
        if self._stop.wait(seconds):
            raise Shutdown("stop requested")

    def session(self) -> bool:
        """One channel, from opening it to its end. True if it ended in a fault."""
        chan: EventChannel | None = None
        conn: Conn | None = None
        try:
            chan = self.open_channel()
            first = None
            while True:
                self.state = self.waiting
                conn = self.attach(chan, self.handshake(chan, first))
                self.state = XenbusState.Connected
                self.counters["connects"] += 1
                try:
                    self.serve(conn)
                except PeerRestarted as e:
                    _drop_locals(e)
                    first = e.hello
                    self.restarted(conn)
                self._detach(conn)
                conn = None
        except ChannelClosed as e:
            _drop_locals(e)
            self.peer_left(e)
        except Shutdown as e:
            _drop_locals(e)
            if chan is not None:
                send_quietly(chan, {"state": "Closing"})
            raise
        except Exception as e:  # noqa: BLE001 - no fault of a connection takes the end down
            _drop_locals(e)
            if self.stopping():
                raise Shutdown("stop requested") from None
            self.fault(chan, e)
            return True
        finally:
            if conn is not None:
                self._detach(conn)
            if chan is not None:
                chan.close()
            self.state = XenbusState.Closed
        return False

    def fault(self, chan: EventChannel | None, e: Exception) -> None:
        """Log and count a fault by its kind, and tell the peer why it is dropped."""
        kind = kind_of(e)
        self.counters[f"faults_{kind}"] += 1
        internal = not isinstance(e, self.peer_errors)
        if internal:
            self.counters["internal_errors"] += 1
            self.log.error("%s: internal error serving %s", self.name, self.peer or "?",
                           exc_info=e)
        why = f"{'internal ' if internal else ''}{type(e).__name__}: {e}"
        self.last_error = why
        tell = self.booked(e, internal, why)
        self.log.error("%s: %s: %s", self.name, FAULT_LABEL[kind], self.fault_line(why))
        if chan is not None:
            send_quietly(chan, {"state": "Closing", "error": tell})

    def _detach(self, conn: Conn) -> None:
        """Teardown never raises: a step that fails is logged and counted (as an internal
        error of its kind), and the end goes on to serve the next peer."""
        try:
            self.detach(conn)
        except Exception as e:  # noqa: BLE001 - a teardown bug must not take the end down
            self.counters[f"faults_{kind_of(e)}"] += 1
            self.counters["internal_errors"] += 1
            self.log.error("%s: teardown of the connection to %s failed", self.name,
                           self.peer or "?", exc_info=e)
        finally:
            if self.state == XenbusState.Connected:
                self.counters["disconnects"] += 1
            self.state = XenbusState.Closed

    def stats(self, role: str, domid: int) -> dict:
        """The part of a ``stats`` answer both ends give alike."""
        return {"role": role, "name": self.name, "peer": self.peer, "pid": os.getpid(),
                "domid": domid, "state": self.state.name, "features": self.features}

    def found_unannounced(self, cfd: int, what: str) -> None:
        """The idle timer found work no notification announced. Unless a kick is merely on
        its way on ``cfd``, that notification was lost: counted, never relied on."""
        quick = select.poll()
        quick.register(cfd, select.POLLIN)
        if not quick.poll(0):
            self.counters["lost_wakeups"] += 1
            self.log.warning("%s: found %s no notification announced (lost wake-up)",
                             self.name, what)


def _drop_locals(e: BaseException) -> None:
    """Clear the locals of the finished frames an exception's traceback keeps (the data
    loop's rings and views of the region), so teardown can close the region now; a log
    handler that keeps the record (and so the traceback) must not pin the mapping."""
    traceback.clear_frames(e.__traceback__)
