"""``pvnet-netback`` / ``python -m backend``: one netback for one guest interface."""

from __future__ import annotations

import argparse
import logging
import sys

from backend.handshake import offered_features
from backend.interface import RX_STALL_TIMEOUT, Netback, NetbackConfig
from backend.tx.credit import parse_rate
from backend.tx.filter import Filter
from shared.protocol.filter_rules import FilterError
from shared.protocol.mechanisms import default, help_text, names
from shared.protocol.netif import MAX_QUEUES
from shared.protocol.queues import DOORBELL_ONE_QUEUE, queue_count


def parse_args(argv: list[str] | None = None) -> NetbackConfig:
    p = argparse.ArgumentParser(
        prog="pvnet-netback",
        description="Serve one pvnet frontend: its TX/RX rings, grant region and vif TAP.")
    p.add_argument("--vif", required=True, help="TAP to create, e.g. vif1.0")
    p.add_argument("--domid", type=int, required=True, help="the frontend's domain id")
    p.add_argument("--bridge", help="bridge to attach the vif to")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="PATH",
                       help="namespace placement: event socket frontends connect to")
    where.add_argument("--connect", metavar="PATH",
                       help="QEMU placement: the guest's virtio-serial port socket")
    p.add_argument("--region-fd", type=int, metavar="N",
                   help="QEMU placement: inherited memfd of the guest's grant region")
    p.add_argument("--doorbell", metavar="SOCKET",
                   help="QEMU placement: kicks over ivshmem-doorbell; the lab's ivshmem server "
                        "backend socket (messages stay on --connect)")
    p.add_argument("--ctl", metavar="PATH", help="control socket for stats")
    p.add_argument("--tx-mode", choices=names("tx"), default=default("tx"),
                   help=f"the TX mechanism ({help_text('tx')}; default: {default('tx')})")
    p.add_argument("--rx-mode", choices=names("rx"), default=default("rx"),
                   help=f"the RX mechanism ({help_text('rx')}; default: {default('rx')})")
    p.add_argument("--filter", action="append", default=[], metavar="RULE",
                   help="e.g. 'drop ip_proto=17', 'drop payload=hex:deadbeef' (repeatable)")
    p.add_argument("--no-offer", action="append", default=[], metavar="KEY",
                   help="do not offer this implemented feature (e.g. feature-gso-tcpv6; "
                        "repeatable)")
    p.add_argument("--budget", type=int, default=64, help="packets per ring per wake-up")
    p.add_argument("--poll-us", type=int, default=0, metavar="US",
                   help="after work, keep polling rings and vif (events unarmed) this many "
                        "microseconds before sleeping (NAPI-like; default 0: sleep at once)")
    p.add_argument("--rate", metavar="BYTES,USEC",
                   help="limit TX from the frontend to BYTES every USEC microseconds, as "
                        "Linux netback's 'rate' key (e.g. 625000,50000: 100 Mbit/s)")
    p.add_argument("--rx-stall-timeout", type=float, default=RX_STALL_TIMEOUT, metavar="S",
                   help="seconds without posted RX buffers before the vif's carrier goes off "
                        f"(Linux rx_stall_timeout; 0: never; default {RX_STALL_TIMEOUT:g})")
    p.add_argument("--queues", type=queue_count, default=1, metavar="N",
                   help=f"queues to offer (multi-queue-max-queues, 1..{MAX_QUEUES}; default 1): "
                        "the vif gets a TAP queue each, a frontend that takes several gets a "
                        "worker process per queue")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.doorbell and a.queues > 1:
        p.error(DOORBELL_ONE_QUEUE)
    if a.connect and a.region_fd is None:
        p.error("--connect needs --region-fd (the region is shared through QEMU)")
    if a.doorbell and not a.connect:
        p.error("--doorbell needs --connect (the QEMU placement)")
    try:
        rate = parse_rate(a.rate) if a.rate else None
        Filter.parse(a.filter)
        offered_features(tuple(a.no_offer))
    except (FilterError, ValueError) as e:
        p.error(str(e))
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s netback %(levelname)s %(message)s", stream=sys.stderr)
    return NetbackConfig(vif=a.vif, domid=a.domid, bridge=a.bridge, listen=a.listen,
                         connect=a.connect, region_fd=a.region_fd, ctl=a.ctl,
                         doorbell=a.doorbell,
                         tx_mode=a.tx_mode, rx_mode=a.rx_mode, filters=a.filter,
                         budget=a.budget, rate=rate, poll_us=a.poll_us,
                         rx_stall_timeout=a.rx_stall_timeout, no_offer=tuple(a.no_offer),
                         queues=a.queues)


def main(argv: list[str] | None = None) -> int:
    Netback(parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
