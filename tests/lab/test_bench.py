"""`invoke bench`: the record/report logic on fake data (fast), a tiny real bench (full).

The fast tier covers what decides the numbers a reader sees -- medians, ratios, targets, the
per-packet arithmetic, parsing of iperf3/rr output -- and that the runner tears a path down on
failure and on Ctrl-C, using fake paths. The full tier runs veth and pvnet lazy for a couple of
seconds and checks the JSON is complete and plausible; it never asserts on speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.lab.bench import placement, report, runner
from shared.lab.bench import record as rec_mod
from shared.lab.bench.measure import ProcSample, Sample, derive, op_us
from shared.lab.bench.modes import netns_defaults, parse
from shared.lab.bench.paths import CmdResult, Endpoints, PathContext
from shared.lab.bench.pvnet_netns import no_gso_commands, topology_yaml
from shared.lab.bench.record import Record, add_ratios, combine, median_of
from shared.lab.bench.registry import REGISTRY, build_paths
from shared.lab.bench.rr import percentile, summarize
from shared.lab.bench.workloads import RunResult, Workload, parse_iperf, parse_rr
from shared.lab.topology import loads
from tests.lab.labs import tiny_bench

REQUIRED = ("path", "mode", "workload", "direction", "gbps", "fps", "p50_us", "p99_us",
            "vs_veth", "vs_virtio", "cpu_front_s_per_gb", "cpu_back_s_per_gb", "notify_per_pkt",
            "maps_per_pkt", "copy_bytes_per_pkt", "rss_front_mb", "rss_back_mb",
            "offered_fps", "frame_bytes", "cpu_front_us_per_frame", "cpu_back_us_per_frame",
            "cpu_machine_us_per_frame", "cpu_ours_us_per_frame", "cpu_gen_us_per_frame",
            "stages", "stage_samples", "load1", "busy_pct", "outside_pct", "kthreads_pct",
            "cpus", "ci95")


def rec(path: str, mode: str, workload: str, direction: str, **kw: object) -> Record:
    return Record(path, mode, workload, direction, reps=1, **kw)  # type: ignore[arg-type]


def fake_records() -> list[Record]:
    return [
        rec("veth", "-", "tcp", "tx", gbps=20.0, fps=50e3),
        rec("veth", "-", "tcp", "rx", gbps=10.0),
        rec("veth", "-", "udp64", "tx", gbps=0.3, fps=500e3, loss_pct=2.0),
        rec("veth", "-", "rr", "both", tps=50e3, p50_us=15.0, p99_us=25.0),
        rec("pvnet-netns", "lazy", "tcp", "tx", gbps=13.0, cpu_front_s_per_gb=0.5,
            notify_per_pkt=0.2, maps_per_pkt=0.0, copy_bytes_per_pkt=128, rss_front_mb=36),
        rec("pvnet-netns", "lazy", "tcp", "rx", gbps=5.0),
        rec("pvnet-netns", "map", "tcp", "tx", gbps=9.0),
        rec("pvnet-netns", "copy", "tcp", "tx", gbps=12.5),
        rec("pvnet-netns", "lazy", "udp64", "tx", gbps=0.05, fps=120e3),
        rec("pvnet-netns", "lazy", "udp64", "rx", gbps=0.04, fps=80e3),
        rec("pvnet-netns", "lazy", "rr", "both", tps=10e3, p50_us=100.0, p99_us=200.0),
    ]


# -- records: medians and ratios ---------------------------------------------------------------


def test_ratios_divide_the_workloads_primary_figure_by_the_same_veth_row():
    rs = add_ratios(fake_records())
    by = {r.key: r for r in rs}
    assert by[("veth", "-", "tcp", "tx")].vs_veth == 1.0
    assert by[("pvnet-netns", "lazy", "tcp", "tx")].vs_veth == pytest.approx(0.65)
    assert by[("pvnet-netns", "lazy", "tcp", "rx")].vs_veth == pytest.approx(0.5)
    assert by[("pvnet-netns", "lazy", "udp64", "tx")].vs_veth == pytest.approx(0.24)  # on fps
    assert by[("pvnet-netns", "lazy", "rr", "both")].vs_veth == pytest.approx(0.2)  # on tps
    assert by[("pvnet-netns", "lazy", "udp64", "rx")].vs_veth is None  # no veth udp64 rx row
    assert all(r.vs_virtio is None for r in rs)  # no virtio-net path yet


def test_vs_virtio_appears_once_a_virtio_net_record_exists():
    rs = fake_records() + [rec("virtio-net", "-", "tcp", "tx", gbps=2.0)]
    by = {r.key: r for r in add_ratios(rs)}
    assert by[("pvnet-netns", "lazy", "tcp", "tx")].vs_virtio == pytest.approx(6.5)
    assert by[("virtio-net", "-", "tcp", "tx")].vs_veth == pytest.approx(0.1)


def test_a_failed_veth_row_gives_no_ratio_instead_of_a_wrong_one():
    rs = [rec("veth", "-", "tcp", "tx", error="iperf3: boom"),
          rec("pvnet-netns", "lazy", "tcp", "tx", gbps=3.0)]
    assert add_ratios(rs)[1].vs_veth is None


def test_median_keeps_the_whole_middle_repetition_and_its_spread():
    reps = [rec("veth", "-", "tcp", "tx", gbps=g, cpu_back_pct=g * 10) for g in (3.0, 1.0, 2.0)]
    m = median_of(reps)
    assert (m.gbps, m.cpu_back_pct, m.reps) == (2.0, 20.0, 3)
    assert m.spread_pct == pytest.approx(100.0)  # (3 - 1) / 2


def test_median_ignores_failed_repetitions_unless_all_failed():
    ok = rec("veth", "-", "tcp", "tx", gbps=5.0)
    bad = rec("veth", "-", "tcp", "tx", error="x")
    assert median_of([bad, ok, bad]).gbps == 5.0
    only_bad = median_of([bad, bad])
    assert only_bad.error == "x" and only_bad.reps == 0


def test_combine_groups_by_key_in_first_seen_order():
    raw = [rec("veth", "-", "tcp", "tx", gbps=1.0), rec("veth", "-", "tcp", "rx", gbps=4.0),
           rec("veth", "-", "tcp", "tx", gbps=3.0)]
    out = combine(raw)
    assert [(r.direction, r.gbps, r.reps) for r in out] == [("tx", 1.0, 2), ("rx", 4.0, 1)]


def test_json_round_trip_has_every_required_field(tmp_path: Path):
    path = tmp_path / "out.json"
    report.write_json(add_ratios(fake_records()), path)
    data = json.loads(path.read_text())
    assert isinstance(data, list) and len(data) == len(fake_records())
    for item in data:
        assert set(REQUIRED) <= set(item)
    assert report.read_json(path)[4].gbps == 13.0


# -- report: table and targets ---------------------------------------------------------------


def test_table_has_one_row_per_record_and_says_why_a_row_failed():
    rs = add_ratios(fake_records()) + [rec("veth", "-", "tcp-nogso", "tx", error="a|b")]
    lines = report.markdown_table(rs).splitlines()
    assert len(lines) == 2 + len(rs)
    assert lines[0].startswith("| path | mode | workload | dir | Gbit/s")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    lazy = next(line for line in lines if "| lazy | tcp | tx |" in line)
    assert "| 13.000 |" in lazy and "| 0.65 |" in lazy
    assert "error: a/b" in lines[-1]


def test_targets_report_met_not_met_and_not_measured():
    res = {t.text: t for t in report.targets(add_ratios(fake_records()))}
    assert res["pvnet-netns lazy TCP tx >= 0.6x veth"].met is True
    assert res["pvnet-netns lazy TCP rx >= 0.6x veth"].met is False
    by_prefix = {k.split(",")[0]: v for k, v in res.items()}
    assert by_prefix["pvnet-netns lazy >= 1.5x map"].met is False  # 13 / 9
    assert by_prefix["pvnet-netns lazy >= 1.1x copy"].met is False  # 13 / 12.5
    assert res["pvnet-netns lazy UDP 64 B tx >= 100k frames/s delivered"].met is True
    assert res["pvnet-netns lazy UDP 64 B rx >= 100k frames/s delivered"].met is False
    none = report.targets([])
    assert none and all(t.met is None for t in none)
    assert "NOT met" in report.targets_text(add_ratios(fake_records()))


def test_plot_writes_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    out = report.plot(add_ratios(fake_records()), tmp_path / "b.png")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"


# -- measure: per-run arithmetic -------------------------------------------------------------


def rings(tx_pk: int, rx_pk: int, notify: int, maps: int, copied: int) -> dict:
    return {"tx": {"tx_packets": tx_pk, "notify_sent": notify, "grant_maps": maps,
                   "grant_copies": 0, "copy_bytes": copied},
            "rx": {"rx_packets": rx_pk, "notify_sent": notify, "grant_maps": 0,
                   "grant_copies": 0, "copy_bytes": 0}}


def test_derive_turns_two_samples_into_per_packet_and_per_gb_figures():
    before = Sample(t=0.0, frames={"tx": 0, "rx": 0},
                    procs={"front": ProcSample(1.0, 100), "back": ProcSample(2.0, 100)},
                    rings={"front": rings(0, 0, 0, 0, 0), "back": rings(0, 0, 0, 0, 0)})
    after = Sample(t=2.0, frames={"tx": 1000, "rx": 400},
                   procs={"front": ProcSample(1.5, 2048), "back": ProcSample(3.0, 4096)},
                   rings={"front": rings(1000, 400, 100, 0, 0),
                          "back": rings(1000, 400, 50, 250, 128_000)})
    out = derive(before, after, "tx", payload_bytes=2e9, seconds=2.0)
    assert out["fps"] == 500.0
    assert out["cpu_front_s_per_gb"] == 0.25 and out["cpu_back_s_per_gb"] == 0.5
    assert out["cpu_front_pct"] == 25.0 and out["cpu_back_pct"] == 50.0
    assert out["notify_per_pkt"] == pytest.approx(0.3)  # (100+100+50+50) / 1000
    assert out["maps_per_pkt"] == 0.25 and out["copy_bytes_per_pkt"] == 128.0
    assert out["rss_front_mb"] == 2.0 and out["rss_back_mb"] == 4.0


def test_op_us_is_mean_microseconds_per_operation_and_null_where_none_happened():
    def ends(maps: int, ns: int) -> dict:
        ring = {"grant_maps": maps, "map_ns": ns, "grant_unmaps": maps, "unmap_ns": ns // 2,
                "faults": 0, "fault_ns": 0, "grant_copy_bytes": 4096 * maps,
                "grant_copy_ns": ns // 4, "notify_sent": maps, "notify_ns": ns}
        return {"front": {"tx": dict(ring, grant_maps=0, map_ns=0, grant_unmaps=0, unmap_ns=0,
                                     grant_copy_bytes=0, grant_copy_ns=0), "rx": {}},
                "back": {"tx": ring, "rx": {}}}
    before = Sample(t=0.0, rings=ends(0, 0))
    after = Sample(t=1.0, rings=ends(100, 400_000))
    ops = op_us(before, after)
    assert ops == {"map": 4.0, "unmap": 2.0, "fault": None, "grant_copy_kb": 0.25,
                   "notify": 4.0}  # notify: 800 µs over 200 kicks from both ends
    r = Record("pvnet-netns", "map", "tcp", "tx", gbps=1.0, op_us=ops)
    assert "4.00 / 2.00 / - / 0.25 / 4.00" in report.markdown_table([r])
    assert Record.from_dict(json.loads(json.dumps(r.as_dict()))).op_us == ops


def test_derive_without_processes_or_rings_leaves_those_fields_null():
    before = Sample(t=0.0, frames={"tx": 0, "rx": 0})
    after = Sample(t=1.0, frames={"tx": 10, "rx": 30})
    out = derive(before, after, "both", payload_bytes=100, seconds=1.0)
    assert out["fps"] == 40.0
    assert out["cpu_back_s_per_gb"] is None and out["rss_front_mb"] is None
    assert "notify_per_pkt" not in out


# -- parsing and the rr tool -------------------------------------------------------------------


def test_parse_iperf_udp_counts_delivered_datagrams():
    text = json.dumps({"end": {"sum_received": {"seconds": 2.0, "bytes": 6400,
                                                "bits_per_second": 25600.0, "packets": 150,
                                                "lost_packets": 50, "lost_percent": 33.3}}})
    r = parse_iperf(text, udp=True)
    assert (r.fps, r.loss_pct, r.payload_bytes) == (50.0, 33.3, 6400.0)
    assert parse_iperf('{"error": "busy"}', udp=False).error == "iperf3: busy"
    assert parse_iperf("", udp=False).error


def test_parse_rr_reads_the_clients_line_and_its_errors():
    r = parse_rr('{"count": 10, "elapsed_s": 1.0, "tps": 10.0, "p50_us": 5.0, "p99_us": 9.0}\n')
    assert (r.tps, r.p50_us, r.p99_us, r.error) == (10.0, 5.0, 9.0, None)
    assert "refused" in (parse_rr('{"error": "refused"}').error or "")
    assert parse_rr("", "Traceback\nOSError: x").error == "rr.py: OSError: x"


def test_rr_percentiles_are_nearest_rank():
    vals = list(range(1, 101))
    assert percentile(vals, 50) == 50 and percentile(vals, 99) == 99
    assert percentile([7], 99) == 7
    s = summarize([3000, 1000, 2000], 0.5)
    assert (s["count"], s["p50_us"], s["tps"]) == (3, 2.0, 6.0)


def test_rr_tool_runs_over_loopback():
    """The stdlib-only tool by path, as the workloads run it (no root, no namespace)."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = str(Path(runner.__file__).with_name("rr.py"))
    server = subprocess.Popen([sys.executable, script, "server", "--bind", "127.0.0.1",
                               "--port", str(port), "--seconds", "10"], stdout=subprocess.PIPE)
    try:
        out = subprocess.run([sys.executable, script, "client", "127.0.0.1", "--port",
                              str(port), "--seconds", "0.3", "--warmup", "10"],
                             capture_output=True, text=True, timeout=20).stdout
    finally:
        server.kill()
        server.wait()
    res = parse_rr(out)
    assert res.error is None and res.p99_us >= res.p50_us > 0 and res.tps > 0


# -- paths and the runner, with fakes --------------------------------------------------------


def test_every_pvnet_mode_makes_a_valid_topology_and_no_gso_reaches_the_frontend():
    ctx = PathContext(prefix="pvbx", subnet="10.99.0")
    for mode in [*netns_defaults(), "map-persistent+rate-100mbit"]:
        topo = loads(topology_yaml(ctx, mode), state_dir="/tmp/pvbx-state")
        g, m = topo.guests[0], parse(mode)
        assert (g.tx_mode, g.rx_mode, g.header_slots, g.persistent) == (
            m.tx, m.rx, m.header_slots, m.persistent)
        assert g.rate == (None if m.rate_mbit is None else (625_000, 50_000))
        assert topo.namespaces == ("pvbx-host", "pvbx-wire", "pvbx-g1")
        back, front = no_gso_commands(topo, g)
        assert front[-1] == "--no-gso" and "--no-gso" not in back


def test_registry_builds_veth_first_and_rejects_unknown_paths():
    ctx = PathContext(modes=("lazy", "copy"))
    paths = build_paths(["pvnet-netns", "veth"], ctx)
    assert [(p.path, p.mode) for p in paths] == [
        ("veth", "-"), ("pvnet-netns", "lazy"), ("pvnet-netns", "copy")]
    with pytest.raises(ValueError, match="unknown path"):
        build_paths(["nope"], ctx)
    assert {"veth", "pvnet-netns"} <= set(REGISTRY)


@dataclass
class FakeEnd:
    ip: str = "10.0.0.1"
    python: str = "python3"

    def run(self, argv, timeout):
        return CmdResult(0, "", "")

    def start(self, argv):
        return lambda: None


@dataclass
class FakePath:
    path: str = "veth"
    mode: str = "-"
    note: str = ""
    fail_setup: bool = False
    calls: list[str] = field(default_factory=list)
    n: int = 0

    def setup(self, gso: bool) -> Endpoints:
        self.calls.append(f"setup {gso}")
        if self.fail_setup:
            raise RuntimeError("no bridge\nlog tail...")
        return Endpoints(FakeEnd(), FakeEnd())

    def sample(self) -> Sample:
        self.n += 100
        return Sample(frames={"tx": self.n, "rx": self.n})

    def teardown(self) -> None:
        self.calls.append("teardown")


def fake_workloads(monkeypatch, run) -> None:
    wl = {"tcp": Workload("tcp", True, ("tx", "rx"), "gbps", run, "fake"),
          "tcp-nogso": Workload("tcp-nogso", False, ("tx",), "gbps", run, "fake")}
    monkeypatch.setattr(runner, "WORKLOADS", wl)


def test_runner_sets_up_each_session_once_and_always_tears_down(monkeypatch, tmp_path):
    fake_workloads(monkeypatch, lambda ends, d, s: RunResult(seconds=s, payload_bytes=1e9,
                                                             gbps=8.0))
    good, broken = FakePath(), FakePath(path="pvnet-netns", mode="lazy", fail_setup=True)
    cfg = runner.BenchConfig(seconds=1, rounds=2, workloads=["tcp", "tcp-nogso"])
    with open(tmp_path / "log", "w") as log:
        b = runner.Bench(cfg, [good, broken], log)
        records = b.run()
    assert good.calls == ["setup True", "teardown", "setup False", "teardown"] * 2
    assert broken.calls == good.calls
    assert b.progress.done == b.progress.total == 2 * 2 * 3
    by = {r.key: r for r in records}
    assert by[("veth", "-", "tcp", "tx")].reps == 2
    assert by[("veth", "-", "tcp", "tx")].fps == 100.0  # counter delta 100 over 1 s
    assert by[("pvnet-netns", "lazy", "tcp", "rx")].error.startswith("setup failed: no bridge")
    assert "log tail" in (tmp_path / "log").read_text()


def test_ctrl_c_mid_run_tears_down_and_keeps_what_was_measured(monkeypatch, tmp_path):
    def run(ends, d, s):
        if d == "rx":
            raise KeyboardInterrupt
        return RunResult(seconds=s, payload_bytes=1e9, gbps=8.0)

    fake_workloads(monkeypatch, run)
    p = FakePath()
    cfg = runner.BenchConfig(seconds=1, rounds=3, workloads=["tcp"])
    with open(tmp_path / "log", "w") as log:
        b = runner.Bench(cfg, [p], log)
        records = b.run()
    assert b.interrupted and p.calls == ["setup True", "teardown"]
    assert [(r.direction, r.gbps) for r in records] == [("tx", 8.0)]


def test_a_no_gso_run_with_big_frames_is_refused_and_says_why(monkeypatch, tmp_path):
    """5 Gbit/s over 10k frames/s is 62.5 KB per frame: GSO frames, not MTU ones. The run
    becomes an error naming the size; the same run at MTU-sized frames is reported."""
    fps = {"tx": 10e3, "rx": 450e3}  # 62500 and 1389 payload bytes per frame

    def run(ends, d, s):
        return RunResult(seconds=s, payload_bytes=1e9, gbps=5.0, fps=fps[d])

    monkeypatch.setattr(runner, "WORKLOADS", {
        "tcp-nogso": Workload("tcp-nogso", False, ("tx", "rx"), "gbps", run, "fake")})
    cfg = runner.BenchConfig(seconds=1, rounds=1, workloads=["tcp-nogso"], profile_hz=0)
    with open(tmp_path / "log", "w") as log:
        by = {r.direction: r for r in runner.Bench(cfg, [FakePath()], log).run()}
    assert by["tx"].error.startswith("refused: 62500 payload bytes per frame is above the 1500")
    assert by["rx"].error is None
    table = report.markdown_table([by["tx"], by["rx"]])
    assert "error: refused: 62500" in table and "| 5.000 |" in table.splitlines()[-1]
    assert report.find([by["tx"]], "veth", "-", "tcp-nogso", "tx") is None  # never a figure


def test_options_map_to_the_config():
    q = runner.config_from(quick=True, paths="veth, pvnet-netns", modes="lazy",
                           workloads="tcp,rr", json="/tmp/x.json")
    assert (q.seconds, q.rounds, q.paths, q.modes, q.workloads) == (
        2.0, 1, ["veth", "pvnet-netns"], ["lazy"], ["tcp", "rr"])
    assert q.json_out == Path("/tmp/x.json")
    full = runner.config_from(seconds="7")
    assert (full.seconds, full.rounds, full.workloads) == (7.0, 3, None)  # None: the plan


# -- full tier: a tiny real bench --------------------------------------------------------------


@pytest.mark.full
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iperf3") is None,
                    reason="the bench needs root and iperf3")
def test_tiny_bench_yields_complete_plausible_records(tmp_path: Path):
    data = tiny_bench(tmp_path, ["tcp", "rr"], "pvbt")
    keys = {(d["path"], d["mode"], d["workload"], d["direction"]) for d in data}
    assert keys == {(p, m, w, d) for p, m in (("veth", "-"), ("pvnet-netns", "lazy"))
                    for w, d in (("tcp", "tx"), ("tcp", "rx"), ("rr", "both"))}
    for d in data:
        assert set(REQUIRED) <= set(d) and d["error"] is None
        assert d["vs_virtio"] is None and d["vs_veth"] > 0 and d["fps"] > 0
        if d["path"] == "veth":
            assert d["vs_veth"] == 1.0 and d["cpu_back_s_per_gb"] is None
        if d["workload"] == "tcp":
            assert d["gbps"] > 0
        else:
            assert 0 < d["p50_us"] <= d["p99_us"]
    for d in data:
        if d["path"] != "pvnet-netns":
            continue
        assert d["rss_front_mb"] > 0 and d["rss_back_mb"] > 0
        assert d["notify_per_pkt"] > 0 and d["copy_bytes_per_pkt"] > 0
        assert d["maps_per_pkt"] is not None and d["maps_per_pkt"] >= 0
        if d["workload"] == "tcp":
            assert d["cpu_front_s_per_gb"] > 0 and d["cpu_back_s_per_gb"] > 0
        assert d["cpu_front_us_per_frame"] > 0 and d["cpu_back_us_per_frame"] > 0
        guest, host = placement.cpus()
        assert d["cpus"] == f"back {host}, front {guest}, client {guest}, server {host}"
        assert d["stage_samples"]["back"] > 0 and "ring" in d["stages"]["back"]
    assert (tmp_path / "res" / "results.json").exists()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pvbt-" not in left  # every namespace of the bench is gone


def test_capture_cost_is_reported_as_a_ratio_to_lazy_in_the_same_run():
    Record = rec_mod.Record
    recs = [Record("pvnet-netns", "lazy", "tcp", "tx", gbps=10.0),
            Record("pvnet-netns", "lazy+capture", "tcp", "tx", gbps=4.0),
            Record("pvnet-netns", "lazy+capture-s128", "tcp", "tx", gbps=8.0),
            Record("pvnet-netns", "lazy+capture", "udp64", "rx", fps=5.0)]  # no lazy udp64
    lines = report.capture_lines(recs)
    assert lines == ["Capture (same run):",
                     "- capture cost: lazy+capture tcp tx: 0.40x lazy without a capture",
                     "- capture cost: lazy+capture-s128 tcp tx: 0.80x lazy without a capture"]
    assert lines[1] in report.targets_text(recs)
