"""The default run: which paths, modes and workloads ``invoke bench`` measures when not told.

The whole cross product (every path, every mode of ``--modes all``, every workload) takes many
hours on this machine; the default run stays under 30 minutes by measuring each mode where it
differs from the reference (``shared.lab.bench.modes``), built from the mode's parts, never
from a list of names:

- ``veth``, ``tap-relay`` (the floor under pvnet's per-frame cost) and the reference mode
  (the default mechanisms, no option): every workload;
- another TX mechanism: TCP with and without GSO (its per-fragment and per-packet cost) and
  64-byte frames; another RX mechanism: TCP and 64-byte frames;
- header slots off: 64-byte frames (where a header copy is most of a packet); persistent
  grants: MTU frames (the persistent-grant RFC's comparison); a rate limit or a capture: TCP;
- the QEMU placement (each boot costs ~45 s under TCG): virtio-net and pvnet in the reference
  mode only, TCP, rr and 64-byte frames; the guest-to-guest paths only on request.

``--paths``, ``--modes`` and ``--workloads`` override each part: a workload list given runs on
every path and mode.
"""

from __future__ import annotations

from shared.lab.bench.modes import parse
from shared.protocol.mechanisms import default

#: the paths of the default run (``--paths`` for the rest)
DEFAULT_PATHS = ("veth", "tap-relay", "pvnet-netns", "virtio-net", "pvnet-qemu")
ALL = ("tcp", "tcp-nogso", "udp64", "rr", "pps64", "pps1496")
#: a QEMU guest's boot and shutdown under TCG, for the time estimate (seconds)
QEMU_SETUP_S = 45.0


def workloads(path: str, mode: str) -> tuple[str, ...]:
    """The workloads the default run measures on ``path`` in ``mode``."""
    if mode == "-":
        return ("tcp", "rr", "pps64") if path.startswith("virtio") else ALL
    m = parse(mode)
    if path.startswith("pvnet-qemu"):
        return ("tcp", "rr", "pps64")
    if m.capture is not None or m.rate_mbit is not None:
        return ("tcp",)
    if m.tx != default("tx"):
        return ("tcp", "tcp-nogso", "pps64")
    if m.rx != default("rx"):
        return ("tcp", "pps64")
    if not m.header_slots:
        return ("pps64",)
    if m.persistent:
        return ("tcp-nogso",)
    return ALL


def setup_s(path: str) -> float:
    """A session's set-up and tear-down, for the time estimate."""
    return QEMU_SETUP_S if path.startswith(("virtio", "pvnet-qemu")) else 1.5
