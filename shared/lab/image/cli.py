"""`python3 -m shared.lab.image` (and `invoke image`): build or reuse, then describe."""

from __future__ import annotations

import argparse
import json
import sys

from shared.lab.image.build import build_image
from shared.lab.image.steps import ImageBuildError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m shared.lab.image",
        description="Build (or reuse) the pvnet QEMU guest image under ~/.cache/pvnet/images/. "
        "Rebuilt only when vm-images/ recipe files or the Debian kernel version change.",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    ap.add_argument("--json", action="store_true", help="print the ImageInfo as JSON on stdout")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    try:
        info = build_image(force=args.force, progress=not args.quiet)
    except ImageBuildError as e:
        print(f"image build failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print(
            f"kernel {info.kernel_version} ({info.kernel_package} {info.kernel_package_version})\n"
            f"vmlinux {info.kernel}\ninitrd  {info.initrd}\nsshd    {info.sshd_dir}\n"
            f"size    {info.size_bytes / 2**20:.1f} MiB"
        )
