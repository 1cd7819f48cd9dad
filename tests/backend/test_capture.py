"""`pvnet capture` against the real netback in process (fast tier): frames of both directions
arrive exactly once and byte-identical, snaplen decides whether payload is mapped, and readers
that stall, die, lie or send junk cost drops or a detach, never the data path."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from backend.grants import dmaview
from shared.endpoint.capture import Attached, Session, attach
from shared.plumbing.control.client import ControlError, query
from shared.protocol.offload import VNET_HDR
from shared.protocol.zbuf import IN, OUT
from tests.conftest import frame
from tests.inproc import BackendThread, FrontendThread, fd_count, memfd_maps, wait_for
from tests.pcapread import read_frames

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VNET = bytes(VNET_HDR.size)


@pytest.fixture
def pair(tmp_path):
    b = BackendThread(tmp_path)
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid)
    f.connected()
    b.connected()
    yield b, f
    f.stop()
    b.stop()


def ctl(b: BackendThread) -> str:
    return str(b.dir / "b.ctl")


def counters(b: BackendThread) -> dict:
    return query(ctl(b), {"cmd": "stats"})["counters"]


def collect(att: Attached, n: int, timeout: float = 10.0) -> list:
    got: list = []
    s = Session(att, got.append, n)
    timer = threading.Timer(timeout, lambda: setattr(s, "stop", True))
    timer.start()
    s.run()
    timer.cancel()
    return got


def test_frames_of_every_size_both_ways_exactly_once(pair) -> None:
    b, f = pair
    att = attach(ctl(b), {"snaplen": 0, "buffer_kb": 64})
    try:
        out = [frame(bytes([i]) * n) for i, n in enumerate(
            [1, 17, 60, 100, 114, 115, 500, 1458, 1500, 3000, 4096, 8000, 9000])]
        for x in out:
            f.guest.send(VNET + x)
        wait_for(lambda: b.nb.tx_stats.tx_packets == len(out), 5, "TX frames on the wire")
        back = [frame(b"r" * n, dport=80) for n in (1, 200, 1500, 4000, 9000)]
        for x in back:
            b.wire.send(VNET + x)
        got = collect(att, len(out) + len(back))
        assert [r.data for r in got if r.direction == OUT] == out
        assert [r.data for r in got if r.direction == IN] == back
        assert all(r.wirelen == len(r.data) for r in got)
        c = counters(b)
        assert c["capture_frames"] == len(out) + len(back) and c["capture_drops"] == 0
        assert c["capture_readers"] == 1
    finally:
        att.close()
    wait_for(lambda: counters(b)["capture_readers"] == 0, 3, "detach")


def _cpu_pages(cpu) -> int:
    """Payload pages the kernel maps in the CPU view's reserved range now (/proc/self/maps):
    the real mapping state, not a counter."""
    lo_r, hi_r = cpu.base, cpu.base + cpu.size
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
            if lo >= lo_r and hi <= hi_r and "/memfd:" in line:
                n += (hi - lo) // 4096
    return n


@pytest.fixture
def no_dma_for_capture(monkeypatch):
    """The DMA view refuses any call made from capture's payload reader."""
    for name in ("iovecs", "copy", "readv", "rx_target"):
        real = getattr(dmaview.DmaView, name)

        def fenced(self, *a, _real=real, **kw):
            f = sys._getframe(1)
            while f is not None:
                assert f.f_code.co_name != "_payload", "capture reached the DMA view"
                f = f.f_back
            return _real(self, *a, **kw)
        monkeypatch.setattr(dmaview.DmaView, name, fenced)


@pytest.mark.parametrize("snaplen, maps", [(64, False), (128, False), (0, True)])
def test_snaplen_within_the_header_copy_maps_no_payload(pair, snaplen, maps, monkeypatch,
                                                        no_dma_for_capture) -> None:
    """Lazy mode. Right after capture recorded a TX frame (before the skb is freed) the CPU
    view's pages are looked up in the kernel's own maps: none with a snaplen inside the
    128-byte header copy, every fragment with full frames (read once into backend memory,
    that copy sent and recorded) -- and those maps show up."""
    b, f = pair
    tap = b.nb.capture
    seen: list[tuple[int, int, int]] = []
    real = tap.out

    def spy(skb) -> None:
        real(skb)
        cpu = b.nb.tx.gntmap.cpu
        seen.append((_cpu_pages(cpu), cpu.outstanding, len(skb.grefs)))

    monkeypatch.setattr(tap, "out", spy)
    att = attach(ctl(b), {"snaplen": snaplen, "direction": "out"})
    try:
        x = frame(b"p" * 6000)
        f.guest.send(VNET + x)
        (rec,) = collect(att, 1)
        want = x if not snaplen else x[:snaplen]
        assert rec.data == want and rec.wirelen == len(x)
        ((pages, outstanding, nfrags),) = seen
        assert nfrags >= 2
        st = b.nb.tx_stats
        if maps:
            assert pages == outstanding == nfrags
            assert st.grant_maps_on_touch == nfrags and st.tx_zerocopy_fail == 1
        else:
            assert pages == outstanding == 0
            assert st.grant_maps == 0 and st.tx_zerocopy_success == 1
        wait_for(lambda: st.maps_outstanding == 0 and _cpu_pages(b.nb.tx.gntmap.cpu) == 0, 3,
                 "maps released by the destructor")
    finally:
        att.close()


def test_tx_capture_records_what_was_sent_not_the_pages_afterwards(pair, monkeypatch) -> None:
    """Finding 7 (TX): the guest rewrites its payload pages right after the vif write (here:
    at the write's return, deterministic). The wire got the bytes as sent; the capture must
    show the same bytes, not the rewritten pages."""
    b, f = pair
    real = os.writev
    guest = b.nb.tx.gntmap.dma._buf  # all of the guest's memory (as the guest writes it)

    def writev(fd, iov):
        n = real(fd, iov)
        if fd == b.nb.vif.fd:
            for frame_ in b.nb.tx.gntmap.frames:  # every payload page: scribbled on
                guest[frame_ * 4096:frame_ * 4096 + 4096] = b"Z" * 4096
        return n

    att = attach(ctl(b), {"direction": "out"})
    try:
        monkeypatch.setattr(os, "writev", writev)
        x = frame(b"s" * 9000)
        f.guest.send(VNET + x)
        (rec,) = collect(att, 1)
        monkeypatch.setattr(os, "writev", real)
        wait_for(lambda: b.wire_frames(), 3, "the frame on the wire")
        assert rec.data == x  # what was sent, byte for byte
    finally:
        att.close()


def test_rx_capture_records_the_frame_as_read_and_maps_nothing(pair, monkeypatch,
                                                               no_dma_for_capture) -> None:
    """Finding 7 (RX): with a capture wanting incoming frames, the frame is read into
    backend memory, recorded there, then copied into the guest's buffers: a guest that
    rewrites its buffer right after the copy (a persistent buffer, say) changes what it
    received, never what the capture shows; and capturing RX maps no guest page."""
    b, _f = pair
    mech = b.nb.rx.mech
    guest = mech.gntmap.dma._buf  # all of the guest's memory (as the guest writes it)
    real = mech.copy_in

    def copy_in(positions, targets, grefs, exps, nbytes):
        bad = real(positions, targets, grefs, exps, nbytes)
        for e in (exps[p] for p in positions):  # the guest scribbles on what it got
            frame_ = e >> 32
            guest[frame_ * 4096:frame_ * 4096 + 4096] = b"Z" * 4096
        return bad

    monkeypatch.setattr(mech, "copy_in", copy_in)
    att = attach(ctl(b), {"direction": "in"})
    try:
        x = frame(b"q" * 9000, dport=80)
        b.wire.send(VNET + x)
        (rec,) = collect(att, 1)
        assert rec.data == x
        st = b.nb.rx_stats
        assert st.grant_maps_on_touch == 0 and st.grant_maps == 0
    finally:
        att.close()


def test_direction_filter(pair) -> None:
    b, f = pair
    att = attach(ctl(b), {"direction": "in"})
    try:
        f.guest.send(VNET + frame(b"o" * 100))
        wait_for(lambda: b.nb.tx_stats.tx_packets == 1, 3, "TX")
        b.wire.send(VNET + frame(b"i" * 100))
        (rec,) = collect(att, 1)
        assert rec.direction == IN and rec.data == frame(b"i" * 100)
    finally:
        att.close()


def test_a_reader_that_never_acks_costs_drops_never_the_ring(pair) -> None:
    b, f = pair
    att = attach(ctl(b), {"buffer_kb": 4})
    try:
        n = 300
        for i in range(n):
            f.guest.send(VNET + frame(bytes([i % 256]) * 600))
            if i % 50 == 49:
                wait_for(lambda i=i: b.nb.tx_stats.tx_packets == i + 1, 5, "TX progress")
        assert b.nb.tx_stats.tx_packets == n  # every frame crossed the vif
        # the last frame is counted before its write and its record: wait for the record
        wait_for(lambda: sum(counters(b)[k] for k in ("capture_frames", "capture_drops")) == n,
                 5, "every frame recorded or counted dropped")
        assert counters(b)["capture_drops"] > 0
    finally:
        att.close()


def test_reader_death_detaches_and_releases_everything(pair) -> None:
    b, f = pair
    f.guest.send(VNET + frame(b"warm" * 10))
    wait_for(lambda: b.nb.tx_stats.tx_packets == 1, 3, "warm-up")
    fds, maps = fd_count(), memfd_maps()
    att = attach(ctl(b), {"buffer_kb": 4})
    assert memfd_maps() == maps + 2  # the backend's mapping and ours
    for i in range(100):  # fill and hold both buffers
        f.guest.send(VNET + frame(bytes([i]) * 700))
    wait_for(lambda: b.nb.tx_stats.tx_packets == 101, 5, "traffic")
    att.close()  # as if killed: no ack, no goodbye
    wait_for(lambda: counters(b)["capture_readers"] == 0, 3, "the detach")
    wait_for(lambda: fd_count() == fds and memfd_maps() == maps, 3, "everything released")
    assert counters(b)["capture_detaches"] == 1
    att2 = attach(ctl(b), {})  # the vif can be captured again
    att2.close()


def test_hostile_requests_get_named_errors(pair) -> None:
    b, _f = pair
    for req, words in [({"snaplen": -1}, "snaplen"), ({"snaplen": "x"}, "snaplen"),
                       ({"buffer_kb": 1}, "buffer_kb"), ({"buffer_kb": 10 ** 9}, "buffer_kb"),
                       ({"buffer_kb": True}, "buffer_kb"), ({"direction": "up"}, "direction")]:
        with pytest.raises(ControlError, match=words):
            attach(ctl(b), req)
    att = attach(ctl(b), {})
    try:
        with pytest.raises(ControlError, match="already attached"):
            attach(ctl(b), {})
    finally:
        att.close()
    assert b.thread.is_alive() and counters(b)["capture_attaches"] == 1


def test_hostile_reader_cannot_hurt_the_backend(pair) -> None:
    """Junk on the socket, descriptors smuggled in, the memfd resized, every byte of both
    buffers scribbled: the backend keeps forwarding and counts the bogus acks."""
    b, f = pair
    att = attach(ctl(b), {"buffer_kb": 8})
    try:
        r, w = os.pipe()
        socket.send_fds(att.sock, [b"junk" * 100], [r, w])
        os.close(r)
        os.close(w)
        with pytest.raises(OSError):
            os.ftruncate(_memfd_of(att), 0)  # sealed: no SIGBUS for the producer
        stop = threading.Event()

        def scribble() -> None:
            i = 0
            while not stop.is_set():
                att.mem[:] = bytes([i % 256]) * len(att.mem)
                i += 1

        t = threading.Thread(target=scribble)
        t.start()
        for i in range(200):
            f.guest.send(VNET + frame(bytes([i]) * 300))
        wait_for(lambda: b.nb.tx_stats.tx_packets == 200, 10, "traffic despite the reader")
        time.sleep(0.3)  # let the watcher tick over the scribbles (no condition to wait on)
        stop.set()
        t.join()
        c = counters(b)
        assert c["capture_bad_acks"] > 0 and b.thread.is_alive()
        assert b.nb.counters["internal_errors"] == 0
    finally:
        att.close()
    wait_for(lambda: counters(b)["capture_readers"] == 0, 3, "detach")


def _memfd_of(att: Attached) -> int:
    """Reopen the reader's memfd through /proc to try resizing it (the reader may)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:pvnet-capture"):
            fd = int(name)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK
            return fd
    raise AssertionError("no capture memfd open")


def test_cli_writes_pcap_tcpdump_reads_and_sigterm_flushes(pair, tmp_path) -> None:
    """The real `pvnet capture` process: -w FILE, SIGTERM flushes and exits 0, the summary
    line; then tcpdump -r reads every frame back."""
    b, f = pair
    out = tmp_path / "c.pcapng"
    p = subprocess.Popen([sys.executable, "-m", "shared.cli", "capture", "--socket", ctl(b),
                          "-w", str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: counters(b)["capture_readers"] == 1, 10, "the CLI attached")
        frames = [frame(bytes([i]) * (100 + 37 * i)) for i in range(20)]
        for x in frames:
            f.guest.send(VNET + x)
        wait_for(lambda: b.nb.tx_stats.tx_packets == 20, 5, "TX")
        p.terminate()
        _, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert err.strip().splitlines()[-1] == "20 captured, 0 dropped by producer"
    read = subprocess.run(["tcpdump", "-r", str(out), "-nn", "-x"], capture_output=True,
                          text=True, check=True)
    assert read.stdout.count("length") >= 20 and read.stdout.count("\n") > 20
    got = read_frames(out)
    assert got == [(x, True) for x in frames]


def test_cli_pipes_to_tcpdump_with_count(pair) -> None:
    b, f = pair
    p = subprocess.Popen(f"{sys.executable} -m shared.cli capture --socket {ctl(b)} -c 5 "
                         f"--format pcap -w - | tcpdump -nn -r - 2>/dev/null", shell=True,
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: counters(b)["capture_readers"] == 1, 10, "the CLI attached")
    for i in range(8):
        f.guest.send(VNET + frame(b"c" * 100, dport=1000 + i))
    out, err = p.communicate(timeout=15)
    assert p.returncode == 0, err
    assert out.count("UDP") == 5 and "5 captured, 0 dropped by producer" in err


def test_query_capture_reply_is_json_even_without_fds(pair) -> None:
    """`pvnet query` (no descriptor handling) still gets a well-formed reply line."""
    b, _f = pair
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(ctl(b))
        s.sendall(b'{"cmd": "capture", "buffer_kb": 4}\n')
        s.settimeout(5)
        reply = json.loads(s.recv(65536).split(b"\n")[0])
    assert reply["ok"] and reply["buffer_size"] == 4096
    wait_for(lambda: counters(b)["capture_readers"] == 0, 3, "detach once it closed")


def test_netback_shutdown_hands_over_what_is_buffered_then_eof(tmp_path) -> None:
    b = BackendThread(tmp_path)
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid)
    f.connected()
    b.connected()
    att = attach(ctl(b), {})
    got: list = []
    s = Session(att, got.append)
    t = threading.Thread(target=s.run)
    try:
        x = frame(b"last words" * 50)
        f.guest.send(VNET + x)
        wait_for(lambda: b.nb.tx_stats.tx_packets == 1, 3, "TX")
        f.stop()
        b.stop()  # the final rotation, then the socket closes
        t.start()
        t.join(10)
        assert not t.is_alive() and s.eof
        assert [r.data for r in got] == [x]
    finally:
        att.close()


def test_cli_without_w_prints_one_line_per_frame(pair) -> None:
    b, f = pair
    p = subprocess.Popen([sys.executable, "-m", "shared.cli", "capture", "--socket", ctl(b),
                          "-c", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for(lambda: counters(b)["capture_readers"] == 1, 10, "the CLI attached")
    for n in (100, 2000):
        f.guest.send(VNET + frame(b"t" * n))
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(" out " in x and "ethertype 0x0800" in x for x in lines)
    assert lines[1].endswith(f"length {len(frame(b't' * 2000))}")
    assert "2 captured, 0 dropped by producer" in err
