"""Control socket: round trips, bad requests answered (not fatal), 0600, many clients at once."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from shared.plumbing.control.client import ControlError, query
from shared.plumbing.control.protocol import MAX_LINE, dispatch
from shared.plumbing.control.server import ControlServer

SLOW_ENTERED = threading.Event()
SLOW_RELEASE = threading.Event()


def stats_handler(request: dict) -> dict:
    cmd = request["cmd"]
    if cmd == "stats":
        return {"role": "netback", "name": "vif1.0", "rings": {"tx": {"tx_packets": 3}}}
    if cmd == "echo":
        if "value" not in request:
            raise ValueError("echo needs 'value'")
        return {"value": request["value"]}
    if cmd == "boom":
        raise RuntimeError("handler bug")
    if cmd == "notdict":
        return [1, 2]  # type: ignore[return-value]
    if cmd == "slow":  # held until the test lets it go: "in the handler" is a known state
        SLOW_ENTERED.set()
        SLOW_RELEASE.wait(5)
        return {}
    raise KeyError(cmd)


@pytest.fixture
def server(tmp_path: Path):
    srv = ControlServer(tmp_path / "t.ctl", stats_handler).start()
    yield srv
    srv.close()


def raw(path: str, payload: bytes, replies: int = 1, timeout: float = 2.0) -> list[dict]:
    """Send raw bytes, read `replies` reply lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        buf = b""
        while buf.count(b"\n") < replies:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_round_trip_and_ping(server: ControlServer) -> None:
    assert query(server.path, {"cmd": "stats"}) == {
        "role": "netback", "name": "vif1.0", "rings": {"tx": {"tx_packets": 3}}}
    pong = query(server.path, {"cmd": "ping"})
    assert pong["pong"] is True and pong["pid"] == os.getpid()


def test_reply_carries_ok_true(server: ControlServer) -> None:
    assert raw(server.path, b'{"cmd":"echo","value":7}\n') == [{"ok": True, "value": 7}]


def test_socket_mode_0600(server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"{not json\n", "malformed JSON"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'"stats"\n', "must be a JSON object"),
        (b'{"nocmd": 1}\n', '"cmd"'),
        (b'{"cmd": "nope"}\n', "unknown command"),
        (b'{"cmd": "echo"}\n', "bad request: echo needs 'value'"),
        (b'{"cmd": "boom"}\n', "internal error"),
        (b'{"cmd": "notdict"}\n', "not a dict"),
        (b"\xff\xfe\n", "malformed JSON"),
    ],
)
def test_bad_requests_get_errors_and_server_keeps_serving(
    server: ControlServer, payload: bytes, needle: str
) -> None:
    [reply] = raw(server.path, payload)
    assert reply["ok"] is False
    assert needle in reply["error"]
    assert query(server.path, {"cmd": "stats"})["name"] == "vif1.0"


def test_query_raises_control_error_on_error_reply(server: ControlServer) -> None:
    with pytest.raises(ControlError, match="unknown command") as info:
        query(server.path, {"cmd": "nope"})
    assert info.value.reply is not None and "unknown command" in info.value.reply["error"]


def test_oversized_line_is_rejected_and_connection_resyncs(server: ControlServer) -> None:
    big = b'{"cmd":"echo","value":"' + b"x" * (MAX_LINE + 10) + b'"}\n'
    replies = raw(server.path, big + b'{"cmd":"echo","value":1}\n', replies=2)
    assert replies[0]["ok"] is False and "longer than" in replies[0]["error"]
    assert replies[1] == {"ok": True, "value": 1}


def test_oversized_line_sent_slowly(server: ControlServer) -> None:
    """The limit holds even when the line arrives in pieces with no newline yet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.connect(server.path)
        for _ in range(5):
            s.sendall(b"y" * (MAX_LINE // 2))
        reply = json.loads(s.recv(65536).split(b"\n")[0])
        assert reply["ok"] is False and "longer than" in reply["error"]
        s.sendall(b'tail-of-the-big-line\n{"cmd":"echo","value":2}\n')
        assert json.loads(s.recv(65536).split(b"\n")[0]) == {"ok": True, "value": 2}


def test_pipelined_requests_on_one_connection(server: ControlServer) -> None:
    payload = b"".join(b'{"cmd":"echo","value":%d}\n' % i for i in range(50))
    replies = raw(server.path, payload, replies=50)
    assert [r["value"] for r in replies] == list(range(50))


def test_many_concurrent_clients(server: ControlServer) -> None:
    errors: list[BaseException] = []
    idle = []
    # a few clients that connect and never send: they must not block anyone
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.path)
        idle.append(s)

    def client(i: int) -> None:
        try:
            for j in range(10):
                assert query(server.path, {"cmd": "echo", "value": [i, j]})["value"] == [i, j]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for s in idle:
        s.close()
    assert not errors
    assert query(server.path, {"cmd": "ping"})["pong"]


def test_does_not_block_caller_thread(tmp_path: Path) -> None:
    """start() returns at once and a slow handler runs on the server thread, not ours."""
    with ControlServer(tmp_path / "s.ctl", stats_handler) as srv:
        done = threading.Event()
        SLOW_ENTERED.clear()
        SLOW_RELEASE.clear()
        threading.Thread(target=lambda: (query(srv.path, {"cmd": "slow"}), done.set())).start()
        # the handler is running (and blocked) on the server's thread while this one goes on
        assert SLOW_ENTERED.wait(3)
        assert threading.current_thread() is threading.main_thread() and not done.is_set()
        SLOW_RELEASE.set()
        assert done.wait(3)


def test_client_disconnecting_mid_request(server: ControlServer) -> None:
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(server.path)
            s.sendall(b'{"cmd":"sta')
    assert query(server.path, {"cmd": "stats"})["name"] == "vif1.0"


def test_close_removes_socket_file(tmp_path: Path) -> None:
    srv = ControlServer(tmp_path / "c.ctl", stats_handler).start()
    assert os.path.exists(srv.path)
    srv.close()
    assert not os.path.exists(srv.path)
    srv.close()  # idempotent


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.ctl"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # file remains, nobody listens
    with ControlServer(path, stats_handler) as srv:
        assert query(srv.path, {"cmd": "ping"})["pong"]


def test_live_socket_is_not_stolen(server: ControlServer) -> None:
    with pytest.raises(ControlError, match="another process"):
        ControlServer(server.path, stats_handler).start()
    assert query(server.path, {"cmd": "ping"})["pong"]


def test_query_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no such control socket"):
        query(tmp_path / "missing.ctl", {"cmd": "ping"})
    path = tmp_path / "refused.ctl"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    try:
        with pytest.raises(ControlError, match="connection refused"):
            query(path, {"cmd": "ping"})
    finally:
        s.close()


def test_query_timeout(tmp_path: Path) -> None:
    path = tmp_path / "mute.ctl"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)  # accepts (in the backlog) but never answers
    try:
        with pytest.raises(ControlError, match="no reply within 0.2 s"):
            query(path, {"cmd": "ping"}, timeout=0.2)
    finally:
        s.close()


def test_dispatch_table(tmp_path: Path) -> None:
    handler = dispatch({"stats": lambda r: {"n": 1}})
    with ControlServer(tmp_path / "d.ctl", handler) as srv:
        assert query(srv.path, {"cmd": "stats"}) == {"n": 1}
        with pytest.raises(ControlError, match="known: ping, stats"):
            query(srv.path, {"cmd": "other"})
