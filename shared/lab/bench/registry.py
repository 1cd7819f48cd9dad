"""The registry of measured paths: every path name, its factory, and the run order.

The one module that imports every path module (veth, tap_relay, pvnet_netns, qemu); they import only
``shared.lab.bench.paths`` (the interfaces), and nothing imports this module back but the
runner, so the bench's import graph has no cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.lab.bench import pvnet_netns, qemu, tap_relay, veth
from shared.lab.bench.paths import Factory, Path, PathContext

REGISTRY: dict[str, Factory] = {
    "veth": veth.veth_paths,
    "tap-relay": tap_relay.tap_relay_paths,
    "pvnet-netns": pvnet_netns.pvnet_netns_paths,
    "virtio-net": qemu.virtio_paths,
    "pvnet-qemu": qemu.pvnet_qemu_paths,
    "virtio-net-g2g": qemu.virtio_g2g_paths,
    "pvnet-qemu-g2g": qemu.pvnet_g2g_paths,
}
"""Every path `--paths` accepts, in run order (veth first: every ratio divides by it). The
``-g2g`` paths are guest -> guest; their vs_virtio divides by virtio-net-g2g."""


def build_paths(names: Sequence[str] | None, ctx: PathContext) -> list[Path]:
    """Instantiate the requested paths (all registered ones if `names` is None), in the
    registry's order whatever order they were asked in."""
    wanted = list(REGISTRY) if names is None else list(names)
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown path(s) {', '.join(unknown)} "
                         f"(registered: {', '.join(REGISTRY)})")
    return [p for n in REGISTRY if n in wanted for p in REGISTRY[n](ctx)]
