"""The soak, short (full tier, ~1.5 minutes): what ``invoke soak`` runs for as long as you
like. Verified transfers both ways on two guests (lazy; map + persistent grants) while
frontends and backends are SIGKILLed and respawned; the bar is every transfer verified and
zero leaks of any kind, also after the lab is taken down. Private names (pvz-*,
10.85.0.0/24)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from shared.lab.soak import Soak, SoakConfig

pytestmark = [
    pytest.mark.full,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                       reason="the namespace placement needs root and iperf3"),
]

MINUTES = float(os.environ.get("PVNET_SOAK_MINUTES", "1"))


@pytest.mark.parametrize("queues", [1, 2])
def test_short_soak_verifies_every_transfer_and_leaks_nothing(tmp_path, queues):
    """With 2 queues a killed end takes its queue workers with it (PDEATHSIG) and a
    respawned one forks new ones: the leak check counts the workers as processes."""
    out = tmp_path / "soak.json"
    lines: list[str] = []
    report = Soak(SoakConfig(minutes=MINUTES, restart_every=9, json_path=str(out),
                             transfer_bytes=32 << 20, prefix="pvz", net="10.85.0",
                             state_dir=str(tmp_path / "state"), queues=queues),
                  say=lines.append).run()
    print("\n".join(lines))
    assert report.errors == [], report.errors
    assert report.leaks == {"fds": 0, "maps": 0, "grants": 0, "devices": 0, "processes": 0}, \
        report.leak_details
    assert report.transfers_failed == 0 and report.connections_lost == 0
    assert report.transfers_verified == report.transfers > 10
    assert report.bytes_verified >= report.transfers_verified * (32 << 20)
    assert report.restarts["frontend"] >= 1 and report.restarts["backend"] >= 1
    assert any(line.startswith("soak ") for line in lines)  # the progress line
    saved = json.loads(out.read_text())
    for key in ("connections_lost", "bytes_verified", "leaks"):
        assert key in saved
    assert report.ok
    if queues > 1:  # the lab really ran with several queues: each end said so
        logs = "".join(p.read_text() for p in (tmp_path / "state" / "log").glob("*.log"))
        assert logs.count(f"{queues} queues") >= 4, logs[-2000:]
