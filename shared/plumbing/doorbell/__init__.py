"""Doorbells: event-channel kicks over ivshmem-doorbell instead of the virtio-serial stream.

Why: a kick over virtio-serial travels guest -> virtqueue -> QEMU -> unix socket (and back the
same way); a doorbell is one MMIO write in the guest that QEMU turns into an eventfd write on
the host (ioeventfd), and one eventfd write on the host that QEMU turns into an MSI-X
interrupt, which VFIO turns into an eventfd in the guest. The round trips measured are in
docs/performance.md (doorbells against virtio-serial).

Only the kicks move: the handshake's JSON messages keep travelling over the virtio-serial
port, so ``KickChannel`` (shared/plumbing/doorbell/kickchannel.py) wraps an ``EventChannel``
(messages) and a doorbell (kicks) behind the EventChannel API and the data loops and handshakes need
no change.

This module holds what every doorbell is; the two kinds live beside it:

- ``HostDoorbell`` (netback, shared/plumbing/doorbell/host.py): a client of the lab's ivshmem server
  (shared/lab/ivshmem_server.py) on its backend socket: peer ``BACKEND_PEER``; it waits on its
  own vector eventfd and kicks by writing the guest peer's vector eventfd (QEMU raises the
  MSI-X vector in the guest).
- ``GuestDoorbell`` (netfront, in the guest, shared/plumbing/doorbell/guest.py): the ivshmem PCI
device
  (1af4:1110) through VFIO: BAR0 registers (Doorbell at 12), BAR2 the shared memory = the grant
  region, MSI-X vector 0 delivered to an eventfd.

``python -m shared.plumbing.doorbell.roundtrip lead|follow ...`` measures the notification round
trip of either transport (the lab's full-tier test runs it in a guest against a host process).
"""

from __future__ import annotations

import os
from typing import Protocol

from shared.plumbing.transport import TransportError


class DoorbellError(TransportError):
    """A doorbell could not be set up (server, device or VFIO); the message says why.

    A TransportError, so the netfront treats it like any other channel set-up failure: it
    counts it, logs it and tries again."""


class Doorbell(Protocol):
    """What KickChannel needs of a doorbell."""

    def notify(self) -> None: ...

    def fileno(self) -> int: ...

    def drain(self) -> int: ...

    def close(self) -> None: ...


def drain_eventfd(fd: int) -> int:
    """Read and reset an eventfd's counter: the number of kicks since the last drain."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
