"""The conftest hooks that keep the full tier honest: a skipped full-tier test is a failure
under CI (or as root with QEMU), and a run that leaves full-tier tests out says how many."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = '''
import pytest

@pytest.mark.full
def test_needs_the_lab():
    pytest.skip("needs root")

@pytest.mark.full
def test_runs():
    pass

def test_fast():
    pass
'''


def run_sample(tmp_path: Path, *args: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    full: the full tier\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest",
                           "-p", "no:cacheprovider", *args, "test_sample.py"], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=120)


def test_a_skipped_full_tier_test_fails_under_ci(tmp_path: Path) -> None:
    r = run_sample(tmp_path, ci="true")
    assert r.returncode == 1, r.stdout
    assert "1 failed, 2 passed" in r.stdout
    assert "full-tier test skipped although it must run (CI is set): needs root" in r.stdout


def test_a_run_without_the_full_tier_says_how_many_did_not_run(tmp_path: Path) -> None:
    r = run_sample(tmp_path, "-m", "not full", ci=None)
    assert r.returncode == 0, r.stdout
    assert "NOTE: 2 full-tier test(s) did NOT run" in r.stdout


def test_a_run_that_writes_into_the_checkout_fails(tmp_path: Path) -> None:
    """The checkout guard: a key left in the source tree by a test is a failed run."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "test_leak.py").write_text(
        "from pathlib import Path\n\ndef test_leaves_a_key():\n"
        "    (Path(__file__).parent / 'id_ed25519').write_text('secret')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p",
                        "no:cacheprovider", "test_leak.py"], cwd=tmp_path, env=env, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert "1 passed" in r.stdout
    assert "FAILED: the test run wrote into the checkout" in r.stdout
    assert "?? id_ed25519" in r.stdout
