"""TX mechanisms: one module each (``lazy``, ``map``, ``copy``, ``linux``), one protocol
(``base.TxMechanism``), registered in ``shared/protocol/mechanisms.py``. ``load`` is how netback
gets the class of a registered name (``backend/mechanisms.py`` does it for both sides)."""
