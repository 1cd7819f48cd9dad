"""``pvnet-netfront`` / ``python -m frontend``: the guest side of one pvnet interface."""

from __future__ import annotations

import argparse
import logging
import sys

from frontend.grants.recycle import DEFAULT_POOL_RINGS
from frontend.netfront import POLL_US, Netfront, NetfrontConfig
from shared.protocol.mechanisms import help_text, names
from shared.protocol.netif import MAX_QUEUES
from shared.protocol.queues import DOORBELL_ONE_QUEUE, queue_count


def size(text: str) -> int:
    """'8M', '16m', '4096' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def parse_args(argv: list[str] | None = None) -> NetfrontConfig:
    p = argparse.ArgumentParser(
        prog="pvnet-netfront",
        description="The guest side of a pvnet interface: a TAP whose frames travel through "
                    "a shared grant region to a netback.")
    p.add_argument("--name", required=True, help="this guest's name (shown in stats)")
    p.add_argument("--domid", type=int, default=1, help="this guest's domain id (default 1)")
    p.add_argument("--tap", default="eth0", help="TAP to create for the guest (default eth0)")
    p.add_argument("--mac", help="MAC address of the TAP")
    p.add_argument("--ip", help="address/prefix for the TAP, e.g. 10.77.0.11/24")
    p.add_argument("--mtu", type=int)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", metavar="PATH",
                       help="namespace placement: the netback's event socket")
    where.add_argument("--channel", metavar="DEV",
                       help="QEMU placement: the virtio-serial port, e.g. "
                            "/dev/virtio-ports/pvnet-event")
    p.add_argument("--region", default=None,
                   help="memfd (namespace placement, default) or pci[:SYSFS-DIR] (QEMU)")
    p.add_argument("--doorbell", action="store_true",
                   help="QEMU placement: kicks over the ivshmem-doorbell device through VFIO, "
                        "whose BAR2 is then the region (messages stay on --channel)")
    p.add_argument("--region-size", type=size, default=8 << 20,
                   help="grant region size for a memfd region (default 8M)")
    p.add_argument("--ctl", metavar="PATH", help="control socket for stats")
    p.add_argument("--ctl-port", metavar="DEV",
                   help="QEMU placement: also serve stats on this virtio-serial port")
    p.add_argument("--no-header-slots", action="store_true",
                   help="do not ask for feature-header-slots (headers ride in payload grants)")
    p.add_argument("--persistent", action="store_true", help="ask for feature-persistent")
    p.add_argument("--grants", choices=names("grants"), default="",
                   help="grant policy (" + help_text("grants") + "); persistent and staging "
                        "ask for their extension, recycle needs none")
    p.add_argument("--recycle-pool", type=int, default=DEFAULT_POOL_RINGS, metavar="RINGS",
                   help="recycle: the pool's size in rings' worth of pages (256 each; "
                        f"default {DEFAULT_POOL_RINGS})")
    p.add_argument("--rx-by-id", action="store_true",
                   help="ask for feature-rx-by-id (RX buffers completed in any order)")
    p.add_argument("--no-gso", action="store_true",
                   help="no GSO either way: withdraw the RX GSO keys and offer the guest "
                        "stack no TSO on the TAP (MTU-sized frames in both directions)")
    p.add_argument("--no-ipv6-csum-offload", action="store_true",
                   help="do not write feature-ipv6-csum-offload: the backend then completes "
                        "the checksums of IPv6 frames before they reach us")
    p.add_argument("--budget", type=int, default=64, help="frames per ring per wake-up")
    p.add_argument("--poll-us", type=int, default=None,
                   help="after work, keep polling ring and TAP this many µs before arming "
                        "events and sleeping (default 0: in a 1-vCPU TCG guest polling took "
                        f"the sender's CPU; the bench's lazy-poll mode uses {POLL_US})")
    p.add_argument("--queues", type=queue_count, default=1, metavar="N",
                   help=f"queues to use, at most what the backend offers (1..{MAX_QUEUES}; "
                        "default 1): the TAP gets a queue each, a connection with several "
                        "gets a worker process per queue")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.doorbell and a.queues > 1:
        p.error(DOORBELL_ONE_QUEUE)
    if a.grants == "staging" and a.queues > 1:
        p.error("--grants staging serves one queue (its pools name one queue's pages)")
    region = a.region or ("memfd" if a.connect else "pci")
    if a.connect and region != "memfd":
        p.error("--connect (namespace placement) needs a memfd region")
    if a.recycle_pool < 1:
        p.error("--recycle-pool: at least 1 ring")
    if a.doorbell and not a.channel:
        p.error("--doorbell needs --channel (the QEMU placement)")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s netfront %(levelname)s %(message)s",
                        stream=sys.stderr)
    return NetfrontConfig(name=a.name, domid=a.domid, tap=a.tap, mac=a.mac, ip=a.ip, mtu=a.mtu,
                          ctl=a.ctl, ctl_port=a.ctl_port, connect=a.connect,
                          channel=a.channel, region=region, doorbell=a.doorbell,
                          region_size=a.region_size, header_slots=not a.no_header_slots,
                          persistent=a.persistent, grants=a.grants,
                          recycle_pool=a.recycle_pool, gso=not a.no_gso, rx_by_id=a.rx_by_id,
                          ipv6_csum_offload=not a.no_ipv6_csum_offload,
                          budget=a.budget,
                          poll_us=a.poll_us or 0, queues=a.queues)


def main(argv: list[str] | None = None) -> int:
    Netfront(parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
