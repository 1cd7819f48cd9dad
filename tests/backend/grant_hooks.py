"""Test-only: act (revoke a grant) just before the backend accesses a grant, at each access
point. ``install`` wraps one ``GntMap``'s methods on the instance, so the production modules
carry no hook and their fast paths stay as they are."""

from __future__ import annotations

from collections.abc import Callable

from backend.grants.gntmap import GntMap

#: the access points: TX hold (GTF_reading set), map, header pull, vif write; RX write
HOOK_POINTS = ("tx_hold", "tx_map", "tx_pull", "tx_submit", "rx_write")
Hook = Callable[[str, int], None]


def install(gntmap: GntMap, hook: Hook, rx=None) -> None:
    """From now on ``hook(point, gref)`` runs just before ``gntmap`` accesses ``gref``;
    ``rx``: the RX grant copy mechanism of the same ring (``RxPath.mech``), if RX."""
    tx = gntmap.tx
    hold, map_, pull, iovecs = tx.hold, gntmap.map, gntmap.pull, gntmap.tx_iovecs

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

    hooks = [(tx, "hold", hooked_hold), (gntmap, "map", hooked_map),
             (gntmap, "pull", hooked_pull), (gntmap, "tx_iovecs", hooked_iovecs)]
    if rx is not None:
        write, write_one, copy_in = rx.write, rx.write_one, rx.copy_in

        def hooked_write(fd, vnet, views, grefs, exps, predicted, layout):
            for p in predicted:  # validated first
                hook("rx_write", grefs[p])
            return write(fd, vnet, views, grefs, exps, predicted, layout)

        def hooked_write_one(fd, vnet, view, g, e):
            hook("rx_write", g)
            return write_one(fd, vnet, view, g, e)

        def hooked_copy_in(positions, views, grefs, exps, nbytes):
            for p in positions:  # the buffers a spill validates
                hook("rx_write", grefs[p])
            return copy_in(positions, views, grefs, exps, nbytes)

        hooks += [(rx, "write", hooked_write), (rx, "write_one", hooked_write_one),
                  (rx, "copy_in", hooked_copy_in)]
    for obj, name, wrapper in hooks:
        setattr(obj, name, wrapper)  # on the instance: its own methods find the wrapper
