"""TX rate limiting as Linux netback's ``rate`` key: a packet beyond the credit waits on the
ring (never dropped, never answered early) until the next window, the credit grows by
credit_bytes a window up to max(128 KiB, credit_bytes), and the loop sleeps meanwhile."""

import pytest

from backend.tx.credit import MIN_BURST, Credit, parse_rate
from tests.conftest import frame, make_pair


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_credit_windows_bursts_and_waits():
    clock = Clock()
    c = Credit(10_000, 15_625, clock=clock)  # 10 kB every 1/64 s (exact in binary)
    assert [c.exceeded(3000) for _ in range(4)] == [False, False, False, True]
    assert c.wait_s() == 1 / 64 and c.stats.tx_credit_waits == 1
    clock.t += 1 / 128
    assert c.exceeded(3000) and c.wait_s() == 1 / 128 and c.stats.tx_credit_waits == 1
    clock.t += 1 / 128
    assert not c.exceeded(3000) and c.remaining == 10_000 + 1000 - 3000
    clock.t += 1.0  # idle for a long time: one window's credit, not one per window missed
    c.exceeded(0)
    assert c.remaining == 8000 + 10_000
    wide = Credit(100_000, 1000, clock=clock)
    clock.t += 1.0
    wide.exceeded(0)
    assert wide.remaining == MIN_BURST  # the burst is capped at max(128 KiB, credit_bytes)
    big = Credit(1000, 1000, clock=clock)  # 1 kB a ms: a 64 KiB packet still goes, in time
    waited = 0
    while big.exceeded(65535):
        clock.t += big.wait_s()
        waited += 1
    assert waited == 65  # 1000 + 65 x 1000 >= 65535: it waits its share, then goes


def test_rate_key_is_parsed_like_linux():
    assert parse_rate("625000,50000") == (625000, 50000)
    for bad in ("625000", "0,50000", "x,y", "5,-1"):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)


def test_packets_beyond_the_credit_wait_on_the_ring_and_are_never_dropped():
    p = make_pair()
    clock = Clock()
    p.btx.credit = Credit(10_000, 15_625, p.bstats[0], clock)
    frames = [frame(bytes([i]) * 2958) for i in range(8)]  # 3000 bytes each
    for f in frames:
        p.send(f)
    p.tx.pump()
    p.tx.ring.push_requests()
    assert p.btx.action() is False  # waiting for credit: no busy loop
    assert p.btx.credit_wait() == 1 / 64
    assert p.wire_frames() == frames[:3]
    assert p.btx.ring.unconsumed_requests() > 0  # the rest wait on the ring, unanswered
    assert p.bstats[0].drops == 0 and p.bstats[0].tx_credit_waits == 1
    got = []
    while len(got) < len(frames[3:]):
        clock.t += p.btx.credit_wait()
        p.btx.action()
        got += p.wire_frames()
    assert got == frames[3:]
    assert p.bstats[0].drops == 0
    for s in (p.guest, p.wire, *p._keep):
        s.close()
