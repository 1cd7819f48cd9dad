"""What a MachineConfig turns into: QEMU's command line, the kernel's, and guest.json.

Pure functions of the config (and of what the launcher chose before start: the accelerator,
the ssh port, the client key), so that the command line can be checked without starting QEMU.

What the guest gets (see vm-images/README.md): the image's ELF kernel + initramfs, the host root
read-only over virtio-9p, a management virtio-net NIC on QEMU user networking (isolated with
restrict=on; only the ssh hostfwd on 127.0.0.1 reaches it), a serial console logged to a file,
QMP on a unix socket, and optional devices: ivshmem-plain on a caller-owned memfd (the grant
region), virtio-serial ports on unix sockets (the event channel), virtio-net NICs on host TAPs
(the baseline), and an intel-iommu (q35) for VFIO in the guest.
"""

from __future__ import annotations

from shared.lab.accel import Accel, cpu_args
from shared.lab.machine.config import (
    MGMT_ADDRESS,
    MGMT_GATEWAY,
    MachineConfig,
    RunFiles,
)
from shared.lab.machine.guest_env import default_guest_path, guest_python, interpreter_paths

HOSTROOT_TAG = "hostroot"
#: every guest, whatever its NIC: no CPU-vulnerability mitigations. Under TCG, page-table
#: isolation makes each syscall switch CR3 twice, and each switch flushes QEMU's software TLB:
#: a guest whose data path is syscalls (pvnet's netfront) pays it per frame. Lab guests only.
GUEST_KERNEL_ARGS = ("mitigations=off",)


def guest_config(cfg: MachineConfig, authorized_key: str) -> dict[str, object]:
    """The guest.json content (see vm-images/guest/guest_init.py for the keys)."""
    interfaces: list[dict[str, object]] = [
        {"mac": cfg.mgmt_mac, "addresses": [MGMT_ADDRESS], "gateway": MGMT_GATEWAY}
    ]
    for nic in cfg.nics:
        if nic.guest_name or nic.addresses or nic.mtu:
            interfaces.append({"mac": nic.mac, "name": nic.guest_name,
                               "addresses": list(nic.addresses), "mtu": nic.mtu})
    env = {"PATH": default_guest_path(), **cfg.guest.env}
    return {
        "hostname": cfg.guest.hostname or cfg.name,
        "interfaces": interfaces,
        "ssh": {
            "sshd_dir": str(cfg.image.sshd_dir),
            "authorized_keys": [authorized_key],
            "port": 22,
        },
        "env": env,
        "cwd": cfg.guest.cwd,
        "host_paths": list(interpreter_paths(guest_python()) if cfg.guest.host_paths is None
                           else cfg.guest.host_paths),
        "sysctls": dict(cfg.guest.sysctls),
        "run": [list(argv) for argv in cfg.guest.run],
    }


def kernel_cmdline(cfg: MachineConfig, files: RunFiles) -> str:
    args = ["console=ttyS0", "quiet", "panic=-1", f"pvnet.conf={files.guest_json}",
            *GUEST_KERNEL_ARGS]
    if cfg.iommu:
        args.append("intel_iommu=on")
    args.extend(cfg.kernel_args)
    return " ".join(args)


def qemu_argv(cfg: MachineConfig, files: RunFiles, accel: Accel, ssh_port: int) -> list[str]:
    """The QEMU command line (also in MachineError when something fails)."""
    machine = cfg.machine_type
    if cfg.iommu and accel == "kvm":
        machine += ",kernel-irqchip=split"
    argv = [
        cfg.qemu_binary, "-name", cfg.name,
        "-machine", machine, "-accel", accel, *cpu_args(accel),
        "-m", str(cfg.memory_mib), "-smp", str(cfg.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(cfg.image.kernel), "-initrd", str(cfg.image.initrd),
        "-append", kernel_cmdline(cfg, files),
        "-chardev", f"file,id=console,path={files.console}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={files.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if cfg.iommu:  # must come before the PCI devices it translates for
        argv += ["-device", "intel-iommu,intremap=on,caching-mode=on"]
    argv += [
        "-virtfs",
        f"local,path=/,mount_tag={HOSTROOT_TAG},readonly=on,security_model=none,"
        "multidevs=remap",
        "-netdev",
        f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={cfg.mgmt_mac},romfile=",
    ]
    for shm in cfg.shm:
        argv += [
            "-object",
            f"memory-backend-file,id={shm.id}-mem,mem-path=/proc/self/fd/{shm.fd},"
            f"size={shm.size},share=on",
            "-device", f"ivshmem-plain,id={shm.id},memdev={shm.id}-mem",
        ]
    if cfg.serial_ports:
        argv += ["-device", "virtio-serial-pci,id=vser0"]
    for i, port in enumerate(cfg.serial_ports):
        opts = f"socket,id=vport{i},path={port.path}"
        if port.server:
            opts += ",server=on,wait=off"
        elif port.reconnect:
            opts += f",reconnect={port.reconnect}"
        argv += ["-chardev", opts,
                 "-device", f"virtserialport,bus=vser0.0,chardev=vport{i},name={port.name}"]
    for i, nic in enumerate(cfg.nics):
        vhost = "on" if nic.vhost else "off"
        where = f"fd={nic.fd}" if nic.fd is not None else \
            f"ifname={nic.tap},script=no,downscript=no"
        argv += ["-netdev", f"tap,id=tap{i},{where},vhost={vhost}",
                 "-device", f"virtio-net-pci,netdev=tap{i},mac={nic.mac},romfile="]
    argv += list(cfg.extra_args)
    return argv
