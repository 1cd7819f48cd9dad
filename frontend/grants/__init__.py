"""The frontend's grant policies: one module each (``transient``, ``persistent``), one protocol
(``base.GrantPolicy``), registered in ``shared/mechanisms.py`` (side ``grants``)."""
