"""`invoke bench`, QEMU placement (fast tier, fake records): guest <-> guest paths divide by
their own kind (virtio-net-g2g), issue 13's targets name the figure they judge, and every
QEMU mode and the two-guest topologies are valid labs whose netfront gets the mode's knobs."""

from __future__ import annotations

import pytest

from shared.lab.bench import report
from shared.lab.bench.modes import parse, qemu_defaults
from shared.lab.bench.paths import PathContext
from shared.lab.bench.qemu import topology_yaml
from shared.lab.bench.record import Record, add_ratios
from shared.lab.bench.registry import build_paths
from shared.lab.commands import GUEST_MIN_TSO_SEGS, frontend_argv, guest_spec
from shared.lab.topology import loads


def rec(path: str, mode: str, workload: str, direction: str, **kw: object) -> Record:
    return Record(path, mode, workload, direction, reps=1, **kw)  # type: ignore[arg-type]


def guest_records() -> list[Record]:
    return [
        rec("virtio-net", "-", "tcp", "tx", gbps=2.0),
        rec("virtio-net", "-", "tcp", "rx", gbps=4.0),
        rec("virtio-net", "-", "rr", "both", tps=2000.0, p50_us=500.0),
        rec("virtio-net", "-", "udp64", "tx", fps=10e3),
        rec("pvnet-qemu", "lazy", "tcp", "tx", gbps=1.4),
        rec("pvnet-qemu", "lazy", "tcp", "rx", gbps=1.0),
        rec("pvnet-qemu", "lazy", "rr", "both", tps=500.0, p50_us=1600.0),
        rec("pvnet-qemu", "lazy", "udp64", "tx", fps=4e3),
        rec("virtio-net-g2g", "-", "tcp", "tx", gbps=1.0),
        rec("pvnet-qemu-g2g", "lazy", "tcp", "tx", gbps=0.6),
        rec("pvnet-qemu-g2g", "lazy", "tcp", "rx", gbps=0.3),
    ]


def test_guest_to_guest_rows_divide_by_virtio_net_g2g_not_by_the_wire_path():
    by = {r.key: r for r in add_ratios(guest_records())}
    assert by[("pvnet-qemu-g2g", "lazy", "tcp", "tx")].vs_virtio == pytest.approx(0.6)
    assert by[("pvnet-qemu-g2g", "lazy", "tcp", "rx")].vs_virtio is None  # no g2g rx baseline
    assert by[("pvnet-qemu", "lazy", "tcp", "tx")].vs_virtio == pytest.approx(0.7)
    assert by[("virtio-net-g2g", "-", "tcp", "tx")].vs_virtio == 1.0
    assert by[("virtio-net-g2g", "-", "tcp", "tx")].vs_veth is None


def test_issue_13_targets_judge_tcp_rr_g2g_and_report_udp():
    res = {t.text: t for t in report.targets(add_ratios(guest_records()))}
    assert res["pvnet-qemu lazy TCP guest->wire >= 0.6x virtio-net"].met is True  # 0.70
    assert res["pvnet-qemu lazy TCP wire->guest >= 0.5x virtio-net"].met is False  # 0.25
    rr = res["pvnet-qemu lazy rr p50 <= 3x virtio-net's"]
    assert rr.met is False and rr.value.startswith("3.2x")
    assert res["pvnet-qemu-g2g lazy TCP guest->guest (tx) >= 0.5x virtio-net-g2g"].met is True
    assert res["pvnet-qemu-g2g lazy TCP guest->guest (rx) >= 0.5x virtio-net-g2g"].met is None
    udp = res["pvnet-qemu lazy UDP 64 B tx frames/s vs virtio-net (reported)"]
    assert udp.value == "0.40x" and udp.met is None and udp.line().endswith("-- reported")
    udp_rx = res["pvnet-qemu lazy UDP 64 B rx frames/s vs virtio-net (reported)"]
    assert udp_rx.value == "n/a" and udp_rx.line().endswith("-- not measured")


def test_every_qemu_mode_and_the_two_guest_topology_make_valid_labs():
    ctx = PathContext(prefix="pvbq", subnet="10.98.0")
    for keys in (parse(m).guest_keys() for m in qemu_defaults()):
        for guests in (1, 2):
            topo = loads(topology_yaml(ctx, "pvnet", keys, True, guests),
                         state_dir="/tmp/pvbq-state")
            assert len(topo.guests) == guests
            assert len({(g.name, g.mac, str(g.ip), g.domid) for g in topo.guests}) == guests
            argv = frontend_argv(topo.guests[0])
            if "poll_us" in keys:
                assert argv[argv.index("--poll-us") + 1] == str(keys["poll_us"])
            else:
                assert "--poll-us" not in argv
    names = [(p.path, p.mode) for p in build_paths(
        ["pvnet-qemu-g2g", "virtio-net-g2g"], PathContext(modes=("lazy",)))]
    assert names == [("virtio-net-g2g", "-"), ("pvnet-qemu-g2g", "lazy")]


def test_every_guest_gets_the_same_stack_tuning_whatever_its_nic():
    """The comparison stays fair: virtio-net and pvnet guests get the same TSO tuning (a
    sysctl their init writes, not a run command whose exit would read as a failure); only
    pvnet guests start a netfront."""
    ctx = PathContext(prefix="pvbq", subnet="10.98.0")
    specs = {nic: guest_spec(loads(topology_yaml(ctx, nic, {}, True),
                                   state_dir="/tmp/pvbq-state").guests[0])
             for nic in ("pvnet", "virtio-net")}
    for nic, spec in specs.items():
        assert spec.sysctls == {"net.ipv4.tcp_min_tso_segs": str(GUEST_MIN_TSO_SEGS)}, nic
        assert spec.run[-1] == ("iperf3", "-s")
    assert any("frontend" in argv for argv in specs["pvnet"].run)
    assert not any("frontend" in argv for argv in specs["virtio-net"].run)
