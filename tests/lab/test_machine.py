"""QEMU launcher: command-line checks (fast) and one real guest boot (full, ~15 s under TCG)."""

from __future__ import annotations

import mmap
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.lab import ssh as lab_ssh
from shared.lab.accel import detect_accel, probe
from shared.lab.image.store import ImageInfo
from shared.lab.machine.cmdline import guest_config
from shared.lab.machine.config import GuestSpec, MachineConfig, SerialPort, ShmDevice, TapNic
from shared.lab.machine.failure import MachineError
from shared.lab.machine.launcher import Machine

SHM_SIZE = 4 << 20
PATTERN = b"pvnet-ivshmem-pattern-\x01\x02\x03"
PORT = "pvnet-event"


def fake_image(tmp_path: Path) -> ImageInfo:
    sshd = tmp_path / "sshd"
    sshd.mkdir(exist_ok=True)
    (sshd / "ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAA test\n")
    return ImageInfo(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.cpio",
                     sshd_dir=sshd, host_key_pub=sshd / "ssh_host_ed25519_key.pub",
                     kernel_version="6.1.0-test-amd64", kernel_package="linux-image-test",
                     kernel_package_version="1", modules=(), size_bytes=0, stamp="x")


def opt_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_command_line_has_the_devices(tmp_path: Path) -> None:
    fd = os.memfd_create("grant")
    try:
        os.ftruncate(fd, SHM_SIZE)
        cfg = MachineConfig(
            name="g1", run_dir=tmp_path / "run", image=fake_image(tmp_path), accel="tcg",
            ssh_port=2222, iommu=True, shm=(ShmDevice(fd, SHM_SIZE),),
            serial_ports=(SerialPort(PORT, tmp_path / "ev.sock"),
                          SerialPort("other", tmp_path / "cl.sock", server=False, reconnect=1)),
            nics=(TapNic("vif1.0", "52:54:00:00:01:02", addresses=("10.9.0.2/24",)),),
            guest=GuestSpec(run=(("python3", "-m", "frontend"),), cwd="/work/main"),
        )
        m = Machine(cfg)
        m._pre_launch()
        argv = m.argv
        devices = opt_after(argv, "-device")
        assert devices[0].startswith("intel-iommu")  # before the devices it translates
        assert f"memory-backend-file,id=shm0-mem,mem-path=/proc/self/fd/{fd},size={SHM_SIZE}," \
               "share=on" in opt_after(argv, "-object")
        assert "ivshmem-plain,id=shm0,memdev=shm0-mem" in devices
        chardevs = opt_after(argv, "-chardev")
        assert f"socket,id=vport0,path={tmp_path / 'ev.sock'},server=on,wait=off" in chardevs
        assert f"socket,id=vport1,path={tmp_path / 'cl.sock'},reconnect=1" in chardevs
        assert f"virtserialport,bus=vser0.0,chardev=vport0,name={PORT}" in devices
        assert "tap,id=tap0,ifname=vif1.0,script=no,downscript=no,vhost=off" in \
               opt_after(argv, "-netdev")
        assert "virtio-net-pci,netdev=tap0,mac=52:54:00:00:01:02,romfile=" in devices
        assert any("hostfwd=tcp:127.0.0.1:2222-:22" in n and "restrict=on" in n
                   for n in opt_after(argv, "-netdev"))
        append = opt_after(argv, "-append")[0]
        assert f"pvnet.conf={m.files.guest_json}" in append and "intel_iommu=on" in append
        assert opt_after(argv, "-smp") == ["1"]
        conf = guest_config(cfg, lab_ssh.ensure_keypair().public_line)
        assert conf["run"] == [["python3", "-m", "frontend"]]
        assert conf["cwd"] == "/work/main"
        macs = [i["mac"] for i in conf["interfaces"]]  # type: ignore[index, union-attr]
        assert macs == [cfg.mgmt_mac, "52:54:00:00:01:02"]
        assert m.files.guest_json.exists()
    finally:
        os.close(fd)


def test_ssh_keypair_is_private_and_loadable(tmp_path: Path) -> None:
    kp = lab_ssh.ensure_keypair(tmp_path / "k")
    assert kp.private_path.stat().st_mode & 0o077 == 0
    assert kp.public_line.startswith("ssh-ed25519 ")
    assert kp.load().get_name() == "ssh-ed25519"
    assert lab_ssh.ensure_keypair(tmp_path / "k") == kp  # kept, not regenerated
    assert 0 < lab_ssh.free_port() < 65536


def test_config_errors_are_precise(tmp_path: Path) -> None:
    fd = os.memfd_create("grant")
    try:
        os.ftruncate(fd, 3 << 20)
        cfg = MachineConfig(name="g1", run_dir=tmp_path, image=fake_image(tmp_path),
                            accel="tcg", shm=(ShmDevice(fd, 3 << 20),))
        with pytest.raises(MachineError, match="power of two"):
            Machine(cfg).launch()
    finally:
        os.close(fd)
    cfg = MachineConfig(name="g1", run_dir=tmp_path, image=fake_image(tmp_path), accel="tcg",
                        iommu=True, machine_type="pc")
    with pytest.raises(MachineError, match="q35"):
        Machine(cfg).launch()


@pytest.mark.full
def test_launch_failure_carries_command_line_and_output(
    tmp_path: Path, guest_image: ImageInfo, qemu_available: None
) -> None:
    cfg = MachineConfig(name="bad", run_dir=tmp_path, image=guest_image, accel="tcg",
                        extra_args=("-device", "no-such-device-pvnet"))
    m = Machine(cfg)
    with pytest.raises(MachineError) as err:
        m.launch()
    e = err.value
    assert "no-such-device-pvnet" in e.qemu_log
    assert e.argv[0] == "qemu-system-x86_64" and "no-such-device-pvnet" in e.argv
    assert "command: qemu-system-x86_64" in str(e)
    assert not m.is_running()


@pytest.mark.full
def test_accel_detection(guest_image: ImageInfo, qemu_available: None) -> None:
    res = probe(guest_image, "tcg", timeout=60)
    assert res.ok, res.detail
    assert guest_image.kernel_version in res.detail
    t = time.monotonic()
    assert detect_accel(guest_image) in ("kvm", "tcg")
    assert detect_accel(guest_image) in ("kvm", "tcg")
    assert time.monotonic() - t < 60


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("pvnet-grant")
    os.ftruncate(fd, SHM_SIZE)
    yield fd
    os.close(fd)


@pytest.fixture
def guest(tmp_path: Path, guest_image: ImageInfo, qemu_available: None,
          memfd: int) -> Iterator[Machine]:
    cfg = MachineConfig(
        name="g1", run_dir=tmp_path / "g1", image=guest_image,
        shm=(ShmDevice(memfd, SHM_SIZE),),
        serial_ports=(SerialPort(PORT, tmp_path / "g1" / "event.sock"),),
        guest=GuestSpec(run=(("sh", "-c", "echo run0 says hello"),), cwd=str(Path.cwd())),
    )
    m = Machine(cfg)
    try:
        m.launch()
        yield m
    finally:
        m.shutdown(timeout=20)


GUEST_SHM_SCRIPT = """
import glob, mmap, os, sys
size = int(sys.argv[1])
for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
    ids = [open(os.path.join(dev, f)).read().strip() for f in ("vendor", "device")]
    if ids == ["0x1af4", "0x1110"]:
        break
else:
    sys.exit("no ivshmem device")
with open(os.path.join(dev, "enable"), "w") as f:
    f.write("1")
fd = os.open(os.path.join(dev, "resource2"), os.O_RDWR | os.O_SYNC)
mm = mmap.mmap(fd, size)
print(os.path.basename(dev), mm[:int(sys.argv[2])].hex())
mm[4096:4096 + 11] = b"guest-wrote"
"""


@pytest.mark.full
def test_guest_boots_with_shm_serial_and_ssh(guest: Machine, memfd: int) -> None:
    host_map = mmap.mmap(memfd, SHM_SIZE)
    host_map[: len(PATTERN)] = PATTERN
    event = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    event.settimeout(60)
    event.connect(str(guest.run_dir / "event.sock"))
    try:
        guest.wait_ready(timeout=120)
        guest.wait_ssh(timeout=120)

        rc, out, err = guest.ssh("uname -r")
        assert (rc, out.strip()) == (0, guest.config.image.kernel_version), err

        rc, out, err = guest.ssh(["python3", "-c", GUEST_SHM_SCRIPT, str(SHM_SIZE),
                                  str(len(PATTERN))])
        assert rc == 0, err
        assert out.split()[1] == PATTERN.hex()
        assert host_map[4096:4096 + 11] == b"guest-wrote"

        rc, out, err = guest.ssh(f"echo event-from-guest > /dev/virtio-ports/{PORT}")
        assert rc == 0, err
        data = b""
        while b"\n" not in data:
            chunk = event.recv(4096)
            assert chunk, "event socket closed"
            data += chunk
        assert data.split(b"\n")[0] == b"event-from-guest"

        rc, out, _ = guest.ssh("cat /run/pvnet-guest/0.log; hostname; pwd")
        assert "run0 says hello" in out and "g1" in out.split() and str(Path.cwd()) in out
        assert "run0 says hello" in guest.console_log()
    finally:
        event.close()
        host_map.close()

    pid = guest.pid
    assert pid is not None
    guest.shutdown(timeout=30)
    assert not guest.is_running()
    assert not Path(f"/proc/{pid}").exists() or _is_zombie_free(pid)
    assert guest.graceful_shutdown, guest.console_log()[-2000:]
    assert not _qemu_pids_for(guest.run_dir)


def _is_zombie_free(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _qemu_pids_for(run_dir: Path) -> list[int]:
    """QEMU processes whose command line mentions this run dir (there must be none left)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-system-x86_64") and str(run_dir).encode() in \
                b" ".join(cmd):
            out.append(int(entry.name))
    return out


@pytest.mark.full
def test_kill_and_double_shutdown(tmp_path: Path, guest_image: ImageInfo,
                                  qemu_available: None) -> None:
    cfg = MachineConfig(name="g2", run_dir=tmp_path / "g2", image=guest_image)
    m = Machine(cfg)
    try:
        m.launch()
        m.wait_for_console("pvnet-init: stage 1", timeout=60)
        assert m.qmp("query-status")["status"] == "running"  # type: ignore[index]
        m.kill()
        assert not m.is_running() and m.graceful_shutdown is False
        m.shutdown()  # no-op after kill
        assert m.argv[0] == "qemu-system-x86_64" and opt_after(m.argv, "-name") == ["g2"]
    finally:
        m.kill()
    assert not _qemu_pids_for(tmp_path / "g2")
