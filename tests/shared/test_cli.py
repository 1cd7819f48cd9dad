"""`pvnet stats` rendering from fake stats dicts, and the command against real control sockets."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from shared import cli
from shared.endpoint import stats_view
from shared.plumbing.control.server import ControlServer


def front(**over: Any) -> dict[str, Any]:
    d = {"socket": "/run/pvnet/g1.ctl", "role": "netfront", "name": "g1", "peer": "vif1.0",
         "pid": 101, "state": "Connected", "tx_mode": "lazy",
         "features": {"feature-sg": True, "feature-header-slots": True},
         "rings": {"tx": {"tx_packets": 10, "tx_bytes": 15000, "req_prod": 12, "custom": 1},
                   "rx": {"rx_packets": 4, "rx_bytes": 400}},
         "counters": {"disconnects": 0}}
    d.update(over)
    return d


def back(**over: Any) -> dict[str, Any]:
    d = {"socket": "/run/pvnet/vif1.0.ctl", "role": "netback", "name": "vif1.0", "peer": "g1",
         "pid": 202, "state": "Connected", "tx_mode": "lazy",
         "features": {"feature-sg": True, "feature-header-slots": False},
         "rings": {"tx": {"tx_packets": 10, "tx_zerocopy_sent": 7, "grant_maps": 2,
                          "req_cons": 12, "zz_extra": ""},
                   "rx": {"rx_packets": 4}},
         "counters": {"malformed": 1, "last_error": "ring overflow"}}
    d.update(over)
    return d


def rows(text: str) -> dict[str, list[str]]:
    """counter name -> [netfront cell, netback cell] for the first occurrence of each name."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^     (\S+)\s+(.+?)\s{3,}(.+)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = [m.group(2).strip(), m.group(3).strip()]
    return out


def test_pairs_front_and_back_by_name_and_peer() -> None:
    groups = stats_view.pair([back(), front(), front(name="g2", peer="vif2.0", socket="/x/g2.ctl")])
    assert [(g["netfront"] or {}).get("name") for g in groups] == ["g1", "g2"]
    assert groups[0]["netback"]["name"] == "vif1.0"
    assert groups[1]["netback"] is None


def test_pairs_when_only_backend_knows_the_peer() -> None:
    groups = stats_view.pair([front(peer=""), back()])
    assert len(groups) == 1 and groups[0]["netback"] is not None


def test_render_table_layout() -> None:
    text = stats_view.render([front(), back()])
    assert text.startswith("== g1 (netfront, pid 101, Connected, tx_mode lazy)  <->  vif1.0")
    assert "feature-header-slots yes/no" in text
    assert text.index("ring tx") < text.index("ring rx") < text.index("counters")
    header = next(ln for ln in text.splitlines() if ln.strip().startswith("ring tx"))
    assert header.split()[-2:] == ["netfront", "netback"]
    r = rows(text)
    assert r["tx_packets"] == ["10", "10"]
    assert r["tx_zerocopy_sent"] == ["-", "7"]
    assert r["req_prod"] == ["12", "-"]
    assert r["malformed"] == ["-", "1"]
    assert r["last_error"][1] == "ring overflow"
    assert r["zz_extra"] == ["-", '""']  # an empty string is not the same as absent


def test_canonical_order_then_extras_sorted() -> None:
    text = stats_view.render([front(), back()])
    tx_block = text[text.index("ring tx"): text.index("ring rx")]
    names = [ln.split()[0] for ln in tx_block.splitlines()[1:] if ln.strip()]
    canon = [n for n in names if n in stats_view.CANONICAL]
    assert canon == sorted(canon, key=stats_view.CANONICAL.index)
    assert names[-2:] == ["custom", "zz_extra"]  # unknown names after canonical ones, sorted


def test_all_tables_share_column_alignment() -> None:
    text = stats_view.render([front(), back()])
    lines = [ln for ln in text.splitlines() if ln.startswith("     ")]
    assert len({len(ln) for ln in lines}) == 1


def test_missing_end_and_unknown_sections_render() -> None:
    text = stats_view.render([back(rings={"tx": {}, "rx": {"rsp_prod": 5}}, counters=None)])
    assert "netfront: (no control socket)" in text
    assert rows(text)["rsp_prod"] == ["-", "5"]


def queues(*tx: int) -> list[dict[str, Any]]:
    return [{"queue": q, "pid": 300 + q, "rings": {"tx": {"tx_packets": n},
                                                  "rx": {"rx_packets": q}}}
            for q, n in enumerate(tx)]


def test_per_queue_tables_follow_the_sum_with_both_ends_side_by_side() -> None:
    f = front(queues=queues(4, 6))
    b = back(queues=queues(3, 7) + [{"queue": "evil"}, "junk"], rings={
        "tx": {"tx_packets": 10}, "rx": {"rx_packets": 1}})
    text = stats_view.render([f, b])
    titles = [ln.strip().split("  ")[0] for ln in text.splitlines()
              if ln.startswith("   ") and not ln.startswith("     ")]
    assert titles[1:] == ["ring tx (all queues)", "ring rx (all queues)", "queue 0 ring tx",
                          "queue 0 ring rx", "queue 1 ring tx", "queue 1 ring rx", "counters"]
    q1 = text[text.index("queue 1 ring tx"):text.index("queue 1 ring rx")]
    assert rows(q1)["tx_packets"] == ["6", "7"]
    lines = [ln for ln in text.splitlines() if ln.startswith("     ")]
    assert len({len(ln) for ln in lines}) == 1  # the long titles do not break the columns
    f2 = copy.deepcopy(f)
    f2["queues"][1]["rings"]["tx"]["tx_packets"] = 26
    rates = stats_view.compute_rates([f], [f2], dt=2.0)
    assert rates[(f["socket"], "queue 1 tx", "tx_packets")] == 10.0


def test_unreachable_is_one_line() -> None:
    text = stats_view.render([front(), back(), {"socket": "/x/g2.ctl", "error": "/x/g2.ctl: gone"}])
    assert text.splitlines()[-1] == "!! /x/g2.ctl: gone"
    assert stats_view.render([]) == "no control sockets found"


def test_rates_for_packet_and_byte_counters_only() -> None:
    f0, b0 = front(), back()
    f1 = copy.deepcopy(f0)
    f1["rings"]["tx"].update(tx_packets=2010, tx_bytes=15000 + 250_000_000, req_prod=99)
    rates = stats_view.compute_rates([f0, b0], [f1, b0], dt=2.0)
    assert rates[(f0["socket"], "tx", "tx_packets")] == 1000.0
    assert rates[(f0["socket"], "tx", "tx_bytes")] == 125_000_000.0
    assert (f0["socket"], "tx", "req_prod") not in rates
    r = rows(stats_view.render([f1, b0], rates))
    assert r["tx_packets"][0] == "2010 (1.00 k/s)"
    assert r["tx_bytes"][0].endswith("(1.00 Gbit/s)")
    assert r["tx_packets"][1] == "10 (0/s)"


def test_no_rate_across_restart_or_reset() -> None:
    f0 = front()
    f1 = front(pid=999)
    assert stats_view.compute_rates([f0], [f1], 1.0) == {}
    f2 = copy.deepcopy(f0)
    f2["rings"]["tx"]["tx_packets"] = 1  # went backwards
    assert (f0["socket"], "tx", "tx_packets") not in stats_view.compute_rates([f0], [f2], 1.0)


# -- the command, against real sockets (no root needed) --------------------------------------


@pytest.fixture
def lab_dir(tmp_path: Path):
    servers = [
        ControlServer(tmp_path / "g1.ctl", lambda r: front(socket="bogus")),
        ControlServer(tmp_path / "vif1.0.ctl", lambda r: back()),
    ]
    for s in servers:
        s.start()
    yield tmp_path
    for s in servers:
        s.close()


def test_main_stats_table(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stats", "--dir", str(lab_dir)]) == 0
    out = capsys.readouterr().out
    assert "== g1 (netfront" in out and "vif1.0 (netback" in out


def test_main_stats_json(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stats", "--dir", str(lab_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {e["role"] for e in data} == {"netfront", "netback"}
    assert {e["socket"] for e in data} == {str(lab_dir / "g1.ctl"), str(lab_dir / "vif1.0.ctl")}


def test_main_unreachable_socket_is_not_a_traceback(
    lab_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = lab_dir / "gone.ctl"
    code = cli.main(["stats", "--socket", str(lab_dir / "g1.ctl"), "--socket", str(missing)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"!! {missing}: no such control socket" in out
    assert "Traceback" not in out


def test_main_no_sockets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stats", "--dir", str(tmp_path)]) == 1
    assert "no control sockets" in capsys.readouterr().err


def test_main_watch_redraws_until_ctrl_c(
    lab_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) > 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", fake_sleep)
    assert cli.main(["stats", "--dir", str(lab_dir), "--watch", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("\x1b[H\x1b[2J") == 2 and calls[0] == 0.5
    assert "(0/s)" in out


def test_main_query(lab_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["query", str(lab_dir / "vif1.0.ctl"), "ping"]) == 0
    assert json.loads(capsys.readouterr().out)["pong"] is True
    assert cli.main(["query", str(lab_dir / "vif1.0.ctl"), '{"cmd": "x"}']) == 0  # fake: any cmd
    assert cli.main(["query", str(lab_dir / "nope.ctl")]) == 1
    assert "no such control socket" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["stats", "--help"], ["query", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    assert "usage: pvnet" in capsys.readouterr().out
