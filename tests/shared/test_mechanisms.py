"""The mechanism registry binds: every registered name is a module implementing its side's
protocol, has its own-work tests, and no code outside a mechanism's own module branches on a
mechanism's name (the core calls hooks; it never asks which mechanism it is)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from backend.mechanisms import load, own_counters
from backend.rx.modes.base import RxMechanism
from backend.tx.modes.base import TxMechanism
from frontend.grants.base import GrantPolicy
from frontend.mechanisms import grant_policy
from shared.protocol.grant import GrantTable
from shared.protocol.mechanisms import (
    GRANTS,
    RX,
    SIDES,
    TX,
    default,
    find,
    help_text,
    markdown_table,
    names,
)

ROOT = Path(__file__).resolve().parents[2]
#: each side's protocol and where its own-work tests live (mirroring the code)
BASES = {"tx": (TxMechanism, "backend/tx/modes"), "rx": (RxMechanism, "backend/rx/modes"),
         "grants": (GrantPolicy, "frontend/grants")}


@pytest.mark.parametrize("side,name", [(s, m.name) for s, ms in SIDES.items() for m in ms])
def test_every_registered_mechanism_is_a_module_with_its_own_tests(side, name):
    base, folder = BASES[side]
    cls = importlib.import_module(find(side, name).module).MECHANISM
    assert issubclass(cls, base)
    if side != "grants":
        assert load(side, name) is cls
        own = own_counters(cls)
        assert set(own.as_dict()) == set(cls.COUNTERS.split())
    tests = ROOT / "tests" / folder / f"test_{name}.py"
    assert tests.is_file(), f"{side} mechanism {name!r} has no own-work tests ({tests})"


def test_the_frontend_policy_is_the_one_whose_feature_was_agreed():
    """An extension agreed decides; a policy needing none is the one configured (never one
    whose extension was not agreed)."""
    table = GrantTable(memoryview(bytearray(4096)), 512)
    for m in GRANTS:
        agreed = {m.feature: True} if m.feature else {}
        assert type(grant_policy(agreed, table, prefer=m.name)).__module__ == m.module
        if m.feature:
            assert type(grant_policy({}, table, prefer=m.name)).__module__ == GRANTS[0].module


def test_names_defaults_and_errors_come_from_the_table():
    assert names("tx") == tuple(m.name for m in TX) and default("tx") == TX[0].name
    assert names("rx") == tuple(m.name for m in RX) and default("rx") == RX[0].name
    with pytest.raises(ValueError, match="must be one of lazy, map, copy, linux"):
        find("tx", "bogus")
    assert all(m.name in help_text("tx") for m in TX)


def _mode_compares(tree: ast.AST, registered: set[str]) -> list[int]:
    """Lines comparing something named like a mode to a registered mechanism name."""
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        consts = [c.value for s in sides for c in ast.walk(s)
                  if isinstance(c, ast.Constant) and isinstance(c.value, str)]
        named = " ".join(ast.unparse(s) for s in sides if not isinstance(s, ast.Constant))
        if "mode" in named and registered & set(consts):
            hits.append(node.lineno)
    return hits


def test_no_code_outside_a_mechanism_branches_on_its_name():
    registered = {m.name for ms in SIDES.values() for m in ms}
    mechanism_dirs = {ROOT / folder for _base, folder in BASES.values()}
    found = []
    for top in ("backend", "frontend", "shared"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.parent in mechanism_dirs:
                continue
            hits = _mode_compares(ast.parse(path.read_text()), registered)
            found += [f"{path.relative_to(ROOT)}:{line}" for line in hits]
    assert found == []


def test_the_docs_table_is_the_registry():
    text = (ROOT / "docs" / "mechanisms.md").read_text()
    start = text.index("<!-- mechanisms:")
    table = text[text.index("\n", start) + 1:text.index("<!-- /mechanisms -->")].strip()
    assert table == markdown_table()
