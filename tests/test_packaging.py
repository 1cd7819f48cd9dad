"""What `pip install .` gives: the drivers, with only their own dependencies (README "Set-up").

The lab's packages (pyyaml, paramiko, cryptography, invoke, qemu.qmp, matplotlib) are the extra
`lab`; the drivers (`pvnet-netback`, `pvnet-netfront`, `pvnet`) must run without them. Fast:
every third-party import maps to a declared distribution, and no module outside the lab
imports a lab-only one. Full: a fresh venv, `pip install` of a copy of the checkout without
extras, and the three programs run.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"shared", "frontend", "backend", "tests"}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (PyYAML == pyyaml, qemu.qmp == qemu-qmp)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip()).group(0))


def declared() -> tuple[set[str], set[str]]:
    """(the drivers' dependencies, the extra `lab`), as canonical distribution names."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    lab = {requirement_name(r) for r in project["optional-dependencies"]["lab"]}
    return core, lab


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of every non-stdlib, non-project import in a file, lazy ones included."""
    tops: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            tops.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    # a script directory's own modules (vm-images/guest/guest_*.py import each other; a
    # package's modules import theirs absolutely, so a package is not a script directory)
    script_dir = not (path.parent / "__init__.py").exists()
    siblings = {p.stem for p in path.parent.glob("*.py")} if script_dir else set()
    return {t for t in tops if t not in sys.stdlib_module_names and t not in OURS
            and t not in siblings and t != "__future__"}


def product_files() -> list[Path]:
    """Every Python file that is not a test: the packages, tasks.py, the guest image recipe."""
    files = [p for pkg in ("shared", "frontend", "backend") for p in (REPO / pkg).rglob("*.py")]
    return sorted([*files, REPO / "tasks.py", *(REPO / "vm-images").rglob("*.py")])


def is_lab(path: Path) -> bool:
    rel = path.relative_to(REPO)
    return rel.parts[:2] == ("shared", "lab") or rel.parts[0] in ("tasks.py", "vm-images")


def test_every_third_party_import_is_declared():
    core, lab = declared()
    dists = packages_distributions()
    problems = []
    for path in product_files():
        allowed = core | lab if is_lab(path) else core
        for top in sorted(third_party_imports(path)):
            from_ = {canonical(d) for d in dists.get(top, ())}
            if not from_:
                problems.append(f"{path.relative_to(REPO)}: {top} (not installed here)")
            elif not from_ & allowed:
                where = "the drivers' dependencies" if allowed == core else "pyproject.toml"
                extra = " (lab-only: the drivers must not import it)" if from_ & lab else ""
                problems.append(f"{path.relative_to(REPO)}: {top} from {sorted(from_)} is not "
                                f"in {where}{extra}")
    assert not problems, "\n".join(problems)


#: lab packages that are programs the lab runs rather than modules it imports: where it runs it
LAB_PROGRAMS = {"py-spy": "shared/lab/bench/profiler.py"}


def test_the_lab_extra_is_what_the_lab_imports():
    """No lab package sneaks back among the drivers' dependencies, and each is used."""
    core, lab = declared()
    assert core == {"pyroute2"}
    assert lab == {"pyyaml", "paramiko", "cryptography", "invoke", "qemu-qmp", "matplotlib",
                   "py-spy"}
    dists = packages_distributions()
    used = {canonical(d) for p in product_files() if is_lab(p)
            for top in third_party_imports(p) for d in dists.get(top, ())}
    modules = lab - set(LAB_PROGRAMS)
    assert modules <= used, f"declared for the lab, imported nowhere: {sorted(modules - used)}"
    for program, where in LAB_PROGRAMS.items():
        assert f'"{program}"' in (REPO / where).read_text(), f"{program} is run nowhere"


def test_the_scan_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom shared import x\ndef f():\n    import yaml.loader\n"
                 "    from paramiko import SSHClient\n")
    assert third_party_imports(f) == {"yaml", "paramiko"}


def checkout_copy(dest: Path) -> None:
    """The checkout's files as git sees them (tracked, and new ones not ignored): no caches,
    no build/ or egg-info of an editable install."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True, timeout=60).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.full
def test_pip_install_without_extras_gives_working_drivers():
    """A fresh venv (no system site-packages), `pip install` of the checkout without extras:
    the three programs answer --help, `pvnet stats` and `pvnet capture` run, and the driver
    packages import - none needs a lab package."""
    tmp = Path(tempfile.mkdtemp(prefix="pvnet-pkg-"))
    try:
        src, venv = tmp / "src", tmp / "venv"
        checkout_copy(src)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        bin_ = venv / "bin"
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        pip = subprocess.run([bin_ / "python", "-m", "pip", "install", "-q", str(src)],
                             capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
        assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]
        freeze = subprocess.run([bin_ / "python", "-m", "pip", "freeze"], capture_output=True,
                                text=True, timeout=60, env=env, check=True).stdout
        installed = {canonical(line.split("==")[0]) for line in freeze.splitlines()}
        _, lab = declared()
        assert not installed & lab, f"pip install . pulled lab packages: {installed & lab}"

        def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
            # cwd outside the copy: the installed package, not the source tree, is imported
            return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                                  timeout=60, env=env, cwd=tmp)

        for prog in ("pvnet-netback", "pvnet-netfront", "pvnet"):
            r = run(bin_ / prog, "--help")
            assert r.returncode == 0 and "usage" in r.stdout.lower(), (prog, r.stderr[-2000:])
        r = run(bin_ / "python", "-c", "import backend.tx.path, frontend.netfront, shared.cli, "
                "shared.endpoint.capture; print(shared.cli.__file__)")
        assert r.returncode == 0, r.stderr[-2000:]
        assert str(venv) in r.stdout, f"imported from outside the venv: {r.stdout}"
        empty = tmp / "no-lab"
        empty.mkdir()
        stats = run(bin_ / "pvnet", "stats", "--dir", empty)
        assert "no control sockets" in stats.stderr, stats.stderr[-2000:]
        cap = run(bin_ / "pvnet", "capture", "--help")
        assert cap.returncode == 0 and "snaplen" in cap.stdout.lower(), cap.stderr[-2000:]
        for r in (stats, cap):
            assert "Traceback" not in r.stderr, r.stderr[-2000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
