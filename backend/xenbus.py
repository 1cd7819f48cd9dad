"""Netback's side of the handshake (Linux ``xenbus.c``): offer features, check what the
frontend chose, map its region. Everything the frontend says is validated here; a bad value
ends the connection with a "Closing" message naming the problem, never with a crash."""

from __future__ import annotations

import mmap
import os
import select
import time
from dataclasses import dataclass

from shared.channel import EventChannel
from shared.netif import FEATURES
from shared.region import Region
from shared.transport import map_memfd
from shared.xenbus import NegotiationError, XenbusState, check_request

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class Negotiated:
    """What a successful handshake produced."""

    name: str
    domid: int
    features: dict[str, bool]
    region: Region


def offered_features() -> dict[str, bool]:
    return dict.fromkeys(FEATURES, True)


class Handshake:
    """Drive one frontend from Initialising to Connected."""

    def __init__(self, chan: EventChannel, vif: str, domid: int,
                 shared_region: mmap.mmap | None = None) -> None:
        self.chan = chan
        self.vif = vif
        self.domid = domid
        self.shared_region = shared_region  # QEMU placement: the region is already ours
        self.offered = offered_features()
        self.state = XenbusState.InitWait

    def run(self, keep_going=lambda: True) -> Negotiated:
        """Blocking; waits indefinitely for the first hello (a guest may still be booting),
        then at most HANDSHAKE_TIMEOUT for each further step."""
        deadline = None
        poller = select.poll()
        poller.register(self.chan.fileno(), select.POLLIN)
        while keep_going():
            if deadline is not None and time.monotonic() > deadline:
                raise NegotiationError("frontend did not finish the handshake in time")
            if not poller.poll(250):
                continue
            got = self.chan.recv()
            for fd in got.fds[1:]:
                os.close(fd)
            fd = got.fds[0] if got.fds else None
            for msg in got.messages:
                state = msg.get("state")
                if state == "Initialising":
                    self._send_initwait()
                    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
                elif state == "Initialised":
                    try:
                        result = self._accept(msg, fd)
                    except (NegotiationError, ValueError, OSError) as e:
                        self.chan.send({"state": "Closing", "error": str(e)})
                        raise NegotiationError(str(e)) from e
                    finally:
                        if fd is not None:
                            os.close(fd)
                            fd = None
                    self.chan.send({"state": "Connected"})
                    return result
                elif state in ("Closing", "Closed"):
                    raise NegotiationError("frontend closed during the handshake")
            if fd is not None:
                os.close(fd)
        raise NegotiationError("backend stopping")

    def _send_initwait(self) -> None:
        self.chan.send({"state": "InitWait", "name": self.vif, "domid": 0,
                        "features": self.offered})

    def _accept(self, msg: dict, fd: int | None) -> Negotiated:
        if msg.get("domid") != self.domid:
            raise NegotiationError(f"frontend says domid {msg.get('domid')!r}, "
                                   f"this vif serves domid {self.domid}")
        features = check_request(self.offered, msg.get("features"))
        region_msg = msg.get("region")
        if not isinstance(region_msg, dict) or not isinstance(region_msg.get("size"), int):
            raise NegotiationError("region must be an object with an integer size")
        if self.shared_region is not None:
            if region_msg["size"] != len(self.shared_region):
                raise NegotiationError(f"region size {region_msg['size']} does not match the "
                                       f"shared region ({len(self.shared_region)})")
            mem = self.shared_region
        else:
            if fd is None:
                raise NegotiationError("no region memfd passed with Initialised")
            mem = map_memfd(fd, region_msg["size"])
        name = msg.get("name")
        return Negotiated(str(name) if name else "?", self.domid, features, Region.attach(mem))
