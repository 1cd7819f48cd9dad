"""TAP devices with virtio-net headers: the frontend's guest NIC and the backend's vif.

With ``IFF_VNET_HDR`` every frame read or written starts with a 12-byte virtio_net_hdr that
carries checksum-offload and GSO metadata, and ``TUNSETOFFLOAD`` lets the kernel hand over
64 KiB TCP segments unsegmented: the one lever that makes a Python data path fast
(docs/performance.md has the figures). The device lives as long as the fd.
"""

from __future__ import annotations

import fcntl
import os
import struct

from pyroute2 import IPRoute

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08


def open_tap(name: str, offload: int = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
             vnet_hdr_size: int = 12, queues: int = 1) -> list[int]:
    """Create (or attach to) TAP ``name``; returns a non-blocking fd per queue. With
    ``queues`` > 1 the device is IFF_MULTI_QUEUE: each fd is a queue of its own, and the
    kernel spreads the frames it hands over by flow (``tun_automq_select_queue``: a flow goes
    to the queue its frames last came in on, else by its hash)."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fds[0], TUNSETVNETHDRSZ, struct.pack("i", vnet_hdr_size))
        fcntl.ioctl(fds[0], TUNSETOFFLOAD, offload)
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def set_queue(fd: int, attached: bool) -> None:
    """Attach or detach one queue of a multi-queue TAP (TUNSETQUEUE): the kernel steers no
    frame to a detached queue."""
    flag = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
    fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH22x", b"", flag))


def set_offload(fd: int, offload: int) -> None:
    """Change what the kernel may hand us (after negotiation: no GSO feature, no TSO)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, offload)


def configure(name: str, mac: str | None = None, ip: str | None = None,
              master: str | None = None, mtu: int | None = None, up: bool = True,
              gso_max_size: int | None = None) -> None:
    """Set MAC/MTU, attach to a bridge, add an address (``a.b.c.d/len``) and bring it up.
    ``gso_max_size`` caps the segments the stack hands the TAP (netif_set_tso_max_size)."""
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=name)
        kw: dict = {}
        if mac:
            kw["address"] = mac
        if mtu:
            kw["mtu"] = mtu
        if gso_max_size:
            kw["gso_max_size"] = gso_max_size
        if master:
            found = ipr.link_lookup(ifname=master)
            if not found:
                raise RuntimeError(f"bridge {master} does not exist")
            kw["master"] = found[0]
        if kw:
            ipr.link("set", index=idx, **kw)
        if ip:
            addr, _, plen = ip.partition("/")
            existing = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
            if addr not in existing:
                ipr.addr("add", index=idx, address=addr, prefixlen=int(plen or 24))
        ipr.link("set", index=idx, state="up" if up else "down")


def set_carrier(name: str, up: bool) -> None:
    """Administrative up/down, the closest a TAP owner gets to netif_carrier_off."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("set", index=found[0], state="up" if up else "down")
