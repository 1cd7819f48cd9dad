"""The arrows run one way (docs/layout.md, "Import contracts"): what lint-imports cannot see.

lint-imports checks the packages against the contracts in pyproject.toml (`invoke lint`, CI);
these tests add the files that are not packages - tasks.py and the guest's init, which run the
drivers as processes and must import neither - and a module-level cycle check: import-linter's
`acyclic_siblings` looks at siblings only, so a package importing a module that imports the
package back is caught here.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGES = ("shared", "frontend", "backend")
DRIVERS = ("frontend", "backend")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports, at any depth (function bodies included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def lab_scripts() -> list[Path]:
    """The lab's Python files that live outside the packages."""
    return [REPO / "tasks.py", *sorted((REPO / "vm-images").rglob("*.py"))]


def test_lab_scripts_import_no_driver():
    """tasks.py and vm-images/ start the drivers as processes; they never import them."""
    scripts = lab_scripts()
    assert REPO / "vm-images" / "guest" / "guest_init.py" in scripts
    bad = {f"{p.relative_to(REPO)} imports {m}" for p in scripts for m in imported_modules(p)
           if m.split(".")[0] in DRIVERS}
    assert not bad, sorted(bad)


def test_imported_modules_sees_nested_imports(tmp_path):
    """The scan above must see a lazy import in a function, or it checks nothing there."""
    f = tmp_path / "t.py"
    f.write_text("import os\ndef f():\n    from backend.tx.filter import Filter\n"
                 "    import frontend.tx.queue as tx\n")
    assert {"backend.tx.filter", "frontend.tx.queue", "os"} == imported_modules(f)


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The import cycles among `modules`, each named module by module (first one repeated at
    the end): for every import a -> b, grimp's shortest chain back from b to a, if any."""
    found: dict[frozenset[str], list[str]] = {}
    for a in sorted(modules):
        for b in sorted(graph.find_modules_directly_imported_by(a) & modules):
            back = graph.find_shortest_chain(importer=b, imported=a)
            if back and back[-1] == a:
                found.setdefault(frozenset(back), [a, *back])
    return sorted(found.values())


def package_graph() -> grimp.ImportGraph:
    """The import graph of the checkout's packages (not an installed copy of them)."""
    sys.path.insert(0, str(REPO))
    try:
        return grimp.build_graph(*ROOT_PACKAGES, cache_dir=None,
                                 exclude_type_checking_imports=True)
    finally:
        sys.path.remove(str(REPO))


def test_no_import_cycles():
    graph = package_graph()
    mods = {m for m in graph.modules if m.split(".")[0] in ROOT_PACKAGES}
    found = cycles(graph, mods)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_cycle_check_names_the_cycle():
    """Including a package's __init__ importing a child that imports it back."""
    graph = grimp.ImportGraph()
    for a, b in (("p", "p.a"), ("p.a", "p"), ("p.b", "p.c"), ("p.c", "p.d"), ("p.d", "p.b"),
                 ("p.e", "p.b")):
        graph.add_import(importer=a, imported=b)
    assert cycles(graph, set(graph.modules)) == [["p", "p.a", "p"],
                                                 ["p.b", "p.c", "p.d", "p.b"]]


def test_import_contracts_are_kept():
    """The contracts in pyproject.toml, as `invoke lint` checks them (its output on failure)."""
    beside = Path(sys.executable).with_name("lint-imports")
    linter = str(beside) if beside.exists() else shutil.which("lint-imports")
    if linter is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[lab,test]'")
    out = subprocess.run([linter, "--no-cache", "--no-logo"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


MAX_LINES = 400


def test_no_module_outside_tests_is_longer_than_400_lines():
    """Modules small and named for what they hold (issue 15): a file past the limit names
    itself here, with its length, so the split happens before it lands."""
    files = [p for pkg in (*ROOT_PACKAGES, "vm-images") for p in (REPO / pkg).rglob("*.py")]
    files.append(REPO / "tasks.py")
    long = {str(p.relative_to(REPO)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert len(files) > 50  # the walk found the tree
    assert long == {}
