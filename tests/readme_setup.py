"""The README's set-up commands, read from its "## Set-up" block: what a newcomer types, what
CI runs (``.ci/run``: ``python3 tests/readme_setup.py --skip 'invoke up'`` prints the script)
and what ``tests/lab/test_first_run.py`` runs in a fresh clone and venv. One reader, so the
three cannot drift apart. Standard library only: CI runs it before anything is installed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def setup_commands(text: str | None = None) -> list[str]:
    """The commands of the set-up block, in order, each without its comment."""
    text = README.read_text() if text is None else text
    block = re.search(r"^## Set-up.*?```sh\n(.*?)```", text, re.S | re.M)
    if block is None:
        raise ValueError("README.md has no '## Set-up' section with a sh block")
    lines = (ln.split("#", 1)[0].strip() for ln in block.group(1).splitlines())
    return [ln for ln in lines if ln]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--skip", action="append", default=[], metavar="COMMAND",
                   help="leave this command out (repeatable)")
    a = p.parse_args()
    for cmd in setup_commands():
        if cmd not in a.skip:
            print(cmd)


if __name__ == "__main__":
    main()
