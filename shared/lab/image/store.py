"""Built images in the cache: one directory per recipe id, each with its stamp.json."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.lab.image.cache import CACHE_DIR
from shared.lab.image.recipe import recipe_id

STAMP_NAME = "stamp.json"
HOST_KEY_NAME = "ssh_host_ed25519_key"


@dataclass(frozen=True)
class ImageInfo:
    """What a launcher needs from a built image (all paths absolute, on the host).

    sshd_dir is also the path at which the guest finds sshd: the guest sees the host root.
    """

    kernel: Path
    initrd: Path
    sshd_dir: Path
    host_key_pub: Path
    kernel_version: str
    kernel_package: str
    kernel_package_version: str
    modules: tuple[str, ...]
    size_bytes: int
    stamp: str
    built: bool = False
    build_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


IMAGE_DIR = CACHE_DIR / "images" / recipe_id()


def dir_size(path: Path) -> int:
    """Bytes in a file or a tree (links not followed): the image's size report."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def load_info(image_dir: Path, built: bool = False) -> ImageInfo | None:
    """The image in `image_dir` as its stamp describes it; None if incomplete or unreadable."""
    stamp_path = image_dir / STAMP_NAME
    if not stamp_path.exists():
        return None
    try:
        s = json.loads(stamp_path.read_text())
        info = ImageInfo(
            kernel=image_dir / "vmlinux",
            initrd=image_dir / "initrd.cpio",
            sshd_dir=image_dir / "sshd",
            host_key_pub=image_dir / "sshd" / (HOST_KEY_NAME + ".pub"),
            kernel_version=s["kernel_version"],
            kernel_package=s["kernel_package"],
            kernel_package_version=s["kernel_package_version"],
            modules=tuple(s["modules"]),
            size_bytes=int(s["size_bytes"]),
            stamp=s["stamp"],
            built=built,
            build_seconds=float(s.get("build_seconds", 0.0)),
        )
    except (KeyError, ValueError, TypeError):
        return None
    if not (info.kernel.exists() and info.initrd.exists() and info.host_key_pub.exists()):
        return None
    return info


def cached_image() -> ImageInfo | None:
    """The image in the cache, whatever its stamp (no apt look-up): for tools that only run."""
    return load_info(IMAGE_DIR)


#: an image of another recipe (another checkout or an older version) unused this long goes
IMAGE_KEEP_DAYS = 14


def prune_images(keep: Path, days: float = IMAGE_KEEP_DAYS) -> list[Path]:
    """Remove the images beside `keep` that nobody used for `days` (using one touches its
    stamp): each recipe change builds a new ~70 MiB image under images/<recipe id>/."""
    cutoff = time.time() - days * 86400
    gone = []
    for d in sorted(keep.parent.iterdir()):
        if d == keep or not d.is_dir():
            continue
        try:
            last = (d / STAMP_NAME).stat().st_mtime
        except OSError:
            last = d.stat().st_mtime
        if last < cutoff:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone
