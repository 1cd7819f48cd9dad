"""Placements: how the grant region is mapped and how the event channel travels.

This is the only code that differs between the namespace placement (frontend in a network
namespace on the host: a sealed memfd handed over the event socket with SCM_RIGHTS) and the
QEMU placement (the same memfd is an ivshmem BAR in the guest, the event channel a
virtio-serial port whose host end is a unix socket). Everything above it is one code path.
"""

from __future__ import annotations

import fcntl
import glob
import mmap
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from shared.faults import OSFault
from shared.plumbing.channel import EventChannel

REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MAX_REGION = 1 << 30
IVSHMEM_IDS = ("0x1af4", "0x1110")


class TransportError(OSFault):
    """The region or channel could not be set up; the message says which and why."""


# --- region ---------------------------------------------------------------------------------
def create_memfd(size: int, name: str = "pvnet-region") -> tuple[int, mmap.mmap]:
    """Frontend, namespace placement: its "memory". Sealed against resizing, so a backend that
    maps it can never be hit by SIGBUS from a shrinking file."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
    return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def map_memfd(fd: int, expected_size: int | None = None) -> mmap.mmap:
    """Backend: map a region fd from the frontend or the lab, after checking it is safe."""
    size = os.fstat(fd).st_size
    if expected_size is not None and size != expected_size:
        raise TransportError(f"region is {size} bytes, the handshake said {expected_size}")
    if size <= 0 or size % mmap.PAGESIZE or size > MAX_REGION:
        raise TransportError(f"region size {size} is not a page multiple up to 1 GiB")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise TransportError(f"region fd is not a memfd: {e}") from e
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise TransportError("region memfd is not sealed against shrinking and growing")
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def find_ivshmem() -> Path:
    """Guest: the sysfs directory of the first ivshmem PCI device."""
    for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
        p = Path(dev)
        try:
            ids = ((p / "vendor").read_text().strip(), (p / "device").read_text().strip())
        except OSError:
            continue
        if ids == IVSHMEM_IDS:
            return p
    raise TransportError("no ivshmem PCI device (1af4:1110) in this guest")


def map_pci_bar(spec: str = "pci") -> mmap.mmap:
    """Frontend, QEMU placement: map BAR2 of the ivshmem device (``pci`` or ``pci:<sysfs>``)."""
    dev = Path(spec.partition(":")[2]) if ":" in spec else find_ivshmem()
    try:
        (dev / "enable").write_text("1")
    except OSError:
        pass  # already enabled, or a kernel that enables on mmap
    fd = os.open(dev / "resource2", os.O_RDWR | os.O_SYNC)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


# --- event channel -----------------------------------------------------------------------
def listen_unix(path: str) -> socket.socket:
    """Backend, namespace placement: where frontends connect."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(4)
    return sock


def connect_unix(path: str, timeout: float | None = None,
                 stop: Callable[[], bool] | None = None) -> EventChannel:
    """Connect to a listening unix socket, retrying until ``timeout`` (None: forever) or until
    ``stop()`` says to give up (then TransportError): a restarting peer is retried, not fatal."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return EventChannel(sock=sock)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if deadline is not None and time.monotonic() > deadline:
                raise TransportError(f"cannot connect to {path}: {e}") from e
            if stop is not None and stop():
                raise TransportError(f"stopped while connecting to {path}") from e
            time.sleep(0.1)
        except BaseException:
            sock.close()
            raise


def open_port(path: str) -> EventChannel:
    """Frontend, QEMU placement: the virtio-serial port (a character device)."""
    try:
        return EventChannel(fd=os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as e:
        raise TransportError(f"cannot open event port {path}: {e}") from e


def queue_channel(base: str, number: int) -> str:
    """QEMU placement: the path of event channel ``number`` of a multi-queue device (a queue's
    ``queue-N/event-channel``): the virtio-serial port ``<port>-q<number>`` in the guest,
    QEMU's socket for it ``<socket>-q<number>`` on the host (the lab makes both)."""
    return f"{base}-q{number}"
