"""Queue workers: one process per queue of a multi-queue connection, at either end.

CPython runs Python on one core per process at a time (the GIL), so N queues served in parallel
take N processes (docs/performance.md "Multi-queue" has the measurement). The end's own process
(the *master*) keeps what belongs to the whole device - the handshake channel, the control
socket, the event listener, the device itself - and, once a connection with several queues is
negotiated and its region mapped, forks one worker per queue (``WorkerPool.start``). A worker
inherits the mappings and keeps only its queue's descriptors (its event channel, its device
queue, the region's memfd): every other descriptor is closed at once, so a worker never holds
the handshake channel open past the master, nor another queue's TAP queue (the kernel would
keep steering frames to it). It dies with the master (PR_SET_PDEATHSIG).

The master and each worker talk over a SOCK_SEQPACKET pair, one JSON object per message:
the master asks ``stats`` or ``stop``; the worker answers with a snapshot of its counters
(also pushed every STATS_PERIOD, so even a killed worker's counts are recent), reports events
(``{"event": ...}``: a stalled RX queue) and, when it ends, its final snapshot and the fault
that ended it, if any. A worker that ends without being asked (a fault, a crash, a kill) is
what ``failed`` returns: the master then takes the whole device down, as Linux disconnects the
whole vif when one queue fails (``xenvif_fatal_tx_err``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shared.faults import OSFault, OwnFault

#: seconds between the snapshots a worker pushes on its own
STATS_PERIOD = 0.5
#: how long a worker asked to stop may take before it is killed
STOP_GRACE = 5.0
#: a message's largest size (a snapshot is a few KiB)
MAX_MESSAGE = 1 << 18
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("pvnet.workers")


class WorkerDied(OSFault):
    """A queue worker ended without reporting a fault of its peer (killed, crashed): the
    connection's device is taken down and comes back at the next connection."""


class WorkerCrashed(OwnFault):
    """A queue worker ended on an error of ours (the worker logged its traceback)."""


def _send(sock: socket.socket, msg: dict) -> None:
    try:
        sock.send(json.dumps(msg, separators=(",", ":")).encode())
    except OSError:
        pass  # the other side is gone: it finds out by itself


@dataclass
class Worker:
    """The master's view of one worker."""

    index: int
    pid: int
    sock: socket.socket
    #: its latest snapshot, and how many it sent
    report: dict | None = None
    seq: int = 0
    #: what it said when it ended: its fault (None: none), and whether it said anything
    fault: dict | None = None
    said_goodbye: bool = False
    #: how it ended ("" while running): "exited 0", "killed by SIGKILL", ...
    ended: str = ""
    reaped: bool = False

    def why(self) -> str:
        """How it ended, for a log line and the peer."""
        return f"queue {self.index} worker (pid {self.pid}) {self.ended or 'ended'}"


class WorkerLink:
    """A worker's end of its link: answers the master from a thread of its own while the
    queue's data loop runs in the main one (a snapshot is a read of counters, as the
    control thread of a single-queue end does)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.snapshot: Callable[[], dict] = dict
        self.stop: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None

    def serve(self, snapshot: Callable[[], dict], stop: Callable[[], None]) -> None:
        """Start answering: ``snapshot()`` gives the counters, ``stop()`` ends the loop."""
        self.snapshot, self.stop = snapshot, stop
        self._thread = threading.Thread(target=self._run, name="worker-link", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            if not poller.poll(int(STATS_PERIOD * 1000)):
                _send(self.sock, {"stats": self.snapshot()})
                continue
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:  # the master is gone (PDEATHSIG follows), or closed the link
                self.stop()
                return
            cmd = json.loads(data).get("cmd")
            if cmd == "stats":
                _send(self.sock, {"stats": self.snapshot()})
            elif cmd == "stop":
                self.stop()

    def event(self, **what: object) -> None:
        """Tell the master something only it can act on (e.g. this queue's RX stalled)."""
        _send(self.sock, {"event": what})

    def goodbye(self, final: dict, fault: dict | None) -> None:
        _send(self.sock, {"stats": final, "final": True, "fault": fault})


class WorkerPool:
    """The workers of one connection, seen from the master."""

    def __init__(self, name: str,
                 on_event: Callable[[int, dict], None] | None = None) -> None:
        self.name = name
        self.on_event = on_event
        self.workers: list[Worker] = []
        self.stopping = False
        self._cond = threading.Condition()
        self._ev_r, self._ev_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._reader: threading.Thread | None = None

    # --- starting -----------------------------------------------------------------------
    def start(self, n: int, body: Callable[[int, WorkerLink], None],
              keep: Callable[[int], Iterable[int]],
              describe: Callable[[BaseException], dict | None]) -> None:
        """Fork ``n`` workers; worker ``i`` runs ``body(i, link)`` with only the descriptors
        ``keep(i)`` (and its link, and stdio) open. ``describe`` turns what ended a worker
        into the fault it reports (None: a requested stop)."""
        for i in range(n):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            pid = os.fork()
            if pid == 0:  # the worker: it never returns from here
                mine.close()
                _child(i, theirs, body, set(keep(i)), describe)
            theirs.close()
            self.workers.append(Worker(i, pid, mine))
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-workers",
                                        daemon=True)
        self._reader.start()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if not w.ended]

    # --- while running ------------------------------------------------------------------
    @property
    def event_fd(self) -> int:
        """Readable once a worker has ended (the master's loop polls it)."""
        return self._ev_r

    def failed(self) -> Worker | None:
        """The first worker that ended without being asked to, if any."""
        with self._cond:
            return next((w for w in self.workers if w.ended), None)

    def snapshot(self, timeout: float = 1.0) -> list[dict | None]:
        """Every worker's counters, fresh: asked now, waited for at most ``timeout``."""
        with self._cond:
            want = [w.seq + 1 for w in self.workers]
            for w in self.workers:
                if not w.ended:
                    _send(w.sock, {"cmd": "stats"})
            self._cond.wait_for(lambda: all(w.ended or w.seq >= s
                                            for w, s in zip(self.workers, want, strict=True)),
                                timeout)
            return [w.report for w in self.workers]

    def _read(self) -> None:
        poller = select.poll()
        by_fd = {w.sock.fileno(): w for w in self.workers}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while by_fd:
            for fd, _ev in poller.poll():
                if fd == self._wake_r:
                    return
                w = by_fd[fd]
                try:
                    data = w.sock.recv(MAX_MESSAGE)
                except OSError:
                    data = b""
                if data:
                    self._message(w, json.loads(data))
                    continue
                poller.unregister(fd)
                del by_fd[fd]
                self._ended(w)

    def _message(self, w: Worker, msg: dict) -> None:
        if "event" in msg:
            if self.on_event is not None:
                self.on_event(w.index, msg["event"])
            return
        with self._cond:
            if msg.get("stats") is not None:
                w.report = msg["stats"]
                w.seq += 1
            if msg.get("final"):
                w.said_goodbye, w.fault = True, msg.get("fault")
            self._cond.notify_all()

    def _ended(self, w: Worker) -> None:
        status = self._reap(w, wait=1.0)
        with self._cond:
            w.ended = status or "closed its link"
            self._cond.notify_all()
        if not self.stopping:
            log.warning("%s: %s", self.name, w.why())
        try:
            os.write(self._ev_w, b"x")
        except OSError:
            pass

    def _reap(self, w: Worker, wait: float) -> str:
        """waitpid ``w`` for up to ``wait`` seconds; how it ended ("" if it still runs)."""
        end = time.monotonic() + wait
        while True:
            with self._cond:
                if w.reaped:
                    return w.ended
                try:
                    pid, status = os.waitpid(w.pid, os.WNOHANG)
                except ChildProcessError:
                    w.reaped = True
                    return "gone"
                if pid:
                    w.reaped = True
                    return _status(status)
            if time.monotonic() >= end:
                return ""
            time.sleep(0.01)

    # --- stopping -----------------------------------------------------------------------
    def stop(self, grace: float = STOP_GRACE) -> list[Worker]:
        """Ask every worker to stop, kill those that do not within ``grace``, reap them all,
        release the links. Never raises. Returns the workers (their final reports)."""
        self.stopping = True
        for w in self.workers:
            if not w.ended:
                _send(w.sock, {"cmd": "stop"})
        end = time.monotonic() + grace
        for w in self.workers:
            if not self._reap(w, max(0.0, end - time.monotonic())):
                log.warning("%s: queue %d worker (pid %d) did not stop; killing it",
                            self.name, w.index, w.pid)
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap(w, 5.0)
        if self._reader is not None:  # let it read the last goodbyes, then end it
            with self._cond:
                self._cond.wait_for(lambda: all(w.ended for w in self.workers), 1.0)
            os.write(self._wake_w, b"x")
            self._reader.join(5)
        for w in self.workers:
            w.sock.close()
        for fd in (self._ev_r, self._ev_w, self._wake_r, self._wake_w):
            os.close(fd)
        return self.workers


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited {os.waitstatus_to_exitcode(status)}"


def _child(index: int, sock: socket.socket, body: Callable[[int, WorkerLink], None],
           keep: set[int], describe: Callable[[BaseException], dict | None]) -> None:
    """A worker's whole life, after fork: never returns (``os._exit``)."""
    code = 1
    try:
        gc.freeze()  # what the master left in memory is never collected (nor its fds closed)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master stops us on ^C
        _close_others(keep | {0, 1, 2, sock.fileno()})
        link = WorkerLink(sock)
        fault = None
        try:
            body(index, link)
        except BaseException as e:  # noqa: BLE001 - reported to the master, then we exit
            fault = describe(e)
        link.goodbye(link.snapshot(), fault)
        code = 0 if fault is None else 2
    finally:
        os._exit(code)


def _close_others(keep: set[int]) -> None:
    """Close every inherited descriptor but ``keep``: the handshake channel, the listener,
    the control socket, the other queues' channels and TAP queues."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
