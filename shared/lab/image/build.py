"""Build the guest image into the cache, or reuse it when its stamp still matches."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from shared.lab.image.cache import CACHE_DIR
from shared.lab.image.debs import (
    apt_fetch,
    apt_kernel_package,
    deb_depends,
    dpkg_extract,
    host_installed,
)
from shared.lab.image.initramfs import make_initramfs
from shared.lab.image.kmods import ModuleTree, resolve_modules
from shared.lab.image.recipe import (
    RECIPE_DIR,
    REPO_ROOT,
    builder_sources,
    parse_module_list,
    parse_package_list,
    recipe_files,
    recipe_hash,
)
from shared.lab.image.steps import ImageBuildError, Progress, run_tool
from shared.lab.image.store import (
    HOST_KEY_NAME,
    IMAGE_DIR,
    STAMP_NAME,
    ImageInfo,
    cached_image,
    dir_size,
    load_info,
    prune_images,
)
from shared.lab.image.vmlinux import extract_vmlinux
from shared.lab.keys import write_ed25519_key


def _stamp_inputs(kernel_pkg: str, kernel_ver: str) -> tuple[str, dict[str, str]]:
    extra = {"kernel_package": kernel_pkg, "kernel_package_version": kernel_ver}
    files = recipe_files() + builder_sources()
    return recipe_hash(files, REPO_ROOT, extra), extra


def build_image(force: bool = False, progress: bool = True) -> ImageInfo:
    """Return the guest image, building it first if the recipe or the kernel changed."""
    prog = Progress(progress)
    IMAGE_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            kernel_pkg, kernel_ver = apt_kernel_package()
        except ImageBuildError as e:
            old = cached_image()
            if old is None or force:
                raise
            prog.say(f"warning: {e}; using the cached image ({old.kernel_package})")
            return old
        stamp, _ = _stamp_inputs(kernel_pkg, kernel_ver)
        old = load_info(IMAGE_DIR)
        if old is not None and old.stamp == stamp and not force:
            (IMAGE_DIR / STAMP_NAME).touch()  # in use: keeps prune_images away from it
            prune_images(IMAGE_DIR)
            prog.say(
                f"image up to date: {kernel_pkg} {kernel_ver}, "
                f"{old.size_bytes / 2**20:.1f} MiB in {IMAGE_DIR}"
            )
            return old
        why = "forced" if force else ("recipe or kernel changed" if old else "no image yet")
        prog.say(f"building the guest image ({why}): {kernel_pkg} {kernel_ver}")
        new_dir = IMAGE_DIR.with_name(IMAGE_DIR.name + ".new")
        shutil.rmtree(new_dir, ignore_errors=True)
        new_dir.mkdir()
        try:
            _build_into(new_dir, kernel_pkg, kernel_ver, stamp, prog)
        except BaseException:
            shutil.rmtree(new_dir, ignore_errors=True)
            raise
        old_dir = IMAGE_DIR.with_name(IMAGE_DIR.name + ".old")
        shutil.rmtree(old_dir, ignore_errors=True)
        if IMAGE_DIR.exists():
            IMAGE_DIR.rename(old_dir)
        new_dir.rename(IMAGE_DIR)
        shutil.rmtree(old_dir, ignore_errors=True)
        info = load_info(IMAGE_DIR, built=True)
        if info is None:
            raise ImageBuildError(f"built image in {IMAGE_DIR} is incomplete")
        prune_images(IMAGE_DIR)
        return info


def _build_into(out: Path, kernel_pkg: str, kernel_ver: str, stamp: str, prog: Progress) -> None:
    packages = parse_package_list((RECIPE_DIR / "packages.txt").read_text())
    wanted = parse_module_list((RECIPE_DIR / "modules.txt").read_text())

    with prog.step(f"fetching {kernel_pkg} and {' '.join(packages)} (apt-get download)"):
        pins: dict[str, str | None] = {kernel_pkg: kernel_ver, **dict.fromkeys(packages)}
        debs = apt_fetch(pins, prog)
        kernel_deb = debs[kernel_pkg]

    work = out / "work"
    with prog.step(f"unpacking {kernel_deb.name} ({kernel_deb.stat().st_size / 2**20:.0f} MiB)"):
        dpkg_extract(kernel_deb, work / "kernel")
    moddirs = list((work / "kernel" / "lib" / "modules").iterdir())
    if len(moddirs) != 1:
        raise ImageBuildError(f"expected one module directory in {kernel_deb.name}: {moddirs}")
    moddir = moddirs[0]
    version = moddir.name
    bzimage = work / "kernel" / "boot" / f"vmlinuz-{version}"

    with prog.step("extracting the ELF vmlinux from the xz bzImage"):
        vmlinux = extract_vmlinux(bzimage.read_bytes())
        (out / "vmlinux").write_bytes(vmlinux)
        shutil.copy2(work / "kernel" / "boot" / f"config-{version}", out / f"config-{version}")

    with prog.step("resolving kernel modules"):
        tree = ModuleTree(moddir)
        mods = resolve_modules(wanted, tree, tree.builtin())
        prog.say(
            f"  {len(wanted)} wanted -> {len(mods)} modules: {' '.join(m.name for m in mods)}"
        )

    with prog.step("unpacking busybox-static, openssh-server (+ libraries missing on the host)"):
        busybox_root = work / "busybox"
        dpkg_extract(debs["busybox-static"], busybox_root)
        busybox = busybox_root / "bin" / "busybox"
        sshd_dir = out / "sshd"
        for p in packages:
            if p != "busybox-static":
                dpkg_extract(debs[p], sshd_dir)
        extra = _fetch_missing_libs([debs[p] for p in packages if p != "busybox-static"], prog)
        for deb in extra:
            dpkg_extract(deb, sshd_dir)
        _check_sshd_libs(sshd_dir)
        write_ed25519_key(sshd_dir / HOST_KEY_NAME, "pvnet-guest")
        shutil.rmtree(sshd_dir / "usr" / "share", ignore_errors=True)

    with prog.step("writing the initramfs (cpio newc, uncompressed)"):
        initrd = make_initramfs(busybox, moddir, mods, version)
        (out / "initrd.cpio").write_bytes(initrd)

    with prog.step("removing the unpacked kernel package"):
        shutil.rmtree(work)

    sizes = {
        "vmlinux": dir_size(out / "vmlinux"),
        "initrd": dir_size(out / "initrd.cpio"),
        "sshd": dir_size(sshd_dir),
    }
    total = sum(sizes.values())
    stamp_data = {
        "stamp": stamp,
        "kernel_version": version,
        "kernel_package": kernel_pkg,
        "kernel_package_version": kernel_ver,
        "modules": [m.name for m in mods],
        "size_bytes": total,
        "sizes": sizes,
        "extra_packages": [d.name for d in extra],
        "build_seconds": round(prog.elapsed(), 1),
    }
    (out / STAMP_NAME).write_text(json.dumps(stamp_data, indent=2) + "\n")
    detail = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items())
    prog.say(f"image built in {prog.elapsed():.1f}s: {total / 2**20:.1f} MiB ({detail} MiB)")


def _fetch_missing_libs(debs: list[Path], prog: Progress) -> list[Path]:
    """Library packages sshd needs that the host lacks (e.g. libwrap0), recursively."""
    fetched: list[Path] = []
    seen: set[str] = set()
    todo = list(debs)
    while todo:
        groups = [g for deb in todo for g in deb_depends(deb)]
        todo = []
        have = host_installed({n for g in groups for n in g})
        need = []
        for group in groups:
            if any(n in have for n in group) or not group[0].startswith("lib"):
                continue  # present, or a maintainer-script tool (adduser, ucf...): not needed
            if group[0] not in seen:
                seen.add(group[0])
                need.append(group[0])
        if need:
            prog.say(f"  not installed on the host, unpacked next to sshd: {' '.join(need)}")
            todo = list(apt_fetch(dict.fromkeys(need), prog).values())
            fetched += todo
    return fetched


def _check_sshd_libs(sshd_dir: Path) -> None:
    libdirs = [str(sshd_dir / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(libdirs))
    out = run_tool(["ldd", str(sshd_dir / "usr" / "sbin" / "sshd")], "ldd sshd", env=env)
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        raise ImageBuildError(f"sshd needs libraries that are neither on the host nor fetched: "
                              f"{missing}")
