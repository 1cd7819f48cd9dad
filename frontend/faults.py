"""The backend's faults as the frontend sees them (a peer's fault: ``shared.faults``)."""

from __future__ import annotations

from shared.channel import ChannelError
from shared.faults import PeerFault
from shared.ring import RingError
from shared.transport import TransportError
from shared.workers import WorkerDied
from shared.xenbus import NegotiationError


class BackendError(PeerFault):
    """The backend answered something no correct backend answers: the device is broken."""


#: what marks the device broken: the backend (or the path to it) misbehaved, or a queue
#: worker was killed
BACKEND_FAULTS = (NegotiationError, ChannelError, TransportError, RingError, BackendError,
                  OSError, WorkerDied)
