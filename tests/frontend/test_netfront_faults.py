"""Netfront's faults by kind, in process (fast tier): a backend's lie is the peer's fault, an
OS refusal while connecting is the OS's; each is logged naming its kind, counted under
``faults_<kind>`` in the stats, and the device comes back."""

from __future__ import annotations

import errno
import logging

import pytest

import frontend.netfront as netfront
from shared.plumbing.channel import EventChannel
from shared.plumbing.control.client import query
from shared.protocol.offload import VNET_HDR
from tests.conftest import frame
from tests.hostile import HostileBackend, lie_tx_unknown_id
from tests.inproc import FrontendThread, InprocNetfront, wait_for

FAULTS = ("faults_peer", "faults_own", "faults_os")


def faults(f: FrontendThread) -> dict[str, int]:
    counters = query(str(f.ctl), {"cmd": "stats"})["counters"]
    return {k: counters[k] for k in FAULTS}


def fault_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "netfront" and " fault: " in r.getMessage()]


@pytest.fixture
def hb(tmp_path, monkeypatch):
    monkeypatch.setattr(netfront, "BROKEN_BACKOFF", 0.02)
    hb = HostileBackend(str(tmp_path / "ev"), domid=9)
    yield hb
    hb.close()


def test_a_lying_backend_is_the_peers_fault(tmp_path, hb, caplog):
    caplog.set_level(logging.INFO, logger="netfront")
    f = FrontendThread(tmp_path / "ev", tmp_path / "f.ctl", domid=9)
    try:
        hb.accept()
        f.connected()
        lie_tx_unknown_id(hb, lambda: f.guest.send(bytes(VNET_HDR.size) + frame(b"t" * 3000)))
        hb.push()
        hb.wait_closed(5)
        wait_for(lambda: f.nf.state.name != "Connected", 5, "the frontend to give up")
        assert faults(f) == {"faults_peer": 1, "faults_own": 0, "faults_os": 0}
        lines = fault_lines(caplog)
        assert len(lines) == 1 and lines[0].startswith("fT: peer fault: device broken: ")
        hb.drop()
        hb.accept()
        f.connected()
    finally:
        f.stop()


class RefusedOnce(InprocNetfront):
    """The first attempt to open the channel fails as if the fd table were full."""

    refused = 0

    def open_channel(self) -> EventChannel:
        if not self.refused:
            self.refused += 1
            raise OSError(errno.EMFILE, "injected by the test")
        return super().open_channel()


def test_an_os_failure_while_connecting_is_the_oss_fault(tmp_path, hb, caplog):
    caplog.set_level(logging.INFO, logger="netfront")
    f = FrontendThread(tmp_path / "ev", tmp_path / "f.ctl", domid=9, netfront=RefusedOnce)
    try:
        hb.accept()  # the second attempt gets through
        f.connected()
        assert faults(f) == {"faults_peer": 0, "faults_own": 0, "faults_os": 1}
        lines = fault_lines(caplog)
        assert len(lines) == 1 and lines[0].startswith("fT: OS fault: device broken: OSError")
    finally:
        f.stop()
