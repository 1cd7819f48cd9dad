"""The grant in-use protocol at every TX access point, with a revoke placed deterministically just
before each access (``tests/backend/grant_hooks.py``): TX grants stay GTF_reading until the skb
is freed (the vif write included, lazy mode included), in every mechanism that holds them. RX:
``tests/backend/test_rx.py`` (every mechanism) and ``tests/backend/rx/modes/test_copy.py`` (the
grant copy's own access points)."""

import pytest

from shared.protocol.grant import GrantError, GTF_reading, GTF_writing
from shared.protocol.mechanisms import names
from tests.backend import grant_hooks
from tests.conftest import frame, make_pair


def close(p):
    for s in (p.guest, p.wire, *p._keep):
        s.close()


@pytest.mark.parametrize("mode", names("tx"))
def test_tx_grant_cannot_be_revoked_while_anything_may_read_it(mode):
    p = make_pair(mode)
    grants = p.front_region.grants
    seen = []

    def hook(point, gref):
        if point == "tx_submit":  # just before the vif write reads the pages
            seen.append((grants.in_use(gref), grants.end_access(gref)))

    grant_hooks.install(p.btx.gntmap, hook)
    sent = frame(b"q" * 20000)
    p.send(sent)
    p.run_tx()
    assert p.wire_frames() == [sent]
    assert all(used and not revoked for used, revoked in seen)
    # the vif write read the frontend's pages exactly when payload was left there (every
    # mechanism but one that copied it out first)
    assert bool(seen) == bool(p.bstats[0].tx_zerocopy_sent)
    assert p.bstats[0].grants_in_use == 0
    assert not any(grants.flags[4 * g] & (GTF_reading | GTF_writing) for g in range(grants.count))
    close(p)


def test_tx_grant_revoked_before_the_backend_holds_it_is_refused():
    p = make_pair("lazy")
    grants = p.front_region.grants
    revoked = []

    def hook(point, gref):
        if point == "tx_hold" and not revoked:
            revoked.append(grants.end_access(gref))

    grant_hooks.install(p.btx.gntmap, hook)
    p.send(frame(b"r" * 20000))
    with pytest.raises(GrantError, match="revoked or changed while the backend took it"):
        p.run_tx()
    assert revoked == [True]
    assert p.wire_frames() == []  # nothing read from the revoked page went out
    assert p.bstats[0].grants_in_use == 0
    close(p)
