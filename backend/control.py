"""The netback's control socket: its pacing (the control thread shares the GIL with the data
path) and the ``stats`` answer it gives ``pvnet stats``, the lab and the tests."""

from __future__ import annotations

import time
from dataclasses import fields
from typing import TYPE_CHECKING

from shared.plumbing.control.protocol import Handoff
from shared.plumbing.control.server import ControlServer
from shared.protocol.stats import RingStats

if TYPE_CHECKING:
    from backend.interface import Netback
    from backend.rx.path import RxPath
    from backend.tx.path import TxPath

#: control requests per second (and burst) the control socket serves, whoever asks
CTL_RATE = 1000.0
CTL_BURST = 100
#: requests answered from one read of one client; the rest of a pipelined flood is refused
CTL_PIPELINE = 16
_CTL_TOO_MANY = b'{"ok":false,"error":"too many requests at once on one connection"}\n'
_STATS_FIELDS = tuple(f.name for f in fields(RingStats))


class PacedControlServer(ControlServer):
    """The control socket with a token bucket on requests. Its thread shares the GIL with
    the data path, so however many clients ask, it answers at most CTL_RATE requests a
    second; the wait is a sleep, which hands the GIL to the data path. One client cannot
    hold the others up by pipelining: beyond CTL_PIPELINE requests from one read, it gets a
    cheap error reply per request instead of an answer."""

    def __init__(self, path: str, handler) -> None:
        super().__init__(path, handler)
        self.tokens, self.t = float(CTL_BURST), time.monotonic()
        self.paced = self.refused = self._in_read = 0

    def _read(self, conn) -> None:
        self._in_read = 0
        super()._read(conn)

    def _dispatch(self, line: bytes) -> bytes:
        self._in_read += 1
        if self._in_read > CTL_PIPELINE:
            self.refused += 1
            return _CTL_TOO_MANY
        now = time.monotonic()
        tokens = min(CTL_BURST, self.tokens + (now - self.t) * CTL_RATE)
        if tokens < 1:
            time.sleep((1 - tokens) / CTL_RATE)
            self.paced += 1
            tokens, now = 1.0, time.monotonic()
        self.tokens, self.t = tokens - 1, now
        return super()._dispatch(line)


def control(nb: Netback, request: dict) -> dict | Handoff:
    """Answer one control request (runs in the control thread: reads, never writes, the
    data path's state)."""
    if request.get("cmd") == "capture":
        if nb.cfg.queues > 1:  # the capture buffer is one process's (its lock, its rotation)
            raise ValueError(f"{nb.name}: capture serves single-queue vifs (this one offers "
                             f"{nb.cfg.queues} queues)")
        return nb.capture.attach(request)
    if request.get("cmd") != "stats":
        raise KeyError(request.get("cmd"))
    rings = rings_of((nb.tx_stats, nb.rx_stats), (nb.tx_own, nb.rx_own), (nb.tx, nb.rx))
    counters = dict(nb.counters)
    out = {}
    if nb.queues is not None:  # several queues: the vif's is the sum (shared/protocol/stats.py)
        out = nb.queues.stats(rings, counters)
    ctl, cfg = nb.ctl, nb.cfg
    out.update(nb.stats("netback", cfg.domid), tx_mode=cfg.tx_mode, rx_mode=cfg.rx_mode,
               offered=nb.offered,
               rings=rings, carrier=nb.carrier, rx_stall_timeout=cfg.rx_stall_timeout,
               regions_mapped=nb.regions_mapped(),
               counters=dict(counters, last_error=nb.last_error,
                             ctl_paced=ctl.paced if ctl else 0,
                             ctl_refused=ctl.refused if ctl else 0,
                             ctl_accept_errors=ctl.accept_errors if ctl else 0,
                             ctl_clients_capped=ctl.clients_capped if ctl else 0,
                             **nb.capture.counters()))
    if nb.filter is not None:
        hits = out.pop("filter_hits", None) or nb.filter.hits
        out["filter"] = [{"rule": f"{r.action} {r.field}", "hits": h}
                         for r, h in zip(nb.filter.rules, hits, strict=True)]
    return out


def rings_of(stats: tuple[RingStats, RingStats], own: tuple[object, object],
             paths: tuple[TxPath | None, RxPath | None]) -> dict[str, dict]:
    """One queue's ``rings`` answer (the whole vif's with one queue): each ring's counters,
    its mechanism's own, and - while connected - its indices."""
    rings = {}
    for name, st, mine, path in zip(("tx", "rx"), stats, own, paths, strict=True):
        d = {k: getattr(st, k) for k in _STATS_FIELDS}
        d.update(mine.as_dict())  # the mechanism's own counters, named by it
        if path is not None:
            r = path.ring
            d.update(r.indices())
            d["req_cons"] = r.req_cons
            d["rsp_prod_pvt"] = r.rsp_prod_pvt
        if name == "tx":
            d["slots_in_flight"] = st.slots_consumed - st.slots_released
        else:
            d["slots_in_flight"] = (path.ring.pending() - len(path.posted)) if path else 0
        rings[name] = d
    return rings
