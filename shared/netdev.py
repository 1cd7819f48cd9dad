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

from shared.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    configure,
    open_tap,
    set_offload,
)

#: _IOW('T', 226, int): netif_carrier_on/off on a TAP (Linux >= 5.0)
TUNSETCARRIER = 0x400454E2


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
    """A TAP this process created and owns (closed with it)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def open(cls, name: str, **settings) -> NetDevice:
        """Create the TAP and configure it (``shared.tap.configure`` keywords)."""
        fd = open_tap(name)
        try:
            configure(name, **settings)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name)

    def set_offload(self, flags: int) -> None:
        """What the stack may hand us (TUNSETOFFLOAD)."""
        set_offload(self.fd, flags)

    def set_carrier(self, on: bool) -> None:
        """netif_carrier_on/off; OSError if the kernel refuses."""
        fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", int(on)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
