"""The data-path programs' command lines in both placements, and what a QEMU guest runs.

One home for the flags both placements give netback and netfront (the guest's features and
filters), so that a new per-guest option is added once. The namespace placement's lines are
`default_commands` (pluggable: tests pass fakes); the QEMU placement's are `backend_argv`
(the region comes as an inherited fd) and `frontend_argv` (run inside the guest).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from shared.lab.machine.config import GuestSpec
from shared.lab.machine.guest_env import guest_python
from shared.lab.plumbing import netns_exec
from shared.lab.topology import Guest, Topology

DEFAULT_REGION_SIZE = Guest.__dataclass_fields__["region_size"].default
REPO_ROOT = Path(__file__).resolve().parents[2]

CommandBuilder = Callable[[Topology, Guest], tuple[list[str], list[str]]]
"""(topology, guest) -> (netback argv, netfront argv). Pluggable so tests can run fakes."""

EVENT_PORT = "pvnet-event"
DOORBELL_VECTORS = 1  # MSI-X vectors per peer: one event channel needs one
CTL_PORT = "pvnet-ctl"
GUEST_TAP = "pv0"

#: guest stack tuning, the same for every guest whatever its NIC: TSO frames of at least 44
#: segments (~64 KB) however low the socket's pacing rate. Linux sizes TSO frames to ~1 ms of
#: the pacing rate (tcp_tso_autosize); a slow path thus gets small frames, and a NIC whose cost
#: is per frame (pvnet's Python netfront under TCG, ~1 ms per frame) stays slow. virtio-net
#: frames are ~54 KB here already. Measured: docs/performance.md, "The guest path".
GUEST_MIN_TSO_SEGS = 44


#: the stack tuning every guest gets, whatever its NIC (written by the guest's init)
GUEST_SYSCTLS = {"net.ipv4.tcp_min_tso_segs": str(GUEST_MIN_TSO_SEGS)}


def backend_base(topo: Topology, g: Guest) -> list[str]:
    """netback's command line up to how it reaches its frontend (placement-specific)."""
    return [*netns_exec(topo.host_netns), sys.executable, "-m", "backend", "--vif", g.vif,
            "--domid", str(g.domid), "--bridge", topo.bridge]


def backend_options(topo: Topology, g: Guest) -> list[str]:
    """netback's control socket, mechanisms and filter rules: the same in both placements."""
    argv = ["--ctl", str(topo.backend_ctl(g)), "--tx-mode", g.tx_mode, "--rx-mode", g.rx_mode]
    for rule in g.filters:
        argv += ["--filter", rule]
    if g.rate is not None:
        argv += ["--rate", f"{g.rate[0]},{g.rate[1]}"]
    if g.poll_us:
        argv += ["--poll-us", str(g.poll_us)]
    if g.queues > 1:
        argv += ["--queues", str(g.queues)]
    return argv


def frontend_features(g: Guest) -> list[str]:
    """netfront's feature flags for guest `g`: the same in both placements."""
    argv = []
    if not g.header_slots:
        argv.append("--no-header-slots")
    if g.persistent:
        argv.append("--persistent")
    if g.grants:
        argv += ["--grants", g.grants, "--recycle-pool", str(g.recycle_pool)]
    if not g.gso:
        argv.append("--no-gso")
    if g.poll_us is not None:
        argv += ["--poll-us", str(g.poll_us)]
    if g.queues > 1:
        argv += ["--queues", str(g.queues)]
    return argv


def default_commands(topo: Topology, g: Guest) -> tuple[list[str], list[str]]:
    """The namespace placement's netback and netfront command lines."""
    backend = [*backend_base(topo, g), "--listen", str(topo.event_socket(g)),
               *backend_options(topo, g)]
    frontend = [
        *netns_exec(g.netns), sys.executable, "-m", "frontend",
        "--name", g.name, "--connect", str(topo.event_socket(g)), "--tap", "eth0",
        "--mac", g.mac, "--ip", str(g.ip), "--ctl", str(topo.frontend_ctl(g)),
        # not in the brief's line, but netback refuses a frontend whose domid is not its own
        # (netfront defaults to 1, so g2 could never connect without it)
        "--domid", str(g.domid),
    ]
    if g.region_size != DEFAULT_REGION_SIZE:
        frontend += ["--region-size", str(g.region_size)]
    return backend, frontend + frontend_features(g)


def frontend_argv(g: Guest) -> list[str]:
    """The netfront command line inside a QEMU guest: the lab's interpreter (guest_python),
    which the guest sees at its host path."""
    argv = [guest_python(), "-m", "frontend", "--name", g.name, "--domid", str(g.domid),
            "--channel", f"/dev/virtio-ports/{EVENT_PORT}", "--region", "pci",
            "--tap", GUEST_TAP, "--mac", g.mac, "--ip", str(g.ip),
            "--ctl-port", f"/dev/virtio-ports/{CTL_PORT}", *frontend_features(g)]
    if g.event == "doorbell":
        argv.append("--doorbell")
    return argv


def backend_argv(topo: Topology, g: Guest, region_fd: int) -> list[str]:
    """The QEMU placement's netback: it connects to QEMU's event port and maps the region
    from an inherited fd."""
    argv = [*backend_base(topo, g), "--connect", str(topo.event_socket(g)),
            "--region-fd", str(region_fd), *backend_options(topo, g)]
    if g.event == "doorbell":
        argv += ["--doorbell", str(doorbell_sockets(topo, g)[1])]
    return argv


def doorbell_sockets(topo: Topology, g: Guest) -> tuple[Path, Path]:
    """The ivshmem server's two sockets for a doorbell guest: QEMU's and the netback's."""
    return (topo.state_dir / f"{g.vif}.ivshmem", topo.state_dir / f"{g.vif}.ivshmem-be")


def ivshmem_doorbell_args(topo: Topology, g: Guest) -> tuple[str, ...]:
    """QEMU: ivshmem-doorbell on the server (which hands QEMU the memfd) instead of -plain."""
    return ("-chardev", f"socket,id=ivshmem0,path={doorbell_sockets(topo, g)[0]}",
            "-device", f"ivshmem-doorbell,id=bell0,chardev=ivshmem0,vectors={DOORBELL_VECTORS}")


def guest_runs(g: Guest) -> tuple[tuple[str, ...], ...]:
    """What a guest's init starts: the netfront (pvnet guests) and iperf3 -s."""
    front = () if g.nic == "virtio-net" else (tuple(frontend_argv(g)),)
    return (*front, ("iperf3", "-s"))


def guest_spec(g: Guest, env: dict[str, str] | None = None) -> GuestSpec:
    """What a guest of either NIC does after boot: the same tuning (GUEST_SYSCTLS) and
    iperf3 -s for both, a netfront for pvnet guests, so the comparison stays fair."""
    return GuestSpec(hostname=g.name, cwd=str(REPO_ROOT), env=dict(env or {}),
                     run=guest_runs(g), sysctls=dict(GUEST_SYSCTLS))
