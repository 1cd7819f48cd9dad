"""The README's set-up block is what CI runs (issue 22, item 4): a fresh venv, the pip line,
`invoke up`, lint, both test tiers, the known bugs; `.ci/run` reads it from the README
instead of repeating it, so the two cannot drift apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme_setup import README, setup_commands

REPO = README.parent


def test_the_set_up_block_is_a_venv_pip_up_lint_test_and_the_known_bugs() -> None:
    cmds = setup_commands()
    assert cmds[0].startswith("python3 -m venv ") and "/bin/activate" in cmds[0]
    assert cmds[1:] == ["pip install -e '.[lab,test]'", "invoke up", "invoke lint",
                        "invoke test", "tests/mutants/check.sh"]


def test_ci_runs_the_readmes_commands_all_but_up() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert 'python3 tests/readme_setup.py --skip "invoke up"' in ci
    lines = [ln.strip() for ln in ci.splitlines()]
    skipped = ["invoke test", "tests/mutants/check.sh"]
    assert all(f'--skip "{c}"' in ci and c in lines for c in skipped)  # run by name, once
    assert lines.index(". .venv/bin/activate") < lines.index("invoke test")
    assert "pip install" not in ci  # no install of its own: the README's line
    out = subprocess.run([sys.executable, str(REPO / "tests" / "readme_setup.py"), "--skip",
                          "invoke up"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [c for c in setup_commands() if c != "invoke up"]


def test_a_readme_without_the_block_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Set-up"):
        setup_commands("# pvnet\n\nno set-up here\n")
