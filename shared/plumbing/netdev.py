"""The network device at an end's outer edge (the backend's vif, the guest's TAP), as the
connection lifecycle uses it: frames pass through ``fd``; offloads follow the negotiation;
the carrier follows the connection.

One class, so that a test replaces the device by subclassing (a socketpair whose offloads
and carrier are no-ops) instead of production code asking "am I under test?".
"""

from __future__ import annotations

import fcntl
import os
import struct

from shared.plumbing.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    configure,
    open_tap,
    set_offload,
    set_queue,
)

#: _IOW('T', 226, int): netif_carrier_on/off on a TAP (Linux >= 5.0)
TUNSETCARRIER = 0x400454E2
#: a vif's MAC, as Xen's hotplug scripts set it: the highest unicast address, so a bridge,
#: which takes the lowest MAC of its ports for its own, never takes a vif's
VIF_MAC = "fe:ff:ff:ff:ff:ff"


def offload_flags(tso4: bool, tso6: bool, csum: bool = True) -> int:
    """TUNSETOFFLOAD flags for what the peer accepts: checksum offload if it takes partial
    checksums of both IPv4 and IPv6 (TUN_F_CSUM is one switch, NETIF_F_HW_CSUM: the TAP
    cannot take IPv4 partial checksums and refuse IPv6 ones), TSO only of the kinds
    negotiated and only with checksum offload, as the kernel requires (xenvif_fix_features,
    xennet_fix_features, netdev_fix_features). Without it the kernel completes every
    checksum before it hands a frame over."""
    if not csum:
        return 0
    flags = TUN_F_CSUM | (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
    return flags | (TUN_F_TSO_ECN if tso4 or tso6 else 0)


class NetDevice:
    """A TAP this process created and owns (closed with it): ``fd`` is its first (or only)
    queue, ``fds`` every queue's (a multi-queue TAP: one fd per queue, ``use_queues``)."""

    def __init__(self, fd: int, name: str, queue_fds: tuple[int, ...] = ()) -> None:
        self.fd = fd
        self.name = name
        self.fds = (fd, *queue_fds)
        self._attached = [True] * len(self.fds)

    @classmethod
    def open(cls, name: str, queues: int = 1, **settings) -> NetDevice:
        """Create the TAP (with ``queues`` queues) and configure it
        (``shared.plumbing.tap.configure`` keywords)."""
        fds = open_tap(name, queues=queues)
        try:
            configure(name, **settings)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(fds[0], name, tuple(fds[1:]))

    @property
    def queues(self) -> int:
        return len(self.fds)

    def use_queues(self, n: int) -> None:
        """Serve the first ``n`` queues: the others are detached, so the kernel steers no
        flow to a queue nobody reads (a connection with fewer queues than the device)."""
        for i, fd in enumerate(self.fds if len(self.fds) > 1 else ()):
            if self._attached[i] != (i < n):
                set_queue(fd, i < n)
                self._attached[i] = i < n

    def set_offload(self, flags: int) -> None:
        """What the stack may hand us (TUNSETOFFLOAD)."""
        set_offload(self.fd, flags)

    def set_carrier(self, on: bool) -> None:
        """netif_carrier_on/off; OSError if the kernel refuses."""
        fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", int(on)))

    def close(self) -> None:
        if self.fd >= 0:
            for fd in self.fds:
                os.close(fd)
            self.fd = -1
            self.fds = ()
