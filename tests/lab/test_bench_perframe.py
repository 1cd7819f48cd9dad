"""`invoke bench`, issue 20's measuring part: per-frame CPU, the machine, stages, intervals,
the packet-rate workloads (trafgen) and the refusal of no-GSO records with big frames.

Fast tier: the arithmetic and parsing on fixed inputs, the stage table against this
repository, py-spy and the core pinning on real processes of this machine. Full tier: pps64
and pps1496 through veth and pvnet-netns for real, with tcp-nogso (MTU frames both ways).
Figures are never asserted: the bench is where they live.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from shared.lab.bench import checks, hostcpu, perframe, placement, pps, report, runner, stages
from shared.lab.bench.interval import ci95, rounded, t975
from shared.lab.bench.measure import ProcSample, Sample, derive, read_proc
from shared.lab.bench.profiler import Profiler, py_spy
from shared.lab.bench.record import Record, add_ratios, median_of
from shared.lab.bench.workloads import WORKLOADS
from tests.lab.labs import tiny_bench

REPO = Path(__file__).resolve().parents[2]


def rec(path: str, mode: str, workload: str, direction: str, **kw: object) -> Record:
    return Record(path, mode, workload, direction, reps=1, **kw)  # type: ignore[arg-type]


# -- CPU per frame: each end and the whole machine ---------------------------------------------


def test_cpu_per_frame_divides_each_ends_cpu_by_the_runs_frames():
    before = Sample(t=0.0, frames={"tx": 0, "rx": 0},
                    procs={"front": ProcSample(1.0, 1, 10, wait_s=0.5),
                           "back": ProcSample(2.0, 1, 11)})
    after = Sample(t=2.0, frames={"tx": 40_000, "rx": 7},
                   procs={"front": ProcSample(1.4, 1, 10, wait_s=0.7),
                          "back": ProcSample(3.0, 1, 11, wait_s=0.1)})
    out = derive(before, after, "tx", payload_bytes=6e7, seconds=2.0)
    assert out["frames"] == 40_000
    assert (out["cpu_front_us_per_frame"], out["cpu_back_us_per_frame"]) == (10.0, 25.0)
    assert (out["wait_front_us_per_frame"], out["wait_back_us_per_frame"]) == (5.0, 2.5)
    # pps: the frames delivered at the receiver, not those the path counted, divide
    out = derive(before, after, "tx", payload_bytes=6e7, seconds=2.0, delivered=20_000)
    assert out["frames"] == 20_000 and out["cpu_back_us_per_frame"] == 50.0


STAT = """cpu  1000 50 400 8000 20 30 120 70 300 0
cpu0 500 25 200 4000 10 15 60 35 150 0
cpu1 500 25 200 4000 10 15 60 35 150 0
intr 12345
"""


def test_proc_stat_busy_is_user_nice_system_irq_softirq_and_guest_is_not_added_twice():
    busy, total, steal, ncpu = hostcpu.parse_stat(STAT)
    tick = hostcpu.CLK_TCK
    assert busy == pytest.approx((1000 + 50 + 400 + 30 + 120) / tick)  # guest 300 is in user
    assert total == pytest.approx((1000 + 50 + 400 + 8000 + 20 + 30 + 120 + 70) / tick)
    assert (steal, ncpu) == (pytest.approx(70 / tick), 2)


def test_machine_fields_take_the_samplers_cpu_out_and_split_ours_kernel_and_outside():
    s0 = hostcpu.MachineSample(t=0.0, busy_s=10.0, total_s=100.0, steal_s=1.0, ours_s=3.0,
                               kthreads_s=0.5, load1=1.5, ncpu=2)
    s1 = hostcpu.MachineSample(t=2.0, busy_s=13.0, total_s=104.0, steal_s=1.2, ours_s=5.2,
                               kthreads_s=0.7, load1=2.25, ncpu=2)
    out = hostcpu.derive(s0, s1, frames=10_000, profiler_s=0.2)
    assert out["cpu_machine_us_per_frame"] == 280.0  # (3.0 - 0.2) s over 10k frames
    assert out["busy_pct"] == 70.0  # 2.8 of 4 CPU-seconds
    assert out["kthreads_pct"] == 5.0 and out["outside_pct"] == 15.0  # 2.8 - 2.0 - 0.2
    assert out["cpu_ours_us_per_frame"] == 220.0  # (2.2 - 0.2 ours + 0.2 kthreads) / 10k
    assert (out["steal_pct"], out["load1"]) == (5.0, 2.25)
    assert hostcpu.derive(s0, s1, frames=None)["cpu_machine_us_per_frame"] is None


def test_our_process_tree_includes_reaped_children():
    ours0, _ = hostcpu.tree_cpu_s(os.getpid())
    subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)
    ours1, kernel = hostcpu.tree_cpu_s(os.getpid())
    assert ours1 - ours0 >= 0.02 and kernel >= 0  # the child's CPU, through cutime


# -- intervals over rounds ---------------------------------------------------------------------


def test_ci95_is_students_t_interval_of_the_mean():
    lo, hi = ci95([1.0, 2.0, 3.0])
    assert (lo, hi) == (pytest.approx(2 - 4.303 / 3 ** 0.5), pytest.approx(2 + 4.303 / 3 ** 0.5))
    assert ci95([5.0]) is None and t975(40) == 1.96
    assert rounded((1.234567, 2.0)) == [1.235, 2.0]


def test_median_record_carries_the_interval_of_each_figure_every_round_has():
    reps = [rec("pvnet-netns", "lazy", "pps64", "tx", fps=f, cpu_machine_us_per_frame=c)
            for f, c in ((10e3, 50.0), (12e3, 40.0), (11e3, None))]
    m = median_of(reps)
    assert m.fps == 11e3 and m.ci95 is not None
    lo, hi = m.ci95["fps"]
    assert lo < 11e3 < hi and "cpu_machine_us_per_frame" not in m.ci95  # one round lacks it
    wild = median_of([rec("veth", "-", "tcp", "tx", gbps=g) for g in (0.1, 9.0)])
    assert wild.ci95["gbps"][0] == 0.0  # a mean's interval below zero says only "noisy"
    assert median_of(reps[:1]).ci95 is None
    assert report.ci_text(m) == f"{lo / 1e3:.1f}-{hi / 1e3:.1f}k"


# -- the no-GSO refusal and the pps checks -----------------------------------------------------


def test_mtu_refusal_reads_payload_bytes_per_frame_against_the_mtu():
    big = rec("virtio-net", "-", "tcp-nogso", "tx", gbps=4.0, fps=8e3)  # 62.5 KB per frame
    assert "62500 payload bytes per frame is above the 1500-byte MTU" in checks.mtu_refusal(big)
    assert checks.mtu_refusal(rec("veth", "-", "tcp-nogso", "tx", gbps=4.0, fps=350e3)) is None
    assert checks.mtu_refusal(rec("veth", "-", "tcp-nogso", "tx")) is None  # nothing to judge


def test_pps_records_warn_on_a_wrong_frame_size_and_a_generator_that_may_be_the_limit():
    ok = rec("pvnet-netns", "lazy", "pps64", "rx", fps=20e3, offered_fps=100e3, frame_bytes=64)
    assert checks.pps_warnings(ok) == []
    slow = rec("pvnet-netns", "lazy", "pps1496", "rx", fps=20e3, offered_fps=30e3,
               frame_bytes=1490.0)
    w = checks.pps_warnings(slow)
    assert w[0] == "WARNING 1490 B/frame at the receiver, not 1496"
    assert "offered only 1.5x" in w[1]
    assert checks.pps_warnings(rec("veth", "-", "pps64", "tx", fps=9e4, offered_fps=9e4)) == []


# -- the packet-rate workload's parts ----------------------------------------------------------


TRAFGEN_OUT = """     1 packets to schedule
    64 bytes in total
Running! Hang up with ^C!


      270069 packets outgoing
    17284416 bytes outgoing
           3 sec, 500000 usec on CPU0 (270069 packets)
4242 (sh) S 4240 4242 4242 0 -1 4194304 120 339 0 0 0 0 37 152 20 0 1 0 100 2 0
"""


def test_generator_output_gives_frames_sent_loop_time_and_the_generators_cpu():
    sent, loop_s, cpu = pps.parse_generator(TRAFGEN_OUT)
    assert (sent, loop_s, cpu) == (270069, 3.5, pytest.approx(1.89))  # (37 + 152) ticks
    with pytest.raises(RuntimeError, match="no summary"):
        pps.parse_generator("trafgen: Device not up and running!")
    r = pps.PpsResult(seconds=2.0, sent=200_000, delivered=50_000, frame_bytes=64.0,
                      gen_cpu_s=1.0)
    assert (r.offered_fps, r.fps, r.loss_pct) == (100e3, 25e3, 75.0)


def test_the_generator_command_is_one_bounded_unshaped_worker_that_leaves_system_settings():
    pkt = pps.packet("02:00:00:00:b2:11", "10.81.0.11", 64)
    assert pkt == ("{ eth(da=02:00:00:00:b2:11, type=0x0800), ipv4(da=10.81.0.11, ttl=64, df), "
                   "udp(sp=9, dp=9), fill(0x00, 22) }")  # 14 + 20 + 8 + 22 = 64 bytes
    assert "fill(0x00, 1454)" in pps.packet("02:00:00:00:b2:11", "10.81.0.11", 1496)
    argv = pps.generator_argv("eth0", pkt, 5)
    # from /tmp: trafgen's temporary file needs a writable working directory (a guest sees a
    # checkout under /tmp read-only)
    assert argv[:2] == ["sh", "-c"] and argv[2].startswith(
        "cd /tmp && timeout -s INT 5 trafgen --dev eth0")
    for opt in ("--cpus 1", "--gap 0ns", "--qdisc-path", "--no-sock-mem", "--notouch-irq"):
        assert opt in argv[2]
    assert argv[2].endswith("; cat /proc/$$/stat")
    with pytest.raises(ValueError):
        pps.packet("not a mac", "10.0.0.1", 64)
    four = pps.packet("02:00:00:00:b2:11", "10.81.0.11", 64, flows=4)  # pps64-f4
    assert "udp(sp=dinc(9, 12), dp=9), fill(0x00, 22)" in four
    assert pps.FLOWS["pps64-f4"] == 4 and pps.SIZES["pps64-f4"] == 64


def test_receiver_counters_count_every_udp_datagram_the_stack_saw():
    text = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n"
            "Udp: 5 1000 2 0 2\nUdpLite: InDatagrams\nUdpLite: 0\n1010\n64640\n")
    assert pps.parse_counters(text) == (1007, 1010, 64640)


def test_pps_workloads_exist_beside_udp64_and_run_on_the_path_placement():
    names = list(WORKLOADS)
    assert names.index("pps64") > names.index("udp64") and "pps1496" in names
    for name in ("pps64", "pps1496"):
        w = WORKLOADS[name]
        assert (w.directions, w.primary, w.placement) == (("tx", "rx"), "fps", placement.PATH)
    assert WORKLOADS["tcp"].placement == placement.SPLIT


# -- stages: the table and the attribution -----------------------------------------------------


def stack(*frames: str) -> list[stages.Frame]:
    return [stages.parse_frame(f) for f in frames]


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    for name, text in (
            ("backend/loop.py",
             "def serve():\n    events = poller.poll(timeout)\n    tx.action()\n"),
            ("backend/tx/path.py",
             "def _submit(self):\n    os.writev(self.vif_fd, iov)\n    self.release.respond()\n"),
            ("shared/protocol/ring.py", "def entry():\n    return 1\n"),
            ("shared/protocol/headers.py", "def walk():\n    return 1\n")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_attribution_innermost_match_wins_and_unmatched_frames_ask_their_caller(fake_repo):
    root = "_run_code (<frozen runpy>:88)"
    serve = "serve (backend/loop.py:3)"
    assert stages.attribute(stack(root, serve, "TxPath._submit (backend/tx/path.py:2)"),
                            fake_repo) == "device"  # the line is inside os.writev
    assert stages.attribute(stack(root, "serve (backend/loop.py:2)",
                                  "EpollSelector.select (selectors.py:468)"),
                            fake_repo) == "wait"  # stdlib leaf: the repo line decides
    assert stages.attribute(stack(root, serve, "TxPath._submit (backend/tx/path.py:3)",
                                  "_Ring.entry (shared/protocol/ring.py:2)"), fake_repo) == "ring"
    assert stages.attribute(stack(root, serve,
                                  "EventChannel.notify (shared/plumbing/channel.py:74)"),
                            fake_repo) == "notify"  # a function rule, whatever its line
    assert stages.attribute(stack(root, serve, "walk (shared/protocol/headers.py:2)"),
                            fake_repo) == "other"
    assert stages.attribute(stack(root, serve, "RxPath._place_held.<locals>.<listcomp> "
                                               "(backend/rx/path.py:126)"), fake_repo) == "grant"
    assert stages.attribute(stack(root, serve, "Lazy.attach (backend/tx/modes/lazy.py:9)"),
                            fake_repo) == "grant"  # a mechanism module, by its folder


def test_shares_leave_waiting_out_and_parse_raw_reads_collapsed_stacks():
    lines = ["a (backend/loop.py:2);b (shared/protocol/ring.py:9) 30\n", "garbage\n",
             "a (backend/loop.py:2);c (shared/protocol/grant.py:1) 10\n"]
    parsed = stages.parse_raw(lines)
    assert [n for _, n in parsed] == [30, 10] and parsed[0][0][1].file == "shared/protocol/ring.py"
    counts = Counter({"wait": 60, "ring": 30, "grant": 10})
    assert stages.shares(counts) == {"ring": 0.75, "grant": 0.25, "device": 0.0,
                                     "notify": 0.0, "other": 0.0}
    assert stages.shares(Counter({"wait": 5})) is None


def test_the_stage_table_names_only_modules_and_functions_that_exist():
    """A renamed module or function would pour its samples into "other" unnoticed."""
    for module in stages.MODULE_STAGES:
        assert (REPO / module).is_dir() if module.endswith("/") else (REPO / module).is_file(), \
            module
    source = "\n".join(p.read_text() for d in ("backend", "frontend", "shared")
                       for p in (REPO / d).rglob("*.py"))
    for qualified in stages.FUNCTION_STAGES:
        cls, _, func = qualified.rpartition(".")
        assert re.search(rf"def {re.escape(func)}\(", source), qualified
        assert not cls or re.search(rf"class {re.escape(cls)}\b", source), qualified


def test_py_spy_samples_a_real_python_process_into_stages(tmp_path: Path):
    assert py_spy() is not None, "py-spy is part of the lab extra: pip install -e '.[lab]'"
    busy = subprocess.Popen([sys.executable, "-c",
                             "import time\nt = time.time()\nwhile time.time() - t < 8: pass"])
    try:
        time.sleep(0.3)
        prof = Profiler(hz=50)
        prof.start({"back": busy.pid, "gone": 999_999_999}, seconds=1)
        result = prof.finish()
    finally:
        busy.kill()
        busy.wait()
    assert result.error is None, result.error
    assert result.shares["back"]["other"] == 1.0 and result.samples["back"] > 10
    assert "gone" not in result.shares and result.cpu_s > 0


# -- placement ---------------------------------------------------------------------------------


def test_pinning_moves_every_thread_of_each_end_to_its_core():
    guest, host = placement.cpus()
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        pids = {"front": procs[0].pid, "back": procs[1].pid}
        text = placement.pin_ends(pids, placement.SPLIT)
        assert os.sched_getaffinity(procs[0].pid) == {guest}
        assert os.sched_getaffinity(procs[1].pid) == {host}
        assert text == f"back {host}, front {guest}, client {guest}, server {host}"
        assert all(os.sched_getscheduler(p.pid) == os.SCHED_BATCH for p in procs)
        placement.pin_ends(pids, placement.PATH)
        assert os.sched_getaffinity(procs[0].pid) == {host} == os.sched_getaffinity(procs[1].pid)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert placement.is_vcpu("CPU 0/TCG") and not placement.is_vcpu("qemu-system-x86")


def test_two_busy_ends_on_one_core_each_wait_for_it_as_long_as_they_run():
    """run_delay is the time a runnable end waited for its CPU: two spinning processes on
    one core each get at most half of it, so each waits at least about as long as it runs
    (a measure that read nothing fails)."""
    _guest, host = placement.cpus()
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 30: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        placement.pin_ends({"front": procs[0].pid, "back": procs[1].pid}, placement.PATH)
        first, t0 = [read_proc(p.pid) for p in procs], time.monotonic()
        deadline = t0 + 20
        while True:  # until each has run 0.4 s of CPU side by side
            now = [read_proc(p.pid) for p in procs]
            ran = [b.cpu_s - a.cpu_s for a, b in zip(first, now, strict=True)]
            if min(ran) >= 0.4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        wall = time.monotonic() - t0
        waited = [b.wait_s - a.wait_s for a, b in zip(first, now, strict=True)]
        for r, w in zip(ran, waited, strict=True):  # more if others run there; never > wall
            assert r >= 0.4 and 0.5 * r <= w <= wall + 0.05, (ran, waited, wall)
        alone = read_proc(os.getpid())
        assert alone is not None and alone.wait_s >= 0
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_queue_workers_are_spread_one_queue_of_each_end_per_core():
    allowed = sorted(os.sched_getaffinity(0))
    guest, host = placement.cpus()
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(4)]
    try:
        fw, bw = (procs[0].pid, procs[1].pid), (procs[2].pid, procs[3].pid)
        text = placement.pin_ends({}, placement.SPLIT, {"front": fw, "back": bw})
        want_f = [allowed[q % len(allowed)] for q in range(2)]
        want_b = [allowed[(1 + q) % len(allowed)] for q in range(2)]
        assert [os.sched_getaffinity(p) for p in fw] == [{c} for c in want_f]
        assert [os.sched_getaffinity(p) for p in bw] == [{c} for c in want_b]
        assert text.startswith(f"back queues {want_b[0]},{want_b[1]}, front queues "
                               f"{want_f[0]},{want_f[1]}, ")
        placement.pin_ends({}, placement.PATH, {"front": fw, "back": bw})
        assert all(os.sched_getaffinity(p.pid) == {host} for p in procs)
        assert guest in want_f
    finally:
        for p in procs:
            p.kill()
            p.wait()


# -- the report --------------------------------------------------------------------------------


def cost_records() -> list[Record]:
    return add_ratios([
        rec("veth", "-", "pps64", "tx", fps=200e3, offered_fps=200e3,
            cpu_machine_us_per_frame=8.0),
        rec("veth", "-", "tcp-nogso", "rx", gbps=3.0, fps=260e3, cpu_machine_us_per_frame=5.0),
        rec("pvnet-netns", "lazy", "pps64", "tx", fps=30e3, offered_fps=300e3,
            cpu_front_us_per_frame=6.0, cpu_back_us_per_frame=22.0,
            cpu_machine_us_per_frame=60.0, cpu_gen_us_per_frame=20.0,
            stages={"back": {"ring": 0.2, "grant": 0.1, "device": 0.3, "notify": 0.2,
                             "other": 0.2}}, stage_samples={"back": 250}, load1=1.8,
            busy_pct=90.0, outside_pct=20.0, kthreads_pct=3.0, cpus="back 1, front 1",
            ci95={"fps": [28e3, 32e3]}),
        rec("pvnet-netns", "lazy", "tcp-nogso", "rx", gbps=0.3, fps=26e3,
            cpu_machine_us_per_frame=70.0, ci95={"fps": [24e3, 28e3]}),
        rec("pvnet-netns", "lazy", "pps64", "rx", error="pps64: no device has 10.81.0.11"),
    ])


def test_cost_table_shows_per_frame_cpu_stages_and_load_per_measured_record():
    lines = perframe.cost_table(cost_records()).splitlines()
    assert lines[0].startswith("| path | mode | workload | dir | kframes/s | CPU µs/frame f / b")
    assert len(lines) == 2 + 4  # the failed record has no row here
    row = next(line for line in lines if "| lazy | pps64 | tx |" in line)
    for cell in ("| 30.0 |", "| 6.0 / 22.0 / - / 60.0 |", "| 20.0 |",
                 "| 20/10/30/20/20 (n=250) |", "| 1.8 / 90 / 20 / 3 |", "| back 1, front 1 |"):
        assert cell in row, cell
    main = report.markdown_table(cost_records())
    assert "| 300.0 |" in main and "| 28.0-32.0k |" in main  # offered, interval


def test_issue_20_figures_carry_interval_and_veth_ratio_and_judge_the_64_byte_goal():
    res = {t.text: t for t in perframe.per_frame_goals(cost_records())}
    mtu = res["per frame: MTU frames wire->guest kframes/s (tcp-nogso)"]
    assert mtu.value == "26.0 [24.0-28.0], 0.10x veth" and mtu.line().endswith("reported")
    cpu = res["per frame: CPU µs per MTU frame wire->guest, whole machine"]
    assert cpu.value == "70.0, 14.00x veth"
    assert res["per frame: 64 B frames tx >= 80k frames/s delivered (pps64)"].met is False
    assert res["per frame: 64 B frames rx >= 80k frames/s delivered (pps64)"].met is None
    assert res["per frame: rr p50 µs"].value == "n/a"


def test_options_reach_the_profiler_rate_and_both_helps_print(capsys):
    assert runner.config_from(profile_hz="0").profile_hz == 0
    assert runner.config_from().profile_hz == 100
    from shared.lab.bench.__main__ import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--profile-hz" in out and "95 % interval" in out
    assert "pps1496" in out


# -- full tier: the workloads for real ---------------------------------------------------------


@pytest.mark.full
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("trafgen") is None,
                    reason="needs root and trafgen (netsniff-ng)")
def test_pps_and_nogso_through_veth_and_pvnet_netns(tmp_path: Path):
    data = tiny_bench(tmp_path, ["pps64", "pps1496", "tcp-nogso"], "pvbp")
    assert {(d["path"], d["workload"], d["direction"]) for d in data} == {
        (p, w, d) for p in ("veth", "pvnet-netns") for w in ("pps64", "pps1496", "tcp-nogso")
        for d in ("tx", "rx")}
    for d in data:
        key = (d["path"], d["workload"], d["direction"])
        assert d["error"] is None and d["cpu_machine_us_per_frame"] > 0, key
        assert d["cpu_ours_us_per_frame"] > 0, key
        assert d["load1"] >= 0 and d["busy_pct"] > 0 and d["outside_pct"] >= 0, key
        if d["workload"] == "tcp-nogso":  # accepted: MTU-sized frames both ways
            assert d["gbps"] * 1e9 / 8 / d["fps"] <= checks.MTU, key
            continue
        size = pps.SIZES[d["workload"]]
        assert d["frame_bytes"] == pytest.approx(size, abs=0.5), key  # bytes on the wire
        assert d["offered_fps"] >= d["fps"] > 0 and 0 <= d["loss_pct"] <= 100, key
        assert d["cpu_gen_us_per_frame"] > 0, key
        if d["path"] == "pvnet-netns":
            assert d["cpu_front_us_per_frame"] > 0 and d["cpu_back_us_per_frame"] > 0, key
            waits = (d["wait_front_us_per_frame"], d["wait_back_us_per_frame"])
            assert min(waits) >= 0 and sum(waits) > 0, key  # one core: the ends take turns
            assert set(d["stages"]["back"]) == set(stages.STAGES), key
            assert sum(d["stages"]["back"].values()) == pytest.approx(1.0, abs=0.01), key
            assert d["stage_samples"]["back"] > 0, key
            guest, host = placement.cpus()
            assert d["cpus"] == f"back {host}, front {host}, generator {guest}", key
    table = (tmp_path / "res" / "table.md").read_text()
    assert "| b stages % r/g/d/n/o |" in table and "| wait µs/frame f / b |" in table
    assert "per frame: 64 B frames tx" in table
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pvbp-" not in left
