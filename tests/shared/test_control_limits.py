"""Control-socket limits against hostile clients: nesting depth, client count, no fd left."""

from __future__ import annotations

import os
import resource
import socket
import threading
from pathlib import Path

import pytest

from shared import jsonline
from shared.control import query
from shared.control_server import MAX_CLIENTS, ControlServer
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
