"""The backend's faults as the frontend sees them (a peer's fault: ``shared.faults``)."""

from __future__ import annotations

from shared.faults import PeerFault


class BackendError(PeerFault):
    """The backend answered something no correct backend answers: the device is broken."""
