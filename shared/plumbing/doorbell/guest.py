"""The netfront's doorbell: the ivshmem-doorbell PCI device (1af4:1110) driven through VFIO.

See shared/plumbing/doorbell/__init__.py for why doorbells exist and shared/plumbing/vfio.py for the
VFIO sequence.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

from shared.plumbing.doorbell import DoorbellError, drain_eventfd
from shared.plumbing.ivshmem import BACKEND_PEER
from shared.plumbing.vfio import VFIO_PCI_MSIX_IRQ_INDEX, VfioDevice, VfioError, find_pci

log = logging.getLogger("pvnet.doorbell")

IVSHMEM_VENDOR, IVSHMEM_DEVICE = 0x1AF4, 0x1110
BAR_REGS, BAR_SHM = 0, 2
REG_INTR_MASK, REG_INTR_STATUS, REG_IVPOSITION, REG_DOORBELL = 0, 4, 8, 12
U32 = struct.Struct("=I")


class GuestDoorbell:
    """The netfront's doorbell: the ivshmem-doorbell PCI device driven through VFIO.

    A VFIO group can be open once, and the region mapping pins it: use ``guest_doorbell()``,
    the process's one instance, rather than opening a second.
    """

    def __init__(self, dev: VfioDevice, vector: int = 0) -> None:
        self.dev = dev
        self.vector = vector
        self._region: mmap.mmap | None = None
        self._regs: memoryview | None = None
        self._regs_map: mmap.mmap | None = None
        nvec = dev.irq_count(VFIO_PCI_MSIX_IRQ_INDEX)
        if nvec <= vector:
            raise DoorbellError(f"device has {nvec} MSI-X vectors (start QEMU with "
                                f"ivshmem-doorbell,vectors={vector + 1} or more)")
        self._doorbell_off = dev.region(BAR_REGS).offset + REG_DOORBELL
        if dev.region(BAR_REGS).mappable:
            # one 32-bit store per ring (memoryview "I" items are written with one move;
            # the full-tier ping-pong checks that no kick arrives twice); else pwrite
            self._regs_map = dev.map(BAR_REGS, mmap.PAGESIZE)
            self._regs = memoryview(self._regs_map).cast("I")
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            dev.enable_bus_master()  # else QEMU drops the MSI-X writes silently
            dev.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, [-1] * vector + [self._efd])
        except BaseException:
            os.close(self._efd)
            raise

    @classmethod
    def open(cls, sysfs: Path | None = None, vector: int = 0) -> GuestDoorbell:
        try:
            dev = VfioDevice.open(sysfs or find_pci(IVSHMEM_VENDOR, IVSHMEM_DEVICE))
        except (VfioError, OSError) as e:
            raise DoorbellError(str(e)) from e
        try:
            return cls(dev, vector)
        except BaseException:
            dev.close()
            raise

    @property
    def ivposition(self) -> int:
        """This guest's peer id, as the server assigned it."""
        if self._regs is not None:
            return self._regs[REG_IVPOSITION // 4]
        return U32.unpack(self.dev.read(BAR_REGS, REG_IVPOSITION, 4))[0]

    def notify(self, peer_id: int = BACKEND_PEER, vector: int = 0) -> None:
        """Ring ``vector`` of ``peer_id`` (default: the netback): one write to Doorbell."""
        value = (peer_id << 16) | vector
        if self._regs is not None:
            self._regs[REG_DOORBELL // 4] = value
        else:
            os.pwrite(self.dev.fd, U32.pack(value), self._doorbell_off)

    def fileno(self) -> int:
        return self._efd

    def drain(self) -> int:
        return drain_eventfd(self._efd)

    def region(self) -> mmap.mmap:
        """BAR2, the shared memory (the grant region), mapped through VFIO: the device belongs
        to vfio-pci, so sysfs resource2 is no longer the way to it."""
        if self._region is None:
            self._region = self.dev.map(BAR_SHM)
        return self._region

    def close(self) -> None:
        """Release everything; a mapping handed out by ``region()`` must be closed first."""
        try:
            self.dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX)
        except (OSError, VfioError):
            pass
        if self._regs is not None:
            self._regs.release()
            self._regs = None
        for m in (self._regs_map, self._region):
            if m is not None:
                try:
                    m.close()
                except BufferError as e:  # a view of it is alive: unmapping would crash it
                    log.warning("doorbell BAR mapping still exported (%s): unmapped when its "
                                "last view goes (own fault)", e)
        os.close(self._efd)
        self.dev.close()


_guest: GuestDoorbell | None = None


def guest_doorbell() -> GuestDoorbell:
    """The process's one GuestDoorbell, opened on first use and kept (see GuestDoorbell)."""
    global _guest
    if _guest is None:
        _guest = GuestDoorbell.open()
    return _guest
