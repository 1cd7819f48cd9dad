"""A hostile frontend with several queues: it negotiates as pvnet's netfront does (its queue
keys, an event channel per queue passed with Initialised) - or, told so, writes keys that do
not add up - and then writes what it is told on any queue's rings and grant entries."""

from __future__ import annotations

import socket
from collections.abc import Callable

from frontend.handshake import Handshake, Laid
from shared.plumbing.channel import ChannelClosed, EventChannel
from shared.plumbing.transport import create_memfd
from shared.protocol.netif import NUM_QUEUES_KEY, RX_REQUEST, TX_REQUEST
from shared.protocol.queues import frontend_queue_keys
from shared.protocol.region import Region
from shared.protocol.ring import FrontRing
from tests.hostile import BASIC, HostileFrontend


class QueuedFrontend(HostileFrontend):
    """``HostileFrontend`` over several queues; ``use(q)`` points its ring helpers (``packet``,
    ``post_rx``, ``push``, ``kick``) at queue ``q``."""

    def connect(self, wanted: dict[str, bool] | None = None, queues: int = 2,
                edit: Callable[[Laid], None] | None = None) -> dict[str, bool]:
        """Negotiate ``queues`` queues (at most what is offered); ``edit`` may rewrite the
        laid-out region's keys and descriptors before they are sent."""
        def make_region(chosen, backend_domid):
            n = int(chosen.get(NUM_QUEUES_KEY, 1))
            fd, mem = create_memfd(self.size)
            self.region = Region.create(mem, queues=n)
            laid = Laid(self.region, {"size": self.size}, (fd,))
            if n > 1:
                for _ in range(n):
                    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                    laid.channels.append(EventChannel(sock=mine))
                    laid.fds = (*laid.fds, theirs.detach())
                lay = self.region.layout
                laid.keys = frontend_queue_keys([lay.queue_rings(q) for q in range(n)],
                                                list(range(1, n + 1)))
            if edit is not None:
                edit(laid)
            return laid

        hs = Handshake(self.chan, self.name, self.domid, wanted or BASIC, queues=queues)
        _offer, self.chosen, laid = hs.run(make_region, timeout=10)
        lay = self.region.layout
        n = laid.queues
        self.channels = laid.channels
        self.areas = [self.region.queue(lay.share(q, n), *lay.queue_rings(q)) if n > 1
                      else self.region for q in range(n)]
        self.txs = [FrontRing(a.tx_ring, TX_REQUEST.size) for a in self.areas]
        self.rxs = [FrontRing(a.rx_ring, RX_REQUEST.size) for a in self.areas]
        self.payload = range(lay.payload_page, lay.payload_page + lay.payload_pages)
        self.use(0)
        return self.chosen

    def use(self, q: int) -> None:
        self.queue = q
        self.area, self.tx, self.rx = self.areas[q], self.txs[q], self.rxs[q]

    def own_ref(self, q: int, i: int = 0) -> int:
        """The ``i``-th grant reference queue ``q`` owns past its RX buffers' (pvnet's
        netfront grants a queue's TX payload pages there)."""
        return self.areas[q].refs.start + (8 if q == 0 else 0) + 256 + i

    def kick(self, n: int = 1) -> None:
        chan = self.channels[self.queue] if self.channels else self.chan
        try:
            chan.notify()
        except (BlockingIOError, ChannelClosed, OSError):
            pass

    def close(self) -> None:
        for c in getattr(self, "channels", ()):
            c.close()
        super().close()
