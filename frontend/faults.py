"""The backend's faults as the frontend sees them (a peer's fault: ``shared.faults``)."""

from __future__ import annotations

from shared.endpoint.workers import WorkerDied
from shared.faults import PeerFault
from shared.plumbing.channel import ChannelError
from shared.plumbing.transport import TransportError
from shared.protocol.ring import RingError
from shared.protocol.xenbus import NegotiationError


class BackendError(PeerFault):
    """The backend answered something no correct backend answers: the device is broken."""


#: what marks the device broken: the backend (or the path to it) misbehaved, or a queue
#: worker was killed
BACKEND_FAULTS = (NegotiationError, ChannelError, TransportError, RingError, BackendError,
                  OSError, WorkerDied)
