"""Each pvnet end against a peer that speaks only stock netif (``tests/stocknetif.py``, written
from netif.h without pvnet's wire module): traffic both ways, GSO both kinds, checksum flags
from the right enum, RX in ring order with the extra in its own slot, few RX buffers."""

from __future__ import annotations

import logging
import socket
import time

import pytest

import shared.protocol.xenbus
from shared.plumbing.channel import EventChannel
from shared.plumbing.netdev import offload_flags
from shared.plumbing.transport import connect_unix, listen_unix
from shared.protocol.netif import EXTENSIONS, NUM_QUEUES_KEY
from shared.protocol.offload import (
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
)
from tests.conftest import frame, frame6
from tests.inproc import BackendThread, FrontendThread, thread_state, wait_for
from tests.stocknetif import (
    FRONTEND_KEYS,
    GSO_TCPV4,
    GSO_TCPV6,
    OLD_FRONTEND_KEYS,
    RXF_CSUM_BLANK,
    RXF_DATA_VALIDATED,
    TXF_CSUM_BLANK,
    TXF_DATA_VALIDATED,
    Frame,
    StockBackend,
    StockFrontend,
)


def vnet(flags: int = 0, gso: int = 0, size: int = 0, start: int = 0, off: int = 0) -> bytes:
    return VNET_HDR.pack(flags, gso, 0, size, start, off, 0)


def recv_all(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


def cross(sock: socket.socket, peer, arrived: list, frames: list[tuple[bytes, bytes]]) -> list:
    """Send ``(frame, vnet header)`` pairs into ``sock``; the stock ``peer`` pumps until as
    many arrived (in its list ``arrived``), which must carry the same frames. Returns them."""
    for data, v in frames:
        sock.send(v + data)
    wait_for(lambda: (peer.pump(), len(arrived) >= len(frames))[1], 10, "frames at the peer")
    assert [g.data for g in arrived] == [d for d, _v in frames]
    return arrived


@pytest.fixture
def netfront_and_stock_backend(tmp_path):
    lst = listen_unix(str(tmp_path / "ev"))
    f = FrontendThread(tmp_path / "ev", tmp_path / "f.ctl")
    lst.settimeout(10)
    sock, _ = lst.accept()
    sb = StockBackend(EventChannel(sock=sock))
    sb.handshake()
    f.connected()
    yield f, sb
    f.stop()
    sb.close()
    lst.close()


def test_netfront_against_a_stock_backend_both_ways(netfront_and_stock_backend, caplog):
    f, sb = netfront_and_stock_backend
    assert not any(f.nf.features.get(k) for k in EXTENSIONS), f.nf.features
    # it wrote what Linux's netfront writes (the stock backend checks: no violation), one
    # queue to a backend with multi-queue-max-queues, and ignored the keys it does not know
    assert all(sb.keys[k] is True for k in FRONTEND_KEYS) and sb.keys[NUM_QUEUES_KEY] == 1
    big4 = frame(b"4" * 30000, proto=6)
    big6 = frame6(b"6" * 20000, proto=6)
    sent = [(frame(b"a" * 60), vnet()),
            (frame(b"b" * 3000), vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 6)),
            (big4, vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)),
            (big6, vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 1440, 54, 16))]
    got = cross(f.guest, sb, sb.tx_frames, sent)
    csum = TXF_CSUM_BLANK | TXF_DATA_VALIDATED
    assert [g.flags & csum for g in got] == [0, csum, csum, csum]
    assert [g.gso for g in got] == [None, None, (GSO_TCPV4, 1448), (GSO_TCPV6, 1440)]
    assert [g.features for g in got] == [0, 0, 0, 0]
    assert sb.violations == []

    sb.rx_queue += [Frame(frame(b"v" * 100), RXF_DATA_VALIDATED),
                    Frame(big4, RXF_CSUM_BLANK | RXF_DATA_VALIDATED, (GSO_TCPV4, 1448)),
                    Frame(big6, RXF_CSUM_BLANK | RXF_DATA_VALIDATED, (GSO_TCPV6, 1440)),
                    Frame(frame(b"j" * 9000), 0)]
    rx: list[bytes] = []
    wait_for(lambda: (sb.pump(), rx.extend(recv_all(f.guest)), len(rx) >= 4)[2], 10,
             "frames in the guest")
    heads = [VNET_HDR.unpack_from(r) for r in rx]
    assert [r[VNET_HDR.size:] for r in rx] == [fr.data for fr in
                                               (Frame(frame(b"v" * 100)), Frame(big4),
                                                Frame(big6), Frame(frame(b"j" * 9000)))]
    assert [h[0] for h in heads] == [VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                     VIRTIO_NET_HDR_F_NEEDS_CSUM, 0]
    assert [(h[1], h[3]) for h in heads] == [(0, 0), (VIRTIO_NET_HDR_GSO_TCPV4, 1448),
                                             (VIRTIO_NET_HDR_GSO_TCPV6, 1440), (0, 0)]
    assert sb.violations == []
    assert f.nf.counters["broken"] == 0, f.nf.last_error


def test_netfront_logs_the_keys_of_a_linux_backend_it_does_not_know(tmp_path, caplog,
                                                                  monkeypatch):
    monkeypatch.setattr(shared.protocol.xenbus, "_IGNORED_LOGGED", set())  # none logged yet
    lst = listen_unix(str(tmp_path / "ev"))
    with caplog.at_level(logging.INFO, "netfront"):
        f = FrontendThread(tmp_path / "ev", tmp_path / "f.ctl")
        lst.settimeout(10)
        sock, _ = lst.accept()
        sb = StockBackend(EventChannel(sock=sock))
        try:
            sb.handshake()
            f.connected()
        finally:
            f.stop()
            sb.close()
            lst.close()
    lines = [r.getMessage() for r in caplog.records if "ignoring backend" in r.getMessage()]
    unknown = ("feature-ctrl-ring", "feature-dynamic-multicast-control",
               "feature-multicast-control", "feature-rx-flip", "feature-split-event-channels",
               "feature-xdp-headroom")
    assert len(lines) == 1 and all(k in lines[0] for k in unknown), lines
    assert f.nf.counters["broken"] == 0


@pytest.fixture
def netback_and_stock_frontend(tmp_path):
    b = BackendThread(tmp_path)
    sf = StockFrontend(connect_unix(str(b.ev), timeout=10))
    offer = sf.handshake()
    wait_for(lambda: b.nb.tx is not None, 5, "backend Connected")
    yield b, sf, offer
    sf.close()
    b.idle()
    b.stop()


def test_netback_against_a_stock_frontend_both_ways_with_ten_rx_buffers(
        netback_and_stock_frontend):
    b, sf, offer = netback_and_stock_frontend
    for k in ("feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6",
              "feature-ipv6-csum-offload", "feature-rx-copy"):
        assert offer["features"][k] is True
    assert not any(b.nb.features.get(k) for k in EXTENSIONS)
    assert all(b.nb.features[k] for k in FRONTEND_KEYS)  # Linux's keys, accepted
    assert b.nb.vif.offload == offload_flags(True, True)
    sf.keep_posted(10)  # fewer than the 18 the largest frame needs
    big4 = frame(b"4" * 30000, proto=6)  # 8 pages + its extra slot: fits 10
    wire = [(frame(b"s" * 80), vnet(VIRTIO_NET_HDR_F_DATA_VALID)),
            (frame(b"j" * 9000), vnet()),
            (big4, vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, 34, 16)),
            (frame(b"t" * 200), vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 6)),
            (frame6(b"6" * 200), vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 54, 6))]
    got = cross(b.wire, sf, sf.rx_frames, wire)
    both = RXF_CSUM_BLANK | RXF_DATA_VALIDATED
    assert [g.flags for g in got] == [RXF_DATA_VALIDATED, 0, both, both, both]
    assert [g.gso for g in got] == [None, None, (GSO_TCPV4, 1448), None, None]
    assert sf.violations == []

    out = [Frame(frame(b"u" * 70)),
           Frame(frame6(b"6" * 20000, proto=6), TXF_CSUM_BLANK | TXF_DATA_VALIDATED,
                 (GSO_TCPV6, 1440)),
           Frame(frame(b"w" * 5000, proto=6), TXF_DATA_VALIDATED)]
    for fr in out:
        sf.send(fr)
    on_wire: list[bytes] = []
    wait_for(lambda: (on_wire.extend(recv_all(b.wire)), len(on_wire) >= len(out))[1], 10,
             "frames on the wire")
    assert [w[VNET_HDR.size:] for w in on_wire] == [fr.data for fr in out]
    heads = [VNET_HDR.unpack_from(w) for w in on_wire]
    assert [(h[0], h[1], h[3]) for h in heads] == [
        (0, 0, 0), (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 1440),
        (VIRTIO_NET_HDR_F_DATA_VALID, 0, 0)]
    wait_for(lambda: (sf.pump(), sf.tx_done == 1 + 5 + 2)[1], 5, "tx responses")
    assert sf.violations == []
    assert b.nb.counters["malformed"] == 0, b.nb.last_error


def test_netback_against_an_older_stock_frontend_without_the_linux_keys(tmp_path):
    """A frontend that writes neither feature-ipv6-csum-offload nor feature-rx-notify: the
    vif is told to hand over no partial checksum (the kernel completes them), a partial one
    that comes anyway is not delivered csum_blank, and RX buffers posted without a
    notification are found by polling (Linux: drain_timeout 30 ms), not by the idle timer."""
    b = BackendThread(tmp_path)
    sf = StockFrontend(connect_unix(str(b.ev), timeout=10))
    try:
        sf.handshake(keys=OLD_FRONTEND_KEYS)
        wait_for(lambda: b.nb.tx is not None, 5, "backend Connected")
        assert b.nb.vif.offload == 0
        assert not b.nb.features["feature-rx-notify"]
        b.wire.send(vnet(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 54, 6) + frame6(b"6" * 200))
        full = [(frame6(b"c" * 200), vnet()), (frame(b"d" * 300), vnet())]
        # the backend has armed req_event and sleeps: nothing will kick it
        wait_for(lambda: thread_state(b.thread.native_id) == "S", 5, "the backend asleep")
        t0 = time.monotonic()
        sf.keep_posted(10)  # no notification (the stock frontend has no feature-rx-notify)
        got = cross(b.wire, sf, sf.rx_frames, full)
        took = time.monotonic() - t0
        assert [g.flags for g in got] == [0, 0]
        assert b.nb.rx_stats.drops_not_negotiated == 1
        assert took < 0.9 and b.nb.counters["lost_wakeups"] == 0, took
        assert sf.violations == []
    finally:
        sf.close()
        b.stop()
