"""The README and docs/ hold to the code: every relative link resolves (file and heading
anchor), every `invoke` task, `pvnet` subcommand, `python -m` module and `path/file.py[:Name]`
named exists, and nothing points outside the repository or at an issue number.

Each check is a function of the text, so the tests at the bottom show that each one fails on
a bad line; the tests above run them over the real documents."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without its fenced code blocks (links there are not links)."""
    return _FENCE.sub("", text)


def _code(text: str) -> list[str]:
    """What a reader would type or look up: inline code spans and fenced blocks' lines."""
    spans = _CODE.findall(_prose(text))
    for block in _FENCE.findall(text):
        spans += block.splitlines()[1:-1]
    return spans


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation other than
    '-' and '_' dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _level, heading in _HEADING.findall(_prose(path.read_text())):
        s = slug(heading)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return frozenset(out)


def dead_links(path: Path, text: str) -> list[str]:
    bad = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check
            continue
        file, _, frag = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading #{frag} in {dest.relative_to(ROOT)}")
    return bad


@cache
def invoke_tasks() -> frozenset[str]:
    from invoke import Collection

    import tasks
    return frozenset(Collection.from_module(tasks).task_names)


def missing_tasks(text: str) -> list[str]:
    bad = []
    for span in _code(text):
        for m in re.finditer(r"\binvoke((?:\s+--?[\w-]+)*)\s+([a-z][\w-]*)", span):
            if m.group(2) not in invoke_tasks():
                bad.append(f"invoke {m.group(2)}")
    return bad


@cache
def pvnet_commands() -> frozenset[str]:
    from shared.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset(sub.choices)


def missing_pvnet_commands(text: str) -> list[str]:
    return [f"pvnet {m.group(1)}" for span in _code(text)
            for m in re.finditer(r"(?<![\w/-])pvnet\s+([a-z][\w-]*)", span)
            if m.group(1) not in pvnet_commands()]


def missing_modules(text: str) -> list[str]:
    bad = []
    for span in _code(text):
        for m in re.finditer(r"\bpython3?(?:\.\d+)?\s+-m\s+([\w.]+)", span):
            try:
                found = importlib.util.find_spec(m.group(1)) is not None
            except ImportError:
                found = False
            if not found:
                bad.append(f"python -m {m.group(1)}")
    return bad


@cache
def _defined(path: Path) -> dict[str, frozenset[str]]:
    """Top-level names of a module, each with the names defined in its body (a class's
    methods and attributes)."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        inner = frozenset(
            n.name for n in getattr(node, "body", [])
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))) | frozenset(
            t.id for n in getattr(node, "body", []) if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name))
        for name in names:
            out[name] = inner
    return out


_PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|sh|yaml|toml|patch|txt))"
                   r"(?::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?))?")


def missing_paths(text: str) -> list[str]:
    """Every `dir/file.ext` named (a glob or a placeholder aside) exists from the top of the
    checkout, and every `dir/file.py:Name` or `:Class.method` is defined there."""
    bad = []
    for span in _code(text):
        for m in _PATH.finditer(span):
            rel, name = m.group(1), m.group(2)
            if any(c in rel for c in "*<>"):
                continue
            path = ROOT / rel
            if not path.is_file():
                bad.append(f"{rel}: no such file")
            elif name:
                top, _, attr = name.partition(".")
                defined = _defined(path)
                if top not in defined or attr and attr not in defined[top]:
                    bad.append(f"{rel}:{name}: not defined there")
    return bad


_OUTSIDE = re.compile(r"\.\./shared|DESIGN\.md|FACTS\.md|\b(?i:issues?) \d+|(?<![\w&])#\d+\b")


def outside_refs(text: str) -> list[str]:
    return [m.group(0) for m in _OUTSIDE.finditer(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("check", [missing_tasks, missing_pvnet_commands, missing_modules,
                                   missing_paths, outside_refs],
                         ids=lambda f: f.__name__)
def test_the_docs_name_what_exists(doc: Path, check) -> None:
    assert check(doc.read_text()) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(doc: Path) -> None:
    assert dead_links(doc, doc.read_text()) == []


def test_the_docs_are_found() -> None:
    names = {p.name for p in DOCS}
    assert {"README.md", "design.md", "performance.md", "testing.md"} <= names


# --- each check bites -----------------------------------------------------------------------

def test_a_dead_link_is_found() -> None:
    readme = ROOT / "README.md"
    assert dead_links(readme, "[x](docs/nothing.md)") == ["docs/nothing.md: no such file"]
    assert dead_links(readme, "[x](docs/design.md#no-such-heading)") != []
    assert dead_links(readme, "[x](#no-such-heading)") != []
    assert dead_links(readme, "[x](docs/design.md#what-pvnet-chose-and-why)") == []
    assert dead_links(readme, "```\n[x](nowhere.md)\n```") == []  # code, not a link


def test_slugs_are_githubs() -> None:
    assert slug("Set-up (Debian 12, as root)") == "set-up-debian-12-as-root"
    assert slug("The literature, reproduced (`invoke paper`)") == \
        "the-literature-reproduced-invoke-paper"
    assert slug("Per-frame cost: how the bench measures it") == \
        "per-frame-cost-how-the-bench-measures-it"


def test_a_missing_command_is_found() -> None:
    assert missing_tasks("run `invoke bench --quick` then `invoke --help up`") == []
    assert missing_tasks("run `invoke frobnicate`") == ["invoke frobnicate"]
    assert missing_pvnet_commands("`pvnet stats --watch`, `pvnet-netback --vif x`") == []
    assert missing_pvnet_commands("`pvnet frob vif1.0`") == ["pvnet frob"]
    assert missing_modules("`python -m shared.protocol.mechanisms`") == []
    assert missing_modules("`python -m shared.no_such_module`") == [
        "python -m shared.no_such_module"]


def test_a_missing_path_or_name_is_found() -> None:
    assert missing_paths("`backend/tx/path.py:TxPath._pass`, `tests/mutants/*.patch`") == []
    assert missing_paths("`backend/nothing.py`") == ["backend/nothing.py: no such file"]
    assert missing_paths("`backend/tx/path.py:TxPath._nothing`") != []
    assert missing_paths("`backend/tx/path.py:nothing`") != []


def test_an_outside_reference_is_found() -> None:
    for bad in ("see ../shared/x", "DESIGN.md", "FACTS.md says", "issue 13", "Issue 9's",
                "Snabb #719"):
        assert outside_refs(bad) != [], bad
    assert outside_refs("docs/design.md, netif.h, 2026-12-07, 18 slots") == []
