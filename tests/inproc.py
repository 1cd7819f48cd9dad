"""The real netback and netfront (``Netback.run``/``Netfront.run``: handshake, loop, fault
handling, release) on threads of the test process, for the fast tier: no root, no TAP.

The vif and the guest TAP are datagram socketpairs (``StandIn`` devices, plugged in by
subclassing: ``StandInDevice.open_device``), the event channel a
real unix socket in a temp dir, the region a real sealed memfd. What differs from the
processes the lab runs is only the device at each edge, so lifecycle bugs (a leaked mapping,
a fault that kills the loop) show up here in seconds.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend.interface import Netback, NetbackConfig
from frontend.netfront import Netfront, NetfrontConfig
from shared.plumbing.control.client import ControlError, query
from shared.plumbing.netdev import NetDevice
from shared.protocol.offload import VNET_HDR
from shared.protocol.xenbus import XenbusState
from tests.conftest import dgram_pair


class StandIn(NetDevice):
    """A datagram socket standing in for a TAP (one per queue): frames pass, offloads are
    only remembered (``offload``: the last TUNSETOFFLOAD flags asked for), the carrier is a
    no-op, queues are always attached, and the sockets stay the test's to close."""

    def __init__(self, socks: socket.socket | list[socket.socket]) -> None:
        socks = socks if isinstance(socks, list) else [socks]
        super().__init__(socks[0].fileno(), f"standin{socks[0].fileno()}",
                         tuple(s.fileno() for s in socks[1:]))
        self.offload: int | None = None
        self.queues_used = 1

    def set_offload(self, flags: int) -> None:
        self.offload = flags

    def use_queues(self, n: int) -> None:
        self.queues_used = n

    def set_carrier(self, on: bool) -> None:
        pass

    def close(self) -> None:
        pass


class StandInDevice:
    """Mixin for an end: its device is ``sock`` (a socket, or one per queue) instead of a
    TAP."""

    def __init__(self, cfg, sock: socket.socket | list[socket.socket]) -> None:
        self._standin = sock
        super().__init__(cfg)

    def open_device(self) -> NetDevice:
        return StandIn(self._standin)


class InprocNetback(StandInDevice, Netback):
    """A Netback whose vif is a socket."""


class InprocNetfront(StandInDevice, Netfront):
    """A Netfront whose TAP is a socket."""


def wait_for(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.005)


def gather(read: Callable[[], list[bytes]], n: int, timeout: float = 5.0,
           what: str = "frames") -> list[bytes]:
    """Every frame ``read`` returns until there are ``n``: a counter an end bumps before its
    device write (tx_packets, rx_packets) says nothing yet about the far side's socket."""
    got: list[bytes] = []

    def enough() -> bool:
        got.extend(read())
        return len(got) >= n

    wait_for(enough, timeout, f"{n} {what}")
    return got


def answers(ctl: Path | str) -> bool:
    """Does the control socket at `ctl` answer a ping (bound *and* listening and served)?"""
    try:
        return bool(query(str(ctl), {"cmd": "ping"}, timeout=1.0))
    except ControlError:
        return False


def wait_answering(ctl: Path | str, timeout: float = 5.0) -> None:
    wait_for(lambda: answers(ctl), timeout, f"the control socket {ctl} to answer")


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd_maps(pid: int | str = "self") -> int:
    """memfd mappings of a process (a grant region is one): the leak the kernel sees."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/memfd:" in line)


def thread_state(native_id: int) -> str:
    """A thread's scheduler state ('R' running, 'S' asleep, e.g. in poll)."""
    raw = Path(f"/proc/self/task/{native_id}/stat").read_text()
    return raw[raw.rindex(")") + 2]


def thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) one thread of this process has used."""
    raw = Path(f"/proc/self/task/{native_id}/stat").read_text()
    rest = raw[raw.rindex(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class BackendThread:
    """A Netback serving ``<dir>/ev`` on a thread; ``wire`` is the bridge's side of its vif."""

    dir: Path
    tx_mode: str = "lazy"
    rx_mode: str = "copy"
    domid: int = 7
    rx_stall_timeout: float = 60.0
    no_offer: tuple[str, ...] = ()
    #: queues offered: the vif is a socket pair per queue (``vifs``, ``wires``)
    queues: int = 1
    #: the Netback class to run (a test may subclass InprocNetback to inject a failure)
    netback: type[InprocNetback] = InprocNetback
    nb: Netback = field(init=False)
    wire: socket.socket = field(init=False)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        pairs = [dgram_pair() for _ in range(self.queues)]
        self.vifs, self.wires = [a for a, _ in pairs], [b for _, b in pairs]
        self.vif, self.wire = self.vifs[0], self.wires[0]
        self.nb = self.netback(NetbackConfig(vif="vifT", domid=self.domid,
                                             listen=str(self.ev), ctl=str(self.dir / "b.ctl"),
                                             tx_mode=self.tx_mode, rx_mode=self.rx_mode,
                                             rx_stall_timeout=self.rx_stall_timeout,
                                             no_offer=self.no_offer, queues=self.queues),
                               self.vifs)
        self.thread = threading.Thread(target=self.nb.run, name="netback", daemon=True)
        self.thread.start()
        # the socket's file exists from bind(), before listen(): wait for an answer instead
        wait_answering(self.dir / "b.ctl", 5)

    @property
    def ev(self) -> Path:
        return self.dir / "ev"

    def connected(self, timeout: float = 10.0) -> None:
        """Wait until a frontend's connection has its TX and RX paths (the netfront may reach
        Connected a moment before the backend has built them)."""
        wait_for(lambda: self.nb.tx is not None and self.nb.rx is not None, timeout,
                 "netback Connected")

    def idle(self, timeout: float = 5.0) -> None:
        """Wait until no frontend is connected (its connection fully released)."""
        wait_for(lambda: self.nb.tx is None and self.nb.state != XenbusState.Connected,
                 timeout, "the backend to release its frontend")

    def wire_frames(self) -> list[bytes]:
        return drain(self.wire)

    def stop(self) -> None:
        stop_end(self.nb, self.thread, (*self.vifs, *self.wires))


@dataclass
class FrontendThread:
    """A Netfront connecting to ``ev`` on a thread; ``guest`` is the guest stack's side."""

    ev: Path
    ctl: Path
    domid: int = 7
    region_size: int = 2 << 20
    persistent: bool = False
    grants: str = ""
    header_slots: bool = True
    poll_us: int = 0
    #: queues wanted: the TAP is a socket pair per queue (``taps``, ``guests``)
    queues: int = 1
    #: the Netfront class to run (a test may subclass InprocNetfront to inject a failure)
    netfront: type[InprocNetfront] = InprocNetfront
    nf: Netfront = field(init=False)
    guest: socket.socket = field(init=False)
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        pairs = [dgram_pair() for _ in range(self.queues)]
        self.taps, self.guests = [a for a, _ in pairs], [b for _, b in pairs]
        self.tap, self.guest = self.taps[0], self.guests[0]
        self.nf = self.netfront(NetfrontConfig(name="fT", domid=self.domid,
                                               connect=str(self.ev), ctl=str(self.ctl),
                                               region_size=self.region_size,
                                               persistent=self.persistent,
                                               grants=self.grants,
                                               header_slots=self.header_slots,
                                               poll_us=self.poll_us, queues=self.queues),
                                self.taps)
        self.thread = threading.Thread(target=self.nf.run, name="netfront", daemon=True)
        self.thread.start()

    def connected(self, timeout: float = 10.0) -> None:
        wait_for(lambda: self.nf.state == XenbusState.Connected, timeout, "netfront Connected")

    def guest_frames(self) -> list[bytes]:
        return drain(self.guest)

    def stop(self) -> None:
        stop_end(self.nf, self.thread, (*self.taps, *self.guests))


def drain(sock: socket.socket) -> list[bytes]:
    """The frames waiting on a stand-in device's far side, without their virtio_net_hdr."""
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(1 << 17)[VNET_HDR.size:])
        except BlockingIOError:
            return out


def stop_end(end: Netback | Netfront, thread: threading.Thread,
             socks: tuple[socket.socket, ...]) -> None:
    end.stop()
    thread.join(10)
    for s in socks:
        s.close()
    assert not thread.is_alive(), f"{thread.name} thread did not stop"
