"""Netback's faults by kind, in process (fast tier): a frontend's malformed request is the
peer's fault, an OS refusal in a transport step is the OS's; each is logged naming its kind
and counted under ``faults_<kind>`` in the stats ``pvnet stats`` reads. And a disconnect gives
back every descriptor the connection took."""

from __future__ import annotations

import errno
import gc
import logging
import socket

from shared.plumbing.channel import EventChannel
from shared.plumbing.control.client import query
from shared.protocol.grant import RESERVED_REFS
from tests.hostile import HostileFrontend
from tests.inproc import BackendThread, InprocNetback, fd_count, memfd_maps, wait_for

FAULTS = ("faults_peer", "faults_own", "faults_os")


def faults(b: BackendThread) -> dict[str, int]:
    """The fault counters as the control socket reports them."""
    counters = query(str(b.dir / "b.ctl"), {"cmd": "stats"})["counters"]
    return {k: counters[k] for k in FAULTS}


def fault_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "netback" and " fault: " in r.getMessage()]


def test_a_malformed_request_is_the_peers_fault(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="netback")
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "liar", b.domid)
    try:
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 3, "connected")
        assert faults(b) == {"faults_peer": 0, "faults_own": 0, "faults_os": 0}
        # a payload grant reference far outside the grant table
        h.write_tx((RESERVED_REFS + 10**6, 0, 0, h.fresh_id(), 100))
        assert "gref" in h.wait_closed(5)
        b.idle()
        assert faults(b) == {"faults_peer": 1, "faults_own": 0, "faults_os": 0}
        assert b.nb.counters["malformed"] == 1 and b.nb.counters["internal_errors"] == 0
        lines = fault_lines(caplog)
        assert len(lines) == 1
        assert lines[0].startswith("vifT: peer fault: disconnecting frontend liar: GrantError")
    finally:
        h.close()
        b.stop()


class FailingRecv(InprocNetback):
    """A netback whose event channel fails (EIO) once the test says so: the OS refusing a
    transport step, not the frontend lying."""

    fail = False

    def open_channel(self) -> EventChannel:
        chan = super().open_channel()
        real = chan.recv

        def recv(*args, **kwargs):
            if self.fail:
                raise OSError(errno.EIO, "injected by the test")
            return real(*args, **kwargs)

        chan.recv = recv  # type: ignore[method-assign]
        return chan


def test_an_os_failure_in_a_transport_step_is_the_oss_fault(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="netback")
    b = BackendThread(tmp_path, netback=FailingRecv)
    h = HostileFrontend(str(b.ev), "victim", b.domid)
    try:
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 3, "connected")
        b.nb.fail = True
        h.kick()
        h.wait_closed(5)
        b.idle()
        assert faults(b) == {"faults_peer": 0, "faults_own": 0, "faults_os": 1}
        assert b.nb.counters["malformed"] == 0
        lines = fault_lines(caplog)
        assert len(lines) == 1 and lines[0].startswith("vifT: OS fault: disconnecting frontend")
        assert "Errno 5" in lines[0]
    finally:
        h.close()
        b.stop()


def test_a_disconnect_gives_back_every_descriptor_and_mapping(tmp_path):
    b = BackendThread(tmp_path)
    try:
        for round in range(3):
            gc.collect()  # earlier garbage (sockets, regions) goes now, not mid-count
            fds, maps = fd_count(), memfd_maps()
            h = HostileFrontend(str(b.ev), f"once{round}", b.domid)
            h.connect({"feature-persistent": True, "feature-header-slots": True})
            wait_for(lambda: b.nb.tx is not None, 3, "connected")
            h.post_rx(30, persistent=True)
            h.packet(9000)
            h.push()
            wait_for(b.wire_frames, 3, "the packet on the wire")
            h.write_tx((RESERVED_REFS + 10**6, 0, 0, h.fresh_id(), 100))
            h.wait_closed(5)
            b.idle()
            h.close()
            del h  # the hostile frontend's own region mapping (same process) goes too
            gc.collect()
            wait_for(lambda n=fds: fd_count() <= n, 3, "the connection's descriptors closed")
            assert memfd_maps() <= maps
            assert b.nb.regions_mapped() == 0
    finally:
        b.stop()


class NoFdLeft:
    """The event socket as a full fd table shows it: readable, and accept() says EMFILE."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self):
        raise OSError(errno.EMFILE, "Too many open files")


def test_an_accept_that_fails_is_the_oss_fault(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="netback")
    b = BackendThread(tmp_path)
    listener = b.nb.listener
    real = listener.sock
    knock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.sock = NoFdLeft(real)
        knock.connect(str(b.ev))
        wait_for(lambda: b.nb.counters["accept_errors"] >= 1, 5, "accept() to fail")
        listener.sock = real
        # accepted at last: the listener is done failing, so the counts hold still
        wait_for(lambda: b.nb.state.name == "InitWait", 5, "the knock to be accepted")
        counted = faults(b)
        assert counted["faults_os"] == b.nb.counters["accept_errors"] >= 1
        assert counted["faults_peer"] == counted["faults_own"] == 0
        assert any("OS fault: accept() on the event socket failed" in line
                   for line in fault_lines(caplog))
    finally:
        listener.sock = real
        knock.close()
        b.stop()
