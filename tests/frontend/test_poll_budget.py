"""The netfront's NAPI-like poll budget (``poll_us``): after work it polls on with events
unarmed, and it sleeps only after arming them and checking once more, so frames that arrive
while it sleeps wake it at once (no lost wake-up, no wait for the idle timer)."""

from __future__ import annotations

import time

from frontend.loop import IDLE_MS
from shared.protocol.offload import VNET_HDR
from tests.conftest import frame
from tests.inproc import BackendThread, FrontendThread, wait_for

POLL_US = 2000


def test_a_polling_frontend_moves_everything_through_a_small_region(tmp_path):
    """Queue stops all the time (52 TX pages) and the frontend polls between rounds: every
    frame arrives in order both ways, polls with and without work happened, the loop slept,
    and neither end's timer found work that no notification announced."""
    b = BackendThread(tmp_path)
    # a wide window (0.2 s): on a loaded machine the GIL can hold the loop past a narrow one
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid, region_size=1280 << 10,
                       poll_us=100 * POLL_US)
    sizes = [60, 1514, 9000, 30000, 64000, 200] * 60
    try:
        f.connected()
        out = [frame(bytes([i % 251]) * n) for i, n in enumerate(sizes)]
        back = [frame(bytes([i % 241]) * n) for i, n in enumerate(sizes[:120])]
        got: list[bytes] = []
        rx: list[bytes] = []
        pending_out, pending_back = list(out), list(back)
        end = time.monotonic() + 60
        while (len(got) < len(out) or len(rx) < len(back)) and time.monotonic() < end:
            for sock, pending in ((f.guest, pending_out), (b.wire, pending_back)):
                sock.setblocking(False)
                while pending:
                    try:
                        sock.send(bytes(VNET_HDR.size) + pending[0])
                    except BlockingIOError:
                        break
                    pending.pop(0)
            got += b.wire_frames()
            rx += f.guest_frames()
            time.sleep(0.002)
        assert got == out
        assert rx == back
        c = f.nf.counters
        assert f.nf.tx_stats.queue_stops > 0
        # after the last frame the loop polls empty for a while, then arms and sleeps
        wait_for(lambda: c["polls_busy"] and c["polls_empty"] and c["sleeps"], 15,
                 "polls with and without work, then a sleep")
        assert c["lost_wakeups"] == 0 and b.nb.counters["lost_wakeups"] == 0
    finally:
        f.stop()
        b.stop()


def test_frames_after_the_poll_window_wake_the_sleeping_frontend_at_once(tmp_path):
    """One frame at a time, each long after the poll window closed: the frontend has armed
    its events and slept, so each frame must be delivered well before the idle timer
    (IDLE_MS) would have found it; a loop that slept unarmed would take a second per frame
    and count lost wake-ups."""
    b = BackendThread(tmp_path)
    f = FrontendThread(b.ev, tmp_path / "f.ctl", domid=b.domid, poll_us=POLL_US)
    try:
        f.connected()
        for i in range(8):
            sleeps = f.nf.counters["sleeps"]
            wait_for(lambda s=sleeps: f.nf.counters["sleeps"] > s, 5, "the frontend to sleep")
            time.sleep(0.02)  # 10x the poll window: it is asleep, events armed
            data = frame(bytes([i]) * (100 + i))
            t0 = time.monotonic()
            if i % 2:
                b.wire.send(bytes(VNET_HDR.size) + data)
                got = wait_for(f.guest_frames, 5, "the frame in the guest")
            else:
                f.guest.send(bytes(VNET_HDR.size) + data)
                got = wait_for(b.wire_frames, 5, "the frame on the wire")
            assert got == [data]
            assert time.monotonic() - t0 < IDLE_MS / 1000 / 2
        assert f.nf.counters["lost_wakeups"] == 0 and b.nb.counters["lost_wakeups"] == 0
    finally:
        f.stop()
        b.stop()
