"""The netback's doorbell: a client of the lab's ivshmem server, as the backend peer.

See shared/plumbing/doorbell/__init__.py for why doorbells exist; the protocol is
shared/plumbing/ivshmem.py.
"""

from __future__ import annotations

import os

from shared.faults import kind_of
from shared.plumbing.channel import ChannelClosed
from shared.plumbing.doorbell import DoorbellError, drain_eventfd
from shared.plumbing.ivshmem import IvshmemClient, ProtocolError, ServerUnreachable


class HostDoorbell:
    """The netback's doorbell: a non-QEMU client of the ivshmem server, as the backend peer."""

    def __init__(self, client: IvshmemClient, vector: int = 0) -> None:
        own = client.own_eventfds()
        if len(own) <= vector:
            client.close()
            raise DoorbellError(f"server gave {len(own)} vectors, vector {vector} wanted")
        self.client = client
        self.vector = vector
        self._own = own[vector]
        os.set_blocking(self._own, False)
        self.guest_id: int | None = None
        self._guest_fd: int | None = None
        self.dropped = 0  # kicks with no guest peer to ring (QEMU not connected)
        self._find_guest()

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, vector: int = 0) -> HostDoorbell:
        try:
            return cls(IvshmemClient.connect(path, timeout), vector)
        except (ProtocolError, ServerUnreachable) as e:
            raise DoorbellError(f"{e} ({kind_of(e)} fault)") from e

    @property
    def peer_id(self) -> int:
        return self.client.own_id

    def _find_guest(self) -> int | None:
        """Apply the server's news and pick the guest peer (the highest id if ever several:
        the newest, as ids only grow until they wrap).

        The chosen fd stays open until the next call: a peer's fds are closed only while
        news is applied here, so notify never writes to a closed (or reused) fd number. A
        server gone away ends the channel like a peer that closed it."""
        try:
            self.client.pump()
        except (ProtocolError, OSError) as e:
            raise ChannelClosed(f"ivshmem server ({kind_of(e)} fault): {e}") from e
        peers = {p: fds for p, fds in self.client.other_peers().items()
                 if len(fds) > self.vector}
        self.guest_id = max(peers) if peers else None
        self._guest_fd = peers[self.guest_id][self.vector] if peers else None
        return self._guest_fd

    def notify(self) -> None:
        """Ring the guest: QEMU reads its vector eventfd and raises that MSI-X vector."""
        fd = self._guest_fd
        if fd is None:
            fd = self._find_guest()
            if fd is None:
                self.dropped += 1
                return
        os.eventfd_write(fd, 1)

    def fileno(self) -> int:
        return self._own

    def drain(self) -> int:
        return drain_eventfd(self._own)

    def close(self) -> None:
        self.client.close()
