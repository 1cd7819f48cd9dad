"""A hostile frontend against the real netback loop, in process (fast tier).

Each hypothesis case connects a fresh ``HostileFrontend`` to one long-lived ``Netback`` (on a
thread, its vif a socketpair), applies a list of lies to the region and the channel, lets
the backend react, and hangs up. After every case: the backend thread is alive, it either
disconnected the frontend with a reason and a ``malformed`` count or kept it harmlessly,
it never hit an internal error, and it holds nothing of that frontend any more (no map, no
grant in use, no in-use bit left set in the table, no region mapping, no fd).

``PVNET_FUZZ_EXAMPLES=5000 pytest tests/backend/test_fuzz.py`` runs a long campaign.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.grant import GTF_in_use
from shared.netif import PAGE_SIZE
from shared.offload import VNET_HDR
from tests.conftest import frame
from tests.hostile import BASIC, GrantEntry, HostileFrontend, ops
from tests.inproc import BackendThread, FrontendThread, fd_count, thread_cpu, wait_for

EXAMPLES = int(os.environ.get("PVNET_FUZZ_EXAMPLES", "15"))
#: the normal run is repeatable; PVNET_FUZZ_RANDOM=1 explores new cases every run
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                derandomize="PVNET_FUZZ_RANDOM" not in os.environ,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", params=["lazy", "map", "copy"])
def backend(request, tmp_path_factory):
    b = BackendThread(tmp_path_factory.mktemp("fuzz"), tx_mode=request.param)
    yield b
    b.stop()


def settle(b: BackendThread, h: HostileFrontend) -> str | None:
    """Until the backend disconnects us (its reason) or stops moving (None): the ring
    indices and counters it exposes stay the same for three looks in a row."""
    same, last = 0, None
    end = time.monotonic() + 3.0
    while same < 3 and time.monotonic() < end:
        why = h.closed_within(0.01)
        if why is not None:
            return why
        nb = b.nb
        tx, rx = nb.tx, nb.rx
        now = (nb.state, tuple(nb.counters.values()),
               (tx.ring.req_cons, tx.ring.rsp_prod_pvt) if tx else None,
               (rx.ring.req_cons, rx.ring.rsp_prod_pvt) if rx else None)
        same = same + 1 if now == last else 0
        last = now
    return None


def released_everything(b: BackendThread) -> None:
    nb = b.nb
    for st_ in (nb.tx_stats, nb.rx_stats):
        assert st_.maps_outstanding == 0 and st_.grants_in_use == 0, st_
    assert nb.rx_stats.grants_active == 0
    assert nb.regions_mapped() == 0
    rings = nb.control({"cmd": "stats"})["rings"]
    assert rings["tx"]["slots_in_flight"] == rings["rx"]["slots_in_flight"] == 0
    assert nb.tx_stats.slots_consumed == nb.tx_stats.slots_released


WIRE_FRAMES = [frame(b"r" * 60), frame(b"R" * 3000), frame(b"s" * 1400)]


@FUZZ
@given(case=ops(), persistent=st.booleans(), header_slots=st.booleans(),
       rx_traffic=st.booleans())
def test_any_lie_disconnects_only_that_frontend_and_leaks_nothing(backend, case, persistent,
                                                                  header_slots, rx_traffic):
    b = backend
    nb = b.nb
    fds = fd_count()
    before = dict(nb.counters)
    h = HostileFrontend(str(b.ev), "fuzz", b.domid)
    try:
        h.connect(dict(BASIC, **{"feature-persistent": persistent,
                                 "feature-header-slots": header_slots}))
        wait_for(lambda: nb.tx is not None, 5, "backend Connected")
        for op in case:
            op.apply(h)
        if rx_traffic:
            for f in WIRE_FRAMES:
                b.wire.send(bytes(VNET_HDR.size) + f)
        h.push()
        why = settle(b, h)
    finally:
        h.close()
    b.idle()
    assert b.thread.is_alive()
    after = nb.counters
    assert after["internal_errors"] == before["internal_errors"], nb.last_error
    malformed = after["malformed"] - before["malformed"]
    if why is not None:
        assert malformed == 1 and nb.last_error, (why, nb.last_error)
    assert malformed in (0, 1)
    released_everything(b)
    # every in-use bit the backend set is cleared again (the ones the case wrote are its own)
    own = {op.ref for op in case if isinstance(op, GrantEntry) and op.flags & GTF_in_use}
    flags = h.region.grants.flags
    left = [r for r in range(h.region.grants.count) if flags[r * 4] & GTF_in_use and r not in own]
    assert left == []
    b.wire_frames()  # whatever the case transmitted
    del h, flags  # our own mapping of the region holds an fd too (mmap keeps a dup)
    gc.collect()
    assert fd_count() == fds


def test_after_the_fuzz_a_real_frontend_still_gets_service(backend, tmp_path):
    f = FrontendThread(backend.ev, tmp_path / "f.ctl", domid=backend.domid)
    try:
        f.connected()
        frames = [frame(bytes([i]) * (100 + 700 * i)) for i in range(20)]
        for fr in frames:
            f.guest.send(bytes(VNET_HDR.size) + fr)
        got = wait_for(lambda: (backend.wire_frames() or None), 5, "frames on the wire")
        deadline = time.monotonic() + 5
        while len(got) < len(frames) and time.monotonic() < deadline:
            got += backend.wire_frames()
            time.sleep(0.01)
        assert got == frames
    finally:
        f.stop()
    backend.idle()
    released_everything(backend)


def test_notification_storm_is_deferred_not_served(tmp_path):
    """lateeoi: a frontend that only kicks gets its events deferred, and the backend thread
    spends a small fraction of the storm on it."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "storm", b.domid)
    try:
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 5, "backend Connected")
        tid = b.thread.native_id
        cpu0, t0 = thread_cpu(tid), time.monotonic()
        sent = h.storm(1.5)
        cpu = thread_cpu(tid) - cpu0
        wall = time.monotonic() - t0
        c = b.nb.counters
        assert sent > 100_000
        assert c["events_deferred"] > 0 and c["spurious_events"] > c["events_deferred"]
        assert cpu < 0.35 * wall, f"backend thread used {cpu:.2f}s of {wall:.2f}s"
        # and a kick that comes with work is still served: the storm was not fatal
        h.packet(1000)
        h.push()
        assert wait_for(b.wire_frames, 3, "the packet after the storm")
        assert b.nb.counters["malformed"] == 0
    finally:
        h.close()
        b.stop()


def test_rx_stall_turns_the_carrier_off_and_buffers_bring_it_back(tmp_path):
    b = BackendThread(tmp_path, rx_stall_timeout=0.3)
    h = HostileFrontend(str(b.ev), "stall", b.domid)
    try:
        h.connect()
        wait_for(lambda: b.nb.tx is not None, 5, "backend Connected")
        assert b.nb.carrier
        wait_for(lambda: not b.nb.carrier, 3, "carrier off")
        assert b.nb.counters["rx_stalls"] == 1
        h.post_rx(40)
        h.push()
        wait_for(lambda: b.nb.carrier, 3, "carrier back on")
        b.wire.send(bytes(VNET_HDR.size) + frame(b"x" * 2 * PAGE_SIZE))
        wait_for(lambda: b.nb.rx_stats.rx_packets == 1, 3, "a frame into the posted buffers")
        assert b.nb.control({"cmd": "stats"})["carrier"] is True
    finally:
        h.close()
        b.stop()
    assert not b.nb.carrier  # carrier off once the frontend is gone (Linux: disconnect)
