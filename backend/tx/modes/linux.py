"""``linux``: Linux xen-netback's own TX strategy - copy the head, map the rest.

``xenvif_tx_build_gops`` grant-copies the first ``XEN_NETBACK_TX_COPY_LEN`` (128) bytes of a
packet into the skb's linear area and grant-maps every remaining slot, so the stack gets the
headers in its own memory and the payload by reference. pvnet's header pull already copies at
least those 128 bytes (and on to the end of the L4 header); this mechanism then maps every
fragment the pull did not consume entirely - and only those: a page whose bytes all went into
the head is never mapped (``tx_pull_consumed`` counts them, ``tx_mapped_after_pull`` the maps).
"""

from __future__ import annotations

from backend.tx.modes.base import TxMechanism
from backend.tx.skb import SkBuff


class Linux(TxMechanism):
    COUNTERS = "tx_mapped_after_pull tx_pull_consumed"

    def pulled(self, skbs: list[SkBuff]) -> None:
        gntmap, own = self.gntmap, self.own
        for skb in skbs:
            left = [i for i, n in enumerate(skb.sizes) if n]
            skb.map_frags(gntmap, left)
            own.tx_mapped_after_pull += len(left)
            own.tx_pull_consumed += len(skb.sizes) - len(left)


MECHANISM = Linux
