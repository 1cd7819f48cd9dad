"""RX mechanisms: one module each (``copy``: the grant copy, ``map``: a mapping receiver),
one protocol (``base.RxMechanism``), registered in ``shared/protocol/mechanisms.py``."""
