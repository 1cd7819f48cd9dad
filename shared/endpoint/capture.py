"""`pvnet capture`, the reader side: attach to a netback, drain its zbuf buffers into pcap.

The attach is one request on the netback's control socket; the reply brings the memfd of the
two buffers (SCM_RIGHTS) and the socket stays open as the capture's own: the netback sends a
byte on each rotation (we also look at the headers on a short timer, so a lost wake-up costs
latency, not frames), we send ``F`` to ask for a last rotation before exiting, and closing it
detaches. The protocol itself is in shared/protocol/zbuf.py.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import BinaryIO

from shared.faults import kind_of
from shared.plumbing.control.client import ControlError
from shared.plumbing.fdpass import AncillaryError, recv_with_fds
from shared.plumbing.pcap import PcapWriter
from shared.protocol.zbuf import OUT, Reader, Record

POLL_MS = 250
FLUSH_WAIT = 1.0


@dataclass
class Attached:
    """A capture the netback accepted: our end of its socket and the two buffers."""

    sock: socket.socket
    mem: mmap.mmap
    reader: Reader
    reply: dict

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.mem.close()
        self.sock.close()


def attach(path: str, request: dict, timeout: float = 5.0) -> Attached:
    """Send the capture request and map what comes back; ControlError on any refusal."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(json.dumps({"cmd": "capture", **request}).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                data, got = recv_with_fds(sock, 65536, 4)
                fds += got
                if not data:
                    raise ControlError(f"{path}: closed before answering")
                buf += data
                if len(buf) > 65536:
                    raise ControlError(f"{path}: reply too long")
        except (OSError, AncillaryError) as exc:
            raise ControlError(f"{path}: {exc}") from exc
        try:
            reply = json.loads(buf[:buf.index(b"\n")])
        except ValueError as exc:
            raise ControlError(f"{path}: reply is not JSON: {exc}") from exc
        if not isinstance(reply, dict) or not reply.get("ok"):
            err = reply.get("error", "refused") if isinstance(reply, dict) else reply
            raise ControlError(f"{path}: {err}")
        size = reply.get("buffer_size")
        if len(fds) != 1 or not isinstance(size, int) or os.fstat(fds[0]).st_size != 2 * size:
            raise ControlError(f"{path}: capture reply without a memfd of two buffers")
        mem = mmap.mmap(fds[0], 2 * size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sock.setblocking(False)
        return Attached(sock, mem, Reader(mem, size), reply)
    except BaseException:
        sock.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)


class Session:
    """Drain an attached capture into a sink until COUNT frames, EOF or a signal."""

    def __init__(self, att: Attached, sink, count: int = 0, flush=None) -> None:
        self.att, self.sink, self.count = att, sink, count
        self.flush = flush  # after each buffer drained, so a pipe sees frames as they come
        self.captured = self.dropped = 0
        self.stop = False
        self.eof = False

    def _drain(self) -> bool:
        """Consume the held buffer if there is one; True if it was."""
        r = self.att.reader
        h = r.held()
        if h is None:
            return False
        self.dropped = h.drops
        for rec in r.records(h):
            if self.count and self.captured >= self.count:
                break
            self.sink(rec)
            self.captured += 1
        r.ack(h)
        if self.flush is not None:
            self.flush()
        return True

    def _wait(self, timeout_ms: int) -> bool:
        """Wait for a wake-up byte; False once the netback's end is closed."""
        sock = self.att.sock
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if not poller.poll(timeout_ms):
            return True
        try:
            return bool(sock.recv(4096))
        except BlockingIOError:
            return True
        except OSError:
            return False

    def done(self) -> bool:
        return bool(self.count) and self.captured >= self.count

    def run(self) -> None:
        while not (self.stop or self.done()):
            if self._drain():
                continue
            if self.eof:
                return
            if not self._wait(POLL_MS):
                self.eof = True  # drain once more: the netback's final rotation
        if not self.done():
            self.final_flush()

    def final_flush(self) -> None:
        """Ask for the store buffer (``F``) and take it, twice in case a rotation of the
        producer's own raced the first request. Bounded by FLUSH_WAIT per round."""
        for _ in range(2):
            self._drain()
            try:
                self.att.sock.send(b"F")
            except OSError:
                return
            end = time.monotonic() + FLUSH_WAIT
            while time.monotonic() < end:
                if self._drain():
                    break
                if not self._wait(50):
                    self._drain()
                    return
            if self.done():
                return


def text_line(rec: Record) -> str:
    """A frame as one line when no -w is given (tcpdump -e in brief)."""
    d = rec.data
    t = time.strftime("%H:%M:%S", time.localtime(rec.ts_ns // 1_000_000_000))
    us = rec.ts_ns // 1000 % 1_000_000
    way = "out" if rec.direction == OUT else "in "
    if len(d) >= 14:
        src, dst = d[6:12].hex(":"), d[0:6].hex(":")
        etype = int.from_bytes(d[12:14], "big")
        what = f"{src} > {dst}, ethertype 0x{etype:04x}"
    else:
        what = "runt"
    return f"{t}.{us:06d} {way} {what}, length {rec.wirelen}"


def run_capture(path: str, vif: str, request: dict, out: BinaryIO | None, count: int,
                fmt: str) -> int:
    """The body of `pvnet capture`: exit 0 on COUNT, EOF, SIGINT or SIGTERM."""
    try:
        att = attach(path, request)
    except ControlError as exc:
        whose = f" ({kind_of(exc.__cause__)} fault)" if exc.__cause__ is not None else ""
        print(f"pvnet capture: {exc}{whose}", file=sys.stderr)
        return 1
    reply = att.reply
    writer = PcapWriter(out, reply["snaplen"], fmt, vif) if out is not None else None
    if writer is not None:
        writer.flush()  # the file header now: a reader on a pipe knows the link type at once

    def sink(rec: Record) -> None:
        if writer is not None:
            writer.write(rec.ts_ns, rec.data, rec.wirelen, rec.direction == OUT)
        else:
            print(text_line(rec), flush=False)

    session = Session(att, sink, count,
                      writer.flush if writer is not None else sys.stdout.flush)

    def on_signal(_sig: int, _frame: object) -> None:
        session.stop = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"pvnet capture: listening on {vif} ({reply['direction']}), link-type EN10MB "
          f"(Ethernet), snapshot length {reply['snaplen']} bytes, 2 x "
          f"{reply['buffer_size'] // 1024} KiB", file=sys.stderr, flush=True)
    broken = False
    try:
        session.run()
    except BrokenPipeError:
        broken = True  # the reading end (tcpdump, head) went away: stop like tcpdump does
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        att.close()
    if broken:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(f"{session.captured} captured, {session.dropped} dropped by producer",
          file=sys.stderr)
    return 0

