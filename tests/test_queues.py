"""Multi-queue (issue 23), fast tier: the queue keys both ways, each queue's part of the
region, and the real netback and netfront with two queues - a worker process each - on
stand-in devices: frames bit-exact on every queue, counters per queue and summed, a hostile
frontend refused with a named reason, a killed worker taking the device down and back.
(The full tier runs the same on TAPs with iperf3: tests/lab/test_queues_real.py.)"""

from __future__ import annotations

import os
import re
import signal

import pytest

from frontend.handshake import Laid
from shared.plumbing.control.client import query
from shared.protocol.grant import RESERVED_REFS
from shared.protocol.netif import MAX_QUEUES_KEY, NUM_QUEUES_KEY, RX_REQUEST, queue_key
from shared.protocol.offload import VNET_HDR
from shared.protocol.queues import FLAT, QueueError, QueueKeys, check_queues, offered_max
from shared.protocol.region import Layout
from shared.protocol.xenbus import NegotiationError, XenbusState, choose
from tests.conftest import frame
from tests.hostile import BASIC
from tests.hostile_queues import QueuedFrontend
from tests.inproc import BackendThread, FrontendThread, drain, fd_count, memfd_maps, wait_for

LINUX = dict(BASIC, **{"feature-gso-tcpv4": True})


def keys(n: int, **over: object) -> dict[str, object]:
    """What a frontend with ``n`` queues writes (rings 10.., channels 1..; one queue: the
    count only), changed by ``over``."""
    out: dict[str, object] = dict(LINUX, **{NUM_QUEUES_KEY: n})
    for q in range(n if n > 1 else 0):
        out.update({queue_key(q, "tx-ring-ref"): 10 + 2 * q,
                    queue_key(q, "rx-ring-ref"): 11 + 2 * q,
                    queue_key(q, "event-channel"): q + 1})
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


# --- the keys ---------------------------------------------------------------------------------
def test_the_backend_reads_each_queues_keys_and_one_queue_keeps_the_flat_ones():
    assert check_queues(2, LINUX) == FLAT  # no count: one queue, as a stock frontend
    assert check_queues(2, keys(1)) == FLAT
    assert check_queues(2, keys(2)) == (QueueKeys(0, 10, 11, 1), QueueKeys(1, 12, 13, 2))


@pytest.mark.parametrize(("written", "reason"), [
    (keys(3), f"{NUM_QUEUES_KEY} 3: more than the 2 this backend offers"),
    (keys(2, **{NUM_QUEUES_KEY: 0}), "not a queue count"),
    (keys(2, **{NUM_QUEUES_KEY: True}), "not a queue count"),
    (keys(2, **{NUM_QUEUES_KEY: "2"}), "not a queue count"),
    (keys(2, **{queue_key(1, "rx-ring-ref"): None}),
     f"{NUM_QUEUES_KEY} is 2 but queue-1/rx-ring-ref is missing"),
    (keys(2, **{queue_key(2, "tx-ring-ref"): 30}),
     f"queue-2/tx-ring-ref written but {NUM_QUEUES_KEY} is 2"),
    (keys(1, **{queue_key(0, "tx-ring-ref"): 10}), "written with one queue"),
    (keys(2, **{queue_key(1, "tx-ring-ref"): 10}), "two queues' rings on one page"),
    (keys(2, **{queue_key(1, "event-channel"): 1}), "two queues on one event channel"),
    (keys(2, **{queue_key(0, "event-channel"): -1}), "not a page or channel number"),
])
def test_queue_keys_that_do_not_add_up_are_refused_by_name(written, reason):
    with pytest.raises(QueueError, match=reason) as e:
        check_queues(2, written)
    assert e.value.reason == "queues"  # booked as fatal_queues


def test_the_frontend_asks_at_most_the_offer_and_refuses_an_offer_that_is_no_count():
    offer = {"feature-rx-copy": True, MAX_QUEUES_KEY: 2}
    assert choose(offer, LINUX, 4, offered_max(offer))[NUM_QUEUES_KEY] == 2
    assert choose(offer, LINUX, 1, offered_max(offer))[NUM_QUEUES_KEY] == 1
    old = {"feature-rx-copy": True}  # no key: one queue, and no count written
    assert offered_max(old) is None and NUM_QUEUES_KEY not in choose(old, LINUX, 4, None)
    for bad in (0, -2, "4", True, None):
        with pytest.raises(NegotiationError, match=MAX_QUEUES_KEY):
            offered_max({MAX_QUEUES_KEY: bad})


# --- each queue's part of the region --------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_queues_own_disjoint_refs_slots_pages_and_rings(n):
    lay = Layout.for_size(8 << 20, queues=n)
    shares = [lay.share(q, n) for q in range(n)]
    refs = [r for s in shares for r in s.refs]
    assert refs == list(range(lay.gnt_count))  # every entry has exactly one owner
    assert [p for s in shares for p in s.payload] == list(range(lay.payload_pages))
    assert [h for s in shares for h in s.hdr_slots] == list(range(lay.hdr_slots))
    for s in shares:  # each queue's payload pages are granted by its own references
        assert RESERVED_REFS + s.payload.start in s.refs
        assert RESERVED_REFS + s.payload.stop - 1 in s.refs
    rings = [p for q in range(n) for p in lay.queue_rings(q)]
    assert len(set(rings)) == 2 * n and all(p in lay.ring_area for p in rings)
    one = Layout.for_size(8 << 20)  # one queue: the layout as before queues existed
    assert (one.tx_ring_page, one.rx_ring_page) == one.queue_rings(0)
    assert one.share(0, 1).refs == range(one.gnt_count) and one.share(0, 1).label == ""


# --- the real ends, two queues --------------------------------------------------------------
@pytest.fixture
def two(tmp_path):
    b = BackendThread(tmp_path, queues=2)
    f = FrontendThread(b.ev, tmp_path / "f.ctl", queues=2, region_size=4 << 20)
    try:
        wait_for(lambda: connected(b, f, 2), 15, "both ends connected with 2 queues")
        yield b, f
    finally:
        f.stop()
        b.stop()


def connected(b: BackendThread, f: FrontendThread, n: int) -> bool:
    pools = (b.nb.queues.pool, f.nf.queues.pool) if n > 1 else (True, True)
    return (b.nb.state == f.nf.state == XenbusState.Connected and all(pools)
            and (n == 1 or all(len(p.pids) == n for p in pools)))


def stats(b: BackendThread) -> dict:
    return query(str(b.dir / "b.ctl"), {"cmd": "stats"}, timeout=5)


def test_frames_cross_bit_exact_on_every_queue_each_in_its_own_process(two):
    b, f = two
    sent = {}
    for q in range(2):
        for i in range(20):
            data = frame(os.urandom(60 + 97 * i + q))
            sent.setdefault(("tx", q), []).append(data)
            f.guests[q].send(bytes(VNET_HDR.size) + data)
            back = frame(os.urandom(3000 + 500 * i + q))  # two RX buffers each
            sent.setdefault(("rx", q), []).append(back)
            b.wires[q].send(bytes(VNET_HDR.size) + back)
    got = {("tx", q): [] for q in range(2)} | {("rx", q): [] for q in range(2)}

    def all_in() -> bool:
        for q in range(2):
            got["tx", q] += drain(b.wires[q])
            got["rx", q] += drain(f.guests[q])
        return all(len(got[k]) == 20 for k in got)
    wait_for(all_in, 10, "every frame on its queue")
    assert got == sent  # each queue's frames, bit for bit, in order, on that queue only
    s = stats(b)
    per = s["queues"]
    assert [q["rings"]["tx"]["tx_packets"] for q in per] == [20, 20]
    assert [q["rings"]["rx"]["rx_packets"] for q in per] == [20, 20]
    assert s["rings"]["tx"]["tx_packets"] == 40 and s["rings"]["rx"]["rx_packets"] == 40
    pids = {q["pid"] for q in per}
    assert len(pids) == 2 and os.getpid() not in pids and set(s["pids"]) == {*pids,
                                                                             os.getpid()}
    fs = query(str(f.ctl), {"cmd": "stats"}, timeout=5)
    assert [q["rings"]["tx"]["tx_packets"] for q in fs["queues"]] == [20, 20]
    assert fs["rings"]["rx"]["rx_packets"] == 40


@pytest.mark.parametrize(("offered", "wanted", "used"), [(1, 2, 1), (2, 1, 1), (4, 2, 2)])
def test_each_end_uses_at_most_what_the_other_takes(tmp_path, offered, wanted, used):
    b = BackendThread(tmp_path, queues=offered)
    f = FrontendThread(b.ev, tmp_path / "f.ctl", queues=wanted, region_size=4 << 20)
    try:
        wait_for(lambda: connected(b, f, used), 15, f"{used} queue(s) connected")
        data = frame(b"x" * 500)
        for q in range(used):
            f.guests[q].send(bytes(VNET_HDR.size) + data)
        got: list[bytes] = []
        wait_for(lambda: got.extend(f for w in b.wires for f in drain(w)) or len(got) == used,
                 10, "the frames")
        assert got == [data] * used
        assert f.nf.features.get(NUM_QUEUES_KEY) == used
    finally:
        f.stop()
        b.stop()


# --- hostile frontends ------------------------------------------------------------------------
def refused(tmp_path, edit=None, queues: int = 2,
            wanted: dict[str, bool] | None = None) -> tuple[str, dict]:
    """A frontend whose keys ``edit`` spoils: the backend's reason and its counters."""
    b = BackendThread(tmp_path, queues=2)
    h = QueuedFrontend(str(b.ev), "liar", b.domid)
    try:
        with pytest.raises(Exception) as e:  # noqa: PT011 - the reason is checked below
            h.connect(wanted, queues=queues, edit=edit)
        wait_for(lambda: b.nb.counters["faults_peer"], 5, "the fault booked")
        return str(e.value), dict(b.nb.counters)
    finally:
        h.close()
        b.stop()


def test_more_queues_asked_than_offered_is_the_frontends_fault(tmp_path):
    why, c = refused(tmp_path, lambda laid: laid.keys.update({NUM_QUEUES_KEY: 3}))
    assert f"{NUM_QUEUES_KEY} 3: more than the 2" in why
    assert (c["fatal_queues"], c["malformed"], c["faults_peer"], c["connects"]) == (1, 1, 1, 0)


def test_staging_grants_on_two_queues_are_refused_by_name(tmp_path):
    """The staging pools name one queue's pages: with two queues the backend refuses."""
    why, c = refused(tmp_path, wanted=dict(BASIC, **{"feature-staging-grants": True}))
    assert "feature-staging-grants with 2 queues" in why
    assert (c["fatal_queues"], c["malformed"], c["connects"]) == (1, 1, 0)


def _drop_channel(laid: Laid) -> None:
    os.close(laid.fds[-1])
    laid.fds = laid.fds[:-1]


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda laid: laid.keys.pop(queue_key(1, "event-channel")),
     "queue-1/event-channel is missing"),
    (_drop_channel, "1 event channels passed for 2 queues"),
    (lambda laid: laid.keys.update({queue_key(1, "tx-ring-ref"): 1}),
     "queue-1/tx-ring-ref 1: not a page of the ring area"),
])
def test_mismatched_queue_keys_are_refused_with_a_named_reason(tmp_path, edit, reason):
    why, c = refused(tmp_path, edit)
    assert reason in why
    assert (c["fatal_queues"], c["malformed"], c["connects"]) == (1, 1, 0)


@pytest.mark.parametrize("ring", ["tx", "rx"])
def test_one_gref_posted_on_two_queues_at_once_disconnects_the_vif(tmp_path, ring):
    """Each grant entry's in-use bits are set and cleared by one queue's worker only (its
    queue owns the reference): a frontend that names queue 0's gref on queue 1 while queue 0
    holds it is refused by queue 1 before the entry is touched, and the whole vif goes."""
    b = BackendThread(tmp_path, queues=2)
    h = QueuedFrontend(str(b.ev), "liar", b.domid, size=4 << 20)
    try:
        h.connect(queues=2)
        wait_for(lambda: b.nb.queues.pool is not None, 10, "the workers")
        fds, maps = fd_count(), memfd_maps()
        gref = h.own_ref(0)
        for q in (0, 1):  # the same reference on both queues, published together
            h.use(q)
            if ring == "tx":
                h.packet(3000, base=gref)
            else:
                h.grant(gref, readonly=False)
                h.rx.req_prod_pvt = 1
                RX_REQUEST.pack_into(h.rx.buf, h.rx.entry(0), 1, 0, gref)
            h.tx.push_requests()
            h.rx.push_requests()
        for q in (0, 1):
            h.use(q)
            h.kick()
        why = h.wait_closed()
        assert re.search(rf"^queue 1: GrantError: .*gref {gref} is not queue 1's", why), why
        b.idle()
        c = b.nb.counters
        assert (c["fatal_grant"], c["malformed"], c["faults_peer"], c["internal_errors"]) == \
            (1, 1, 1, 0)
        assert b.nb.queues.pool is None and f"gref {gref}" in b.nb.last_error
        s = stats(b)
        for r in ("tx", "rx"):  # queue 0 held the grant: released with its worker
            assert s["rings"][r]["grants_in_use"] == 0 == s["rings"][r]["maps_outstanding"]
        assert s["rings"]["tx"]["slots_consumed"] == s["rings"]["tx"]["slots_released"]
        wait_for(lambda: fd_count() <= fds and memfd_maps() < maps, 5, "nothing kept")
    finally:
        h.close()
        b.stop()


# --- a worker killed --------------------------------------------------------------------------
@pytest.mark.parametrize("end", ["backend", "frontend"])
def test_a_killed_queue_worker_takes_the_device_down_and_it_comes_back(two, end):
    b, f = two
    fds = fd_count()
    maps = memfd_maps()
    ends = {"backend": b.nb, "frontend": f.nf}
    pool = ends[end].queues.pool
    os.kill(pool.workers[1].pid, signal.SIGKILL)
    wait_for(lambda: ends[end].queues.pool is not pool and connected(b, f, 2), 15,
             "the device back with two queues")
    c = ends[end].counters
    assert c["faults_os"] == 1 and c["disconnects"] == 1
    assert c["workers_died" if end == "backend" else "broken"] == 1
    assert "killed by SIGKILL" in ends[end].last_error
    assert b.nb.counters["malformed"] == 0  # nobody blames the frontend for our worker
    data = frame(b"after" * 100)
    for q in range(2):
        f.guests[q].send(bytes(VNET_HDR.size) + data)
    got = []
    wait_for(lambda: got.extend(drain(b.wires[0]) + drain(b.wires[1])) or len(got) == 2, 10,
             "frames on both queues again")
    assert got == [data, data]
    wait_for(lambda: fd_count() == fds and memfd_maps() == maps, 5,
             "as many descriptors and mappings as before")
    for pid in pool.pids + [w.pid for w in pool.workers]:  # every old worker reaped
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
