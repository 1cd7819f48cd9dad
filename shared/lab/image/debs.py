"""Debian packages: which kernel to use, apt-get download into the cache, dpkg -x.

Nothing is installed on the host: the .debs stay in the cache (a rebuild is offline)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.lab.image.cache import DEB_DIR
from shared.lab.image.steps import ImageBuildError, Progress, run_tool

KERNEL_META_PACKAGE = "linux-image-amd64"


def parse_apt_depends(text: str, prefix: str = "linux-image-") -> tuple[str, str | None]:
    """(kernel package, pinned version or None) from the meta package's dependencies.

    Accepts `apt-cache depends` output ("  Depends: pkg") and `apt-cache show` stanzas
    ("Depends: pkg (= version), ...").
    """
    for line in text.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(.*)", line)
        if not m:
            continue
        for item in m.group(1).split(","):
            dm = re.match(r"\s*([^\s(<>|]+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", item)
            if dm and dm.group(1).startswith(prefix):
                return dm.group(1), dm.group(2)
    raise ImageBuildError(f"no {prefix}* dependency in apt-cache output:\n{text}")


def parse_apt_show(text: str) -> dict[str, str]:
    """Package -> Version from `apt-cache show --no-all-versions` stanzas."""
    out: dict[str, str] = {}
    for stanza in re.split(r"\n\s*\n", text):
        pkg = re.search(r"^Package:\s*(\S+)", stanza, re.M)
        ver = re.search(r"^Version:\s*(\S+)", stanza, re.M)
        if pkg and ver:
            out.setdefault(pkg.group(1), ver.group(1))
    return out


def apt_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel linux-image-amd64 pulls in now (one apt-cache call).

    The meta package pins its kernel with "(= version)"; without a pin, ask for the
    candidate version of the kernel package itself.
    """
    hint = " (run `apt-get update` first)"
    try:
        out = run_tool(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
                   "apt-cache show")
        pkg, version = parse_apt_depends(out)
    except ImageBuildError as e:
        raise ImageBuildError(str(e) + hint) from e
    return pkg, version or apt_candidate_versions([pkg])[pkg]


def apt_candidate_versions(pkgs: list[str]) -> dict[str, str]:
    out = run_tool(["apt-cache", "show", "--no-all-versions", *pkgs], "apt-cache show")
    versions = parse_apt_show(out)
    missing = [p for p in pkgs if p not in versions]
    if missing:
        raise ImageBuildError(f"apt-cache show: no candidate version for {missing}")
    return versions


def deb_path(pkg: str, version: str) -> Path:
    return DEB_DIR / f"{pkg}_{version.replace(':', '%3a')}.deb"


def apt_fetch(pins: Mapping[str, str | None], progress: Progress) -> dict[str, Path]:
    """The .debs of the given packages (pinned version, or the candidate when None) in the deb
    cache; those missing are fetched with one `apt-get download` (apt's own caching and
    signature checks; nothing is installed)."""
    unpinned = [p for p, v in pins.items() if v is None]
    versions = {p: v for p, v in pins.items() if v is not None}
    if unpinned:
        versions.update(apt_candidate_versions(unpinned))
    DEB_DIR.mkdir(parents=True, exist_ok=True)
    wanted = {p: deb_path(p, v) for p, v in versions.items()}
    missing = [p for p, path in wanted.items() if not path.exists()]
    if missing:
        specs = [f"{p}={versions[p]}" for p in missing]
        progress.say(f"  apt-get download {' '.join(specs)}")
        with tempfile.TemporaryDirectory(dir=DEB_DIR) as tmp:
            run_tool(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *specs],
                 "apt-get download", cwd=tmp)
            for p in missing:
                got = list(Path(tmp).glob(f"{p}_*.deb"))
                if len(got) != 1:
                    raise ImageBuildError(f"apt-get download {p}: expected one .deb, got {got}")
                got[0].rename(wanted[p])
    return wanted


def deb_depends(deb: Path) -> list[list[str]]:
    """Depends of a .deb as alternatives groups of bare package names."""
    text = run_tool(["dpkg-deb", "-f", str(deb), "Depends"], f"dpkg-deb -f {deb.name}")
    groups = []
    for group in text.replace("\n", " ").split(","):
        names = [re.sub(r"[\s(:].*", "", alt.strip()) for alt in group.split("|")]
        names = [n for n in names if n]
        if names:
            groups.append(names)
    return groups


def host_installed(pkgs: Iterable[str]) -> set[str]:
    pkgs = list(pkgs)
    if not pkgs:
        return set()
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *pkgs],
        capture_output=True, text=True, check=False,
    )
    return {
        line.split()[0]
        for line in res.stdout.splitlines()
        if len(line.split()) >= 2 and line.split()[1].startswith("ii")
    }


def dpkg_extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run_tool(["dpkg", "-x", str(deb), str(dest)], f"dpkg -x {deb.name}")
