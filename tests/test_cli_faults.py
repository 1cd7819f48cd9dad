"""`pvnet stats` reports faults by kind (shared/faults.py): one line per end, kept in --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared import cli
from shared.endpoint import stats_view
from shared.plumbing.control.server import ControlServer
from tests.shared.test_cli import back, front, rows

FAULTS = {"faults_peer": 3, "faults_own": 0, "faults_os": 1}


@pytest.fixture
def lab_dir(tmp_path: Path):
    """A netfront without fault counters (an older process) and a netback with them."""
    servers = [
        ControlServer(tmp_path / "g1.ctl", lambda r: front()),
        ControlServer(tmp_path / "vif1.0.ctl",
                      lambda r: back(counters={"malformed": 3, **FAULTS})),
    ]
    for s in servers:
        s.start()
    yield tmp_path
    for s in servers:
        s.close()


def test_text_output_has_one_faults_line_per_end_and_no_fault_rows(lab_dir: Path, capsys
                                                                   ) -> None:
    assert cli.main(["stats", "--dir", str(lab_dir)]) == 0
    out = capsys.readouterr().out
    assert "   faults (netback): peer 3, own 0, OS 1" in out.splitlines()
    assert "faults (netfront)" not in out  # it does not count them: no line, no zeros
    table = rows(out)
    assert table["malformed"] == ["-", "3"]
    assert not set(FAULTS) & set(table)


def test_json_keeps_the_fault_counters(lab_dir: Path, capsys) -> None:
    assert cli.main(["stats", "--dir", str(lab_dir), "--json"]) == 0
    data = {e["role"]: e for e in json.loads(capsys.readouterr().out)}
    assert {k: data["netback"]["counters"][k] for k in FAULTS} == FAULTS


def test_fault_counters_at_the_top_level_and_missing_kinds() -> None:
    assert stats_view.faults_line(back(faults_peer=2, faults_os=0)) == "peer 2, own -, OS 0"
    assert stats_view.faults_line(None) == "" and stats_view.faults_line(front()) == ""
