"""The one connection lifecycle (``shared.endpoint.connection.Endpoint``) with a toy end plugged in:
the order of the steps and of teardown, a restart on the same stream, and how each way a
connection can end is booked (fast tier, no region, no device)."""

from __future__ import annotations

import logging
import socket

import pytest

from shared.endpoint.connection import Endpoint, PeerRestarted
from shared.endpoint.lifecycle import Shutdown
from shared.plumbing.channel import ChannelClosed, ChannelError, EventChannel
from shared.plumbing.netdev import NetDevice
from shared.protocol.xenbus import XenbusState

log = logging.getLogger("toy")


class Toy(Endpoint[dict]):
    """Serves one scripted ending per connection, and records every step it is asked for."""

    waiting = XenbusState.InitWait
    peer_errors = (ChannelError,)

    def __init__(self, endings: list[BaseException]) -> None:
        super().__init__("toy", log)
        self.endings = endings
        self.steps: list[str] = []
        self.peers: list[socket.socket] = []

    def open_device(self) -> NetDevice:
        raise AssertionError("not used")

    def open_channel(self) -> EventChannel:
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        self.steps.append("open")
        return EventChannel(sock=ours)

    def handshake(self, chan: EventChannel, first: dict | None) -> dict:
        self.steps.append(f"handshake {self.state.name} first={first is not None}")
        return {"chan": chan}

    def attach(self, chan: EventChannel, negotiated: dict) -> dict:
        self.steps.append("attach")
        return negotiated

    def serve(self, conn: dict) -> None:
        self.steps.append(f"serve {self.state.name}")
        raise self.endings.pop(0)

    def detach(self, conn: dict) -> None:
        self.steps.append(f"detach chan_open={conn['chan'].fileno() >= 0}")

    def close(self) -> None:
        super().close()
        for s in self.peers:
            s.close()

    def said(self) -> list[str]:
        """What the last peer was told (the Closing messages)."""
        self.peers[-1].setblocking(False)
        try:
            return self.peers[-1].recv(4096).decode().splitlines()
        except BlockingIOError:
            return []


def test_a_connection_runs_its_steps_in_order_and_tears_down_in_one_order():
    toy = Toy([ChannelClosed("bye")])
    assert toy.session() is False
    assert toy.steps == ["open", "handshake InitWait first=False", "attach", "serve Connected",
                         "detach chan_open=True"]
    assert toy.state == XenbusState.Closed
    assert toy.counters["connects"] == 1 and toy.counters["disconnects"] == 1
    assert {toy.counters[f"faults_{k}"] for k in ("peer", "own", "os")} == {0}
    toy.close()


def test_a_restart_on_the_same_stream_negotiates_again_with_the_hello_it_read():
    toy = Toy([PeerRestarted({"state": "Initialising"}), ChannelClosed("bye")])
    toy.session()
    assert toy.steps.count("open") == 1
    assert "handshake InitWait first=True" in toy.steps
    assert toy.counters["connects"] == 2 and toy.counters["disconnects"] == 2
    toy.close()


@pytest.mark.parametrize("exc, kind, internal", [
    (ChannelError("garbage"), "peer", 0),
    (ValueError("our bug"), "own", 1),
    (OSError(5, "EIO"), "os", 1),
])
def test_each_fault_is_booked_by_its_kind_and_the_peer_is_told(exc, kind, internal, caplog):
    caplog.set_level(logging.INFO, logger="toy")
    toy = Toy([exc])
    assert toy.session() is True
    faults = {k: toy.counters[f"faults_{k}"] for k in ("peer", "own", "os")}
    assert faults == {k: int(k == kind) for k in faults}
    assert toy.counters["internal_errors"] == internal
    label = {"peer": "peer fault", "own": "own fault", "os": "OS fault"}[kind]
    assert [r.getMessage() for r in caplog.records if " fault: " in r.getMessage()] == [
        f"toy: {label}: disconnecting ?: {toy.last_error}"]
    assert any('"Closing"' in line and "error" in line for line in toy.said())
    assert toy.steps[-1] == "detach chan_open=True"  # released before the channel closed
    toy.close()


def test_shutdown_says_goodbye_and_still_tears_down():
    toy = Toy([Shutdown("SIGTERM")])
    with pytest.raises(Shutdown):
        toy.session()
    said = toy.said()
    assert len(said) == 1 and '"Closing"' in said[0] and "error" not in said[0]
    assert toy.steps[-1] == "detach chan_open=True" and toy.state == XenbusState.Closed
    toy.close()
