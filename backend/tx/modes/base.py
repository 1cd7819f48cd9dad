"""The TX mechanism protocol: the four places where mechanisms really differ.

The core of netback TX (``backend/tx/path.py``) reads and validates a ring pass's requests,
copies each packet's header, resolves every fragment's grant once (its frame), pulls the
headers, sets up checksums, filters, writes to the vif and frees the packets. It knows no
mechanism by name; at four points it hands the *batch* of packets of one ring pass to the
mechanism in force:

- ``attach(skbs)``: their fragments are resolved (``skb.frames``) and nothing else yet. Hold
  the grants (GTF_reading, so the frontend cannot revoke them while anything may read them),
  map them, or neither.
- ``pulled(skbs)``: the header pull has copied the headers into ``skb.head`` and trimmed the
  fragments (``skb.sizes`` may now hold zeros). A mechanism that maps or copies what the pull
  left does it here.
- ``xmit(skbs)``: the packets that passed the checksum set-up and the filter, just before
  their vif write (the last point at which a mechanism may stage their bytes).
- ``free(skbs)``: the packets are done with (sent, dropped or filtered): undo what ``attach``
  and the others did. The core answers their slots afterwards (``skb.ids``; a mechanism that
  answered early emptied them).

``free`` must undo exactly what was done and no more, whatever point a packet reached: the
core also calls it on a pass cut short by a fatal error of the frontend. The defaults below
hold the grants at attach and undo holds and maps at free, which is what every mechanism but
copy wants. A mechanism's own counters are named in ``COUNTERS``: netback creates them once
per process and shows them beside the ring's counters in ``pvnet stats`` and its JSON.
"""

from __future__ import annotations

from typing import ClassVar

from backend.grants.gntmap import GntMap
from backend.tx.release import TxRelease
from backend.tx.skb import NOT_HELD, SkBuff
from shared.protocol.stats import RingStats


class TxMechanism:
    """What every TX mechanism is handed, and the default hooks."""

    #: the mechanism's own counters (space-separated names), shown beside the ring's
    COUNTERS: ClassVar[str] = ""
    #: a packet wholly in its header slot has no grant to act on, so the core sends it
    #: without the hooks (``backend/tx/small.py``); True: this mechanism sees those too
    HEAD_ONLY_HOOKS: ClassVar[bool] = False

    def __init__(self, gntmap: GntMap, stats: RingStats, release: TxRelease,
                 own: object) -> None:
        self.gntmap = gntmap
        #: the ring's counters (canonical names, ``shared/protocol/stats.py``)
        self.stats = stats
        #: the slot answers: a mechanism that lets a packet's slots go before it is freed
        #: calls ``release.release(skb.ids, skb.extras)`` and empties ``skb.ids``
        self.release = release
        #: its own counters (``COUNTERS``), kept across connections
        self.own = own

    def attach(self, skbs: list[SkBuff]) -> None:
        """Hold every fragment's grant until the packet is freed."""
        hold = self.gntmap.tx.hold
        for skb in skbs:
            if skb.grefs:
                skb.hold_flags = hold(skb.grefs, skb.frames, skb.flags0)

    def pulled(self, skbs: list[SkBuff]) -> None:
        """After the header pull: nothing by default."""

    def xmit(self, skbs: list[SkBuff]) -> None:
        """Before the vif write: nothing by default."""

    def free(self, skbs: list[SkBuff]) -> None:
        """Unmap what is mapped, release the grants' in-use bits (nothing reads them any
        more: the frontend's end_access may succeed)."""
        gntmap = self.gntmap
        release = gntmap.tx.release
        for skb in skbs:
            if skb.mapped:
                skb.unmap_frags(gntmap)
            if skb.hold_flags != NOT_HELD:
                release(skb.grefs, skb.hold_flags)
                skb.hold_flags = NOT_HELD
