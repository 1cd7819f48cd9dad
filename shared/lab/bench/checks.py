"""What a record must satisfy to mean what its workload's name says, checked after each run.

- A no-GSO record (tcp-nogso) whose frames are bigger than an MTU measured GSO frames after
  all: it is refused (becomes an error saying why), never reported as an MTU figure. The size
  checked is payload bytes per frame (goodput over frames counted on the path), a lower
  bound on the frame's size: above the MTU, the frames were above it too.
- A packet-rate record (pps*) says so when the frames at the receiver were not the size asked
  for, and when the generator offered less than twice what the path delivered (then the
  generator, not the path, may have set the figure). veth is exempt from the second: its row
  is the generator's own rate, the reference the others are read against.
"""

from __future__ import annotations

from shared.lab.bench.pps import SIZES
from shared.lab.bench.record import Record

MTU = 1500  # every device the lab creates keeps Linux's default
OFFERED_MIN = 2.0  # offered / delivered below this: the generator may be the limit


def mtu_refusal(rec: Record) -> str | None:
    """Why a no-GSO record cannot be reported as MTU-sized frames; None if it can."""
    if rec.gbps and rec.fps:
        per_frame = rec.gbps * 1e9 / 8 / rec.fps
        if per_frame > MTU:
            return (f"refused: {per_frame:.0f} payload bytes per frame is above the {MTU}-byte "
                    "MTU, so GSO/TSO frames crossed the path in a no-GSO run")
    return None


def pps_warnings(rec: Record) -> list[str]:
    """The warnings a packet-rate record carries in its note (none if it is sound)."""
    out = []
    size = SIZES.get(rec.workload)
    if size is not None and rec.frame_bytes is not None and abs(rec.frame_bytes - size) > 1:
        out.append(f"WARNING {rec.frame_bytes:g} B/frame at the receiver, not {size}")
    if rec.path != "veth" and rec.offered_fps and rec.fps:
        ratio = rec.offered_fps / rec.fps
        if ratio < OFFERED_MIN:
            out.append(f"WARNING offered only {ratio:.1f}x what was delivered: the generator "
                       "may be the limit")
    return out
