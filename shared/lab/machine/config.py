"""What a guest is made of: the typed MachineConfig, its devices, its guest spec, its files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.lab.accel import QEMU, Accel
from shared.lab.image.store import ImageInfo

MGMT_MAC = "52:54:00:00:ff:01"
MGMT_ADDRESS = "10.0.2.15/24"  # QEMU user networking defaults
MGMT_GATEWAY = "10.0.2.2"


@dataclass(frozen=True)
class ShmDevice:
    """ivshmem-plain on a memfd the caller owns (the grant region).

    The fd is inherited by QEMU under the same number (pass_fds) and opened by QEMU as
    /proc/self/fd/N; share=on so host and guest see the same pages. The guest finds the device
    as PCI 1af4:1110 and maps its BAR 2 (sysfs resource2 / resource2_wc).
    """

    fd: int
    size: int  # bytes; a power of two (it becomes a PCI BAR)
    id: str = "shm0"


@dataclass(frozen=True)
class SerialPort:
    """A virtio-serial port: the guest sees /dev/virtio-ports/<name>; the host a unix socket.

    server=True: QEMU listens at `path` (server=on,wait=off): connect after launch.
    server=False: QEMU connects to `path` at start-up (someone must listen already) and, with
    reconnect > 0, tries again every `reconnect` seconds after a disconnect.
    """

    name: str
    path: Path
    server: bool = True
    reconnect: int = 0


@dataclass(frozen=True)
class TapNic:
    """A virtio-net-pci NIC on an existing host TAP (script=no): the virtio-net baseline.

    guest_name/addresses, when given, are applied by the guest's init (matched by MAC).
    """

    tap: str
    mac: str
    vhost: bool = False
    fd: int | None = None  # an open TAP fd to hand QEMU (a TAP in another namespace)
    guest_name: str | None = None
    addresses: tuple[str, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True)
class GuestSpec:
    """What the guest does after boot (written into guest.json).

    run: argv lists started in the background in the guest, each logged to the console and to
    /run/pvnet-guest/<i>.log; cwd: their working directory (and ssh sessions'); env: added to
    their environment (and ssh sessions'); PATH defaults to this Python's bin dir first, so
    `python3` in the guest is the host's python3 with its installed packages.
    """

    hostname: str | None = None
    run: tuple[tuple[str, ...], ...] = ()
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: host dirs the guest must see at their own paths (default: this interpreter's, see
    #: interpreter_paths); cwd is always added by the guest's init
    host_paths: tuple[str, ...] | None = None
    #: kernel settings the guest's init writes before it starts ``run`` ("net.ipv4.x": "44"):
    #: one-shot tuning is no run command, whose exit the lab would report as a failure
    sysctls: dict[str, str] = field(default_factory=dict)


@dataclass
class MachineConfig:
    """Everything needed to start one guest. Paths are host paths."""

    name: str
    run_dir: Path
    image: ImageInfo
    accel: Accel | None = None  # None: detect_accel() (KVM only if it really boots)
    memory_mib: int = 512
    cpus: int = 1  # -smp 2 measured slower under TCG here
    machine_type: str = "q35"
    iommu: bool = False  # intel-iommu (q35 only) + intel_iommu=on: VFIO in the guest
    kernel_args: tuple[str, ...] = ()
    guest: GuestSpec = field(default_factory=GuestSpec)
    guest_json: Path | None = None  # default: run_dir/guest.json
    write_guest_json: bool = True  # False: the caller wrote guest_json itself
    ssh_port: int | None = None  # None: a free port on 127.0.0.1
    mgmt_mac: str = MGMT_MAC
    shm: tuple[ShmDevice, ...] = ()
    serial_ports: tuple[SerialPort, ...] = ()
    nics: tuple[TapNic, ...] = ()
    extra_args: tuple[str, ...] = ()
    qemu_binary: str = QEMU
    qmp_timeout: float = 20.0  # QEMU start until QMP answers
    # PR_SET_PDEATHSIG: no orphan QEMU if the lab dies. It fires when the launching *thread*
    # exits: launch from a long-lived thread (not a short-lived pool worker) or set False.
    die_with_parent: bool = True


@dataclass(frozen=True)
class RunFiles:
    """The files of one guest in its run dir (the guest reads the dir as /host/<run_dir>):
    guest.json (its config), console.log (the serial console), qemu.log (QEMU's own output),
    qmp.sock (the QMP socket). Also what a detached guest's handle points at."""

    run_dir: Path
    guest_json: Path

    @classmethod
    def at(cls, run_dir: Path, guest_json: Path | None = None) -> RunFiles:
        run_dir = run_dir.resolve()
        return cls(run_dir, (guest_json or run_dir / "guest.json").resolve())

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"
