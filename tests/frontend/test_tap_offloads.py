"""What the netfront's TAP offers the guest stack (TUNSETOFFLOAD): TSO follows the backend's
feature-gso-* keys, and ``--no-gso`` withholds it whatever the backend offers, so the guest
stack segments before the TAP and the bench's tcp-nogso TX frames are MTU-sized."""

from __future__ import annotations

import pytest

from frontend.netfront import tap_offloads
from shared.plumbing.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN
from shared.protocol.xenbus import Agreement

TSO = TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN


def agreement(v4: bool, v6: bool) -> Agreement:
    offered = {"feature-sg": True, "feature-gso-tcpv4": v4, "feature-gso-tcpv6": v6,
               "feature-ipv6-csum-offload": True}
    return Agreement.of(offered, {"feature-sg": True})


@pytest.mark.parametrize("v4,v6", [(True, True), (True, False), (False, True)])
def test_no_gso_offers_checksum_offload_and_no_tso_whatever_the_backend_offers(v4, v6):
    assert tap_offloads(agreement(v4, v6), gso=False) == TUN_F_CSUM


def test_with_gso_the_tap_offers_exactly_the_tso_kinds_the_backend_accepts():
    assert tap_offloads(agreement(True, True)) == TUN_F_CSUM | TSO
    assert tap_offloads(agreement(True, False)) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
    assert tap_offloads(agreement(False, False)) == TUN_F_CSUM


def test_no_gso_keeps_the_checksum_rule_a_tap_without_ipv6_csum_offers_nothing():
    offered = {"feature-sg": True, "feature-gso-tcpv4": True, "feature-gso-tcpv6": True}
    ag = Agreement.of(offered, {"feature-sg": True})
    assert tap_offloads(ag, gso=False) == tap_offloads(ag) == 0
