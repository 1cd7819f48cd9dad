"""System packages the lab needs, installed on demand (Debian's apt), saying what and why.

A fresh machine of this kind has none of them; `invoke up`, `invoke bench` and `invoke test`
call ``ensure`` so that a user (and CI) never has to know the list.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

#: command or file that proves the package is there -> (Debian package, why we need it)
PACKAGES: dict[str, tuple[str, str]] = {
    "iperf3": ("iperf3", "traffic through the lab"),
    "ip": ("iproute2", "namespaces, veth and bridges"),
    "qemu-system-x86_64": ("qemu-system-x86", "guest VMs"),
    "/bin/busybox": ("busybox-static", "the guest initramfs"),
    "cpio": ("cpio", "packing the guest initramfs"),
    "depmod": ("kmod", "guest kernel modules"),
    "xz": ("xz-utils", "unpacking the guest kernel"),
    "zstd": ("zstd", "unpacking the guest kernel modules"),
    "pgrep": ("procps", "finding lab processes"),
    "ethtool": ("ethtool", "offload settings in the benchmark"),
    "tcpdump": ("tcpdump", "reading captures back (pvnet capture -w - | tcpdump -r -)"),
    "trafgen": ("netsniff-ng", "the bench's packet-rate workloads (pps64, pps1496)"),
}


#: the one apt-get install command line (also .ci/run's): headless, no recommended packages
APT_INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]


def missing(wanted: list[str] | None = None) -> list[tuple[str, str]]:
    out = []
    for probe, (pkg, why) in PACKAGES.items():
        if wanted is not None and pkg not in wanted:
            continue
        found = os.path.exists(probe) if probe.startswith("/") else shutil.which(probe)
        if not found:
            out.append((pkg, why))
    return out


def ensure(wanted: list[str] | None = None) -> None:
    """apt-get install what is missing (root only); a clear error otherwise."""
    todo = missing(wanted)
    if not todo:
        return
    names = sorted({p for p, _ in todo})
    for pkg, why in todo:
        print(f"installing {pkg} (needed for {why})", file=sys.stderr, flush=True)
    if os.geteuid() != 0:
        raise RuntimeError(f"missing packages {' '.join(names)}: run as root or "
                           f"apt-get install {' '.join(names)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    # no recommends: qemu-system-x86 alone would pull in 100+ desktop, audio and video
    # libraries (GTK, GStreamer, Mesa) that a headless lab never loads
    subprocess.run(APT_INSTALL + names, check=True, env=env)


if __name__ == "__main__":
    ensure()
    print("all system packages present")
