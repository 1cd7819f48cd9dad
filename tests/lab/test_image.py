"""Guest image recipe: fast tests of the pure parts, one full build (marked full)."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from shared.lab.image.build import build_image
from shared.lab.image.cpio import CpioArchive, read_cpio
from shared.lab.image.debs import parse_apt_depends, parse_apt_show
from shared.lab.image.initramfs import busybox_applets
from shared.lab.image.kmods import (
    KernelModule,
    ModuleTree,
    ModuleWant,
    format_modules_dep,
    normalize_module,
    parse_modules_dep,
    read_modinfo,
    resolve_modules,
)
from shared.lab.image.recipe import (
    RECIPE_DIR,
    parse_module_list,
    recipe_files,
    recipe_hash,
)
from shared.lab.image.steps import ImageBuildError
from shared.lab.image.store import HOST_KEY_NAME, ImageInfo
from shared.lab.image.vmlinux import extract_vmlinux

FAKE_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/drivers/vfio/vfio.ko:
kernel/drivers/vfio/pci/vfio-pci-core.ko: kernel/drivers/vfio/vfio.ko
kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/pci/vfio-pci-core.ko kernel/drivers/vfio/vfio.ko
"""  # noqa: E501 - modules.dep lines are long


def names(mods: list[KernelModule]) -> list[str]:
    return [m.name for m in mods]


def test_module_list_parsing() -> None:
    text = "# comment\nvirtio_pci   # why\n\nvfio-pci\naf_packet?\n"
    assert parse_module_list(text) == [
        ModuleWant("virtio_pci"),
        ModuleWant("vfio_pci"),
        ModuleWant("af_packet", optional=True),
    ]


def test_recipe_module_list_is_the_issue_list() -> None:
    wanted = {w.name for w in parse_module_list((RECIPE_DIR / "modules.txt").read_text())}
    assert {"virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay", "virtio_net",
            "tun", "vfio_pci", "vfio_iommu_type1", "af_packet"} <= wanted


def test_resolve_orders_dependencies_first() -> None:
    avail = parse_modules_dep(FAKE_DEP)
    mods = resolve_modules([ModuleWant("9p"), ModuleWant("virtio_pci"),
                            ModuleWant("9pnet_virtio")], avail)
    order = names(mods)
    assert set(order) == {"9p", "9pnet", "netfs", "virtio_pci", "virtio_ring", "virtio",
                          "9pnet_virtio"}
    assert len(order) == len(set(order))
    for m in mods:
        for d in m.depends:
            assert order.index(d) < order.index(m.name), (d, m.name)


def test_resolve_normalizes_dash_and_underscore() -> None:
    avail = parse_modules_dep(FAKE_DEP)
    order = names(resolve_modules(parse_module_list("vfio-pci\n"), avail))
    assert order == ["vfio", "vfio_pci_core", "vfio_pci"]
    assert avail["vfio_pci"].relpath == "kernel/drivers/vfio/pci/vfio-pci.ko"


def test_resolve_builtin_optional_and_missing() -> None:
    avail = parse_modules_dep(FAKE_DEP)
    wanted = [ModuleWant("virtio_pci"), ModuleWant("af_packet", optional=True),
              ModuleWant("overlay", optional=True)]
    order = names(resolve_modules(wanted, avail, builtin=["kernel/net/packet/af_packet.ko",
                                                           "kernel/drivers/virtio/virtio.ko"]))
    assert order == ["virtio_ring", "virtio_pci"]  # virtio built in, overlay absent + optional
    with pytest.raises(ImageBuildError, match="overlay"):
        resolve_modules([ModuleWant("overlay")], avail)


def test_resolve_reports_missing_dependency_chain() -> None:
    avail = parse_modules_dep("kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(ImageBuildError, match="'b'.*a"):
        resolve_modules([ModuleWant("a")], avail)


def test_resolve_detects_cycles() -> None:
    avail = parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(ImageBuildError, match="cycle"):
        resolve_modules([ModuleWant("a")], avail)


def test_trimmed_modules_dep_round_trips() -> None:
    avail = parse_modules_dep(FAKE_DEP)
    mods = resolve_modules([ModuleWant("9p")], avail)
    again = parse_modules_dep(format_modules_dep(mods))
    assert set(again) == {"9p", "9pnet", "netfs"}
    assert set(again["9p"].depends) == {"9pnet", "netfs"}


def _fake_module(depends: str) -> bytes:
    """A minimal ELF64 with a .modinfo section, as read_modinfo needs it."""
    modinfo = f"license=GPL\0depends={depends}\0name=fake\0".encode()
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 2)
    body = bytes(hdr) + modinfo + shstr
    body += b"\0" * (shoff - len(body))
    sections = [
        bytes(64),
        struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(modinfo), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0),
    ]
    return body + b"".join(sections)


def test_read_modinfo_and_module_tree(tmp_path: Path) -> None:
    assert read_modinfo(_fake_module("a,b-c"))["depends"] == ["a,b-c"]
    moddir = tmp_path / "6.1.0-test"
    (moddir / "kernel" / "x").mkdir(parents=True)
    (moddir / "kernel" / "x" / "top-mod.ko").write_bytes(_fake_module("dep_one"))
    (moddir / "kernel" / "x" / "dep_one.ko.xz").write_bytes(lzma.compress(_fake_module("")))
    (moddir / "modules.builtin").write_text("kernel/net/packet/af_packet.ko\n")
    tree = ModuleTree(moddir)
    assert tree.builtin() == {"af_packet"}
    mods = resolve_modules(parse_module_list("top-mod\naf_packet?\n"), tree, tree.builtin())
    assert names(mods) == ["dep_one", "top_mod"]


def test_extract_vmlinux_finds_the_elf_stream() -> None:
    elf = b"\x7fELF" + os.urandom(3000)
    # A decoy xz stream (not an ELF) first, then the real one, as in a bzImage.
    blob = (b"MZ" + b"\0" * 500 + lzma.compress(b"not a kernel", format=lzma.FORMAT_XZ)
            + b"\0" * 17 + lzma.compress(elf, format=lzma.FORMAT_XZ,
                                         filters=[{"id": lzma.FILTER_X86},
                                                  {"id": lzma.FILTER_LZMA2}])
            + b"trailing")
    assert extract_vmlinux(blob) == elf
    assert extract_vmlinux(b"xx" + gzip.compress(elf) + b"yy") == elf
    with pytest.raises(ImageBuildError):
        extract_vmlinux(b"no kernel here")


def test_cpio_round_trip_and_determinism() -> None:
    def build() -> bytes:
        a = CpioArchive()
        a.add_file("init", b"#!/bin/sh\n", 0o755)
        a.add_symlink("bin/sh", "busybox")
        a.add_file("bin/busybox", b"\x7fELF...", 0o755)
        a.add_chardev("dev/console", 5, 1)
        a.add_file("lib/modules/v/kernel/a.ko", b"x" * 5)
        return a.to_bytes()

    data = build()
    assert data == build()
    assert len(data) % 4 == 0
    entries = read_cpio(data)
    assert entries["init"].data == b"#!/bin/sh\n" and entries["init"].mode == 0o100755
    assert entries["bin/sh"].mode == 0o120777 and entries["bin/sh"].data == b"busybox"
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["lib/modules/v/kernel"].mode & 0o170000 == 0o040000
    names_in_order = list(entries)
    assert names_in_order.index("lib") < names_in_order.index("lib/modules/v/kernel/a.ko")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_cpio_is_readable_by_gnu_cpio() -> None:
    a = CpioArchive()
    a.add_file("a/b.txt", b"hello")
    a.add_symlink("a/c", "b.txt")
    out = subprocess.run(["cpio", "-it", "--quiet"], input=a.to_bytes(), capture_output=True,
                         check=True)
    assert out.stdout.decode().split() == ["a", "a/b.txt", "a/c"]


def test_recipe_hash_tracks_content_and_kernel(tmp_path: Path) -> None:
    (tmp_path / "init").write_text("one")
    (tmp_path / "modules.txt").write_text("virtio_pci\n")
    (tmp_path / "README.md").write_text("docs do not count")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "vmlinux").write_text("build output does not count")
    files = recipe_files(tmp_path)
    assert [f.name for f in files] == ["init", "modules.txt"]
    kern = {"kernel_package": "linux-image-6.1.0-1-amd64"}
    h1 = recipe_hash(files, tmp_path, kern)
    assert h1 == recipe_hash(files, tmp_path, kern)
    (tmp_path / "README.md").write_text("edited docs")
    (tmp_path / "cache" / "vmlinux").write_text("rebuilt")
    assert recipe_hash(recipe_files(tmp_path), tmp_path, kern) == h1
    assert recipe_hash(files, tmp_path, {"kernel_package": "linux-image-6.1.0-2-amd64"}) != h1
    (tmp_path / "init").write_text("two")
    assert recipe_hash(files, tmp_path, kern) != h1
    (tmp_path / "init").write_text("one")
    (tmp_path / "init").chmod(0o755)
    assert recipe_hash(files, tmp_path, kern) != h1  # the exec bit is part of the recipe


def test_parse_apt_depends() -> None:
    out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert parse_apt_depends(out) == ("linux-image-6.1.0-56-amd64", None)
    show = ("Package: linux-image-amd64\nVersion: 6.1.192-2\n"
            "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\n")
    assert parse_apt_depends(show) == ("linux-image-6.1.0-56-amd64", "6.1.192-2")
    with pytest.raises(ImageBuildError):
        parse_apt_depends("linux-image-amd64\n")
    stanzas = "Package: a\nVersion: 1:2.0-1\n\nPackage: b\nVersion: 3\nDepends: x\n"
    assert parse_apt_show(stanzas) == {"a": "1:2.0-1", "b": "3"}


def test_busybox_applets_never_include_busybox(tmp_path: Path) -> None:
    fake = tmp_path / "busybox"
    fake.write_text("#!/bin/sh\nprintf 'ash\\nbusybox\\nsh\\ninsmod\\n'\n")
    fake.chmod(0o755)
    assert busybox_applets(fake) == ["ash", "insmod", "sh"]


def test_guest_scripts_parse() -> None:
    for script in ("init", "guest/stage2", "guest/shutdown", "guest/acpi/PWRF/00000080"):
        path = RECIPE_DIR / script
        assert os.access(path, os.X_OK), f"{script} must be executable"
        subprocess.run(["sh", "-n", str(path)], check=True)
    for module in sorted((RECIPE_DIR / "guest").glob("*.py")):  # guest_init.py and its modules
        compile(module.read_text(), module.name, "exec")


@pytest.mark.full
def test_build_image(guest_image: ImageInfo) -> None:
    info = guest_image
    assert info.kernel.read_bytes()[:4] == b"\x7fELF"
    entries = read_cpio(info.initrd.read_bytes())
    assert entries["init"].mode & 0o111
    assert entries["dev/console"].rdev == (5, 1)
    assert "bin/busybox" not in [n for n, e in entries.items() if e.mode == 0o120777]
    assert entries["bin/sh"].data == b"busybox"
    load = entries[f"lib/modules/{info.kernel_version}/modules.load"].data.decode().split()
    loaded = [normalize_module(p) for p in load]
    for want in ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_net", "tun", "vfio_pci",
                 "vfio_iommu_type1", "virtio_console"):
        assert want in loaded
    assert loaded.index("virtio") < loaded.index("virtio_pci")
    assert (info.sshd_dir / "usr" / "sbin" / "sshd").exists()
    assert (info.sshd_dir / HOST_KEY_NAME).stat().st_mode & 0o077 == 0
    assert info.host_key_pub.read_text().startswith("ssh-ed25519 ")
    assert info.size_bytes < 200 * 2**20
    # Built once, then cached: a second call does not rebuild.
    again = build_image(progress=False)
    assert again.stamp == info.stamp and not again.built
