"""Per-operation microbenchmarks through netback's own code: the cost model's inputs.

``invoke paper`` predicts each row's ratio before the row is measured, from what one grant
operation costs *here* times how many of them a packet does (counted by the bench). This
measures the operations on a real grant region (a memfd laid out as netfront lays it out),
through the very calls the data path makes, each many times, and prints mean µs:

- ``map`` / ``unmap``: ``GntMap.map``/``unmap`` of a transient grant (a real ``mmap`` into the
  CPU view and its ``munmap``, with netback's bookkeeping).
- ``first_touch``: the first read of a freshly mapped page (the page fault that fills the PTE).
- ``grant_copy``: ``GntMap.copy_from`` of 64 bytes (check the grant, mark it, copy through the
  DMA view, unmark: what a header copy without header slots costs), and ``grant_copy_kb`` the
  extra cost per KiB (from 64-byte and 4096-byte copies).
- ``cpu_copy_kb``: a CPU copy out of a mapped page, per KiB (what copy mode's TX copy and the
  mapping receiver's RX copy pay beyond their maps; the page kept mapped while timed).
- ``pull``: ``GntMap.pull`` of 64 bytes out of a fragment grant already held: the header pull
  without header slots, a grant copy whose check and mark are the hold's (until 2026-12-07
  the model charged a pull a whole ``grant_copy`` on top of the hold: the check twice).
- ``staged_pull``: the same pull out of a persistent grant kept mapped (persistent and
  staging grants): a lookup and a CPU copy (``staged_pulls``).
- ``hold``: ``TxGrants.hold`` + ``release`` of one transient fragment grant (GTF_reading set
  and cleared, the entry re-read).
- ``notify``: one event-channel kick (a byte ``send`` on a unix socket pair, drained).

Nothing here sleeps or spins: every figure is the real work, timed with ``perf_counter_ns``.
``python -m backend.opbench [--json] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from backend.grants.gntmap import GntMap, Views
from backend.handshake import attach_region
from shared.plumbing.transport import create_memfd
from shared.protocol.netif import GREF_PERSISTENT, PAGE_SIZE
from shared.protocol.region import Region
from shared.protocol.stats import RingStats

_now = time.perf_counter_ns
#: grant references the benchmark grants (clear of the reserved ones)
REF0 = 16
PAGES = 64


def measure(rounds: int = 5000) -> dict[str, float]:
    """Mean µs of each operation over ``rounds`` (several thousand: the figures are a few
    µs each, and the machine is shared)."""
    fd, mem = create_memfd(4 << 20)
    front = Region.create(mem)
    region, own_fd = attach_region(fd, mem)
    os.close(fd)
    st = RingStats()
    views = Views(own_fd, mem, region, st, shared=True)
    gm = GntMap(region, views, 0, st, persistent=False)
    frames = [region.layout.payload_page + i for i in range(PAGES)]
    for i, f in enumerate(frames):
        front.grants.grant(REF0 + i, 0, f, readonly=True)
    out: dict[str, float] = {}
    try:
        t_map = t_unmap = t_touch = 0
        for n in range(rounds):
            i = n % PAGES
            ref, f = REF0 + i, frames[i]
            t = _now()
            gm.map(ref, f)
            t_map += _now() - t
            t = _now()
            gm.page(f)[0]
            t_touch += _now() - t
            t = _now()
            gm.unmap(ref, f)
            t_unmap += _now() - t
        out.update(map=t_map / rounds / 1e3, unmap=t_unmap / rounds / 1e3,
                   first_touch=t_touch / rounds / 1e3)
        small = _timed(lambda i: gm.copy_from(REF0 + i % PAGES, 0, 64), rounds)
        page = _timed(lambda i: gm.copy_from(REF0 + i % PAGES, 0, 4096), rounds)
        out["grant_copy"] = small
        out["grant_copy_kb"] = max(0.0, (page - small) / ((4096 - 64) / 1024))
        hold, release = gm.tx.hold, gm.tx.release

        def held(i: int) -> None:
            g = [REF0 + i % PAGES]
            release(g, hold(g, [frames[i % PAGES]]))
        out["hold"] = _timed(held, rounds)
        out["cpu_copy_kb"] = _cpu_copy_kb(gm, frames, rounds)
        # the pulls last: timed before it, they made the CPU copy above read 10x dearer
        out["pull"] = _pull(gm, frames, rounds)
        out["staged_pull"] = _staged_pull(region, views, frames, rounds)
        out["notify"] = _notify(rounds)
    finally:
        gm.unmap_all()
        views.close()
    return {k: round(v, 3) for k, v in out.items()}


def _cpu_copy_kb(gm: GntMap, frames: list[int], rounds: int) -> float:
    """µs per KiB of a CPU copy out of a mapped page (copy mode's TX copy, the mapping
    receiver's RX copy): 4096-byte against 64-byte copies of pages kept mapped meanwhile,
    so neither the maps nor the first touches are in it."""
    for i, f in enumerate(frames):
        gm.map(REF0 + i, f)
        gm.page(f)[0]
    dst = bytearray(PAGE_SIZE)
    page = gm.page
    try:
        small = _timed(lambda i: dst.__setitem__(slice(0, 64), page(frames[i % PAGES])[:64]),
                       rounds)
        whole = _timed(lambda i: dst.__setitem__(slice(None), page(frames[i % PAGES])), rounds)
    finally:
        for i, f in enumerate(frames):
            gm.unmap(REF0 + i, f)
    return max(0.0, (whole - small) / ((PAGE_SIZE - 64) / 1024))


def _pull(gm: GntMap, frames: list[int], rounds: int) -> float:
    """Mean µs of a 64-byte header pull from held fragment grants (held once, outside the
    timing, as a packet holds its fragments before the pull)."""
    refs = [REF0 + i for i in range(PAGES)]
    held = gm.tx.hold(refs, frames)
    try:
        return _timed(lambda i: gm.pull(REF0 + i % PAGES, frames[i % PAGES], 0, 64), rounds)
    finally:
        gm.tx.release(refs, held)


def _staged_pull(region: Region, views: Views, frames: list[int], rounds: int) -> float:
    """Mean µs of a 64-byte header pull out of a persistent grant the backend keeps mapped
    (persistent and staging grants: a lookup and a CPU copy, no grant operation)."""
    gp = GntMap(region, views, 0, RingStats(), persistent=True)
    refs = [(REF0 + i) | GREF_PERSISTENT for i in range(PAGES)]
    try:
        for ref, f in zip(refs, frames, strict=True):
            gp.check(ref)
            gp.map(ref, f)
        return _timed(lambda i: gp.pull(refs[i % PAGES], frames[i % PAGES], 0, 64), rounds)
    finally:
        gp.unmap_all()


def _timed(op, rounds: int) -> float:
    t = _now()
    for i in range(rounds):
        op(i)
    return (_now() - t) / rounds / 1e3


def _notify(rounds: int) -> float:
    """A kick: one byte sent on a unix stream socket (as the event channel does), drained
    every 64 so the buffer never fills; only the sends are timed."""
    a, b = socket.socketpair()
    b.setblocking(False)
    total = 0
    try:
        for n in range(rounds):
            t = _now()
            a.send(b"k")
            total += _now() - t
            if n % 64 == 63:
                b.recv(4096)
    finally:
        a.close()
        b.close()
    return total / rounds / 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backend.opbench",
                                description="Mean µs of each grant operation through netback's "
                                            "own code (the paper table's cost model inputs).")
    p.add_argument("--rounds", type=int, default=5000, help="operations timed per kind")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = p.parse_args(argv)
    res = measure(a.rounds)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:14s} {v:8.3f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
