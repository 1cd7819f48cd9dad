"""The netns lab: command lines (fast), and up/down on real namespaces (full tier, root).

The full tests use their own names (pvt-*, 10.78.0.0/24, domids 101/102) and a private state
dir, so they can run while a real lab is up. Every fixture tears down, also on failure, and
then checks that nothing is left: no namespace, link, process, socket or pidfile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS
from pyroute2 import netns as pnetns

from shared import cli
from shared.lab import procs
from shared.lab.commands import default_commands
from shared.lab.errors import LabError
from shared.lab.iperf import IperfPath, IperfResult, format_iperf, iperf_paths, run_iperf
from shared.lab.netns import Lab
from shared.lab.plumbing import netns_exec
from shared.lab.topology import Guest, Topology, load
from tests.inproc import wait_for

TEST_TOPOLOGY = """\
bridge: pvtbr0
host_netns: pvt-host
wire: {netns: pvt-wire, ip: 10.78.0.1/24, iperf_server: true, host_if: pvtbr0-wire}
guests:
  - {name: pvt-g1, domid: 101, mac: "02:00:00:00:01:01", ip: 10.78.0.11/24}
  - {name: pvt-g2, domid: 102, mac: "02:00:00:00:01:02", ip: 10.78.0.12/24,
     tx_mode: copy, header_slots: false, persistent: true, filters: ["drop ip_proto=17"]}
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iperf3") is None, reason="needs root and iperf3")


# -- fast: command lines and iperf bookkeeping -----------------------------------------------


def split_command(argv: list[str]) -> tuple[list[str], dict[str, list[str]], set[str]]:
    """(the launcher up to and including `-m MODULE`, {--option: [values]}, {--flags}): a
    command line as the program sees it, so that reordering its options changes nothing."""
    cut = argv.index("-m") + 2
    opts: dict[str, list[str]] = {}
    flags: set[str] = set()
    rest = argv[cut:]
    i = 0
    while i < len(rest):
        assert rest[i].startswith("--"), rest
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            opts.setdefault(rest[i], []).append(rest[i + 1])
            i += 2
        else:
            flags.add(rest[i])
            i += 1
    return argv[:cut], opts, flags


def test_default_command_lines() -> None:
    t = load(state_dir="/run/pvnet")
    back, front = default_commands(t, t.guests[0])
    py = sys.executable
    assert split_command(back) == (
        ["ip", "netns", "exec", "pvhost", py, "-m", "backend"],
        {"--vif": ["vif1.0"], "--domid": ["1"], "--bridge": ["pvbr0"],
         "--listen": ["/run/pvnet/vif1.0.ev"], "--ctl": ["/run/pvnet/vif1.0.ctl"],
         "--tx-mode": ["lazy"], "--rx-mode": ["copy"]}, set())
    assert split_command(front) == (
        ["ip", "netns", "exec", "g1", py, "-m", "frontend"],
        {"--name": ["g1"], "--connect": ["/run/pvnet/vif1.0.ev"], "--tap": ["eth0"],
         "--mac": ["00:16:3e:00:00:01"], "--ip": ["10.77.0.11/24"],
         "--ctl": ["/run/pvnet/g1.ctl"], "--domid": ["1"]}, set())


def test_command_line_options_follow_guest_knobs(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text(TEST_TOPOLOGY.replace("host_netns: pvt-host", "host_netns: null"))
    t = load(f, state_dir="/s")
    back, front = default_commands(t, t.guests[1])
    prog, opts, flags = split_command(back)
    assert prog == [sys.executable, "-m", "backend"]  # root namespace: no netns prefix
    assert opts["--tx-mode"] == ["copy"] and opts["--filter"] == ["drop ip_proto=17"]
    assert flags == set()
    _prog, opts, flags = split_command(front)
    assert opts["--domid"] == ["102"] and flags == {"--no-header-slots", "--persistent"}
    t2 = load(f.parent / "t.yaml", state_dir="/s")
    assert "--region-size" not in default_commands(t2, t2.guests[0])[1]
    assert netns_exec(None) == [] and netns_exec("x") == ["ip", "netns", "exec", "x"]


def test_iperf_paths_cover_both_directions() -> None:
    t = load()
    labels = [(p.label, p.netns, p.server, p.reverse) for p in iperf_paths(t)]
    assert labels == [
        ("g1 -> wire", "g1", "10.77.0.1", False), ("wire -> g1", "g1", "10.77.0.1", True),
        ("g2 -> wire", "g2", "10.77.0.1", False), ("wire -> g2", "g2", "10.77.0.1", True),
        ("g1 -> g2", "g1", "10.77.0.12", False), ("g2 -> g1", "g1", "10.77.0.12", True),
    ]


def test_iperf_tries_again_while_the_server_closes_the_last_test(monkeypatch) -> None:
    """A server still closing the previous test resets the control connection: tried again;
    any other error is the answer at once."""
    import shared.lab.iperf as iperf
    monkeypatch.setattr(iperf.time, "sleep", lambda s: None)
    ok = '{"end": {"sum_sent": {"bits_per_second": 2e9}, "sum_received": {"bits_per_second": 1e9}}}'
    busy = '{"error": "unable to receive control message: Connection reset by peer"}'
    answers = [busy, busy, ok]
    calls = []

    def runner(where, argv, timeout):
        calls.append(argv)
        return 0, answers.pop(0), ""

    p = IperfPath("t", "g1", "10.77.0.1", True)
    r = run_iperf(p, 1, runner=runner)
    assert r.error is None and r.receiver_bps == 1e9 and len(calls) == 3
    answers[:] = ['{"error": "unable to connect to server: No route to host"}', ok]
    assert run_iperf(p, 1, runner=runner).error.startswith("unable to connect")
    answers[:] = [busy] * iperf.ATTEMPTS
    assert "reset by peer" in run_iperf(p, 1, runner=runner).error and not answers


def test_format_iperf_table() -> None:
    p = IperfPath("g1 -> wire", "g1", "10.77.0.1", False)
    text = format_iperf([IperfResult(p, 1.5e9, 1.25e9),
                         IperfResult(IperfPath("g2 -> g1", "g1", "x", True), error="refused")])
    assert "1.500" in text and "1.250" in text and "error: refused" in text.splitlines()[-1]


def test_pidfile_spawn_stop_and_pid_reuse_guard(tmp_path: Path) -> None:
    """A pidfile whose start time does not match (pid reused) must not get anyone killed."""
    pf, log = tmp_path / "s.pid", tmp_path / "log" / "s.log"
    proc = procs.spawn(["sh", "-c", "echo hello; sleep 30 & wait"], log=log, pidfile=pf)
    try:
        rec = procs.read_pidfile(pf)
        assert rec is not None and rec.pid == proc.pid and rec.alive()
        assert os.getpgid(proc.pid) == proc.pid  # own process group: down kills the group
        forged = {"pid": rec.pid, "start": rec.start + 1, "argv": []}
        pf.write_text(json.dumps(forged))
        assert procs.stop_pidfile(pf, timeout=1) == [] and rec.alive() and not pf.exists()
        procs.write_pidfile(pf, proc.pid, ["sh"])
        # the shell forks its sleep when the scheduler lets it: wait for both, then stop them
        wait_for(lambda: len(procs.group_members(proc.pid)) == 2, 10, "the shell and its sleep")
        killed = procs.stop_pidfile(pf, timeout=2)
        assert proc.pid in killed and len(killed) == 2  # the shell and its sleep
        assert proc.wait(2) is not None and procs.group_members(proc.pid) == []
        assert "hello" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- full tier helpers -----------------------------------------------------------------------


FAKE = textwrap.dedent("""\
    # A stand-in for netback/netfront: serves a control socket and reports a state.
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from shared.plumbing.control.server import ControlServer
    role, name, peer, ctl, delay, final = sys.argv[1:7]
    t0 = time.monotonic()
    def handler(req):
        if req["cmd"] != "stats":
            raise KeyError(req["cmd"])
        state = final if time.monotonic() - t0 >= float(delay) else "InitWait"
        return {{"role": role, "name": name, "peer": peer, "pid": os.getpid(), "state": state,
                 "tx_mode": "lazy", "features": {{}},
                 "rings": {{"tx": {{"tx_packets": 1}}, "rx": {{"rx_packets": 2}}}},
                 "counters": {{"disconnects": 0}}}}
    if final == "crash":
        print("fake", role, name, "crashing on purpose", flush=True)
        sys.exit(3)
    srv = ControlServer(ctl, handler).start()
    print("fake", role, name, "serving", ctl, flush=True)
    signal.signal(signal.SIGTERM, lambda *a: (srv.close(), sys.exit(0)))
    while True:
        signal.pause()
""")


def fake_commands(script: Path, final: str = "Connected", delay: float = 0.3):
    def build(t: Topology, g: Guest) -> tuple[list[str], list[str]]:
        py = [sys.executable, str(script)]
        back = [*netns_exec(t.host_netns), *py, "netback", g.vif, g.name,
                str(t.backend_ctl(g)), str(delay), final]
        front = [*netns_exec(g.netns), *py, "netfront", g.name, g.vif, str(t.frontend_ctl(g)),
                 str(delay), final]
        return back, front
    return build


@pytest.fixture
def topo() -> Iterator[Topology]:
    """The test topology with a short private state dir (unix socket paths max 107 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="pvt"))
    f = base / "topo.yaml"
    f.write_text(TEST_TOPOLOGY)
    t = load(f, state_dir=base / "state")
    try:
        yield t
    finally:
        if os.geteuid() == 0:
            Lab(t, say=lambda _: None, kill_timeout=2.0).down()
            assert_nothing_left(t)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def script(topo: Topology) -> Path:
    p = topo.state_dir.parent / "fake.py"
    p.write_text(FAKE.format(repo=str(Path(__file__).resolve().parents[2])))
    return p


def assert_nothing_left(t: Topology) -> None:
    """No namespace, link, process, socket, pidfile or state.json of `t` survives `down`."""
    assert not set(t.namespaces) & set(pnetns.listnetns())
    ours = {t.bridge, t.wire.host_if, *(g.vif for g in t.guests)}
    with IPRoute() as ipr:
        assert not ours & {link.get("ifname") for link in ipr.get_links()}
    marker = str(t.state_dir).encode()
    for pid in procs.all_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        info = procs.proc_stat(pid)
        assert marker not in cmdline or info is None or info.state == "Z", cmdline
    left = sorted(p.name for p in t.state_dir.iterdir()) if t.state_dir.exists() else []
    assert left in ([], ["log"]), left


def in_ns(ns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout)


def attach_test_veth(t: Topology, g: Guest) -> None:
    """A plain veth from the bridge into the guest namespace, standing in for netback+netfront."""
    with NetNS(t.host_netns, flags=0) as h:
        h.link("add", ifname=f"pvt{g.domid}", kind="veth",
               peer={"ifname": "eth0", "net_ns_fd": g.netns})
        br = h.link_lookup(ifname=t.bridge)[0]
        h.link("set", index=h.link_lookup(ifname=f"pvt{g.domid}")[0], master=br, state="up")
    with NetNS(g.netns, flags=0) as n:
        idx = n.link_lookup(ifname="eth0")[0]
        n.link("set", index=idx, address=g.mac)
        n.addr("add", index=idx, address=str(g.ip.ip), prefixlen=g.ip.network.prefixlen)
        n.link("set", index=idx, state="up")


# -- full tier -------------------------------------------------------------------------------


@pytest.mark.full
@needs_root
def test_up_devices_and_wire_reachable_over_plain_veth(topo: Topology) -> None:
    lines: list[str] = []
    Lab(topo, say=lines.append).up(processes=False)
    assert set(topo.namespaces) <= set(pnetns.listnetns())
    with NetNS(topo.host_netns, flags=0) as h:
        kinds = {ln.get("ifname"): ln.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
                 for ln in h.get_links()}
    assert kinds[topo.bridge] == "bridge" and kinds[topo.wire.host_if] == "veth"
    assert "10.78.0.1/24" in in_ns(topo.wire.netns, "ip", "-br", "addr").stdout
    for ns in (topo.wire.netns, *(g.netns for g in topo.guests)):
        rec = procs.read_pidfile(topo.pidfile(f"iperf3-{ns}"))
        assert rec is not None and rec.alive()
        assert rec.pid in procs.pids_in_netns(ns)
    state = json.loads(topo.state_file.read_text())
    assert state["netns"] == list(topo.namespaces)
    assert any("created" in ln for ln in lines) and all("\n" not in ln for ln in lines)

    g1, g2 = topo.guests
    attach_test_veth(topo, g1)
    attach_test_veth(topo, g2)
    probe = "import socket; socket.create_connection(('10.78.0.1', 5201), 3).close()"
    reach = in_ns(g1.netns, sys.executable, "-c", probe)  # the wire's iperf3 server answers
    assert reach.returncode == 0, reach.stderr
    for path in (IperfPath("g1 -> wire", g1.netns, "10.78.0.1", False),
                 IperfPath("wire -> g1", g1.netns, "10.78.0.1", True),
                 IperfPath("g1 -> g2", g1.netns, "10.78.0.12", False)):
        result = run_iperf(path, seconds=1)
        assert result.error is None, result.error
        assert result.sender_bps and result.receiver_bps and result.receiver_bps > 1e6


@pytest.mark.full
@needs_root
def test_bridge_forwards_frames_bit_for_bit(topo: Topology) -> None:
    """A padded 60-byte IPv4 frame keeps its trailer (br_netfilter is off in host_netns)."""
    Lab(topo, say=lambda _: None).up(processes=False)
    g1 = topo.guests[0]
    attach_test_veth(topo, g1)
    capture = subprocess.Popen(
        ["ip", "netns", "exec", g1.netns, sys.executable, "-c", textwrap.dedent("""\
            import socket
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
            s.bind(("eth0", 0)); s.settimeout(5); print("ready", flush=True)
            while True:
                d = s.recv(2048)
                if d.endswith(b"TRLR"):
                    print(len(d)); break
                if d[23:24] == b"\\x01" and len(d) < 60:
                    print(len(d)); break
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 1, 0,
                         socket.inet_aton("10.78.0.1"), socket.inet_aton("10.78.0.11"))
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x99\x08\x00" + ip + b"\x08\x00" + b"\0" * 6
        frame += b"\0" * (56 - len(frame)) + b"TRLR"
        sender = (f"import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
                  f"s.bind(('{topo.wire.dev}', 0)); s.send({frame!r})")
        assert in_ns(topo.wire.netns, sys.executable, "-c", sender).returncode == 0
        out, _ = capture.communicate(timeout=10)
        assert out.strip() == "60"
    finally:
        capture.kill()
        capture.wait()


@pytest.mark.full
@needs_root
def test_up_and_down_are_idempotent(topo: Topology) -> None:
    Lab(topo, say=lambda _: None).up(processes=False)
    rec = procs.read_pidfile(topo.pidfile(f"iperf3-{topo.wire.netns}"))
    lines: list[str] = []
    Lab(topo, say=lines.append).up(processes=False)
    assert not any("created" in ln or "started" in ln for ln in lines), lines
    assert procs.read_pidfile(topo.pidfile(f"iperf3-{topo.wire.netns}")) == rec
    first: list[str] = []
    Lab(topo, say=first.append, kill_timeout=2).down()
    assert any(ln.startswith("removed netns") for ln in first)
    assert any(ln.startswith("stopped iperf3-") for ln in first)
    assert_nothing_left(topo)
    again: list[str] = []
    Lab(topo, say=again.append).down()
    assert again == ["nothing to remove"]


@pytest.mark.full
@needs_root
def test_up_with_data_processes_waits_for_connected(topo: Topology, script: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    Lab(topo, commands=fake_commands(script, delay=0.5), say=lines.append).up(timeout=15)
    assert any(ln.startswith("all 4 ends Connected") for ln in lines), lines
    backend = procs.read_pidfile(topo.pidfile("vif101.0"))
    frontend = procs.read_pidfile(topo.pidfile("pvt-g1"))
    assert backend and backend.alive() and backend.pid in procs.pids_in_netns(topo.host_netns)
    assert frontend and frontend.alive() and frontend.pid in procs.pids_in_netns("pvt-g1")
    assert "serving" in topo.log_path("vif101.0").read_text()
    # a second up sees everything running
    again: list[str] = []
    Lab(topo, commands=fake_commands(script), say=again.append).up(timeout=5)
    assert not any("started" in ln for ln in again)
    # pvnet stats pairs the fakes
    assert cli.main(["stats", "--dir", str(topo.state_dir)]) == 0
    out = capsys.readouterr().out
    assert "== pvt-g1 (netfront" in out and "vif101.0 (netback" in out
    Lab(topo, say=lambda _: None, kill_timeout=2).down()
    assert not backend.alive() and not frontend.alive()


def failed_up(topo: Topology, script: Path, final: str, timeout: float) -> str:
    """The LabError message of an `up` whose fake pair ends as `final` ("crash" or a state)."""
    with pytest.raises(LabError) as info:
        Lab(topo, commands=fake_commands(script, final=final), say=lambda _: None).up(
            timeout=timeout)
    return str(info.value)


@pytest.mark.full
@needs_root
def test_process_that_dies_is_reported_with_log_tail(topo: Topology, script: Path) -> None:
    msg = failed_up(topo, script, final="crash", timeout=10)
    assert "vif101.0 exited (status 3)" in msg
    assert "crashing on purpose" in msg and "vif101.0.log" in msg
    assert "invoke down" in msg


@pytest.mark.full
@needs_root
def test_never_connected_times_out_with_states_and_logs(topo: Topology, script: Path) -> None:
    start = time.monotonic()
    msg = failed_up(topo, script, final="InitWait", timeout=2)
    assert time.monotonic() - start < 15
    assert "timeout after 2 s: not all ends reached Connected" in msg
    assert "vif101.0: state InitWait" in msg and "pvt-g2: state InitWait" in msg
    assert "| fake netfront pvt-g1 serving" in msg


@pytest.mark.full
@needs_root
def test_down_after_crashed_up(topo: Topology, script: Path) -> None:
    """SIGKILL an `up` midway (a real crash: no cleanup code runs), then down removes all."""
    repo = str(Path(__file__).resolve().parents[2])
    code = textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {repo!r})
        from shared.lab.netns import Lab
        from shared.lab.topology import load
        t = load({topo.source!r}, state_dir={str(topo.state_dir)!r})
        Lab(t).up(processes=False)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(f"netns {topo.guests[0].netns}"):
                break  # the wire and its iperf3 are up, the guests are half done
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert topo.wire.netns in pnetns.listnetns()
    # plus a stray the pidfiles do not know about, inside one of our namespaces
    stray = subprocess.Popen(["ip", "netns", "exec", topo.wire.netns, "sleep", "300"],
                             start_new_session=True)
    deadline = time.monotonic() + 10
    while stray.pid not in procs.pids_in_netns(topo.wire.netns):  # exec'd into the netns
        assert time.monotonic() < deadline, "the stray never entered the namespace"
        time.sleep(0.02)
    lines: list[str] = []
    Lab(topo, say=lines.append, kill_timeout=2).down()
    stray.wait(5)
    assert any("stray" in ln for ln in lines), lines
    assert_nothing_left(topo)


@pytest.mark.full
@needs_root
def test_down_leaves_foreign_devices_alone(topo: Topology) -> None:
    """A device that merely shares a topology name but is of another kind is not deleted."""
    with IPRoute() as ipr:
        ipr.link("add", ifname="vif101.0", kind="veth", peer={"ifname": "pvt101peer"})
    try:
        f = topo.state_dir.parent / "root.yaml"
        f.write_text(TEST_TOPOLOGY.replace("host_netns: pvt-host", "host_netns: null"))
        t = load(f, state_dir=topo.state_dir)
        lines: list[str] = []
        Lab(t, say=lines.append).down()
        assert any("left vif101.0 alone" in ln for ln in lines)
        with IPRoute() as ipr:
            assert ipr.link_lookup(ifname="vif101.0")
    finally:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname="vif101.0"):
                ipr.link("del", index=idx)
