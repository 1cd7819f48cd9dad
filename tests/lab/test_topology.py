"""Topology parsing: the shipped default, derived names, and every error naming its field."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.lab.commands import backend_options, frontend_features
from shared.lab.topology import DEFAULT_TOPOLOGY, TopologyError, load, loads, parse
from shared.protocol.mechanisms import names


def base() -> dict[str, Any]:
    return {
        "bridge": "pvbr0",
        "wire": {"netns": "wire", "ip": "10.77.0.1/24", "iperf_server": True},
        "guests": [
            {"name": "g1", "domid": 1, "mac": "00:16:3e:00:00:01", "ip": "10.77.0.11/24"},
            {"name": "g2", "domid": 2, "mac": "00:16:3e:00:00:02", "ip": "10.77.0.12/24"},
        ],
    }


def test_default_topology() -> None:
    t = load()
    assert t.source == str(DEFAULT_TOPOLOGY)
    assert t.bridge == "pvbr0" and t.host_netns == "pvhost"
    assert t.wire.netns == "wire" and t.wire.ip == ipaddress.IPv4Interface("10.77.0.1/24")
    assert t.wire.iperf_server and t.wire.host_if == "pvbr0-wire" and t.wire.dev == "eth0"
    g1, g2 = t.guests
    assert (g1.name, g1.domid, g1.mac, str(g1.ip)) == ("g1", 1, "00:16:3e:00:00:01",
                                                       "10.77.0.11/24")
    assert (g2.name, g2.domid, str(g2.ip)) == ("g2", 2, "10.77.0.12/24")
    for g in t.guests:
        assert (g.memory, g.region_size, g.tx_mode) == (512, 8 << 20, "lazy")
        assert (g.header_slots, g.persistent, g.event, g.filters) == (True, False, "serial", ())
    assert t.namespaces == ("pvhost", "wire", "g1", "g2")


def test_derived_names() -> None:
    t = parse(base(), state_dir="/tmp/st")
    g = t.guests[0]
    assert g.vif == "vif1.0" and g.netns == "g1"
    assert t.event_socket(g) == Path("/tmp/st/vif1.0.ev")
    assert t.backend_ctl(g) == Path("/tmp/st/vif1.0.ctl")
    assert t.frontend_ctl(g) == Path("/tmp/st/g1.ctl")
    assert t.log_path("vif1.0") == Path("/tmp/st/log/vif1.0.log")
    assert t.state_file == Path("/tmp/st/state.json")
    assert t.guest("g2").domid == 2
    with pytest.raises(KeyError):
        t.guest("g9")


def test_defaults_when_keys_omitted() -> None:
    t = parse({"wire": {"ip": "10.1.0.1/24"},
               "guests": [{"name": "a", "domid": 7, "mac": "02:00:00:00:00:07",
                           "ip": "10.1.0.7/24"}]})
    assert t.bridge == "pvbr0" and t.host_netns == "pvhost" and t.wire.netns == "wire"
    assert t.state_dir == Path("/run/pvnet") and t.ipv6 is False
    assert t.guests[0].vif == "vif7.0"


def test_custom_knobs_and_root_namespace() -> None:
    d = base()
    d["host_netns"] = None
    d["guests"][0].update(memory=256, region_size="16M", tx_mode="copy", header_slots=False,
                          persistent=True, event="doorbell",
                          filters=["drop ip_proto=17", "drop payload=hex:deadbeef"])
    t = parse(d)
    g = t.guests[0]
    assert t.host_netns is None and t.namespaces == ("wire", "g1", "g2")
    assert (g.memory, g.region_size, g.tx_mode, g.header_slots, g.persistent, g.event) == (
        256, 16 << 20, "copy", False, True, "doorbell")
    assert g.filters == ("drop ip_proto=17", "drop payload=hex:deadbeef")


def test_queues_default_one_and_reach_both_ends_argv() -> None:
    d = base()
    assert {g.queues for g in parse(d).guests} == {1}
    d["guests"][0]["queues"] = 2
    t = parse(d)
    g1, g2 = t.guests
    assert (g1.queues, g2.queues) == (2, 1)
    back, front = backend_options(t, g1), frontend_features(g1)
    assert back[back.index("--queues") + 1] == "2" and front[front.index("--queues") + 1] == "2"
    assert "--queues" not in backend_options(t, g2) + frontend_features(g2)
    assert [p.name for p in t.queue_sockets(g1)] == [f"{g1.vif}.ev-q0", f"{g1.vif}.ev-q1"] \
        and t.queue_sockets(g2) == ()


def test_queues_refuse_the_one_vector_doorbell_and_staging() -> None:
    d = base()
    d["guests"][0].update(queues=2, event="doorbell")
    with pytest.raises(TopologyError, match=r"guests\[0\]\.queues: event: doorbell serves one"):
        parse(d)
    d["guests"][0].update(event="serial", grants="staging")
    with pytest.raises(TopologyError, match=r"guests\[0\]\.queues: grants: staging serves one"):
        parse(d)


def test_frozen() -> None:
    t = load()
    with pytest.raises(AttributeError):
        t.bridge = "x"  # type: ignore[misc]


def mutate(path: str, value: Any) -> dict[str, Any]:
    """Set (or with value=DELETE remove) a dotted path like 'guests.1.tx_mode' in base()."""
    d = base()
    *parents, last = path.split(".")
    node: Any = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return d


DELETE = object()

CASES = [
    ("guests.1.tx_mode", "mapp",
     f"guests[1].tx_mode: must be one of {', '.join(names('tx'))} (got 'mapp')"),
    ("guests.0.rx_mode", "grant", f"guests[0].rx_mode: must be one of {', '.join(names('rx'))} "
                                  "(got 'grant')"),
    ("guests.0.event", "irq", "guests[0].event: must be one of serial, doorbell (got 'irq')"),
    ("guests.0.grants", "pool", f"guests[0].grants: must be one of , {', '.join(names('grants'))} "
                                "(got 'pool')"),
    ("guests.0.recycle_pool", 0, "guests[0].recycle_pool:"),
    ("guests.0.tx_mod", "map", "guests[0]: unknown key 'tx_mod'; did you mean 'tx_mode'?"),
    ("guests.0.zzz", 1, "guests[0]: unknown key 'zzz' (known: name, domid"),
    ("wire.iperf", True, "wire: unknown key 'iperf'; did you mean 'iperf_server'?"),
    ("bridges", "x", "(top level): unknown key 'bridges'; did you mean 'bridge'?"),
    ("guests.0.name", DELETE, "guests[0].name: required"),
    ("guests.0.name", "G1", "guests[0].name: must be lowercase"),
    ("guests.0.name", "vif3", "guests[0].name: must not look like a backend vif name"),
    ("guests.0.name", "wire", "guests[0].name: 'wire' is already used by wire.netns"),
    ("guests.0.name", "pvhost", "guests[0].name: 'pvhost' is already used by host_netns"),
    ("guests.1.name", "g1", "guests[1].name: duplicate name 'g1' (also guests[0].name)"),
    ("guests.0.domid", 0, "guests[0].domid: must be an integer in 1..32751 (got 0)"),
    ("guests.0.domid", "1", "guests[0].domid: must be an integer in 1..32751 (got '1')"),
    ("guests.0.domid", True, "guests[0].domid: must be an integer"),
    ("guests.1.domid", 1, "guests[1].domid: duplicate domid 1 (also guests[0].domid)"),
    ("guests.0.mac", "00:16:3e:00:00", "guests[0].mac: must be a MAC address"),
    ("guests.0.mac", "01:16:3e:00:00:01", "guests[0].mac: must be a unicast MAC"),
    ("guests.0.mac", "00:00:00:00:00:00", "guests[0].mac: must not be all zeros"),
    ("guests.1.mac", "00:16:3E:00:00:01", "guests[1].mac: duplicate mac '00:16:3e:00:00:01'"),
    ("guests.0.mac", 12345, "guests[0].mac: YAML read this MAC as a base-60 number"),
    ("guests.0.ip", "10.77.0.11", "guests[0].ip: must be an IPv4 address with prefix"),
    ("guests.0.ip", "10.77.0.300/24", "guests[0].ip: invalid IPv4 address"),
    ("guests.0.ip", "10.77.0.255/24", "guests[0].ip: is the network or broadcast address"),
    ("guests.0.ip", "10.78.0.11/24", "guests[0].ip: 10.78.0.11/24 is not in the wire subnet"),
    ("guests.0.ip", "10.77.0.11/16", "guests[0].ip: 10.77.0.11/16 is not in the wire subnet"),
    ("guests.1.ip", "10.77.0.11/24", "guests[1].ip: duplicate ip '10.77.0.11'"),
    ("guests.0.ip", "10.77.0.1/24", "guests[0].ip: duplicate ip '10.77.0.1' (also wire.ip)"),
    ("guests.0.memory", 0, "guests[0].memory: must be an integer in 64.."),
    ("guests.0.region_size", "8X", "guests[0].region_size: expected a size like 8M"),
    ("guests.0.region_size", "4K", "guests[0].region_size: must be at least 1M"),
    ("guests.0.region_size", 1048577, "guests[0].region_size: must be at least 1M and a multiple"),
    ("guests.0.header_slots", "yes", "guests[0].header_slots: must be true or false (got 'yes')"),
    ("guests.0.persistent", 1, "guests[0].persistent: must be true or false (got 1)"),
    ("guests.0.filters", "drop ip_proto=17", "guests[0].filters: must be a list of rule strings"),
    ("guests.0.filters", ["drop ip_proto=17", "junk"], "guests[0].filters[1]: expected a rule"),
    ("guests.0.filters", ["drop bogus=1"], "guests[0].filters[0]: filter rule 'drop bogus=1'"),
    ("guests.0", "g1", "guests[0]: must be a mapping (got 'g1')"),
    ("guests", [], "guests: must be a non-empty list of guests"),
    ("guests", DELETE, "guests: required"),
    ("wire", DELETE, "wire: required"),
    ("wire.ip", DELETE, "wire.ip: required"),
    ("wire.ip", "10.77.0.0/24", "wire.ip: is the network or broadcast address"),
    ("wire.netns", "pvhost", "wire.netns: same namespace as host_netns"),
    ("wire.netns", "Wire!", "wire.netns: must be lowercase"),
    ("wire.host_if", "pvbr0", "wire.host_if: same name as the bridge"),
    ("wire.host_if", "a-very-long-interface", "wire.host_if: must be at most 15 characters"),
    ("wire.iperf_server", "on", "wire.iperf_server: must be true or false"),
    ("bridge", "br/0", "bridge: invalid interface name (got 'br/0')"),
    ("bridge", "vif1.0", "guests[0].domid: vif name 'vif1.0' collides"),
    ("bridge", "", "bridge: must be a non-empty string"),
    ("host_netns", "Host", "host_netns: must be lowercase"),
    ("state_dir", "run/pvnet", "state_dir: must be an absolute path"),
    ("ipv6", "no", "ipv6: must be true or false"),
    ("guests.0.queues", 0, "guests[0].queues: must be an integer in 1..8 (got 0)"),
    ("guests.1.queues", 9, "guests[1].queues: must be an integer in 1..8 (got 9)"),
    ("guests.0.queues", "2", "guests[0].queues: must be an integer in 1..8 (got '2')"),
    ("guests.0.queues", True, "guests[0].queues: must be an integer in 1..8 (got True)"),
]


@pytest.mark.parametrize(("path", "value", "message"), CASES, ids=[c[2][:40] for c in CASES])
def test_validation_error_names_field(path: str, value: Any, message: str) -> None:
    text = yaml.safe_dump(mutate(path, value))
    with pytest.raises(TopologyError) as info:
        loads(text, "topology.yaml")
    assert str(info.value).startswith(f"topology.yaml: {message}"), str(info.value)


def test_brief_example_message_exactly() -> None:
    d = base()
    d["guests"][1]["tx_mode"] = "mapp"
    with pytest.raises(TopologyError) as info:
        parse(d, "topology.yaml")
    assert str(info.value) == (
        f"topology.yaml: guests[1].tx_mode: must be one of {', '.join(names('tx'))} "
        "(got 'mapp')")


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(TopologyError, match=r"^t.yaml: \(top level\): must be a mapping"):
        loads("- a\n- b\n", "t.yaml")


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(TopologyError, match=r"^t.yaml: line \d+: "):
        loads("bridge: pvbr0\nwire: {ip: [\n", "t.yaml")


def test_duplicate_yaml_key_is_an_error() -> None:
    with pytest.raises(TopologyError, match=r"^t.yaml: line 2: duplicate key 'bridge'"):
        loads("bridge: a\nbridge: b\n", "t.yaml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load(tmp_path / "nope.yaml")


def test_ten_line_custom_topology(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text(
        "bridge: labbr\n"
        "wire: {ip: 192.168.50.1/24}\n"
        "guests:\n"
        "  - {name: web, domid: 5, mac: '02:00:00:00:00:05', ip: 192.168.50.5/24,\n"
        "     tx_mode: map, filters: ['drop dst_port=5999']}\n"
        "  - {name: db, domid: 6, mac: '02:00:00:00:00:06', ip: 192.168.50.6/24,\n"
        "     persistent: true, header_slots: false}\n"
    )
    t = load(f, state_dir=tmp_path / "state")
    assert [g.vif for g in t.guests] == ["vif5.0", "vif6.0"]
    assert t.wire.host_if == "labbr-wire"
    assert t.backend_ctl(t.guests[1]) == tmp_path / "state" / "vif6.0.ctl"
    assert t.source == str(f)


def test_base_fixture_is_valid() -> None:
    parse(copy.deepcopy(base()))


def test_rate_is_xls_vif_syntax_and_becomes_linuxs_rate_key():
    from shared.lab.commands import backend_options
    from shared.lab.units import parse_rate

    assert parse_rate("100Mb/s") == (625_000, 50_000)  # xl's default interval: 50 ms
    assert parse_rate("10MB/s@20ms") == (200_000, 20_000)
    d = base()
    d["guests"][0]["rate"] = "100Mb/s@10ms"
    t = parse(d, "t.yaml")
    assert t.guests[0].rate == (125_000, 10_000) and t.guests[1].rate is None
    argv = backend_options(t, t.guests[0])
    assert argv[argv.index("--rate") + 1] == "125000,10000"
    d["guests"][0]["rate"] = "fast"
    with pytest.raises(TopologyError, match=r"guests\[0\]\.rate: expected a rate like 100Mb/s"):
        parse(d, "t.yaml")


def test_grant_policy_keys_reach_netfronts_command_line():
    """`grants: recycle` with its pool, and `grants: staging`, become netfront's flags (the
    bench's -recycle<K> and -staging modes write these keys)."""
    from shared.lab.bench.modes import parse as mode
    from shared.lab.commands import frontend_features

    for name, want in (("lazy-recycle1", ["--grants", "recycle", "--recycle-pool", "1"]),
                       ("linux-staging", ["--grants", "staging", "--recycle-pool", "2"])):
        text = (f"wire: {{ip: 10.77.0.1/24}}\nguests:\n  - {{name: g1, domid: 1, "
                f"mac: '00:16:3e:00:00:01', ip: 10.77.0.11/24{mode(name).guest_yaml()}}}\n")
        g = loads(text, "t.yaml").guests[0]
        assert frontend_features(g) == want
