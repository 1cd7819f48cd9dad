"""The bench's workloads: what runs between a path's guest and peer ends, and what it reports.

Clients always run on the guest end (with iperf3 -R for peer->guest), servers on the peer end,
so a guest only has to be able to run a bounded command -- which is all a QEMU guest over ssh
offers. The packet-rate workloads (pps.py) run their generator at the sending end, which is
also a bounded command. Every run is bounded: iperf3 by -t plus a kill timeout, rr.py by its
own deadline, trafgen by timeout(1). Clients and servers on host ends are pinned to the
workload's placement's cores (placement.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FsPath

from shared.lab.bench import placement
from shared.lab.bench.paths import IPERF_PORT, Endpoint, Endpoints, NetnsEndpoint
from shared.lab.bench.pps import FLOWS as PPS_FLOWS
from shared.lab.bench.pps import SIZES, run_pps

RR_SCRIPT = str(FsPath(__file__).with_name("rr.py"))
RR_PORT = 7777
UDP_LEN = 64
FLOWS = 4  # the multi-flow workloads' flows (the queues dimension: flows to spread)
SLACK = 20.0  # seconds a bounded client may overrun its duration before it is killed


@dataclass
class RunResult:
    """What one workload run measured itself (the path's counters are measured around it)."""

    seconds: float = 0.0
    payload_bytes: float = 0.0
    gbps: float | None = None
    fps: float | None = None  # delivered datagrams/s (udp64, pps*); else the path counters
    loss_pct: float | None = None
    offered_fps: float | None = None  # pps*: what the generator handed its device
    frame_bytes: float | None = None  # pps*: bytes per frame at the receiving device
    gen_cpu_s: float | None = None  # pps*: the generator's own CPU seconds
    tps: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    error: str | None = None


Runner = Callable[[Endpoints, str, float], RunResult]


@dataclass(frozen=True)
class Workload:
    """A named workload. `gso` decides which path session it needs; `primary` is the
    higher-is-better field the vs_veth / vs_virtio ratios divide."""

    name: str
    gso: bool
    directions: tuple[str, ...]
    primary: str
    run: Runner
    what: str
    placement: str = placement.SPLIT  # which core runs what (placement.py)


def _iperf(ends: Endpoints, direction: str, seconds: float, udp: bool,
           streams: int = 1) -> RunResult:
    argv = ["iperf3", "-c", ends.peer.ip, "-p", str(IPERF_PORT), "-t", str(max(1, round(seconds))),
            "-J", "--connect-timeout", "3000", "-A", _affinity(ends)]
    if streams > 1:  # one client thread (iperf3 3.12) sends them all: the same offered load
        argv += ["-P", str(streams)]
    if direction == "rx":
        argv.append("-R")
    if udp:
        argv += ["-u", "-l", str(UDP_LEN), "-b", "0"]
    for attempt in range(3):
        res = ends.guest.run(argv, timeout=seconds + SLACK)
        parsed = parse_iperf(res.out, udp)
        transient = ("busy", "refused")  # finishing the previous test / not listening yet
        if parsed.error and attempt < 2 and any(t in (parsed.error + res.err) for t in transient):
            time.sleep(1.0)
            continue
        if parsed.error and res.rc != 0 and not res.out.strip():
            parsed.error = (res.err.strip().splitlines() or [f"exit status {res.rc}"])[-1]
        return parsed
    return parsed


def _affinity(ends: Endpoints) -> str:
    """iperf3 -A: the client on the guest core, a host-side server on the host core (a
    server in a guest has that guest's one vCPU: it keeps it)."""
    guest, host = placement.cpus()
    return f"{guest},{host}" if isinstance(ends.peer, NetnsEndpoint) else str(guest)


def _pinned(end: Endpoint, cpu: int, argv: list[str]) -> list[str]:
    """`argv` under taskset on a host end; a guest end runs it as it is (one vCPU)."""
    return ["taskset", "-c", str(cpu), *argv] if isinstance(end, NetnsEndpoint) else argv


def parse_iperf(text: str, udp: bool) -> RunResult:
    """iperf3 -J output -> RunResult (receiver side: what was delivered)."""
    try:
        raw = json.loads(text)
    except ValueError:
        return RunResult(error="iperf3 printed no JSON")
    if raw.get("error"):
        return RunResult(error=f"iperf3: {raw['error']}")
    end = raw.get("end") or {}
    recv = end.get("sum_received") or end.get("sum")
    if not recv or not recv.get("seconds"):
        return RunResult(error="iperf3 reported no end-of-test summary")
    secs = float(recv["seconds"])
    out = RunResult(seconds=secs, payload_bytes=float(recv.get("bytes", 0)),
                    gbps=round(float(recv.get("bits_per_second", 0)) / 1e9, 4))
    if udp:
        delivered = int(recv.get("packets", 0)) - int(recv.get("lost_packets", 0))
        out.fps = round(delivered / secs, 1)
        out.loss_pct = round(float(recv.get("lost_percent", 0.0)), 2)
    return out


def _tcp(ends: Endpoints, direction: str, seconds: float) -> RunResult:
    return _iperf(ends, direction, seconds, udp=False)


def _tcp_flows(ends: Endpoints, direction: str, seconds: float) -> RunResult:
    return _iperf(ends, direction, seconds, udp=False, streams=FLOWS)


def _udp(ends: Endpoints, direction: str, seconds: float) -> RunResult:
    return _iperf(ends, direction, seconds, udp=True)


def _rr(ends: Endpoints, direction: str, seconds: float) -> RunResult:
    guest, host = placement.cpus()
    stop = ends.peer.start(_pinned(ends.peer, host, [
        ends.peer.python, RR_SCRIPT, "server", "--port", str(RR_PORT),
        "--seconds", str(seconds + SLACK)]))
    try:
        res = ends.guest.run(_pinned(ends.guest, guest, [
            ends.guest.python, RR_SCRIPT, "client", ends.peer.ip, "--port", str(RR_PORT),
            "--seconds", str(seconds)]), timeout=seconds + SLACK)
    finally:
        stop()
    return parse_rr(res.out, res.err)


def parse_rr(text: str, err: str = "") -> RunResult:
    """rr.py client's JSON line -> RunResult."""
    try:
        raw = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = err.strip().splitlines()
        return RunResult(error=f"rr.py: {tail[-1] if tail else 'no output'}")
    if "error" in raw:
        return RunResult(error=f"rr.py: {raw['error']}")
    return RunResult(seconds=float(raw["elapsed_s"]), payload_bytes=2.0 * raw["count"],
                     tps=float(raw["tps"]), p50_us=float(raw["p50_us"]),
                     p99_us=float(raw["p99_us"]))


def _pps(name: str) -> Runner:
    def run(ends: Endpoints, direction: str, seconds: float) -> RunResult:
        try:
            r = run_pps(ends, direction, seconds, SIZES[name], PPS_FLOWS.get(name, 1))
        except RuntimeError as exc:
            return RunResult(error=f"{name}: {exc}")
        return RunResult(seconds=r.seconds, payload_bytes=r.delivered * SIZES[name],
                         fps=round(r.fps, 1), loss_pct=r.loss_pct,
                         offered_fps=round(r.offered_fps, 1), frame_bytes=r.frame_bytes,
                         gen_cpu_s=r.gen_cpu_s)
    return run


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("tcp", True, ("tx", "rx"), "gbps", _tcp, "one TCP stream, GSO on"),
    Workload("tcp-nogso", False, ("tx", "rx"), "gbps", _tcp,
             "one TCP stream, GSO/TSO off: MTU-sized frames"),
    Workload("tcp-p4", True, ("tx", "rx"), "gbps", _tcp_flows,
             f"{FLOWS} TCP streams (iperf3 -P {FLOWS}), GSO on"),
    Workload("tcp-nogso-p4", False, ("tx", "rx"), "gbps", _tcp_flows,
             f"{FLOWS} TCP streams (iperf3 -P {FLOWS}), GSO/TSO off: MTU-sized frames"),
    Workload("udp64", True, ("tx", "rx"), "fps", _udp,
             f"UDP {UDP_LEN}-byte datagrams, unlimited rate; frames/s delivered"),
    Workload("rr", True, ("both",), "tps", _rr,
             "1-byte TCP ping-pong (TCP_NODELAY), guest client"),
    *(Workload(name, True, ("tx", "rx"), "fps", _pps(name),
               f"{size}-byte UDP frames from trafgen"
               + (f" in {PPS_FLOWS[name]} flows (source ports)" if name in PPS_FLOWS else "")
               + ", one unshaped core; delivered frames/s",
               placement.PATH) for name, size in SIZES.items()),
)}
