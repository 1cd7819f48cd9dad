"""The control protocol on a character device: the netfront's control channel in a guest.

A virtio-serial port whose host end is a unix socket (QEMU chardev), so a frontend inside a
guest answers `pvnet stats` on the host like any other end. One host client at a time (the
port is one stream); descriptors cannot pass, so a Handoff is refused.
"""

from __future__ import annotations

import os
import select
import threading
import time

from shared.plumbing.control.protocol import (
    MAX_LINE,
    TOO_LONG,
    Handler,
    Handoff,
    answer,
    error_reply,
)


class PortControl:
    """The same protocol served on a character device: a virtio-serial port whose host end is
    a unix socket (QEMU chardev), so a frontend inside a guest answers `pvnet stats` on the
    host like any other end. One host client at a time (the port is one stream)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PortControl:
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"control:{os.path.basename(self.path)}")
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _serve(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        buf = bytearray()
        try:
            while not self._stop.is_set():
                if not poller.poll(500):
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # host side not connected: wait for the next client
                    buf.clear()
                    time.sleep(0.1)
                    continue
                start = len(buf)  # no newline before it: each byte is looked at once
                buf += data
                while (nl := buf.find(b"\n", start)) >= 0:
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    start = 0
                    reply = (answer(self.handler, line) if len(line) <= MAX_LINE
                             else TOO_LONG)
                    if isinstance(reply, Handoff):  # no descriptors over a serial port
                        reply.abandon()
                        reply = error_reply("this control channel cannot pass descriptors")
                    if line.strip():
                        self._write(fd, reply)
                if len(buf) > MAX_LINE:
                    buf.clear()
                    self._write(fd, TOO_LONG)
        finally:
            os.close(fd)

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                return
