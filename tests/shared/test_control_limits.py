"""Control-socket limits against hostile clients: nesting depth, client count, no fd left."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from pathlib import Path

import pytest

from shared.plumbing import jsonline
from shared.plumbing.control.client import ControlError, query
from shared.plumbing.control.server import MAX_CLIENTS, ControlServer
from tests.inproc import fd_count, wait_for
from tests.shared.test_control import raw, stats_handler


@pytest.fixture
def server(tmp_path: Path):
    srv = ControlServer(tmp_path / "t.ctl", stats_handler).start()
    yield srv
    srv.close()


def test_deep_nesting_is_the_clients_malformed_input_and_the_thread_lives(server) -> None:
    for line in (b"[" * 3000, b'{"cmd":"echo","value":' + b"[" * 5000 + b"]" * 5000 + b"}"):
        reply = raw(server.path, line + b"\n")[0]
        assert reply["ok"] is False and "nested deeper than 32" in reply["error"]
    assert server._thread.is_alive()
    assert query(server.path, {"cmd": "echo", "value": [[["ok"]]]}) == {"value": [[["ok"]]]}


def test_brackets_inside_strings_do_not_count() -> None:
    assert jsonline.loads(b'{"a":"' + b"[" * 100 + b'"}') == {"a": "[" * 100}
    assert jsonline.depth(b'[[{"x":"]]]]"}]]') == 3
    assert jsonline.depth(b'[[{"x":"\\"[[\\\\"}]]') == 3  # escapes inside strings
    assert jsonline.loads(b'[[{"x":"]]]]"}]]', max_depth=3) == [[{"x": "]]]]"}]]
    with pytest.raises(jsonline.TooDeep):
        jsonline.loads(b'[[{"x":["[[["]}]]', max_depth=3)


MIB = 1 << 20
#: lines of about `n` bytes a peer may send: deep, unterminated strings full of escaped quotes
#: (the old nesting guard restarted its string scan at every quote: 4-5 s for 32 KiB), wide,
#: and just within or past the cap
HOSTILE_LINES = {
    "open brackets": lambda n: b"[" * n,
    "open objects": lambda n: b'{"a":' * (n // 5),
    "escaped quotes, unterminated": lambda n: b'"' + b'\\"' * (n // 2),
    "quotes in brackets": lambda n: b'["' + b'\\"[' * (n // 3),
    "bare quotes": lambda n: b'"' * n,
    "wide and shallow": lambda n: b"[" + b"[[],{}]," * (n // 8) + b"0]",
    "32 deep, wide": lambda n: b"[" * 32 + b"0," * (n // 2 - 40) + b"0" + b"]" * 32,
    "33 deep, wide": lambda n: b"[" * 33 + b"0," * (n // 2 - 40) + b"0" + b"]" * 33,
    "long string": lambda n: b'"' + b"x" * n + b'"',
}


def _decide(line: bytes) -> tuple[str, object, float]:
    """(verdict, value, CPU seconds) of one jsonline.loads."""
    value = None
    t = time.process_time()
    try:
        value = jsonline.loads(line)
        verdict = "parsed"
    except jsonline.TooDeep:
        verdict = "too deep"
    except ValueError:
        verdict = "malformed"
    return verdict, value, time.process_time() - t


@pytest.mark.parametrize("name", HOSTILE_LINES)
def test_a_1mib_line_is_parsed_or_refused_in_linear_time(name) -> None:
    """Finding 5: the nesting guard was quadratic. Every 1 MiB line is now decided (parsed, or
    refused as the peer's malformed input: a ValueError, TooDeep for nesting) in time linear in
    its size: 8 times the bytes cost at most 8 times the CPU (with room for a loaded machine;
    a quadratic guard costs 64 times), and well under the seconds the old guard took
    (measured: 1-250 ms of CPU each on the 2-core machine; 5 s for 32 KiB before)."""
    make = HOSTILE_LINES[name]
    verdict, value, spent = _decide(make(MIB))
    small = min(_decide(make(MIB // 8))[2] for _ in range(3))
    want = {"open brackets": "too deep", "open objects": "too deep",
            "33 deep, wide": "too deep", "32 deep, wide": "parsed",
            "wide and shallow": "parsed", "long string": "parsed"}.get(name, "malformed")
    assert verdict == want, (name, verdict)
    assert spent < 8 * 3 * small + 0.05, f"{name}: {spent:.3f} s for 1 MiB, {small:.3f} s for 1/8"
    assert spent < 2.0, f"{name}: {spent:.3f} s of CPU for 1 MiB"
    if verdict == "parsed":
        assert value is not None


def test_a_hostile_1mib_reply_does_not_hang_pvnet_stats(tmp_path) -> None:
    """A control reply (a guest's: not trusted) of 1 MiB of quotes in brackets, and one
    trickled a byte every 10 ms without end (each read succeeds well within the timeout, so
    only an overall deadline ends it): `pvnet stats`'s query gives up with a ControlError,
    within its 1 s timeout (plus slack for a loaded machine), not after hours."""
    path = str(tmp_path / "evil.ctl")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(2)
    stop = threading.Event()

    def serve(reply: bytes, trickle: bool) -> None:
        conn, _ = lst.accept()
        with conn:
            conn.recv(4096)
            try:
                if not trickle:
                    conn.sendall(reply)
                    return
                conn.sendall(reply)
                while not stop.wait(0.01):  # a byte every 10 ms until the client hangs up
                    conn.send(b"y")
            except OSError:
                pass  # the client gave up: what it should do

    try:
        for reply, trickle, match in ((HOSTILE_LINES["quotes in brackets"](MIB) + b"\n", False,
                                       "malformed reply"),
                                      (b'{"ok": true, "x": "', True, "no reply within 1 s")):
            th = threading.Thread(target=serve, args=(reply, trickle), daemon=True)
            th.start()
            t = time.monotonic()
            with pytest.raises(ControlError, match=match):
                query(path, {"cmd": "stats"}, timeout=1.0)
            assert time.monotonic() - t < 4.0
            th.join(20)
            assert not th.is_alive()
    finally:
        stop.set()
        lst.close()


def test_clients_beyond_the_cap_wait_in_the_backlog(server) -> None:
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(MAX_CLIENTS)]
    try:
        for s in held:
            s.connect(server.path)
        wait_for(lambda: len(server._conns) == MAX_CLIENTS, 5, "the cap")
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.connect(server.path)  # the backlog takes it; the server does not accept it yet
        wait_for(lambda: server.clients_capped >= 1, 5, "the cap to be counted")
        assert len(server._conns) == MAX_CLIENTS
        held.pop().close()  # one goes: the late one is served
        late.settimeout(5)
        late.sendall(b'{"cmd":"ping"}\n')
        assert b'"pong":true' in late.recv(4096)
        late.close()
    finally:
        for s in held:
            s.close()


def _cpu(stat_fd: int) -> float:
    """CPU seconds of a thread from its already open /proc stat file (no fd needed)."""
    raw = os.pread(stat_fd, 4096, 0).decode()
    rest = raw[raw.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def test_no_fd_left_rests_the_listener_instead_of_spinning(server) -> None:
    """EMFILE on accept(): the server neither spins nor dies, and serves again afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    stat_fd = os.open(f"/proc/self/task/{server._thread.native_id}/stat", os.O_RDONLY)
    fillers: list[int] = []
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_count() + 16, hard))
        while True:  # fill the fd table (this process is the server's too)
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        os.close(fillers.pop())
        client.connect(server.path)  # takes the last fd; accept() in the server fails
        wait_for(lambda: server.accept_errors >= 1, 5, "accept() to fail")
        cpu0 = _cpu(stat_fd)
        threading.Event().wait(1.0)  # a second of EMFILE: a spinning loop would burn it all
        spent = _cpu(stat_fd) - cpu0
        assert spent < 0.3, f"control thread used {spent:.2f}s CPU in 1s of EMFILE"
        assert server._thread.is_alive() and server.accept_errors < 50
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(stat_fd)
    client.settimeout(5)
    client.sendall(b'{"cmd":"ping"}\n')
    assert b'"pong":true' in client.recv(4096)
    client.close()
