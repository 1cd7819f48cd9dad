"""Negotiation binds: the backend offers only what it implements, a request beyond the offer is
fatal (counted, logged), the frontend uses only what was offered, GSO keys have a direction,
and each end checks on the ring what was negotiated."""

from __future__ import annotations

import logging

import pytest

import frontend.handshake
import shared.protocol.xenbus
from backend.handshake import IMPLEMENTED, offered_features
from frontend.faults import BackendError
from frontend.netfront import tap_offloads
from shared.plumbing.netdev import offload_flags
from shared.protocol.netif import (
    EXTENSIONS,
    FEATURES,
    GREF_PERSISTENT,
    MAX_QUEUES_KEY,
    NUM_QUEUES_KEY,
    RX_REQUEST,
    TX_REQUEST,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NETTXF_header_slot,
)
from shared.protocol.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
)
from shared.protocol.queues import FLAT, QueueError, check_queues
from shared.protocol.xenbus import (
    FRONTEND_READ,
    Agreement,
    NegotiationError,
    NotNegotiated,
    check_request,
    choose,
    log_ignored,
    unknown_keys,
)
from tests.conftest import frame, frame6, make_pair
from tests.hostile import BASIC, HostileFrontend
from tests.inproc import BackendThread, FrontendThread, gather, wait_for

STOCK = {"request-rx-copy": True, "feature-sg": True, "feature-gso-tcpv4": True,
         "feature-gso-tcpv6": True}
#: what Linux 6.x xen-netfront writes (talk_to_netback), and what pvnet's netfront writes
LINUX = dict(STOCK, **{"feature-rx-notify": True, "feature-ipv6-csum-offload": True})


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


def gso(kind: int, size: int = 1448) -> bytes:
    return VNET_HDR.pack(1, kind, 54, size, 34, 16, 0)


def test_backend_offers_what_it_implements_and_can_withhold_options():
    off = offered_features()
    assert set(off) == {*IMPLEMENTED, MAX_QUEUES_KEY} and all(off.values())
    assert off[MAX_QUEUES_KEY] == 1 and offered_features(queues=2)[MAX_QUEUES_KEY] == 2
    assert offered_features(("feature-gso-tcpv6",))["feature-gso-tcpv6"] is False
    for bad in ("feature-rx-copy", "feature-bogus"):
        with pytest.raises(ValueError):
            offered_features((bad,))


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_an_extension_that_was_not_offered_is_refused(ext):
    off = offered_features((ext,))
    with pytest.raises(NotNegotiated, match=ext):
        check_request(off, dict(STOCK, **{ext: True}))
    assert check_request(offered_features(), dict(STOCK, **{ext: True}))[ext] is True


def test_no_request_rx_copy_is_refused_and_an_unknown_key_is_ignored_once(caplog,
                                                                          monkeypatch):
    monkeypatch.setattr(shared.protocol.xenbus, "_IGNORED_LOGGED", set())
    with pytest.raises(NegotiationError, match="request-rx-copy"):
        check_request(offered_features(), dict(STOCK, **{"request-rx-copy": False}))
    odd = dict(LINUX, **{"feature-rx-flip": True, "feature-zz-unknown": 7,
                        "ctrl-ring-ref": "12", "feature-split-event-channels": True})
    got = check_request(offered_features(), odd)  # never fatal (Linux reads what it knows)
    assert "feature-zz-unknown" not in got and got["feature-rx-notify"] is True
    assert unknown_keys(odd, (*FRONTEND_READ, NUM_QUEUES_KEY)) == [
        "ctrl-ring-ref", "feature-rx-flip", "feature-split-event-channels",
        "feature-zz-unknown"]
    log = logging.getLogger("test-keys")
    with caplog.at_level(logging.INFO, "test-keys"):
        for _ in range(3):
            log_ignored(log, ["feature-zz-once", "feature-zz-twice"], "frontend")
    lines = [r.getMessage() for r in caplog.records if r.name == "test-keys"]
    assert len(lines) == 1 and "feature-zz-once, feature-zz-twice" in lines[0]


def test_a_peer_inventing_keys_gets_bounded_memory_and_lines(caplog, monkeypatch):
    monkeypatch.setattr(shared.protocol.xenbus, "_IGNORED_LOGGED", set())
    log = logging.getLogger("test-keys")
    with caplog.at_level(logging.INFO, "test-keys"):
        for round_ in range(100):  # a reconnecting frontend with 1000 new keys each time
            keys = [f"x-{round_}-{i}" for i in range(1000)]
            check_request(offered_features(), dict(LINUX, **dict.fromkeys(keys, True)))
            log_ignored(log, keys, "frontend")
    assert len(shared.protocol.xenbus._IGNORED_LOGGED) == shared.protocol.xenbus.IGNORED_LOGGED_MAX
    lines = [r.getMessage() for r in caplog.records if r.name == "test-keys"]
    assert len(lines) == 1 and "no more such keys will be logged" in lines[0]


def test_backend_accepts_every_key_a_linux_netfront_writes():
    """netif.h keys a frontend writes, as Linux netback reads them (read_xenbus_vif_flags):
    feature-rx-notify, feature-ipv6-csum-offload and feature-no-csum-offload set how RX
    checksums are delivered, multi-queue-num-queues may be 1 (at most the
    multi-queue-max-queues offered: more is QueueError, tests/test_queues.py),
    request-multicast-control is read and not in force."""
    off = offered_features()
    assert off["feature-ipv6-csum-offload"] is True
    for extra in ({}, {"feature-no-csum-offload": True},
                  {"request-multicast-control": True}, {NUM_QUEUES_KEY: 1}):
        got = check_request(off, dict(LINUX, **extra))
        assert all(got[k] for k in LINUX)
        assert check_queues(off[MAX_QUEUES_KEY], dict(LINUX, **extra)) == FLAT
    with pytest.raises(QueueError, match=f"{NUM_QUEUES_KEY} 4: more than the 1"):
        check_queues(off[MAX_QUEUES_KEY], dict(LINUX, **{NUM_QUEUES_KEY: 4}))
    with pytest.raises(NegotiationError, match="true or false"):
        check_request(off, dict(LINUX, **{"feature-rx-notify": 1}))


def test_ipv6_checksum_offload_has_a_direction_and_partial_checksums_follow_it():
    """netif.h: the backend's feature-ipv6-csum-offload is about TX, the frontend's about RX;
    a key not written is off. A TAP has one checksum switch: partial checksums cross only
    where both families may carry them, and TSO only with them."""
    ag = Agreement.of(offered_features(), check_request(offered_features(), LINUX))
    assert (ag.tx_csum, ag.rx_csum, ag.rx_notify) == (True, True, True)
    assert tap_offloads(ag) == offload_flags(True, True) != 0
    old = Agreement.of(offered_features(), check_request(offered_features(), STOCK))
    assert (old.tx_csum_v6, old.rx_csum_v4, old.rx_csum_v6, old.rx_notify) == (
        True, True, False, False)
    assert offload_flags(old.rx_gso_tcpv4, old.rx_gso_tcpv6, old.rx_csum) == 0
    noff = offered_features(("feature-ipv6-csum-offload",))
    ag = Agreement.of(noff, check_request(noff, dict(LINUX, **{
        "feature-no-csum-offload": True})))
    assert (ag.tx_csum_v6, ag.rx_csum_v4, ag.rx_csum_v6) == (False, False, True)
    assert tap_offloads(ag) == 0
    assert choose(noff, dict.fromkeys(FEATURES, True))["feature-ipv6-csum-offload"] is True


def test_frontend_never_chooses_what_was_not_offered():
    off = offered_features(("feature-header-slots", "feature-persistent"))
    got = choose(off, dict.fromkeys(FEATURES, True))
    assert got["feature-header-slots"] is False and got["feature-persistent"] is False
    assert got["feature-rx-by-id"] is True and got["request-rx-copy"] is True


def test_gso_keys_have_a_direction():
    """netif.h: the backend's feature-gso-tcpv6 is about TX, the frontend's about RX."""
    off = offered_features(("feature-gso-tcpv6",))
    req = dict(STOCK, **{"feature-gso-tcpv4": False})
    ag = Agreement.of(off, check_request(off, req))
    assert (ag.tx_gso_tcpv4, ag.tx_gso_tcpv6) == (True, False)
    assert (ag.rx_gso_tcpv4, ag.rx_gso_tcpv6) == (False, True)


def backend_refuses(p, match: str, *send) -> None:
    """The frontend queues ``send`` and publishes it; the backend's next action must refuse
    it as NotNegotiated, naming ``match``."""
    p.send(*send)
    p.tx.pump()
    p.tx.ring.push_requests()
    with pytest.raises(NotNegotiated, match=match):
        p.btx.action()
    close(p)


def test_header_slot_request_without_the_feature_is_fatal():
    p = make_pair(header_slots=True)
    p.btx.header_slots = False  # the backend did not agree to header slots
    backend_refuses(p, "feature-header-slots", frame(b"h" * 1000))


def test_gso_kind_or_slots_the_backend_did_not_offer_are_fatal():
    p = make_pair(header_slots=False)
    p.btx.gso_ok = frozenset({XEN_NETIF_GSO_TYPE_TCPV4})
    backend_refuses(p, "GSO type 2", frame(b"6" * 20000, proto=6),
                    gso(VIRTIO_NET_HDR_GSO_TCPV6))
    p = make_pair(header_slots=False)
    p.btx.sg = False
    backend_refuses(p, "feature-sg", frame(b"s" * 6000))


def test_frontend_tx_sends_only_what_the_backend_accepts():
    p = make_pair(header_slots=False, tx_sg=False, tx_gso_tcpv6=False)
    p.send(frame(b"a" * 3000))  # one slot: fine
    p.send(frame(b"b" * 6000))  # two slots: the backend has no feature-sg
    p.send(frame(b"6" * 3000, proto=6), gso(VIRTIO_NET_HDR_GSO_TCPV6))
    p.send(frame(b"4" * 3000, proto=6), gso(VIRTIO_NET_HDR_GSO_TCPV4))
    p.run_tx()
    assert [len(f) for f in p.wire_frames()] == [3042, 3054]
    assert p.fstats[0].drops_not_negotiated == p.fstats[0].drops == 2
    close(p)


def test_backend_rx_sends_only_what_the_frontend_accepts():
    p = make_pair(rx_sg=False, rx_gso_tcpv4=False)
    p.wire.send(bytes(VNET_HDR.size) + frame(b"a" * 1000))
    p.wire.send(bytes(VNET_HDR.size) + frame(b"b" * 6000))  # two buffers: no feature-sg
    p.wire.send(gso(VIRTIO_NET_HDR_GSO_TCPV4) + frame(b"4" * 1000, proto=6))
    p.run_rx()
    assert [len(g) - VNET_HDR.size for g in p.guest_frames()] == [1042]
    assert p.bstats[1].drops_not_negotiated == p.bstats[1].drops == 2
    close(p)


def csum(start: int, off: int) -> bytes:
    return VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start, off, 0)


def test_backend_drops_ipv6_csum_blank_tx_it_did_not_offer(caplog):
    """Decided (docs/protocol.md, Negotiation): a csum_blank IPv6 frame without the backend's
    feature-ipv6-csum-offload is dropped - counted drops_not_negotiated, the frontend stays -
    as any frame whose checksum this backend does not set up; IPv4 is unaffected."""
    p = make_pair(header_slots=False)
    p.btx.csum_v6 = False  # the backend did not write feature-ipv6-csum-offload
    p.send(frame6(b"6" * 500), csum(54, 6))
    p.send(frame(b"4" * 500), csum(34, 6))
    p.send(frame6(b"v" * 500))
    p.run_tx()
    assert [len(f) for f in p.wire_frames()] == [542, 562]
    st = p.bstats[0]
    assert st.drops == st.drops_error == st.drops_not_negotiated == 1
    assert st.tx_packets == 2  # the two frames handed on, not the dropped one
    assert st.slots_consumed == st.slots_released
    assert any("feature-ipv6-csum-offload" in r.getMessage() for r in caplog.records)
    close(p)


def test_frontend_sends_no_partial_checksum_the_backend_did_not_agree_to():
    p = make_pair(header_slots=False, tx_csum_v6=False)
    p.send(frame6(b"6" * 500), csum(54, 6))
    p.send(frame(b"4" * 500), csum(34, 6))  # the TAP was told no partial checksums at all
    p.send(frame(b"p" * 500))
    p.run_tx()
    assert [len(f) for f in p.wire_frames()] == [542]
    assert p.fstats[0].drops == p.fstats[0].drops_not_negotiated == 2
    close(p)


def test_backend_sets_no_csum_blank_for_a_frontend_without_ipv6_csum_offload():
    """The vif is told no partial checksums (TUNSETOFFLOAD 0, the kernel completes them); one
    that still comes (queued before) is not delivered csum_blank: dropped, counted."""
    p = make_pair(rx_csum_v6=False)
    p.wire.send(csum(54, 6) + frame6(b"6" * 300))
    p.wire.send(VNET_HDR.pack(VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0)
                + frame6(b"v" * 300))
    p.run_rx()
    got = [VNET_HDR.unpack_from(g) for g in p.guest_frames()]
    assert [(h[0], h[1]) for h in got] == [(VIRTIO_NET_HDR_F_DATA_VALID, 0)]
    assert p.bstats[1].drops_not_negotiated == p.bstats[1].drops == 1
    close(p)


def test_frontend_rx_refuses_what_it_did_not_announce():
    p = make_pair()
    p.rx.gso_ok = frozenset()  # the frontend wrote no feature-gso-* key
    p.wire.send(gso(VIRTIO_NET_HDR_GSO_TCPV4) + frame(b"4" * 9000, proto=6))
    with pytest.raises(BackendError, match="GSO kinds"):
        p.run_rx()
    close(p)


def test_persistent_bit_is_on_the_ring_when_negotiated_and_only_then():
    for persistent in (True, False):
        p = make_pair(persistent=persistent, header_slots=False)
        p.send(frame(b"p" * 9000))
        p.tx.pump()
        p.rx.refill()
        ring = p.tx.ring
        grefs = [TX_REQUEST.unpack_from(ring.buf, ring.entry(i))[0] for i in range(3)]
        rgrefs = [RX_REQUEST.unpack_from(p.rx.ring.buf, p.rx.ring.entry(i))[2]
                  for i in range(4)]
        want = GREF_PERSISTENT if persistent else 0
        assert [g & GREF_PERSISTENT for g in grefs + rgrefs] == [want] * 7
        p.tx.ring.push_requests()
        p.run_tx()
        assert len(p.wire_frames()) == 1
        assert (p.bstats[0].persistent_hits > 0 or p.bstats[0].grants_in_use > 0) == persistent
        close(p)


def test_netfront_against_a_backend_withholding_extensions(tmp_path):
    b = BackendThread(tmp_path, no_offer=("feature-header-slots", "feature-persistent"))
    f = FrontendThread(b.ev, tmp_path / "f.ctl", persistent=True)
    try:
        f.connected()
        assert not f.nf.features["feature-header-slots"]
        assert not f.nf.features["feature-persistent"]
        frames = [frame(bytes([i]) * (100 + 900 * i)) for i in range(8)]
        for fr in frames:
            f.guest.send(bytes(VNET_HDR.size) + fr)
        got = gather(b.wire_frames, len(frames), 5, "frames on the wire")
        assert got == frames
        assert f.nf.tx_stats.tx_header_slot_packets == 0
        assert b.nb.counters["malformed"] == 0, b.nb.last_error
    finally:
        f.stop()
        b.stop()


def test_a_frontend_using_what_was_not_offered_is_disconnected_and_counted(tmp_path,
                                                                           monkeypatch):
    b = BackendThread(tmp_path, no_offer=("feature-persistent",))
    monkeypatch.setattr(frontend.handshake, "choose", lambda offered, wanted, *_: dict(wanted))
    h = HostileFrontend(str(b.ev), "liar", b.domid)
    try:
        with pytest.raises(Exception, match="not offered"):
            h.connect(dict(BASIC, **{"feature-persistent": True}))
        wait_for(lambda: b.nb.counters["not_negotiated"] == 1, 5, "the refusal counted")
        assert b.nb.counters["malformed"] == 1
        assert "feature-persistent" in b.nb.last_error
    finally:
        h.chan.close()
        b.stop()


def test_header_slot_flag_on_the_ring_without_negotiation_disconnects(tmp_path):
    b = BackendThread(tmp_path, no_offer=("feature-header-slots",))
    h = HostileFrontend(str(b.ev), "liar", b.domid)
    try:
        h.connect(dict(BASIC))
        assert not h.chosen["feature-header-slots"]
        h.packet(1000, header_slot=True)
        h.push()
        wait_for(lambda: b.nb.counters["not_negotiated"] == 1, 5, "the refusal counted")
        assert "feature-header-slots" in b.nb.last_error
        assert NETTXF_header_slot
    finally:
        h.close()
        b.stop()


@pytest.mark.parametrize("ext,use", [
    ("feature-header-slots", lambda h: h.packet(1000, header_slot=True)),
    ("feature-persistent", lambda h: h.packet(6000, header_slot=False, persistent=True)),
    ("feature-persistent", lambda h: h.post_rx(4, persistent=True)),
], ids=["header-slot", "persistent-tx", "persistent-rx"])
def test_an_extension_offered_but_not_taken_is_judged_by_the_agreement(tmp_path, ext, use):
    """The backend offers every extension; this frontend takes none and then uses one on
    the ring anyway. What binds is the agreement (offered *and* taken), not the offer: the
    backend disconnects it (not_negotiated), naming the key."""
    b = BackendThread(tmp_path)
    h = HostileFrontend(str(b.ev), "liar", b.domid)
    try:
        assert b.nb.offered[ext]
        h.connect(dict(BASIC, **{ext: False}))
        assert not h.chosen[ext]
        use(h)
        h.push()
        wait_for(lambda: b.nb.counters["not_negotiated"] == 1, 5, "the refusal counted")
        assert b.nb.counters["malformed"] == 1 and ext in b.nb.last_error
    finally:
        h.close()
        b.stop()
