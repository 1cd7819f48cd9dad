"""Notification round trips: ``python -m shared.plumbing.doorbell.roundtrip lead|follow ...``.

Kick, wait for the answering kick, repeat: measures the round trip of either transport, the
virtio-serial stream (an EventChannel) or the doorbell (a KickChannel). The lab's full-tier
test runs the follower in a guest against a leader on the host.
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from shared.plumbing.doorbell.guest import GuestDoorbell
from shared.plumbing.doorbell.host import HostDoorbell
from shared.plumbing.doorbell.kickchannel import KickChannel


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
    from shared.plumbing.transport import connect_unix, open_port

    chan = open_port(args.port) if args.role == "follow" else connect_unix(args.connect, 10.0)
    if args.transport == "serial":
        return chan
    if args.role == "follow":
        return KickChannel(chan, GuestDoorbell.open())
    return KickChannel(chan, HostDoorbell.connect(args.doorbell))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.plumbing.doorbell.roundtrip",
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
