"""Just enough VFIO (linux/vfio.h) to drive a PCI device from guest user space with Python.

Why VFIO: the ivshmem-doorbell device raises only MSI-X (QEMU 7.2 gives it no INTx pin, so
uio_pci_generic cannot deliver its interrupts), and VFIO is the user-space driver that turns an
MSI-X vector into an eventfd. It needs an IOMMU in the guest (q35 + intel-iommu,
intel_iommu=on), the vfio-pci and vfio_iommu_type1 modules, and root.

The sequence is the one in the kernel's Documentation/driver-api/vfio.rst: bind the device to
vfio-pci, open the container (/dev/vfio/vfio), check the API version and the type1 IOMMU
extension, open the device's IOMMU group (/dev/vfio/<group>), check it is viable, attach it to
the container, select the type1 IOMMU, get the device fd. Regions (BARs, config space) are at
fixed offsets of the device fd: read/write them with pread/pwrite, or mmap those that allow it.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import mmap
import os
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shared.faults import OSFault

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def _io(nr: int) -> int:
    """_IO(VFIO_TYPE, VFIO_BASE + nr): VFIO ioctls carry no size in their number."""
    return (VFIO_TYPE << 8) | (VFIO_BASE + nr)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2


class RegionFlag(enum.IntFlag):
    """vfio_region_info.flags: what a region allows."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2


class IrqSet(enum.IntFlag):
    """vfio_irq_set.flags: the data format and the action of VFIO_DEVICE_SET_IRQS."""

    DATA_NONE = 1 << 0
    DATA_EVENTFD = 1 << 2
    ACTION_TRIGGER = 1 << 5


PCI_COMMAND = 0x04  # config-space offset of the command register and its bits:
PCI_COMMAND_MEMORY, PCI_COMMAND_MASTER = 0x2, 0x4

GROUP_STATUS = struct.Struct("=II")  # argsz, flags
REGION_INFO = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("=IIIII")  # argsz, flags, index, start, count (+ data)

PCI_DEVICES = Path("/sys/bus/pci/devices")
VFIO_DRIVER = Path("/sys/bus/pci/drivers/vfio-pci")


class VfioError(OSFault):
    """VFIO set-up failed; the message names the step and what to check."""


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int  # of the region within the device fd

    @property
    def mappable(self) -> bool:
        return bool(self.flags & RegionFlag.MMAP)


def find_pci(vendor: int, device: int) -> Path:
    """The sysfs directory of the first PCI device with these ids."""
    for dev in sorted(PCI_DEVICES.glob("*")):
        try:
            ids = (int((dev / "vendor").read_text(), 16), int((dev / "device").read_text(), 16))
        except (OSError, ValueError):
            continue
        if ids == (vendor, device):
            return dev
    raise VfioError(f"no PCI device {vendor:04x}:{device:04x}")


def bind_vfio_pci(dev: Path, timeout: float = 5.0) -> None:
    """Hand the device to vfio-pci: new_id "<vendor> <device>" (binds every unbound device with
    those ids at once), or, when the id is already known to the driver (a second run), bind."""
    driver = dev / "driver"
    if driver.exists() and driver.resolve().name == "vfio-pci":
        return
    if not VFIO_DRIVER.exists():
        with contextlib.suppress(OSError):
            subprocess.run(["modprobe", "vfio-pci"], capture_output=True, timeout=10)
        if not VFIO_DRIVER.exists():
            raise VfioError("no vfio-pci driver (is the vfio-pci module in the image?)")
    if driver.exists():
        (driver / "unbind").write_text(dev.name)
    ids = f"{(dev / 'vendor').read_text().strip()[2:]} {(dev / 'device').read_text().strip()[2:]}"
    try:
        (VFIO_DRIVER / "new_id").write_text(ids)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise VfioError(f"vfio-pci new_id {ids!r}: {e}") from e
    deadline = time.monotonic() + timeout
    while not (driver.exists() and driver.resolve().name == "vfio-pci"):
        with contextlib.suppress(OSError):
            (VFIO_DRIVER / "bind").write_text(dev.name)
        if time.monotonic() > deadline:
            raise VfioError(f"{dev.name} did not bind to vfio-pci")
        time.sleep(0.05)


def _wait_path(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise VfioError(f"{path} did not appear (devtmpfs mounted? IOMMU on?)")
        time.sleep(0.02)


class VfioDevice:
    """One PCI device opened through VFIO; owns the container, group and device fds.

    A group can be open in one place at a time, and a mapping of a region keeps the device
    (and so the group) open: open a device once per process and keep it.
    """

    def __init__(self, sysfs: Path, container: int, group: int, device: int) -> None:
        self.sysfs = sysfs
        self.container = container
        self.group = group
        self.fd = device
        self._regions: dict[int, RegionInfo] = {}

    @classmethod
    def open(cls, sysfs: Path) -> VfioDevice:
        bind_vfio_pci(sysfs)
        try:
            group_no = os.readlink(sysfs / "iommu_group").rsplit("/", 1)[1]
        except OSError as e:
            raise VfioError(f"{sysfs.name} has no IOMMU group: boot the guest with an IOMMU "
                            "(q35 + intel-iommu, intel_iommu=on)") from e
        _wait_path(Path("/dev/vfio/vfio"), 2.0)
        _wait_path(Path(f"/dev/vfio/{group_no}"), 5.0)
        fds: list[int] = []
        try:
            container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
            fds.append(container)
            if fcntl.ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION:
                raise VfioError("unknown VFIO API version")
            if not fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU):
                raise VfioError("VFIO has no type1 IOMMU (vfio_iommu_type1 loaded?)")
            group = os.open(f"/dev/vfio/{group_no}", os.O_RDWR | os.O_CLOEXEC)
            fds.append(group)
            status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
            fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, status, True)
            if not GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
                raise VfioError(f"IOMMU group {group_no} is not viable: bind every device "
                                "in it to vfio-pci")
            fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("=i", container)),
                        True)
            fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)
            name = bytearray(sysfs.name.encode() + b"\0")
            device = fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name, True)
        except OSError as e:
            for fd in reversed(fds):
                os.close(fd)
            raise VfioError(f"VFIO set-up of {sysfs.name} failed: {e}") from e
        except VfioError:
            for fd in reversed(fds):
                os.close(fd)
            raise
        return cls(sysfs, container, group, device)

    # --- regions --------------------------------------------------------------------------
    def region(self, index: int) -> RegionInfo:
        if index not in self._regions:
            buf = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
            fcntl.ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, buf, True)
            _argsz, flags, idx, _cap, size, offset = REGION_INFO.unpack(buf)
            self._regions[index] = RegionInfo(idx, flags, size, offset)
        return self._regions[index]

    def map(self, index: int, size: int | None = None) -> mmap.mmap:
        info = self.region(index)
        if not info.mappable:
            raise VfioError(f"region {index} of {self.sysfs.name} cannot be mmapped")
        return mmap.mmap(self.fd, size or info.size, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=info.offset)

    def read(self, index: int, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, self.region(index).offset + offset)

    def write(self, index: int, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, self.region(index).offset + offset)

    def enable_bus_master(self) -> int:
        """Set Memory Space + Bus Master in PCI_COMMAND. Without Bus Master the device's MSI-X
        writes are dropped silently (QEMU checks it), so no interrupt ever arrives."""
        (cmd,) = struct.unpack("=H", self.read(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, 2))
        want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if want != cmd:
            self.write(VFIO_PCI_CONFIG_REGION_INDEX, PCI_COMMAND, struct.pack("=H", want))
        return want

    # --- interrupts -----------------------------------------------------------------------
    def irq_count(self, index: int) -> int:
        buf = bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        fcntl.ioctl(self.fd, VFIO_DEVICE_GET_IRQ_INFO, buf, True)
        return IRQ_INFO.unpack(buf)[3]

    def set_irq_eventfds(self, index: int, eventfds: list[int]) -> None:
        """Trigger these eventfds on vectors 0..n-1 of IRQ ``index`` (enables MSI-X)."""
        data = struct.pack(f"={len(eventfds)}i", *eventfds)
        head = IRQ_SET.pack(IRQ_SET.size + len(data),
                            IrqSet.DATA_EVENTFD | IrqSet.ACTION_TRIGGER,
                            index, 0, len(eventfds))
        fcntl.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, bytearray(head + data), True)

    def disable_irqs(self, index: int) -> None:
        head = IRQ_SET.pack(IRQ_SET.size, IrqSet.DATA_NONE | IrqSet.ACTION_TRIGGER,
                            index, 0, 0)
        fcntl.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, bytearray(head), True)

    def close(self) -> None:
        for fd in (self.fd, self.group, self.container):
            with contextlib.suppress(OSError):
                os.close(fd)
