"""The backend's own sockets against hostile input: deep JSON on the event channel is the
frontend's malformed input (not our internal error), and a full fd table neither spins the
accept loop nor ends the netback."""

from __future__ import annotations

import gc
import os
import resource
import socket
import threading

from tests.hostile import HostileFrontend
from tests.inproc import BackendThread, fd_count, wait_for
from tests.shared.test_control_limits import _cpu


def test_deep_json_on_the_event_channel_is_malformed_input(tmp_path):
    b = BackendThread(tmp_path)
    try:
        h = HostileFrontend(str(b.ev), "deep", b.domid)
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 5, "backend Connected")
        h.garbage(b"[" * 3000 + b"\n")
        why = h.wait_closed()
        h.close()
        b.idle()
        c = b.nb.counters
        assert "nested deeper than 32" in b.nb.last_error and why
        assert c["malformed"] == 1 and c["fatal_channel"] == 1 and c["internal_errors"] == 0
        assert b.thread.is_alive()
        h2 = HostileFrontend(str(b.ev), "next", b.domid)  # the next frontend is served
        h2.connect()
        wait_for(lambda: b.nb.tx is not None, 5, "the next frontend Connected")
        h2.close()
    finally:
        b.stop()


def test_no_fd_left_for_a_frontend_neither_spins_nor_ends_the_netback(tmp_path):
    b = BackendThread(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    stat_fd = os.open(f"/proc/self/task/{b.thread.native_id}/stat", os.O_RDONLY)
    fillers: list[int] = []
    knock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        gc.collect()  # no earlier test's garbage may close an fd and free a slot meanwhile
        gc.disable()
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_count() + 16, hard))
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        knock.connect(str(b.ev))  # the backend's accept() now fails with EMFILE
        wait_for(lambda: b.nb.counters["accept_errors"] >= 1, 5, "accept() to fail")
        cpu0 = _cpu(stat_fd)
        threading.Event().wait(1.0)
        spent = _cpu(stat_fd) - cpu0
        assert spent < 0.3, f"netback used {spent:.2f}s CPU in 1s of EMFILE"
        assert b.thread.is_alive()
    finally:
        gc.enable()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(stat_fd)
        knock.close()
    try:
        h = HostileFrontend(str(b.ev), "after", b.domid)
        h.connect()
        wait_for(lambda: b.nb.tx is not None and b.nb.peer == "after", 10, "served again")
        h.close()
        assert b.nb.counters["internal_errors"] == 0
    finally:
        b.stop()
