"""TX rate limiting as Linux netback does it: ``credit_bytes`` every ``credit_usec``.

Linux reads the vif's ``rate`` key (``"<bytes>,<usec>"``, written by the toolstack from a
``rate=10Mb/s@50ms`` vif setting) and, before building each TX packet, checks
``tx_credit_exceeded``: a packet bigger than the credit left waits - its requests stay on the
ring, so a full ring stops the frontend's queue - until the next window replenishes it
(``tx_add_credit``: the credit grows by ``credit_bytes``, to at most
max(128 KiB, ``credit_bytes``), so a 64 KiB GSO packet can always go). Nothing is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.protocol.stats import RingStats

#: tx_add_credit's smallest burst: a 128 KiB jumbo packet must always fit
MIN_BURST = 131072


def parse_rate(text: str) -> tuple[int, int]:
    """The ``rate`` key's value, ``"<bytes>,<usec>"`` -> (bytes, usec); ValueError if not."""
    try:
        nbytes, usec = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"rate {text!r}: expected <bytes>,<usec> (e.g. 625000,50000)") from None
    if nbytes <= 0 or usec <= 0:
        raise ValueError(f"rate {text!r}: bytes and usec must be positive")
    return nbytes, usec


class Credit:
    """One TX ring's credit (Linux: ``remaining_credit``, ``credit_window_start``)."""

    def __init__(self, credit_bytes: int, credit_usec: int, stats: RingStats | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.credit_bytes, self.window = credit_bytes, credit_usec / 1e6
        self.stats = stats if stats is not None else RingStats()
        self.clock = clock
        self.remaining = credit_bytes
        self.window_start = clock()
        #: when a packet waits for credit: the time the next window opens (0: not waiting)
        self.wait_until = 0.0

    def exceeded(self, size: int) -> bool:
        """tx_credit_exceeded: True (and ``wait_until`` set) if a packet of ``size`` bytes
        must wait for the next window; else its bytes are taken from the credit."""
        now = self.clock()
        if self.wait_until and now < self.wait_until:
            return True
        if now >= self.window_start + self.window:  # a window has passed: tx_add_credit
            # the windows keep their phase: a late wake-up (the loop sleeps in whole ms)
            # must not stretch every window, or the rate would fall short by the lateness
            self.window_start += (now - self.window_start) // self.window * self.window
            self.remaining = min(self.remaining + self.credit_bytes,
                                 max(MIN_BURST, self.credit_bytes))
            self.wait_until = 0.0
        if size > self.remaining:  # wait for the next window (Linux: the credit timer)
            self.wait_until = self.window_start + self.window
            self.stats.tx_credit_waits += 1  # Linux: rate_limited
            return True
        self.remaining -= size
        return False

    def wait_s(self) -> float:
        """Seconds until a waiting packet may be tried again (0: none waits)."""
        return max(0.0, self.wait_until - self.clock()) if self.wait_until else 0.0
