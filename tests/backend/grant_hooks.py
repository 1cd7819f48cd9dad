"""Test-only: act (revoke a grant) just before the backend accesses a grant, at each access
point. ``install`` wraps one ``GntMap``'s methods on the instance, so the production modules
carry no hook and their fast paths stay as they are."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

from backend.gntmap import GntMap

#: the access points: TX hold (GTF_reading set), map, header pull, vif write; RX write
HOOK_POINTS = ("tx_hold", "tx_map", "tx_pull", "tx_submit", "rx_write")
Hook = Callable[[str, int], None]


def install(gntmap: GntMap, hook: Hook) -> None:
    """From now on ``hook(point, gref)`` runs just before ``gntmap`` accesses ``gref``."""
    tx, rx = gntmap.tx, gntmap.rx
    hold, map_, pull, iovecs = tx.hold, gntmap.map, gntmap.pull, gntmap.tx_iovecs
    write, spill = rx.write, rx._rx_spill

    def hooked_hold(grefs, *a, **kw):
        for g in grefs:
            hook("tx_hold", g)
        return hold(grefs, *a, **kw)

    def hooked_map(gref, *a, **kw):
        hook("tx_map", gref)
        return map_(gref, *a, **kw)

    def hooked_pull(gref, *a, **kw):
        hook("tx_pull", gref)
        return pull(gref, *a, **kw)

    def hooked_iovecs(grefs, *a, **kw):
        for g in grefs:
            hook("tx_submit", g)
        return iovecs(grefs, *a, **kw)

    def hooked_write(fd, vnet, views, grefs, exps, maxbufs):
        for g in islice(grefs, min(rx.window, maxbufs)):  # the buffers it validates first
            hook("rx_write", g)
        return write(fd, vnet, views, grefs, exps, maxbufs)

    def hooked_spill(n, k, nbufs, views, grefs, exps, *a, **kw):
        for g in islice(grefs, k, nbufs):  # the buffers a spill validates
            hook("rx_write", g)
        return spill(n, k, nbufs, views, grefs, exps, *a, **kw)

    for obj, name, wrapper in ((tx, "hold", hooked_hold), (gntmap, "map", hooked_map),
                               (gntmap, "pull", hooked_pull), (gntmap, "tx_iovecs", hooked_iovecs),
                               (rx, "write", hooked_write), (rx, "_rx_spill", hooked_spill)):
        setattr(obj, name, wrapper)  # on the instance: its own methods find the wrapper
