"""A frontend that does the handshake properly and then lies on the ring: the tool the tests
use to check that a backend disconnects a malformed frontend and survives it."""

from __future__ import annotations

import select
import time

from frontend.xenbus import Handshake
from shared.channel import ChannelClosed
from shared.netif import TX_REQUEST
from shared.region import Region
from shared.ring import MASK32, FrontRing
from shared.transport import connect_unix, create_memfd


class HostileFrontend:
    def __init__(self, event_path: str, name: str, domid: int, size: int = 2 << 20) -> None:
        self.chan = connect_unix(event_path, timeout=10)
        self.name, self.domid, self.size = name, domid, size
        self.region: Region | None = None

    def connect(self) -> dict[str, bool]:
        def make_region(chosen, backend_domid):
            fd, mem = create_memfd(self.size)
            self.region = Region.create(mem)
            return self.region, {"size": self.size}, (fd,)

        hs = Handshake(self.chan, self.name, self.domid, dict.fromkeys(
            ["feature-sg", "feature-header-slots", "feature-rx-copy"], True))
        _offer, chosen, _region = hs.run(make_region, timeout=10)
        self.tx = FrontRing(self.region.tx_ring, TX_REQUEST.size, init=False)
        return chosen

    def write_tx(self, *reqs: tuple[int, int, int, int, int]) -> None:
        for r in reqs:
            TX_REQUEST.pack_into(self.tx.buf, self.tx.entry(self.tx.req_prod_pvt), *r)
            self.tx.req_prod_pvt = (self.tx.req_prod_pvt + 1) & MASK32
        self.tx.push_requests()
        self.chan.notify()

    def wait_closed(self, timeout: float = 10.0) -> str:
        """Block until the backend says Closing (returns its error) or hangs up."""
        end = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.chan.fileno(), select.POLLIN)
        while time.monotonic() < end:
            if not poller.poll(200):
                continue
            try:
                for msg in self.chan.recv().messages:
                    if msg.get("state") == "Closing":
                        return str(msg.get("error", ""))
            except ChannelClosed:
                return "hung up"
        raise TimeoutError("backend did not disconnect the hostile frontend")

    def close(self) -> None:
        self.chan.close()
