"""A lying backend against the real netfront (fast tier: ``Netfront.run`` on a thread, its
TAP a socketpair; the backend a ``HostileBackend`` speaking the real handshake).

Every lie must end the same way: the frontend tells the backend why (Closing + error), counts
``broken``, keeps running, delivers nothing it should not to the guest, and comes back with a
fresh handshake (and a fresh region: the old one is unmapped). The response checks themselves
are also fuzzed directly on ``RxQueue``/``TxQueue``.
"""

from __future__ import annotations

import gc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import frontend.netfront as netfront
from frontend.faults import BackendError
from shared.protocol.grant import GTF_reading
from shared.protocol.netif import (
    RX_RESPONSE,
    TX_RESPONSE,
    XEN_NETIF_RSP_NULL,
)
from shared.protocol.offload import VNET_HDR
from shared.protocol.ring import MASK32, RingError
from tests.conftest import frame, make_pair
from tests.hostile import (
    BACKEND_LIES,
    HostileBackend,
    lie_rx_bad_offset,
    lie_rx_past_buffer,
    lie_rx_unknown_id,
)
from tests.inproc import FrontendThread, fd_count, wait_for


@pytest.fixture
def rig(tmp_path, monkeypatch):
    monkeypatch.setattr(netfront, "BROKEN_BACKOFF", 0.02)
    hb = HostileBackend(str(tmp_path / "ev"), domid=9)
    f = FrontendThread(tmp_path / "ev", tmp_path / "f.ctl", domid=9)
    yield hb, f
    f.stop()
    hb.close()


def test_every_lie_breaks_the_device_and_it_comes_back(rig):
    hb, f = rig
    nf = f.nf
    hb.accept()
    f.connected()
    gc.collect()  # earlier tests' garbage (sockets, regions) closes now, not mid-count
    fds = fd_count()
    for lie in BACKEND_LIES:
        broken = nf.counters["broken"]
        want = lie(hb, lambda: f.guest.send(bytes(VNET_HDR.size) + frame(b"t" * 3000)))
        hb.push()
        why = hb.wait_closed(5)
        assert want in why, (lie.__name__, why)
        assert nf.counters["broken"] == broken + 1
        assert want in nf.last_error
        assert f.thread.is_alive() and nf.counters["internal_errors"] == 0
        got = f.guest_frames()
        if lie in (lie_rx_unknown_id, lie_rx_past_buffer, lie_rx_bad_offset):
            assert got == [], lie.__name__  # nothing from outside a posted buffer
        hb.drop()
        hb.accept()  # the frontend is back with a fresh handshake and region
        f.connected()
        wait_for(lambda: nf.regions_mapped() == 1, 5, "the old region to be unmapped")
    gc.collect()
    assert fd_count() == fds


def test_a_malformed_offer_is_a_broken_handshake_not_a_crash(rig):
    hb, f = rig
    nf = f.nf
    for bad in ({"state": "InitWait", "features": "all"},
                {"state": "InitWait", "features": {}, "domid": "zero"},
                {"state": "InitWait", "features": {}, "domid": 1 << 40}):
        broken = nf.counters["broken"]
        hb.listener.settimeout(5)
        sock, _ = hb.listener.accept()
        with sock:
            sock.settimeout(5)
            assert b"Initialising" in sock.recv(4096)
            import json

            sock.sendall(json.dumps(bad).encode() + b"\n")
            wait_for(lambda b=broken: nf.counters["broken"] == b + 1, 5, "broken")
        assert "NegotiationError" in nf.last_error
    hb.accept()  # and a correct backend is still welcome
    f.connected()
    assert nf.counters["internal_errors"] == 0


# --- the checks themselves, fuzzed ---------------------------------------------------------
MARK = 0xEE


def _posted_pair():
    p = make_pair()
    p.rx.refill()
    p.rx.ring.push_requests()
    p.brx.refill()
    # everything that is not a posted RX buffer is marked: a frame must never contain it
    lay = p.front_region.layout
    rx_pages = set(p.rx.frames)
    for f in range(lay.payload_page, lay.payload_page + lay.payload_pages):
        p.front_region.page(f)[:] = (bytes([f % 200]) if f in rx_pages else bytes([MARK])) \
            * 4096
    return p


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(rsps=st.lists(st.tuples(st.one_of(st.integers(0, 300), st.integers(0, 0xFFFF)),
                               st.one_of(st.just(0), st.integers(0, 0xFFFF)),
                               st.integers(0, 15),
                               st.one_of(st.integers(-2, 4200), st.integers(-0x8000, 0x7FFF))),
                     min_size=1, max_size=40),
       ahead=st.integers(0, 3))
def test_rx_responses_of_any_shape_break_or_deliver_only_posted_bytes(rsps, ahead):
    p = _posted_pair()
    try:
        ring = p.brx.ring
        for r in rsps:
            RX_RESPONSE.pack_into(ring.buf, ring.entry(ring.rsp_prod_pvt), *r)
            ring.rsp_prod_pvt = (ring.rsp_prod_pvt + 1) & MASK32
        ring.rsp_prod_pvt = (ring.rsp_prod_pvt + ahead) & MASK32
        ring.push_responses()
        try:
            for _ in range(5):
                p.rx.poll()
        except (BackendError, RingError):
            pass
        for g in p.guest_frames():
            assert MARK not in g[VNET_HDR.size:], "a frame read outside its posted buffers"
    finally:
        for s in (p.guest, p.wire, *p._keep):
            s.close()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(rsps=st.lists(st.tuples(st.one_of(st.integers(0, 60), st.integers(0x8000, 0x8010),
                                         st.integers(0, 0xFFFF)),
                               st.one_of(st.just(0), st.just(XEN_NETIF_RSP_NULL),
                                         st.integers(-0x8000, 0x7FFF))),
                     min_size=1, max_size=40),
       frames=st.integers(0, 4))
def test_tx_responses_of_any_shape_break_or_release_only_what_was_sent(rsps, frames):
    p = make_pair()
    try:
        for i in range(frames):
            p.send(frame(bytes([i]) * 5000))
        p.tx.pump()
        in_flight = p.tx.in_flight()
        ring = p.btx.ring
        for r in rsps:
            TX_RESPONSE.pack_into(ring.buf, ring.entry(ring.rsp_prod_pvt), *r)
            ring.rsp_prod_pvt = (ring.rsp_prod_pvt + 1) & MASK32
        ring.push_responses()
        try:
            p.tx.reap()
        except (BackendError, RingError):
            return
        # accepted: then every id it released was one in flight, and the books balance
        assert p.tx.in_flight() == max(0, in_flight - len(rsps))
        assert not any(p.front_region.grants.flags[r * 4] & GTF_reading
                       for r in range(p.front_region.grants.count))
    finally:
        for s in (p.guest, p.wire, *p._keep):
            s.close()
