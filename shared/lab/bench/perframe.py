"""The per-frame cost table and the per-frame goals' figures (MTU and 64 B rates, CPU per frame).

A second table beside the main one, because what it shows is per frame rather than per
second: each end's CPU and the whole machine's per data frame, the pps generator's share,
where each end's CPU went by stage (py-spy, stages.py), the load the run shared the machine
with, and the cores it ran on.
"""

from __future__ import annotations

from shared.lab.bench.record import Record
from shared.lab.bench.report import REF, TargetResult, cell, find
from shared.lab.bench.stages import STAGES

STAGE_LETTERS = "/".join(s[0] for s in STAGES)  # r/g/d/n/o


def stages_text(r: Record, end: str) -> str:
    """'30/5/40/15/10 (n=250)': percent of the end's sampled CPU per stage, and the samples."""
    shares = (r.stages or {}).get(end)
    if not shares:
        return "-"
    n = (r.stage_samples or {}).get(end)
    cells = "/".join(f"{100 * shares.get(s, 0.0):.0f}" for s in STAGES)
    return f"{cells} (n={n})" if n is not None else cells


def _load(r: Record) -> str:
    if r.load1 is None:
        return "-"
    return " / ".join([f"{r.load1:.1f}", *(cell(v, ".0f") for v in (
        r.busy_pct, r.outside_pct, r.kthreads_pct))])


COLUMNS = [
    ("path", lambda r: r.path),
    ("mode", lambda r: r.mode),
    ("workload", lambda r: r.workload),
    ("dir", lambda r: r.direction),
    ("kframes/s", lambda r: cell(r.fps, ".1f", 1e-3)),
    ("CPU µs/frame f / b / ours / machine", lambda r: " / ".join(
        cell(v, ".1f") for v in (r.cpu_front_us_per_frame, r.cpu_back_us_per_frame,
                                 r.cpu_ours_us_per_frame, r.cpu_machine_us_per_frame))),
    ("gen µs/frame", lambda r: cell(r.cpu_gen_us_per_frame, ".1f")),
    ("wait µs/frame f / b", lambda r: " / ".join(
        cell(v, ".1f") for v in (r.wait_front_us_per_frame, r.wait_back_us_per_frame))),
    (f"b stages % {STAGE_LETTERS}", lambda r: stages_text(r, "back")),
    (f"f stages % {STAGE_LETTERS}", lambda r: stages_text(r, "front")),
    ("load1 / busy / outside / kthreads %", _load),
    ("cores", lambda r: r.cpus or "-"),
]

LEGEND = (
    "CPU µs/frame: process CPU of the frontend (f; the QEMU process for pvnet-qemu) and "
    "backend (b; QEMU for virtio-net), ours (the bench's processes and the kernel threads) and "
    "the whole machine's busy CPU from /proc/stat (user+nice+system+irq+softirq, every core, "
    "the neighbours' included), the py-spy samplers' own CPU taken out of both, per "
    "data frame of the run: frames counted on the path, or delivered at the receiver for pps*. "
    "gen: trafgen's own CPU per delivered frame (inside the machine figure). wait: the time "
    "each end was runnable but waited for its core (schedstat run_delay; on the pps path core "
    "the ends take turns). stages: share of each end's sampled CPU in ring / grant / device / "
    "notify / other (stages.py; the ends run SCHED_BATCH so that samples of an end waiting "
    "for its core fall where it runs, placement.py), n working samples. "
    "load1: 1-minute load average after the run; busy: all cores' busy share; "
    "outside: busy share not spent by the bench, the processes it started or kernel threads "
    "(the neighbours'); kthreads: kernel threads' share (ksoftirqd may carry our softirqs).")


def cost_table(records: list[Record]) -> str:
    """The per-frame table: one row per record that measured something."""
    head = [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        if r.error is None:
            cells = [fn(r) for _, fn in COLUMNS]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


PAIR = ("pvnet-netns", REF)  # the default TX mechanism (lazy)
GOAL_64B_FPS = 80e3  # ixy.py's per-direction rate: the per-frame goal


def _reported(text: str, r: Record | None, value: str) -> TargetResult:
    return TargetResult(text, value if r is not None else "n/a", None, reported=True)


def _with_veth(records: list[Record], r: Record | None, attr: str, fmt: str,
               scale: float = 1.0) -> str:
    """`attr` of r with its interval and its ratio to veth's in the same run."""
    if r is None or getattr(r, attr) is None:
        return "n/a"
    v = getattr(r, attr)
    iv = (r.ci95 or {}).get(attr)
    text = f"{v * scale:{fmt}}" + (f" [{iv[0] * scale:{fmt}}-{iv[1] * scale:{fmt}}]" if iv
                                   else "")
    base = find(records, "veth", "-", r.workload, r.direction)
    b = getattr(base, attr) if base else None
    return text + (f", {v / b:.2f}x veth" if b else "")


def per_frame_goals(records: list[Record]) -> list[TargetResult]:
    """The per-frame goals' figures through the netns pair (default TX mode): MTU frames each
    way, 64 B frames per direction (goal: 80k/s), rr p50 and CPU per MTU frame (whole machine);
    each with its interval and veth's ratio in the same run. Only the 64 B goal is absolute:
    the others are judged against a baseline, which this table is the way to measure."""
    out = []
    for d, arrow in (("rx", "wire->guest"), ("tx", "guest->wire")):
        r = find(records, *PAIR, "tcp-nogso", d)
        out.append(_reported(f"per frame: MTU frames {arrow} kframes/s (tcp-nogso)", r,
                             _with_veth(records, r, "fps", ".1f", 1e-3)))
        out.append(_reported(f"per frame: CPU µs per MTU frame {arrow}, whole machine", r,
                             _with_veth(records, r, "cpu_machine_us_per_frame", ".1f")))
        out.append(_reported(f"per frame: CPU µs per MTU frame {arrow}, ours + kthreads", r,
                             _with_veth(records, r, "cpu_ours_us_per_frame", ".1f")))
    for d in ("tx", "rx"):
        r = find(records, *PAIR, "pps64", d)
        fps = r.fps if r else None
        out.append(TargetResult(f"per frame: 64 B frames {d} >= 80k frames/s delivered (pps64)",
                                _with_veth(records, r, "fps", ".1f", 1e-3),
                                None if fps is None else fps >= GOAL_64B_FPS))
    r = find(records, *PAIR, "rr", "both")
    out.append(_reported("per frame: rr p50 µs", r, _with_veth(records, r, "p50_us", ".1f")))
    return out
