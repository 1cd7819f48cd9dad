"""`pvnet capture`, the producer side: frames crossing the vif into zbuf buffers
(shared/protocol/zbuf.py).

A reader attaches through the netback's control socket (``{"cmd": "capture", ...}``); the
reply carries a sealed memfd holding the two buffers (SCM_RIGHTS) and the socket is then the
capture's own: the producer sends one byte (``b"R"``) on it at each rotation (the wake-up),
the reader may send ``b"F"`` (flush: rotate now, used on exit), and its end closing is the
reader's death, which detaches the capture and releases everything (mapping, memfd, socket).

The data path calls ``tap.out`` (a frame written to the vif: from the guest) or ``tap.into``
(a frame read from the vif: to the guest) only when ``tap.on``; that check is the whole cost
of capture support while nobody captures. It never waits for the reader: the buffers are
guarded by a lock the data path only *tries*; a busy lock or no free buffer drops the frame,
counted (``capture_drops``; ``capture_drops_busy`` for the lock). The data path rotates when
the store buffer is full or its first record is ROTATE_TIMEOUT old; a watcher thread per
capture rotates only after the data path has been idle that long (so a trickle arrives and
the lock is almost never contended), answers flush requests and notices the reader leave.

What is recorded is exactly what crossed the vif, never guest memory read afterwards (a guest
can rewrite its pages, or a persistent RX buffer, at any time): capture reads only backend
memory. TX: the data path asks ``out_caplen`` before the vif write; if the capture wants more
than the header copy (``skb.head``), the frame is read once into backend memory
(``SkBuff.linearize``: through the CPU view, so each page is mapped - in lazy mode those maps
show up in ``grant_maps_on_touch`` and the packet is a ``tx_zerocopy_fail``) and that copy is
both sent and recorded. RX: while a reader wants incoming frames, the data path reads each
frame from the vif into its own memory first (``RxMechanism.bounce``), records it there and
then copies it into the guest's buffers (``wants_in``). A snaplen within
the header copy maps nothing. An RX frame has no header copy (netback reads it from the vif
straight into the guest's buffers, a grant copy), so capturing RX maps its first page(s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING

from shared.plumbing.control.protocol import Handoff
from shared.plumbing.transport import create_memfd
from shared.protocol.stats import counters
from shared.protocol.zbuf import HEADER, IN, MAX_BUFFER, MIN_BUFFER, OUT, RECORD, Buffer, Producer

if TYPE_CHECKING:  # an annotation only: the skb is TX's
    from backend.tx.skb import SkBuff

log = logging.getLogger("netback")
#: a store buffer with records is handed over after this long even if not full
ROTATE_TIMEOUT = 0.2
DEFAULT_BUFFER_KB = 1024
DEFAULT_SNAPLEN = 262144  # tcpdump's default: the whole frame
DIRECTIONS = {"out": (True, False), "in": (False, True), "both": (True, True)}
WAKE, FLUSH = b"R", b"F"


Totals = counters(
    "Totals", "capture_frames capture_drops capture_drops_busy capture_rotations "
    "capture_bad_acks capture_attaches capture_detaches",
    "Cumulative over every capture this netback served (the stats counters).")


class Capture:
    """One attached reader: its buffers, its socket and its watcher thread."""

    def __init__(self, tap: CaptureTap, snaplen: int, buffer_size: int, direction: str,
                 gen: int = 0) -> None:
        self.tap = tap
        self.fd, self.mem = create_memfd(2 * buffer_size, "pvnet-capture")
        self.producer = Producer(self.mem, buffer_size, gen)
        self.snaplen = min(snaplen, self.producer.max_caplen)
        self.want_out, self.want_in = DIRECTIONS[direction]
        self.lock = threading.Lock()
        self.closed = False
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self._last = (0, 0, 0, 0)  # producer counters already added to the tap's totals

    # --- data path (never waits) ---------------------------------------------------------
    def frame(self, direction: int, wirelen: int, data: Buffer) -> None:
        """Record ``data`` (the frame's first bytes, in backend memory) of a frame of
        ``wirelen`` bytes."""
        p = self.producer
        if not self.lock.acquire(False):  # the watcher is rotating: drop rather than wait
            p.drops += 1
            self.tap.totals.capture_drops_busy += 1
            return
        try:
            if self.closed:
                return
            caplen = min(self.snaplen, wirelen, len(data))
            rotations = p.rotations
            if not p.room(caplen):
                p.drops += 1
                return
            p.append(wirelen, direction, (data[:caplen],), caplen)
            if p.last - p.started >= ROTATE_TIMEOUT:  # traffic keeps coming: rotate here
                p.rotate()
            if p.rotations != rotations:
                self._wake()
        finally:
            self.lock.release()

    def _wake(self) -> None:
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # full (the reader is behind) or gone
                sock.send(WAKE, socket.MSG_DONTWAIT)

    # --- the watcher thread ----------------------------------------------------------------
    def adopt(self, sock: socket.socket) -> None:
        """The reply went out: the socket is ours; start watching it."""
        self.sock = sock
        os.close(self.fd)  # the reader has its copy; our mapping keeps the memory
        self.fd = -1
        self.thread = threading.Thread(target=self._watch, daemon=True,
                                       name=f"capture:{self.tap.name}")
        self.thread.start()

    def _watch(self) -> None:
        sock = self.sock
        assert sock is not None
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        try:
            while not self.closed:
                flush = False
                if poller.poll(int(ROTATE_TIMEOUT * 500)):
                    try:
                        data = sock.recv(4096, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        data = b"?"
                    except OSError:
                        data = b""
                    if not data:
                        break  # the reader went away
                    flush = FLUSH in data  # anything else a reader sends is ignored
                self._tick(flush)
        finally:
            self.tap.detach(self, "reader went away" if not self.closed else "")

    def _tick(self, flush: bool) -> None:
        """Rotate for a reader that asked (flush), or for frames that have waited while the
        data path captured nothing for ROTATE_TIMEOUT. While frames flow, the data path
        rotates by itself, so this thread takes the lock only when it is idle: the data path
        drops only if a frame comes in those few microseconds."""
        p = self.producer
        if not flush and not (p.pending and time.monotonic() - p.last >= ROTATE_TIMEOUT):
            return
        with self.lock:
            if self.closed:
                return
            rotated = p.rotate()
            self.tap.account(self)
        if rotated or flush:
            self._wake()

    # --- teardown ----------------------------------------------------------------------------
    def close(self, final_rotate: bool) -> None:
        """Release everything; with ``final_rotate`` (netback shutting down) hand over what
        the store buffer holds first, so a live reader still gets it before EOF. The socket
        is closed by the watcher thread itself (others only shut it down, which wakes it), so
        its descriptor number is never reused under the watcher's poll."""
        with self.lock:
            if not self.closed:
                if final_rotate and self.producer.pending and self.producer.rotate():
                    self._wake()
                self.tap.account(self)
                self.closed = True
                self.mem.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        sock = self.sock
        if sock is None:
            return
        if self.thread is None or self.thread is threading.current_thread():
            self.sock = None
            sock.close()
        else:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class CaptureTap:
    """What a netback's data path holds: ``on`` while a capture is attached."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.on = False
        self.capture: Capture | None = None
        self.totals = Totals()
        self._attach_lock = threading.Lock()

    # --- hooks, data path --------------------------------------------------------------
    def out_caplen(self, wirelen: int) -> int:
        """Before a vif write: the bytes a capture will record of this frame (0: none)."""
        c = self.capture
        return min(c.snaplen, wirelen) if c is not None and c.want_out else 0

    def out(self, skb: SkBuff) -> None:
        """A frame netback wrote to the vif (from the guest): recorded from the bytes that
        were sent - the copy a payload read made, or the header copy - never from guest
        pages. (A capture attached since ``out_caplen`` gets what the header copy holds.)"""
        c = self.capture
        if c is not None and c.want_out:
            c.frame(OUT, skb.size, skb.linear if skb.linear is not None else skb.head)

    def wants_in(self) -> bool:
        """Does a capture want incoming frames (then they pass through backend memory)?"""
        c = self.capture
        return c is not None and c.want_in

    def into(self, frame: Buffer, length: int) -> None:
        """A frame netback read from the vif (to the guest), as read, from backend memory."""
        c = self.capture
        if c is not None and c.want_in:
            c.frame(IN, length, frame)

    # --- control thread ------------------------------------------------------------------
    def attach(self, request: dict) -> Handoff:
        """``{"cmd": "capture", "snaplen": N, "buffer_kb": N, "direction": "in|out|both"}``."""
        snaplen = request.get("snaplen", DEFAULT_SNAPLEN)
        kb = request.get("buffer_kb", DEFAULT_BUFFER_KB)
        direction = request.get("direction", "both")
        if not isinstance(snaplen, int) or isinstance(snaplen, bool) or snaplen < 0:
            raise ValueError("snaplen must be a non-negative integer (0: whole frames)")
        if not isinstance(kb, int) or isinstance(kb, bool) \
                or not MIN_BUFFER <= kb * 1024 <= MAX_BUFFER:
            raise ValueError(f"buffer_kb must be an integer in {MIN_BUFFER // 1024}.."
                             f"{MAX_BUFFER // 1024}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
        with self._attach_lock:
            if self.capture is not None:
                raise ValueError(f"{self.name}: a capture is already attached")
            cap = Capture(self, snaplen or DEFAULT_SNAPLEN, kb * 1024, direction)
            self.capture = cap
            self.on = True  # before the reply: every frame after it is in the buffers

        def adopt(sock: socket.socket) -> None:
            cap.adopt(sock)
            self.totals.capture_attaches += 1
            log.info("%s: capture attached (snaplen %d, 2 x %d KiB, %s)", self.name,
                     cap.snaplen, kb, direction)

        reply = {"buffer_size": kb * 1024, "header_size": HEADER.size,
                 "record_size": RECORD.size, "snaplen": cap.snaplen,
                 "rotate_ms": int(ROTATE_TIMEOUT * 1000), "vif": self.name,
                 "direction": direction}
        return Handoff(reply, [cap.fd], adopt, lambda: self.detach(cap, ""))

    def detach(self, cap: Capture, why: str, final_rotate: bool = False) -> None:
        with self._attach_lock:
            if self.capture is cap:
                self.on = False
                self.capture = None
                if cap.sock is not None:
                    self.totals.capture_detaches += 1
        cap.close(final_rotate)
        if why:
            log.info("%s: capture detached: %s", self.name, why)

    def account(self, cap: Capture) -> None:
        """Fold a capture's producer counters into the totals (called under its lock)."""
        p, t = cap.producer, self.totals
        now = (p.frames, p.drops, p.rotations, p.bad_acks)
        f, d, r, b = (a - b for a, b in zip(now, cap._last, strict=True))
        t.capture_frames += f
        t.capture_drops += d
        t.capture_rotations += r
        t.capture_bad_acks += b
        cap._last = now

    def counters(self) -> dict[str, int]:
        """Totals plus what the attached capture did since its last tick; reads only, so the
        control thread never takes the lock the data path tries."""
        out = self.totals.as_dict()
        cap = self.capture
        if cap is not None:
            p = cap.producer
            now = (p.frames, p.drops, p.rotations, p.bad_acks)
            for key, a, b in zip(("capture_frames", "capture_drops", "capture_rotations",
                                  "capture_bad_acks"), now, cap._last, strict=True):
                out[key] += a - b
        out["capture_readers"] = int(self.on)
        return out

    def close(self) -> None:
        """Netback shutting down: hand over what is buffered, then release everything."""
        cap = self.capture
        if cap is not None:
            self.detach(cap, "netback shutting down", final_rotate=True)
            if cap.thread is not None and cap.thread is not threading.current_thread():
                cap.thread.join(2.0)


NO_CAPTURE = CaptureTap()
"""The tap of a TX/RX path built on its own, outside a netback: never on, captures nothing."""
