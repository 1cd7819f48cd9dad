"""Doorbells: event-channel kicks over ivshmem-doorbell instead of the virtio-serial stream.

Why: a kick over virtio-serial travels guest -> virtqueue -> QEMU -> unix socket (and back the
same way); a doorbell is one MMIO write in the guest that QEMU turns into an eventfd write on
the host (ioeventfd), and one eventfd write on the host that QEMU turns into an MSI-X
interrupt, which VFIO turns into an eventfd in the guest. A prototype measured a notification
round trip of ~70 us p50 against ~184 us over virtio-serial (see FACTS.md).

Only the kicks move: the handshake's JSON messages keep travelling over the virtio-serial
port, so ``KickChannel`` wraps an ``EventChannel`` (messages) and a doorbell (kicks) behind the
EventChannel API and the data loops and handshakes need no change.

- ``HostDoorbell`` (netback): a client of the lab's ivshmem server (shared/lab/ivshmem_server.py)
  on its backend socket: peer ``BACKEND_PEER``; it waits on its own vector eventfd and kicks
  by writing the guest peer's vector eventfd (QEMU raises the MSI-X vector in the guest).
- ``GuestDoorbell`` (netfront, in the guest): the ivshmem PCI device (1af4:1110) through VFIO:
  BAR0 registers (Doorbell at 12), BAR2 the shared memory = the grant region, MSI-X vector 0
  delivered to an eventfd.

``python -m shared.doorbell lead|follow ...`` measures the notification round trip of either
transport (the lab's full-tier test runs it in a guest against a host process).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from shared.channel import ChannelClosed, EventChannel, Received
from shared.ivshmem import BACKEND_PEER, IvshmemClient, ProtocolError
from shared.transport import TransportError
from shared.vfio import VFIO_PCI_MSIX_IRQ_INDEX, VfioDevice, VfioError, find_pci

IVSHMEM_VENDOR, IVSHMEM_DEVICE = 0x1AF4, 0x1110
BAR_REGS, BAR_SHM = 0, 2
REG_INTR_MASK, REG_INTR_STATUS, REG_IVPOSITION, REG_DOORBELL = 0, 4, 8, 12
U32 = struct.Struct("=I")
STREAM_EVERY = 8  # KickChannel reads the message stream at least every this many kick wake-ups


class DoorbellError(TransportError):
    """A doorbell could not be set up (server, device or VFIO); the message says why.

    A TransportError, so the netfront treats it like any other channel set-up failure: it
    counts it, logs it and tries again."""


class Doorbell(Protocol):
    """What KickChannel needs of a doorbell."""

    def notify(self) -> None: ...

    def fileno(self) -> int: ...

    def drain(self) -> int: ...

    def close(self) -> None: ...


def drain_eventfd(fd: int) -> int:
    """Read and reset an eventfd's counter: the number of kicks since the last drain."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# --- host side -----------------------------------------------------------------------------
class HostDoorbell:
    """The netback's doorbell: a non-QEMU client of the ivshmem server, as the backend peer."""

    def __init__(self, client: IvshmemClient, vector: int = 0) -> None:
        own = client.own_eventfds()
        if len(own) <= vector:
            client.close()
            raise DoorbellError(f"server gave {len(own)} vectors, vector {vector} wanted")
        self.client = client
        self.vector = vector
        self._own = own[vector]
        os.set_blocking(self._own, False)
        self.guest_id: int | None = None
        self._guest_fd: int | None = None
        self.dropped = 0  # kicks with no guest peer to ring (QEMU not connected)
        self._find_guest()

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, vector: int = 0) -> HostDoorbell:
        try:
            return cls(IvshmemClient.connect(path, timeout), vector)
        except ProtocolError as e:
            raise DoorbellError(str(e)) from e

    @property
    def peer_id(self) -> int:
        return self.client.own_id

    def _find_guest(self) -> int | None:
        """Apply the server's news and pick the guest peer (the highest id if ever several:
        the newest, as ids only grow until they wrap).

        The chosen fd stays open until the next call: a peer's fds are closed only while
        news is applied here, so notify never writes to a closed (or reused) fd number. A
        server gone away ends the channel like a peer that closed it."""
        try:
            self.client.pump()
        except (ProtocolError, OSError) as e:
            raise ChannelClosed(f"ivshmem server: {e}") from e
        peers = {p: fds for p, fds in self.client.other_peers().items()
                 if len(fds) > self.vector}
        self.guest_id = max(peers) if peers else None
        self._guest_fd = peers[self.guest_id][self.vector] if peers else None
        return self._guest_fd

    def notify(self) -> None:
        """Ring the guest: QEMU reads its vector eventfd and raises that MSI-X vector."""
        fd = self._guest_fd
        if fd is None:
            fd = self._find_guest()
            if fd is None:
                self.dropped += 1
                return
        os.eventfd_write(fd, 1)

    def fileno(self) -> int:
        return self._own

    def drain(self) -> int:
        return drain_eventfd(self._own)

    def close(self) -> None:
        self.client.close()


# --- guest side ----------------------------------------------------------------------------
class GuestDoorbell:
    """The netfront's doorbell: the ivshmem-doorbell PCI device driven through VFIO.

    A VFIO group can be open once, and the region mapping pins it: use ``guest_doorbell()``,
    the process's one instance, rather than opening a second.
    """

    def __init__(self, dev: VfioDevice, vector: int = 0) -> None:
        self.dev = dev
        self.vector = vector
        self._region: mmap.mmap | None = None
        self._regs: memoryview | None = None
        self._regs_map: mmap.mmap | None = None
        nvec = dev.irq_count(VFIO_PCI_MSIX_IRQ_INDEX)
        if nvec <= vector:
            raise DoorbellError(f"device has {nvec} MSI-X vectors (start QEMU with "
                                f"ivshmem-doorbell,vectors={vector + 1} or more)")
        self._doorbell_off = dev.region(BAR_REGS).offset + REG_DOORBELL
        if dev.region(BAR_REGS).mappable:
            # one 32-bit store per ring (memoryview "I" items are written with one move;
            # the full-tier ping-pong checks that no kick arrives twice); else pwrite
            self._regs_map = dev.map(BAR_REGS, mmap.PAGESIZE)
            self._regs = memoryview(self._regs_map).cast("I")
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            dev.enable_bus_master()  # else QEMU drops the MSI-X writes silently
            dev.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, [-1] * vector + [self._efd])
        except BaseException:
            os.close(self._efd)
            raise

    @classmethod
    def open(cls, sysfs: Path | None = None, vector: int = 0) -> GuestDoorbell:
        try:
            dev = VfioDevice.open(sysfs or find_pci(IVSHMEM_VENDOR, IVSHMEM_DEVICE))
        except (VfioError, OSError) as e:
            raise DoorbellError(str(e)) from e
        try:
            return cls(dev, vector)
        except BaseException:
            dev.close()
            raise

    @property
    def ivposition(self) -> int:
        """This guest's peer id, as the server assigned it."""
        if self._regs is not None:
            return self._regs[REG_IVPOSITION // 4]
        return U32.unpack(self.dev.read(BAR_REGS, REG_IVPOSITION, 4))[0]

    def notify(self, peer_id: int = BACKEND_PEER, vector: int = 0) -> None:
        """Ring ``vector`` of ``peer_id`` (default: the netback): one write to Doorbell."""
        value = (peer_id << 16) | vector
        if self._regs is not None:
            self._regs[REG_DOORBELL // 4] = value
        else:
            os.pwrite(self.dev.fd, U32.pack(value), self._doorbell_off)

    def fileno(self) -> int:
        return self._efd

    def drain(self) -> int:
        return drain_eventfd(self._efd)

    def region(self) -> mmap.mmap:
        """BAR2, the shared memory (the grant region), mapped through VFIO: the device belongs
        to vfio-pci, so sysfs resource2 is no longer the way to it."""
        if self._region is None:
            self._region = self.dev.map(BAR_SHM)
        return self._region

    def close(self) -> None:
        """Release everything; a mapping handed out by ``region()`` must be closed first."""
        try:
            self.dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX)
        except (OSError, VfioError):
            pass
        if self._regs is not None:
            self._regs.release()
            self._regs = None
        for m in (self._regs_map, self._region):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    pass  # someone still uses it; the device stays open until they are done
        os.close(self._efd)
        self.dev.close()


_guest: GuestDoorbell | None = None


def guest_doorbell() -> GuestDoorbell:
    """The process's one GuestDoorbell, opened on first use and kept (see GuestDoorbell)."""
    global _guest
    if _guest is None:
        _guest = GuestDoorbell.open()
    return _guest


# --- the channel the data loops use ----------------------------------------------------------
class KickChannel:
    """An EventChannel for messages plus a doorbell for kicks, behind the EventChannel API.

    ``fileno()`` is an epoll fd that is readable when either is, so a caller's poll() loop
    works unchanged; ``recv()`` drains them (doorbell kicks counted like ``!`` bytes; stream
    kicks from a peer on a plain EventChannel still count).
    ``own_doorbell`` False leaves the doorbell open on close (the netfront keeps its VFIO
    device across reconnections).
    """

    def __init__(self, chan: EventChannel, doorbell: Doorbell, own_doorbell: bool = True
                 ) -> None:
        self.chan = chan
        self.doorbell = doorbell
        self.own_doorbell = own_doorbell
        self._bell_fd = doorbell.fileno()
        self._chan_fd = chan.fileno()
        self._ep = select.epoll(2)
        self._ep.register(self._chan_fd, select.EPOLLIN)
        self._ep.register(self._bell_fd, select.EPOLLIN)
        self.kicks_sent = 0
        self.kicks_received = 0
        self._kick_only = 0  # wake-ups since the message stream was last read

    @classmethod
    def around(cls, chan: EventChannel, open_doorbell: Callable[[], Doorbell],
               own_doorbell: bool = True) -> KickChannel:
        """Wrap ``chan``, opening the doorbell now; if that fails, ``chan`` is closed too
        (the one-line integration point of netback and netfront)."""
        try:
            return cls(chan, open_doorbell(), own_doorbell)
        except BaseException:
            chan.close()
            raise

    @property
    def send_timeout(self) -> float | None:
        """The message stream's (see EventChannel.send)."""
        return getattr(self.chan, "send_timeout", None)

    @send_timeout.setter
    def send_timeout(self, value: float | None) -> None:
        self.chan.send_timeout = value

    def fileno(self) -> int:
        return self._ep.fileno()

    def notify(self) -> None:
        self.doorbell.notify()
        self.kicks_sent += 1

    def send(self, message: dict, fds: tuple[int, ...] = ()) -> None:
        self.chan.send(message, fds)

    def recv(self, keep_fds: bool = True) -> Received:
        """Drain the doorbell, and the message stream unless this wake-up was a kick.

        The kick fast path is one eventfd read: in the guest, under TCG, every further syscall
        costs round-trip time (an epoll_wait(0) per wake-up to ask which fd is ready cost
        ~10 us). A stream left unread stays readable (level-triggered), so the caller's next
        poll returns at once; and it is read on every ``STREAM_EVERY``-th kick wake-up anyway,
        so a steady stream of kicks cannot hold back a "Closing" message or an EOF."""
        kicks = self.doorbell.drain()
        if kicks:
            self.kicks_received += kicks
            if self._kick_only < STREAM_EVERY:
                self._kick_only += 1
                return Received(kicks=kicks)
        self._kick_only = 0
        got = self.chan.recv() if keep_fds else self.chan.recv(keep_fds=False)
        self.kicks_received += got.kicks
        got.kicks += kicks
        return got

    def close(self) -> None:
        self._ep.close()
        self.chan.close()
        if self.own_doorbell:
            self.doorbell.close()


# --- round-trip measurement ----------------------------------------------------------------
@dataclass
class RoundTrips:
    """One ping-pong run, timed by the leader (the host: its clock is the trustworthy one)."""

    transport: str
    rounds: int
    lost: int
    extra_kicks: int
    p50_us: float
    p99_us: float
    mean_us: float
    min_us: float

    @classmethod
    def of(cls, transport: str, samples_ns: list[int], lost: int,
           extra_kicks: int = 0) -> RoundTrips:
        us = sorted(s / 1000 for s in samples_ns) or [float("nan")]
        return cls(transport, len(samples_ns), lost, extra_kicks, round(us[len(us) // 2], 1),
                   round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
                   round(statistics.fmean(us), 1), round(us[0], 1))


class _Waiter:
    """Waits on one channel with a poll object made once (the guest runs this under TCG,
    where every avoidable Python call shows in the round trip)."""

    def __init__(self, chan) -> None:
        self.chan = chan
        self.poller = select.poll()
        self.poller.register(chan.fileno(), select.POLLIN)

    def kick(self, timeout_ms: int) -> int:
        """Kicks of one wake-up that had any (0: timeout); 'done' ends a follower."""
        while True:
            if not self.poller.poll(timeout_ms):
                return 0
            got = self.chan.recv()
            if got.kicks:
                return got.kicks
            if any(m.get("pingpong") == "done" for m in got.messages):
                raise EOFError("leader is done")

    def message(self, key: str, value: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poller.poll(200) and any(m.get(key) == value
                                             for m in self.chan.recv().messages):
                return
        raise TimeoutError(f"no {{{key!r}: {value!r}}} message in {timeout:g} s")

    def flush(self) -> None:
        """Throw away whatever a previous user left (kicks, messages) before starting."""
        while self.poller.poll(50):
            self.chan.recv()


def lead(chan, rounds: int, warmup: int = 100, timeout: float = 1.0,
         ready_timeout: float = 60.0) -> tuple[list[int], int, int]:
    """Kick, wait for the answering kick, repeat; returns (round trips in ns, lost rounds,
    kicks beyond one per round: a kick delivered twice, e.g. a Doorbell write split in two).

    The follower announces itself with a message once its doorbell is armed (a kick sent
    before that would be dropped by QEMU with MSI-X still disabled)."""
    w = _Waiter(chan)
    w.message("pingpong", "ready", ready_timeout)
    w.flush()
    samples: list[int] = []
    lost = extra = 0
    clock = time.perf_counter_ns
    timeout_ms = int(timeout * 1000)
    for i in range(warmup + rounds):
        t0 = clock()
        chan.notify()
        kicks = w.kick(timeout_ms)
        if not kicks:
            lost += 1
            w.flush()
            continue
        if i >= warmup:
            samples.append(clock() - t0)
            extra += kicks - 1
    chan.send({"pingpong": "done"})
    return samples, lost, extra


def follow(chan, timeout: float = 120.0) -> int:
    """Answer every kick with a kick until the leader says done; returns rounds answered."""
    w = _Waiter(chan)
    w.flush()
    chan.send({"pingpong": "ready"})
    answered = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if w.kick(5000):
                chan.notify()
                answered += 1
    except EOFError:
        pass
    return answered


def _open(args: argparse.Namespace):
    """The channel for one end of a ping-pong: serial (EventChannel) or doorbell (KickChannel)."""
    from shared.transport import connect_unix, open_port

    chan = open_port(args.port) if args.role == "follow" else connect_unix(args.connect, 10.0)
    if args.transport == "serial":
        return chan
    if args.role == "follow":
        return KickChannel(chan, GuestDoorbell.open())
    return KickChannel(chan, HostDoorbell.connect(args.doorbell))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.doorbell",
                                description="notification round trip over either transport")
    p.add_argument("role", choices=("lead", "follow"))
    p.add_argument("--transport", choices=("serial", "doorbell"), required=True)
    p.add_argument("--port", default="/dev/virtio-ports/pvnet-event",
                   help="follow (guest): the virtio-serial event port")
    p.add_argument("--connect", help="lead (host): QEMU's socket for that port")
    p.add_argument("--doorbell", help="lead (host): the ivshmem server's backend socket")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--timeout", type=float, default=120.0, help="follow: give up after")
    a = p.parse_args(argv)
    if a.role == "lead" and (not a.connect or (a.transport == "doorbell" and not a.doorbell)):
        p.error("lead needs --connect (and --doorbell for the doorbell transport)")
    chan = _open(a)
    try:
        if a.role == "follow":
            print(json.dumps({"answered": follow(chan, a.timeout)}), flush=True)
        else:
            samples, lost, extra = lead(chan, a.rounds)
            print(json.dumps(asdict(RoundTrips.of(a.transport, samples, lost, extra))),
                  flush=True)
    finally:
        chan.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
