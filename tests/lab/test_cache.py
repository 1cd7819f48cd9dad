"""Fast tier: what the lab downloads and builds (debs, images, ssh keys, the KVM verdict)
lives outside the checkout: ~/.cache/pvnet, or $PVNET_CACHE / $XDG_CACHE_HOME/pvnet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = ("import json; from shared.lab import ssh, accel; from shared.lab.image import cache, "
         "store; print(json.dumps([str(cache.CACHE_DIR), str(store.IMAGE_DIR), str(cache.DEB_DIR), "
         "str(ssh.DEFAULT_KEY_DIR), str(accel.CACHE_FILE)]))")


def cache_paths(**env: str) -> list[Path]:
    full = {k: v for k, v in os.environ.items() if k not in ("PVNET_CACHE", "XDG_CACHE_HOME")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=full, text=True,
                         capture_output=True, check=True).stdout
    return [Path(p) for p in json.loads(out)]


def test_the_default_cache_is_in_home_not_in_the_checkout() -> None:
    paths = cache_paths(HOME="/root")
    assert paths[0] == Path("/root/.cache/pvnet")
    for p in paths:
        assert p.is_relative_to(paths[0]) and not p.is_relative_to(REPO), p
    assert paths[1].parent.name == "images" and len(paths[1].name) == 16  # recipe id


def test_pvnet_cache_and_xdg_move_it(tmp_path: Path) -> None:
    assert cache_paths(PVNET_CACHE=str(tmp_path))[0] == tmp_path
    assert cache_paths(XDG_CACHE_HOME=str(tmp_path))[0] == tmp_path / "pvnet"


def test_prune_images_removes_only_other_images_unused_for_long(tmp_path: Path) -> None:
    from shared.lab.image.store import STAMP_NAME, prune_images

    images = tmp_path / "images"
    keep, fresh, stale = images / "keep", images / "fresh", images / "stale"
    for d in (keep, fresh, stale):
        d.mkdir(parents=True)
        (d / STAMP_NAME).write_text("{}")
    old = 30 * 86400
    for d in (keep, stale):  # the one in use is kept however old its stamp
        os.utime(d / STAMP_NAME, (os.path.getmtime(d / STAMP_NAME) - old,) * 2)
    assert prune_images(keep, days=14) == [stale]
    assert keep.is_dir() and fresh.is_dir() and not stale.exists()
