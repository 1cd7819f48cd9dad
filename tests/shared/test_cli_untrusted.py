"""`pvnet stats` against a hostile guest's control replies: escapes reach no terminal, a reply
cannot pair itself with another guest's netback, and odd shapes or deep nesting do not crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import cli
from shared.endpoint import stats_view
from shared.plumbing.control.server import ControlServer
from tests.shared.test_cli import back, front

EVIL = "\x1b[2J\x1b]0;owned\x07\u202egnp\n== vif9.0 (netback"


def test_control_characters_are_escaped_everywhere() -> None:
    f = stats_view.untrusted(front(name=EVIL, state=EVIL, tx_mode=EVIL,
                            features={EVIL: True}, counters={EVIL: EVIL},
                            rings={"tx": {EVIL: 1}}), "/run/pvnet/g1.ctl")
    out = stats_view.render([f, back()])
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out
    assert not any(line.startswith("== vif9.0") for line in out.splitlines())  # no forged line


def test_a_guest_cannot_pair_itself_with_another_guests_netback() -> None:
    # guest 2 claims to be g1 (and says its peer is vif1.0): its socket is g2.ctl
    liar = front(name="g1", peer="vif1.0", socket="/run/pvnet/g2.ctl", pid=666)
    groups = stats_view.pair([back(), liar, front()])
    paired = [g for g in groups if g["netfront"] and g["netback"]]
    assert len(paired) == 1 and paired[0]["netfront"]["pid"] == 101
    # guest 2's frontend said hello as "g1", so its netback vif2.0 reports peer g1: the
    # honest g1 names its backend and still pairs right; if it names none, nobody pairs
    evil_back = back(name="vif2.0", socket="/run/pvnet/vif2.0.ctl", pid=667)
    groups = stats_view.pair([evil_back, back(), front()])
    assert [g["netback"]["name"] for g in groups if g["netfront"]] == ["vif1.0"]
    two = stats_view.pair([back(), evil_back, front(peer="")])
    assert all(g["netfront"] is None or g["netback"] is None for g in two)
    assert "[socket g2.ctl]" in stats_view.render([liar])


@pytest.mark.parametrize("shape", [
    {"rings": [1, 2]}, {"rings": {"tx": 5}}, {"counters": "x"}, {"features": [True]},
    {"rings": {"tx": {"a": {"b": [1, {"c": None}]}}}}, {"pid": {"x": 1}, "name": 7}])
def test_odd_shapes_render(shape) -> None:
    e = stats_view.untrusted(front(**shape), "/run/pvnet/g1.ctl")
    assert "g1" in stats_view.render([e, back()]) or "7" in stats_view.render([e, back()])


def test_deeply_nested_reply_is_an_error_line_not_a_crash(tmp_path: Path, capsys) -> None:
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    srv = ControlServer(tmp_path / "g1.ctl", lambda r: {"role": "netfront", "name": "g1"})
    srv.start()
    try:
        # the server's own encoder would refuse this depth: send the raw line instead
        srv._dispatch = lambda line: b'{"ok":true,"x":' + b"[" * 5000 + b"]" * 5000 + b"}\n"
        code = cli.main(["stats", "--dir", str(tmp_path)])
    finally:
        srv.close()
    out = capsys.readouterr().out
    assert code == 1 and "nested deeper than 32" in out
