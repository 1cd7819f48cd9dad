"""iperf3 through the lab: the measured paths, one client run, the table `invoke iperf` prints.

`run_iperf` takes a runner, so one code path serves both placements: `netns_runner` runs the
client in a namespace, the QEMU placement's SshRunner runs it in a guest."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.lab.plumbing import netns_exec
from shared.lab.topology import Topology

Runner = Callable[[str | None, list[str], float], tuple[int, str, str]]


@dataclass(frozen=True)
class IperfPath:
    """One measured direction: the client runs in `netns` against `server`; -R if `reverse`."""

    label: str
    netns: str
    server: str
    reverse: bool


@dataclass
class IperfResult:
    path: IperfPath
    sender_bps: float | None = None
    receiver_bps: float | None = None
    lost_percent: float | None = None
    raw: dict | None = None
    error: str | None = None


def iperf_paths(topo: Topology) -> list[IperfPath]:
    """Each guest to and from the wire peer, then every guest pair both ways."""
    wire_ip = str(topo.wire.ip.ip)
    out: list[IperfPath] = []
    for g in topo.guests:
        out.append(IperfPath(f"{g.name} -> wire", g.netns, wire_ip, False))
        out.append(IperfPath(f"wire -> {g.name}", g.netns, wire_ip, True))
    for i, a in enumerate(topo.guests):
        for b in topo.guests[i + 1 :]:
            out.append(IperfPath(f"{a.name} -> {b.name}", a.netns, str(b.ip.ip), False))
            out.append(IperfPath(f"{b.name} -> {a.name}", a.netns, str(b.ip.ip), True))
    return out


def netns_runner(where: str | None, argv: list[str], timeout: float) -> tuple[int, str, str]:
    """Run `argv` in namespace `where`: the namespace placement's way into a guest."""
    proc = subprocess.run([*netns_exec(where), *argv], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


#: iperf3's words when its server is still closing the previous test (it serves one at a time):
#: a run back to back with another may meet them, and a new attempt a moment later succeeds
BUSY = ("the server is busy", "unable to receive control message", "unable to send control message")
ATTEMPTS = 3


def run_iperf(path: IperfPath, seconds: int = 5, udp: bool = False,
              bitrate: str = "0", runner: Runner = netns_runner) -> IperfResult:
    """Run one iperf3 client (bounded by `seconds`) and pull sender/receiver rates from -J.
    `runner` says how to run it where `path.netns` names (a namespace, or a VM over ssh).
    A server still closing the previous test (`BUSY`) gets up to `ATTEMPTS` tries, 1 s apart."""
    for attempt in range(ATTEMPTS):
        result = _run_once(path, seconds, udp, bitrate, runner)
        if not (result.error and any(b in result.error for b in BUSY)) or attempt == ATTEMPTS - 1:
            return result
        time.sleep(1.0)  # the server's own cleanup has no event to wait on from here
    return result


def _run_once(path: IperfPath, seconds: int, udp: bool, bitrate: str,
              runner: Runner) -> IperfResult:
    argv = ["iperf3", "-c", path.server, "-t", str(seconds), "-J", "--connect-timeout", "3000"]
    if path.reverse:
        argv.append("-R")
    if udp:
        argv += ["-u", "-b", bitrate]
    try:
        rc, out, err = runner(path.netns, argv, seconds + 20)
    except (subprocess.TimeoutExpired, TimeoutError):
        return IperfResult(path, error=f"iperf3 did not finish within {seconds + 20} s")
    try:
        raw = json.loads(out)
    except ValueError:
        msg = (err or out).strip().splitlines()
        return IperfResult(path, error=msg[-1] if msg else f"iperf3 exit status {rc}")
    if raw.get("error"):
        return IperfResult(path, raw=raw, error=str(raw["error"]))
    end = raw.get("end") or {}
    if not (end.get("sum_sent") or end.get("sum")):
        return IperfResult(path, raw=raw, error="iperf3 reported no end-of-test summary")
    sent = end.get("sum_sent") or end.get("sum") or {}
    recv = end.get("sum_received") or end.get("sum") or {}
    lost = (end.get("sum") or recv).get("lost_percent") if udp else None
    return IperfResult(path, sent.get("bits_per_second"), recv.get("bits_per_second"), lost, raw)


def format_iperf(results: list[IperfResult], udp: bool = False) -> str:
    """The table `invoke iperf` prints: Gbit/s per path, sender and receiver."""
    def gbps(v: float | None) -> str:
        return "-" if v is None else f"{v / 1e9:.3f}"

    width = max([len(r.path.label) for r in results] + [4])
    head = f"{'path':<{width}}  {'sender Gbit/s':>14}  {'receiver Gbit/s':>15}"
    head += f"  {'lost %':>7}" if udp else ""
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.path.label:<{width}}  error: {r.error}")
            continue
        row = f"{r.path.label:<{width}}  {gbps(r.sender_bps):>14}  {gbps(r.receiver_bps):>15}"
        if udp:
            row += f"  {'-' if r.lost_percent is None else f'{r.lost_percent:.2f}':>7}"
        lines.append(row)
    return "\n".join(lines)
