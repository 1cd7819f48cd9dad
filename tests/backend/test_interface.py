"""Netback's connection lifecycle, in process (fast tier): restarts on the same stream,
silent and half-finished handshakes, descriptors smuggled in while connected, a control
socket under a pipelined flood, and a small-region pair that must never lose a wake-up."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import termios
import threading
import time

import backend.handshake as backend_handshake
from backend.control import CTL_PIPELINE
from shared.plumbing.control.client import query
from shared.plumbing.transport import create_memfd
from shared.protocol.offload import VNET_HDR
from tests.conftest import frame
from tests.hostile import HostileFrontend
from tests.inproc import BackendThread, FrontendThread, fd_count, wait_answering, wait_for


def test_a_new_hello_on_a_connected_stream_restarts_the_connection(tmp_path):
    """QEMU placement: the guest's frontend restarts behind the same virtio-serial stream;
    its hello while Connected releases the old connection and negotiates a new one."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "again", b.domid)
    try:
        h.connect({"feature-persistent": True, "feature-header-slots": True})
        h.post_rx(30, persistent=True)
        h.push()
        wait_for(lambda: b.nb.rx_stats.grants_in_use == 30, 3, "persistent RX grants held")
        first = h.region
        h.connect()  # same channel: a second hello, a second region
        wait_for(lambda: b.nb.counters["frontend_restarts"] == 1, 3, "the restart")
        wait_for(lambda: b.nb.tx is not None, 3, "connected again")
        assert b.nb.rx_stats.grants_in_use == 0  # the old connection's grants were let go
        assert not any(first.grants.in_use(r) for r in range(first.grants.count))
        assert b.nb.counters["connects"] == 2 and b.nb.counters["malformed"] == 0
        h.packet(3000)
        h.push()
        assert wait_for(b.wire_frames, 3, "a packet on the new connection")
    finally:
        h.close()
        b.stop()


def test_a_silent_frontend_gives_way_to_a_newer_one(tmp_path):
    b = BackendThread(tmp_path)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(b.ev))
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid)
    try:
        f.connected(5)
        assert silent.recv(100) == b""  # dropped without a word
    finally:
        silent.close()
        f.stop()
        b.stop()


def test_a_half_finished_handshake_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(backend_handshake, "HANDSHAKE_TIMEOUT", 0.5)
    b = BackendThread(tmp_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(b.ev))
        s.sendall(b'{"state":"Initialising","name":"half","domid":7}\n')
        s.settimeout(5)
        got = b""
        while b"Closing" not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert b"in time" in got
        wait_for(lambda: b.nb.counters["malformed"] == 1, 3, "malformed counted")
    finally:
        s.close()
        b.stop()


def unread(sock: socket.socket) -> int:
    """Bytes this unix socket sent that the peer has not read yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]


def test_descriptors_smuggled_in_while_connected_are_closed(tmp_path):
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "smuggler", b.domid)
    try:
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 3, "connected")
        fds = fd_count()
        for _ in range(20):
            fd, mem = create_memfd(1 << 20)
            socket.send_fds(h.chan.sock, [b"!"], [fd, fd, fd])
            os.close(fd)
            mem.close()
        # in flight, the descriptors are in no fd table: counting before the backend read
        # them would pass for the wrong reason. Once it has read every byte they are ours
        # (same process), until the backend closes them.
        wait_for(lambda: unread(h.chan.sock) == 0, 3, "the backend to read every message")
        wait_for(lambda: fd_count() <= fds, 3, "the smuggled descriptors to be closed")
        assert b.nb.tx is not None  # harmless: still connected
    finally:
        h.close()
        b.stop()


def test_a_pipelined_flood_on_the_control_socket_does_not_starve_other_readers(tmp_path):
    b = BackendThread(tmp_path)
    ctl = str(tmp_path / "b.ctl")
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        wait_answering(ctl)  # bound before it listens: BackendThread waits for a pong too
        flood.connect(ctl)
        flood.sendall(b'{"cmd":"stats"}\n' * 2000)
        t0 = time.monotonic()
        latencies = []
        for _ in range(20):
            s = time.monotonic()
            assert query(ctl, {"cmd": "stats"})["role"] == "netback"
            latencies.append(time.monotonic() - s)
        assert max(latencies) < 0.5, latencies
        flood.settimeout(5)
        got = b""
        while got.count(b"\n") < CTL_PIPELINE + 1:
            got += flood.recv(1 << 16)
        replies = [json.loads(x) for x in got.split(b"\n")[:CTL_PIPELINE + 1]]
        assert all(r["ok"] for r in replies[:CTL_PIPELINE])
        assert replies[CTL_PIPELINE] == {"ok": False,
                                         "error": "too many requests at once on one connection"}
        assert b.nb.control({"cmd": "stats"})["counters"]["ctl_refused"] > 0
        assert time.monotonic() - t0 < 5
    finally:
        flood.close()
        b.stop()


def test_small_region_pair_moves_everything_without_a_lost_wakeup(tmp_path):
    """1280K region: 52 TX pages, three 64 KB frames, so the frontend stops on a full queue
    constantly. Every frame arrives, in order, and neither end's timer ever found work a
    notification had not announced."""
    b = BackendThread(tmp_path)
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid, region_size=1280 << 10)
    sizes = [60, 1514, 9000, 30000, 64000, 200] * 150
    try:
        f.connected()
        out = [frame(bytes([i % 251]) * n) for i, n in enumerate(sizes)]
        back = [frame(bytes([i % 241]) * n) for i, n in enumerate(sizes[:300])]

        def feed(sock, frames):
            for fr in frames:
                while True:
                    try:
                        sock.send(bytes(VNET_HDR.size) + fr)
                        break
                    except BlockingIOError:
                        time.sleep(0.001)

        feeders = [threading.Thread(target=feed, args=(f.guest, out)),
                   threading.Thread(target=feed, args=(b.wire, back))]
        for t in feeders:
            t.start()
        got, rx = [], []
        end = time.monotonic() + 60
        while (len(got) < len(out) or len(rx) < len(back)) and time.monotonic() < end:
            got += b.wire_frames()
            rx += f.guest_frames()
            time.sleep(0.002)
        for t in feeders:
            t.join()
        assert got == out
        assert rx == back
        assert f.nf.tx_stats.queue_stops > 10
        assert b.nb.counters["lost_wakeups"] == 0 and f.nf.counters["lost_wakeups"] == 0
    finally:
        f.stop()
        b.stop()


def test_frontend_comes_back_to_a_new_backend(tmp_path):
    b = BackendThread(tmp_path)
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid)
    try:
        f.connected()
        b.stop()
        wait_for(lambda: f.nf.state.name != "Connected", 5, "the frontend to notice")
        b = BackendThread(tmp_path)
        f.connected(10)
        f.guest.send(bytes(VNET_HDR.size) + frame(b"again" * 100))
        assert wait_for(b.wire_frames, 3, "traffic on the new connection")
        assert f.nf.counters["connects"] == 2 and f.nf.counters["broken"] == 0
        wait_for(lambda: f.nf.regions_mapped() == 1, 3, "the old region unmapped")
    finally:
        f.stop()
        b.stop()
