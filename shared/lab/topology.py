"""Lab topology as data: a small YAML file parsed into frozen dataclasses. A user describes
a lab in ten lines (a bridge, the wire peer, the guests with their pvnet knobs) and every other
piece -- `invoke up/down/iperf`, `pvnet stats`, the tests -- derives device, namespace, socket
and log names from it, so they always agree and `down` can find everything `up` made.
Validation is strict and names the offending field (``guests[1].tx_mode``), because a typo
silently replaced by a default would make a benchmark measure the wrong thing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.lab.fields import Fields, TopologyError, UniqueKeyLoader, show
from shared.lab.units import parse_rate, parse_size
from shared.plumbing.transport import queue_channel
from shared.protocol.filter_rules import FilterError, Rule
from shared.protocol.mechanisms import default, names
from shared.protocol.netif import MAX_QUEUES

DEFAULT_TOPOLOGY = Path(__file__).parent / "topologies" / "default.yaml"
DEFAULT_STATE_DIR = Path("/run/pvnet")

EVENT_KINDS = ("serial", "doorbell")
NIC_KINDS = ("pvnet", "virtio-net")
PAGE = 4096
IFNAMSIZ = 15  # usable characters of a Linux interface name
MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED - 1, as in Xen

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_FILTER_RE = re.compile(r"^[a-z_]+( +[a-z_]+=\S+)+$")
_NAME_WHAT = "must be lowercase letters, digits, '-' or '_', starting with a letter"


@dataclass(frozen=True)
class Wire:
    """The test NIC's far side: a veth end in its own namespace, standing in for the network."""

    netns: str
    ip: ipaddress.IPv4Interface
    iperf_server: bool
    host_if: str  # veth end on the bridge
    dev: str  # veth end inside `netns`


@dataclass(frozen=True)
class Guest:
    """One guest and its pvnet knobs (passed to netback/netfront on their command lines)."""

    name: str
    domid: int
    mac: str
    ip: ipaddress.IPv4Interface
    memory: int = 512  # MiB (QEMU placement)
    region_size: int = 8 << 20  # bytes of grant region
    #: TX limit as Linux netback's ``rate`` key: (credit_bytes, credit_usec); None: unlimited
    rate: tuple[int, int] | None = None
    tx_mode: str = default("tx")  # a TX mechanism of shared/protocol/mechanisms.py
    rx_mode: str = default("rx")  # an RX mechanism of shared/protocol/mechanisms.py
    header_slots: bool = True
    persistent: bool = False
    grants: str = ""  # netfront's grant policy where no extension decides (recycle: its pool)
    recycle_pool: int = 2
    event: str = "serial"  # QEMU placement only
    filters: tuple[str, ...] = ()
    #: pvnet, or virtio-net: the same guest type with QEMU's own NIC instead (the baseline)
    nic: str = "pvnet"
    gso: bool = True  # negotiate GSO (64 KiB segments); false: MTU-sized frames only
    #: netfront poll budget in µs (QEMU placement); None: the netfront's default
    poll_us: int | None = None
    #: queues (multi-queue-max-queues offered and asked for): a TAP queue and a worker
    #: process per queue at each end (QEMU placement: a virtio-serial port per queue)
    queues: int = 1

    @property
    def vif(self) -> str:
        """Backend interface name, Xen-style vif<domid>.<devid> (one device per guest here)."""
        return f"vif{self.domid}.0"

    @property
    def netns(self) -> str:
        """The namespace the netfront runs in for the no-VM placement: named as the guest."""
        return self.name


@dataclass(frozen=True)
class Topology:
    """A whole lab. Path helpers live here so every tool derives the same names."""

    bridge: str
    wire: Wire
    guests: tuple[Guest, ...]
    host_netns: str | None = "pvhost"
    state_dir: Path = DEFAULT_STATE_DIR
    ipv6: bool = False
    source: str = "<topology>"

    def guest(self, name: str) -> Guest:
        for g in self.guests:
            if g.name == name:
                return g
        raise KeyError(f"no guest {name!r} in {self.source}")

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace this topology owns, host side first."""
        host = (self.host_netns,) if self.host_netns else ()
        return (*host, self.wire.netns, *(g.netns for g in self.guests))

    def event_socket(self, g: Guest) -> Path:
        return self.state_dir / f"{g.vif}.ev"

    def queue_sockets(self, g: Guest) -> tuple[Path, ...]:
        """QEMU placement, several queues: the host ends of each queue's event port."""
        if g.queues == 1:
            return ()
        return tuple(Path(queue_channel(str(self.event_socket(g)), q))
                     for q in range(g.queues))

    def backend_ctl(self, g: Guest) -> Path:
        return self.state_dir / f"{g.vif}.ctl"

    def frontend_ctl(self, g: Guest) -> Path:
        return self.state_dir / f"{g.name}.ctl"

    def log_path(self, name: str) -> Path:
        return self.state_dir / "log" / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"


# -- parsing ---------------------------------------------------------------------------------


_TOP_KEYS = ("bridge", "host_netns", "state_dir", "ipv6", "wire", "guests")
_WIRE_KEYS = ("netns", "ip", "iperf_server", "host_if", "dev")
_GUEST_KEYS = ("name", "domid", "mac", "ip", "memory", "region_size", "tx_mode", "rx_mode",
               "header_slots", "persistent", "grants", "recycle_pool", "event", "filters",
               "nic", "gso", "poll_us", "rate", "queues")


def _parse_wire(src: str, data: Any, bridge: str) -> Wire:
    f = Fields(src, "wire", data, _WIRE_KEYS)
    ns = f.string("netns", "wire", pattern=_NAME_RE, what=_NAME_WHAT)
    host_if = f.string("host_if", f"{bridge}-wire", pattern=_IFNAME_RE, maxlen=IFNAMSIZ,
                       what="invalid interface name")
    dev = f.string("dev", "eth0", pattern=_IFNAME_RE, maxlen=IFNAMSIZ,
                   what="invalid interface name")
    return Wire(netns=ns, ip=f.interface("ip"), iperf_server=f.boolean("iperf_server", True),
                host_if=host_if, dev=dev)


def _filter_problem(rule: str) -> str | None:
    """Ask netback's own rule grammar, so `up` fails here rather than in a netback log."""
    try:
        Rule.parse(rule)
    except FilterError as exc:
        return str(exc)
    return None


def _parse_guest(src: str, i: int, data: Any) -> Guest:
    f = Fields(src, f"guests[{i}]", data, _GUEST_KEYS)
    name = f.string("name", pattern=_NAME_RE, maxlen=IFNAMSIZ, what=_NAME_WHAT)
    if re.match(r"^vif\d", name):
        f.fail(f"must not look like a backend vif name (got {name!r})", "name")
    if isinstance(f.data.get("mac"), int):
        f.fail("YAML read this MAC as a base-60 number; quote it ('10:20:30:40:50:01')", "mac")
    mac = f.string("mac").lower()
    if not _MAC_RE.match(mac):
        f.fail(f"must be a MAC address like 00:16:3e:00:00:01 (got {f.data['mac']!r})", "mac")
    if int(mac[:2], 16) & 1:
        f.fail(f"must be a unicast MAC (multicast bit set in {mac!r})", "mac")
    if mac == "00:00:00:00:00:00":
        f.fail("must not be all zeros", "mac")
    try:
        region = parse_size(f.get("region_size", "8M"))
    except ValueError as exc:
        f.fail(f"{exc} (got {f.data['region_size']!r})", "region_size")
    if region < 1 << 20 or region % PAGE:
        f.fail(f"must be at least 1M and a multiple of {PAGE} (got {region} bytes)",
               "region_size")
    filters = f.get("filters", [])
    if not isinstance(filters, list):
        f.fail(f"must be a list of rule strings (got {show(filters)})", "filters")
    for j, rule in enumerate(filters):
        if not isinstance(rule, str) or not _FILTER_RE.match(rule.strip()):
            f.fail(f"expected a rule like 'drop ip_proto=17' (got {show(rule)})",
                   f"filters[{j}]")
        problem = _filter_problem(rule)
        if problem:
            f.fail(problem, f"filters[{j}]")
    return Guest(
        name=name,
        domid=f.integer("domid", lo=1, hi=MAX_DOMID),
        mac=mac,
        ip=f.interface("ip"),
        memory=f.integer("memory", 512, lo=64, hi=1 << 20),
        region_size=region,
        tx_mode=f.choice("tx_mode", default("tx"), names("tx")),
        rx_mode=f.choice("rx_mode", default("rx"), names("rx")),
        header_slots=f.boolean("header_slots", True),
        persistent=f.boolean("persistent", False),
        grants=f.choice("grants", "", ("", *names("grants"))),
        recycle_pool=f.integer("recycle_pool", 2, lo=1, hi=8),
        event=f.choice("event", "serial", EVENT_KINDS),
        filters=tuple(r.strip() for r in filters),
        nic=f.choice("nic", "pvnet", NIC_KINDS),
        gso=f.boolean("gso", True),
        poll_us=None if f.get("poll_us", None) is None
        else f.integer("poll_us", lo=0, hi=1_000_000),
        rate=_rate(f),
        queues=_queues(f),
    )


def _queues(f: Fields) -> int:
    n = f.integer("queues", 1, lo=1, hi=MAX_QUEUES)
    if n > 1 and f.data.get("event") == "doorbell":
        f.fail("event: doorbell serves one queue (one doorbell vector)", "queues")
    if n > 1 and f.data.get("grants") == "staging":
        f.fail("grants: staging serves one queue (its pools name one queue's pages)", "queues")
    return n


def _rate(f: Fields) -> tuple[int, int] | None:
    try:
        return None if (text := f.get("rate", None)) is None else parse_rate(str(text))
    except ValueError as exc:
        f.fail(f"{exc} (got {show(text)})", "rate")


def parse(data: Any, source: str = "<topology>", state_dir: str | Path | None = None) -> Topology:
    """Validate an already-decoded YAML document. `state_dir` overrides the file's (tests)."""
    top = Fields(source, "", data, _TOP_KEYS)
    bridge = top.string("bridge", "pvbr0", pattern=_IFNAME_RE, maxlen=IFNAMSIZ,
                        what="invalid interface name")
    host_ns = top.get("host_netns", "pvhost")
    if host_ns is not None:
        host_ns = top.string("host_netns", "pvhost", pattern=_NAME_RE,
                             what=_NAME_WHAT + " (or null for the root namespace)")
    sd = top.get("state_dir", str(DEFAULT_STATE_DIR))
    if not isinstance(sd, str) or not sd.startswith("/"):
        top.fail(f"must be an absolute path (got {show(sd)})", "state_dir")
    ipv6 = top.boolean("ipv6", False)
    wire = _parse_wire(source, top.get("wire", required=True), bridge)
    raw_guests = top.get("guests", required=True)
    if not isinstance(raw_guests, list) or not raw_guests:
        top.fail(f"must be a non-empty list of guests (got {show(raw_guests)})", "guests")
    guests = tuple(_parse_guest(source, i, g) for i, g in enumerate(raw_guests))
    _check_unique(source, bridge, host_ns, wire, guests)
    return Topology(bridge=bridge, wire=wire, guests=guests, host_netns=host_ns,
                    state_dir=Path(state_dir) if state_dir is not None else Path(sd),
                    ipv6=ipv6, source=source)


def _check_unique(src: str, bridge: str, host_ns: str | None, wire: Wire,
                  guests: tuple[Guest, ...]) -> None:
    """Cross-field checks: one subnet, nothing shared, no name used twice for two things."""

    def fail(field: str, msg: str) -> None:
        raise TopologyError(f"{src}: {field}: {msg}")

    namespaces = {wire.netns: "wire.netns"}
    if host_ns is not None:
        if host_ns == wire.netns:
            fail("wire.netns", f"same namespace as host_netns ({host_ns!r})")
        namespaces[host_ns] = "host_netns"
    if wire.host_if == bridge:
        fail("wire.host_if", f"same name as the bridge ({bridge!r})")
    firsts: dict[str, dict[Any, str]] = {"name": {}, "domid": {}, "mac": {},
                                         "ip": {str(wire.ip.ip): "wire.ip"}}
    for i, g in enumerate(guests):
        here = f"guests[{i}]"
        if g.ip.network != wire.ip.network:
            fail(f"{here}.ip", f"{g.ip} is not in the wire subnet {wire.ip.network}")
        if g.name in namespaces:
            fail(f"{here}.name", f"{g.name!r} is already used by {namespaces[g.name]}")
        if g.vif == bridge or g.vif == wire.host_if:
            fail(f"{here}.domid", f"vif name {g.vif!r} collides with another interface")
        for key, value in (("name", g.name), ("domid", g.domid), ("mac", g.mac),
                           ("ip", str(g.ip.ip))):
            seen = firsts[key]
            if value in seen:
                fail(f"{here}.{key}", f"duplicate {key} {value!r} (also {seen[value]})")
            seen[value] = f"{here}.{key}"


def loads(text: str, source: str = "<topology>", state_dir: str | Path | None = None) -> Topology:
    """Parse YAML text; YAML syntax errors are reported as TopologyError too."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise TopologyError(f"{source}: {where}: {problem}") from None
    return parse(data, source, state_dir)


def load(path: str | Path | None = None, state_dir: str | Path | None = None) -> Topology:
    """Load a topology file (default: the shipped default.yaml)."""
    p = Path(path) if path is not None else DEFAULT_TOPOLOGY
    try:
        text = p.read_text()
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read: {exc.strerror}") from None
    return loads(text, str(p), state_dir)
