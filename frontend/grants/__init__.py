"""The frontend's grant policies: one module each (``transient``, ``persistent``), one protocol
(``base.GrantPolicy``), registered in ``shared/protocol/mechanisms.py`` (side ``grants``)."""
