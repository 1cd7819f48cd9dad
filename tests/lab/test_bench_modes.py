"""The bench's modes come from the mechanism registry: every default mode parses to the
mechanisms and options its name says, names round-trip, the cross product covers every
registered pair, and a bad name says what a good one looks like."""

import pytest

from shared.lab.bench.modes import (
    cross_product,
    help_text,
    name_of,
    netns_defaults,
    parse,
    qemu_defaults,
    select,
)
from shared.lab.bench.options import HELP
from shared.protocol.mechanisms import default, names


def test_every_mechanism_runs_by_default_and_the_old_names_mean_what_they_meant():
    defaults = netns_defaults()
    assert set(names("tx")) <= set(defaults)
    assert all(name_of(default("tx"), r) in defaults for r in names("rx"))
    old = {"lazy": ("lazy", True, False, None), "lazy-noslots": ("lazy", False, False, None),
           "map-persistent": ("map", True, True, None),
           "lazy+capture-s128": ("lazy", True, False, 128),
           "lazy+capture": ("lazy", True, False, 0)}
    for name, (tx, slots, persistent, capture) in old.items():
        m = parse(name)
        assert (m.tx, m.rx, m.header_slots, m.persistent, m.capture) == (
            tx, default("rx"), slots, persistent, capture)
    assert parse("lazy-doorbell").guest_keys() == {"tx_mode": "lazy", "event": "doorbell"}
    assert qemu_defaults() == ["lazy"]  # each boot is dear: the rest on request
    assert parse("lazy-poll").guest_keys() == {"tx_mode": "lazy", "poll_us": 1000}


def test_names_round_trip_and_the_cross_product_has_every_pair():
    every = cross_product() + cross_product(qemu=True)
    for name in every:
        m = parse(name)
        assert name_of(m.tx, m.rx, noslots=not m.header_slots, persistent=m.persistent,
                       poll=m.poll, doorbell=m.doorbell, capture=m.capture) == name
    pairs = {(parse(n).tx, parse(n).rx) for n in cross_product()}
    assert pairs == {(t, r) for t in names("tx") for r in names("rx")}


def test_the_queues_dimension_is_a_mode_option_that_reaches_the_topology():
    one, two = parse("lazy"), parse("lazy-q2")
    assert (one.queues, two.queues, two.tx, two.rx) == (1, 2, "lazy", default("rx"))
    assert "queues" not in one.guest_keys() and two.guest_keys()["queues"] == 2
    assert name_of("lazy", "map", persistent=True, queues=2) == "lazy-persistent-q2+rx-map"
    assert parse("lazy-persistent-q2+rx-map").queues == 2
    for bad in ("lazy-q0", "lazy-q9", "lazy-q2-persistent"):
        with pytest.raises(ValueError, match=r"\[-q<N>\]"):
            parse(bad)


def test_a_placement_runs_what_it_can_and_a_typo_fails():
    assert [m.name for m in select(("lazy", "lazy-doorbell", "lazy-poll", "lazy+capture"))] == [
        "lazy", "lazy-poll", "lazy+capture"]
    assert [m.name for m in select(("lazy", "lazy-poll", "lazy+capture"), qemu=True)] == [
        "lazy", "lazy-poll"]
    with pytest.raises(ValueError, match="tx one of lazy, map, copy, linux"):
        select(("lazzy",))
    with pytest.raises(ValueError, match="rx one of copy, map"):
        parse("lazy+rx-flip")


def test_the_help_texts_are_built_from_the_registry():
    assert HELP["modes"] == help_text()
    for name in (*names("tx"), *names("rx"), *netns_defaults()):
        assert name in HELP["modes"]


def test_a_rate_mode_limits_the_guest_and_the_report_checks_it_within_5_percent():
    from shared.lab.bench import report
    from shared.lab.bench.record import Record

    m = parse("map-persistent+rate-100mbit+capture-s64")
    assert (m.tx, m.persistent, m.rate_mbit, m.capture) == ("map", True, 100, 64)
    assert m.guest_keys()["rate"] == "100Mb/s"
    assert name_of("map", persistent=True, rate_mbit=100, capture=64) == m.name
    recs = [Record("pvnet-netns", "lazy+rate-100mbit", "tcp", "tx", gbps=0.0981),
            Record("pvnet-netns", "lazy+rate-50mbit", "tcp", "tx", gbps=0.056)]
    got = {t.text: t.met for t in report.rate_targets(recs)}
    assert got == {"pvnet-netns lazy+rate-100mbit: TCP tx within 5 % of 100 Mbit/s": True,
                   "pvnet-netns lazy+rate-50mbit: TCP tx within 5 % of 50 Mbit/s": False}


def test_the_default_run_measures_each_mode_where_it_differs_within_30_minutes():
    import io

    from shared.lab.bench import plan
    from shared.lab.bench.paths import PathContext
    from shared.lab.bench.registry import build_paths
    from shared.lab.bench.runner import Bench, BenchConfig

    paths = build_paths(list(plan.DEFAULT_PATHS), PathContext())
    bench = Bench(BenchConfig(), paths, io.StringIO())
    assert bench.estimate_s() < 30 * 60
    todo = {(p.path, p.mode): [w.name for w in bench.todo[id(p)]] for p in paths}
    assert todo[("veth", "-")] == todo[("pvnet-netns", "lazy")] == list(plan.ALL)
    assert todo[("tap-relay", "-")] == list(plan.ALL)  # the floor beside every workload
    for tx in names("tx")[1:]:
        assert "tcp-nogso" in todo[("pvnet-netns", tx)]
    assert todo[("pvnet-netns", "lazy-noslots")] == ["pps64"]
    assert ("pvnet-qemu", "lazy") in todo and ("pvnet-qemu-g2g", "lazy") not in todo
    asked = Bench(BenchConfig(workloads=["tcp"]), paths, io.StringIO())
    assert all([w.name for w in ws] == ["tcp"] for ws in asked.todo.values())
