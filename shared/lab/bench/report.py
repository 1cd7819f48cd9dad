"""Turning records into what a person reads: the markdown table, the targets, JSON, a plot.

The targets are the issue's goals; the bench reports them and never asserts them (a shared,
noisy two-core machine decides too much of the absolute numbers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FsPath

from shared.lab.bench.modes import name_of, parse
from shared.lab.bench.record import PRIMARY, Record
from shared.lab.bench.workloads import WORKLOADS
from shared.protocol.mechanisms import default

PVNET_PATHS = ("pvnet-netns", "pvnet-qemu")

Column = tuple[str, Callable[[Record], str]]


def cell(v: float | None, fmt: str = ".2f", scale: float = 1.0) -> str:
    """A figure as a table cell: "-" when there is none."""
    return "-" if v is None else format(v * scale, fmt)


def _pair(a: float | None, b: float | None, fmt: str = ".1f") -> str:
    if a is None and b is None:
        return "-"
    return f"{cell(a, fmt)} / {cell(b, fmt)}"


def _ops(ops: dict[str, float | None] | None) -> str:
    if not ops:
        return "-"
    return " / ".join(cell(ops.get(k), ".2f") for k in OP_KEYS)


OP_KEYS = ("map", "unmap", "fault", "grant_copy_kb", "notify")

COLUMNS: list[Column] = [
    ("path", lambda r: r.path),
    ("mode", lambda r: r.mode),
    ("workload", lambda r: r.workload),
    ("dir", lambda r: r.direction),
    ("Gbit/s", lambda r: cell(r.gbps, ".3f")),
    ("kframes/s", lambda r: cell(r.fps, ".1f", 1e-3)),
    ("offered kframes/s", lambda r: cell(r.offered_fps, ".1f", 1e-3)),
    ("loss %", lambda r: cell(r.loss_pct, ".1f")),
    ("p50 µs", lambda r: cell(r.p50_us, ".1f")),
    ("p99 µs", lambda r: cell(r.p99_us, ".1f")),
    ("vs veth", lambda r: cell(r.vs_veth, ".2f")),
    ("vs virtio", lambda r: cell(r.vs_virtio, ".2f")),
    ("CPU s/GB f / b", lambda r: _pair(r.cpu_front_s_per_gb, r.cpu_back_s_per_gb)),
    ("CPU % f / b", lambda r: _pair(r.cpu_front_pct, r.cpu_back_pct, ".0f")),
    ("notif/pkt", lambda r: cell(r.notify_per_pkt, ".3f")),
    ("maps/pkt", lambda r: cell(r.maps_per_pkt, ".2f")),
    ("copy B/pkt", lambda r: cell(r.copy_bytes_per_pkt, ".0f")),
    ("op µs map / unmap / fault / copy KB / notify", lambda r: _ops(r.op_us)),
    ("RSS MB f / b", lambda r: _pair(r.rss_front_mb, r.rss_back_mb, ".0f")),
    ("95 % CI", lambda r: ci_text(r)),
]

#: how the table shows each figure an interval may be of: (scale, format)
CI_SHOWN = {"gbps": (1.0, ".3f"), "fps": (1e-3, ".1f"), "tps": (1e-3, ".2f"),
            "p50_us": (1.0, ".1f")}


def ci_text(r: Record) -> str:
    """The 95 % interval over rounds of the row's headline figure, in its column's unit:
    the primary figure, or p50 for rr (whose primary, transactions/s, is its inverse)."""
    name = "p50_us" if r.workload == "rr" else PRIMARY.get(r.workload, "gbps")
    iv = (r.ci95 or {}).get(name)
    if iv is None:
        return "-"
    scale, fmt = CI_SHOWN.get(name, (1.0, ".3g"))
    unit = {"fps": "k", "tps": "k tps", "p50_us": " µs p50"}.get(name, "")
    return f"{iv[0] * scale:{fmt}}-{iv[1] * scale:{fmt}}{unit}"


def markdown_table(records: list[Record]) -> str:
    """A GitHub-markdown table, one row per record; failed ones say why in the first column."""
    head = [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in records:
        if r.error:
            cells = [r.path, r.mode, r.workload, r.direction, f"error: {r.error}"]
            cells += [""] * (len(COLUMNS) - len(cells))
        else:
            cells = [fn(r) for _, fn in COLUMNS]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "vs veth / vs virtio: Gbit/s for tcp*, delivered frames/s for udp64 and pps*, "
    "transactions/s for rr, each over the same workload and direction on that path. kframes/s "
    "for tcp and rr: frames counted on the path (a GSO frame counts once; rr counts both "
    "directions); for pps*: delivered at the receiver, beside what trafgen offered. f / b: "
    "frontend / backend process. notif/pkt: notifications either end sent on either ring per "
    "data packet. Figures are the median round's; 95 % CI: the interval of the mean over the "
    "rounds (Student's t; p50 for rr).")


@dataclass(frozen=True)
class TargetResult:
    text: str
    value: str
    met: bool | None  # None: not measured in this run (or a figure only reported)
    reported: bool = False  # a figure with no goal: shown, never counted as met

    def line(self) -> str:
        mark = {True: "met", False: "NOT met", None: "not measured"}[self.met]
        if self.reported and self.value != "n/a":
            mark = "reported"
        return f"- {self.text}: {self.value} -- {mark}"


def find(records: list[Record], path: str, mode: str, workload: str,
         direction: str) -> Record | None:
    """The record of that key, if it measured something (a refused record did not)."""
    for r in records:
        if (r.path, r.mode, r.workload, r.direction) == (path, mode, workload, direction):
            return r if r.error is None else None
    return None


def _ratio_target(text: str, num: Record | None, den: Record | None, attr: str,
                  goal: float) -> TargetResult:
    a = getattr(num, attr) if num else None
    b = getattr(den, attr) if den else None
    if a is None or not b:
        return TargetResult(text, "n/a", None)
    ratio = a / b
    return TargetResult(text, f"{ratio:.2f}x", ratio >= goal)


#: the reference mode every other is compared with: the default TX mechanism
REF = default("tx")
#: (mode, against mode, workload, goal, why): what the seeds claim, checked in every run
CLAIMS = (
    (REF, "map", "tcp", 1.5, "64 KB GSO frames (Santos)"),
    (REF, "copy", "tcp", 1.1, "64 KB GSO frames (Snabb's 'just copy' costs a copy)"),
    ("map-persistent", "map", "tcp-nogso", 1.2, "MTU frames (persistent-grant RFC)"),
    (REF, name_of(REF, noslots=True), "pps64", 1.0, "header slots, 64-byte frames"),
)
for _claim in CLAIMS:  # a renamed mechanism fails here, not silently in a report
    parse(_claim[0]), parse(_claim[1])


def targets(records: list[Record]) -> list[TargetResult]:
    """The goals: the namespace pair against veth, the seeds' claims (``CLAIMS``), 64-byte
    UDP; the QEMU placement against virtio-net (same guest type, same run)."""
    out: list[TargetResult] = []
    p = "pvnet-netns"
    if any(r.path == p for r in records) or not any(r.path == "pvnet-qemu" for r in records):
        for d in ("tx", "rx"):
            lazy = find(records, p, REF, "tcp", d)
            veth = find(records, "veth", "-", "tcp", d)
            out.append(_ratio_target(f"{p} {REF} TCP {d} >= 0.6x veth", lazy, veth, "gbps", 0.6))
        for num, den, workload, goal, why in CLAIMS:  # what the seeds claim
            out.append(_ratio_target(f"{p} {num} >= {goal}x {den}, {why} ({workload} tx)",
                                     find(records, p, num, workload, "tx"),
                                     find(records, p, den, workload, "tx"),
                                     WORKLOADS[workload].primary, goal))
        for d in ("tx", "rx"):
            r = find(records, p, REF, "udp64", d)
            fps = r.fps if r else None
            out.append(TargetResult(f"{p} {REF} UDP 64 B {d} >= 100k frames/s delivered",
                                    "n/a" if fps is None else f"{fps / 1e3:.1f}k",
                                    None if fps is None else fps >= 100e3))
    out += rate_targets(records)
    if any(r.path == "pvnet-qemu" for r in records):
        out.append(_ratio_target(
            f"pvnet-qemu {REF} TCP guest->wire >= 1.0x virtio-net (same guest type)",
            find(records, "pvnet-qemu", REF, "tcp", "tx"),
            find(records, "virtio-net", "-", "tcp", "tx"), "gbps", 1.0))
        out += _guest_targets(records)
    return out


def _guest_targets(records: list[Record]) -> list[TargetResult]:
    """The guest path within reach of virtio-net in the same guest (same run)."""
    q, v = "pvnet-qemu", "virtio-net"
    out = [_ratio_target(f"{q} {REF} TCP {arrow} >= {goal}x virtio-net",
                         find(records, q, REF, "tcp", d), find(records, v, "-", "tcp", d),
                         "gbps", goal)
           for d, arrow, goal in (("tx", "guest->wire", 0.6), ("rx", "wire->guest", 0.5))]
    a, b = find(records, q, REF, "rr", "both"), find(records, v, "-", "rr", "both")
    pa, pb = (a.p50_us if a else None), (b.p50_us if b else None)
    text = f"{q} {REF} rr p50 <= 3x virtio-net's"
    out.append(TargetResult(text, "n/a", None) if pa is None or not pb
               else TargetResult(text, f"{pa / pb:.1f}x ({pa:.0f} vs {pb:.0f} us)",
                                 pa <= 3 * pb))
    for d in ("tx", "rx"):
        out.append(_ratio_target(f"{q}-g2g {REF} TCP guest->guest ({d}) >= 0.5x virtio-net-g2g",
                                 find(records, q + "-g2g", REF, "tcp", d),
                                 find(records, v + "-g2g", "-", "tcp", d), "gbps", 0.5))
    for d in ("tx", "rx"):  # reported, no goal: the ratio is the figure
        r = _ratio_target(f"{q} {REF} UDP 64 B {d} frames/s vs virtio-net (reported)",
                          find(records, q, REF, "udp64", d),
                          find(records, v, "-", "udp64", d), "fps", 0.0)
        out.append(TargetResult(r.text, r.value, None, reported=True))
    return out


def targets_text(records: list[Record]) -> str:
    res = targets(records)
    met = sum(1 for t in res if t.met)
    known = sum(1 for t in res if t.met is not None)
    return "\n".join([f"Targets: {met} of {known} measured met", *[t.line() for t in res],
                      *capture_lines(records), *mechanism_lines(records),
                      *floor_lines(records)])


def rate_targets(records: list[Record]) -> list[TargetResult]:
    """A vif limited to N Mbit/s (Linux's ``rate``) moves N Mbit/s of TCP guest->wire,
    within 5 % (the limit counts whole frames; iperf3 counts payload)."""
    out = []
    for r in records:
        limit = parse(r.mode).rate_mbit if r.mode != "-" else None
        if limit is None or (r.workload, r.direction) != ("tcp", "tx") or r.gbps is None:
            continue
        ratio = r.gbps * 1e3 / limit
        out.append(TargetResult(f"{r.path} {r.mode}: TCP tx within 5 % of {limit} Mbit/s",
                                f"{r.gbps * 1e3:.1f} Mbit/s ({ratio:.3f}x)",
                                abs(ratio - 1) <= 0.05))
    return out


def capture_lines(records: list[Record]) -> list[str]:
    """The cost of `pvnet capture`: each capture mode's primary figure over the same mode's
    without a capture, same workload and direction, same run."""
    out = []
    for r in records:
        if r.path != "pvnet-netns" or "+capture" not in r.mode:
            continue
        plain = r.mode.split("+capture")[0]
        base = find(records, r.path, plain, r.workload, r.direction)
        if base is None or r.primary is None or not base.primary:
            continue
        out.append(f"- capture cost: {r.mode} {r.workload} {r.direction}: "
                   f"{r.primary / base.primary:.2f}x {plain} without a capture")
    return (["Capture (same run):", *out]) if out else []


def mechanism_lines(records: list[Record]) -> list[str]:
    """Every registered mechanism (and option) against the reference mechanism, per
    workload and direction, same run: the comparisons no target names."""
    out = []
    for r in records:
        if r.path != "pvnet-netns" or r.mode == REF or "+capture" in r.mode \
                or "+rate-" in r.mode:
            continue
        base = find(records, r.path, REF, r.workload, r.direction)
        if base is None or r.primary is None or not base.primary:
            continue
        out.append(f"- {r.mode} {r.workload} {r.direction}: {r.primary / base.primary:.2f}x "
                   f"{REF}")
    return (["Mechanisms against " + REF + " (same run):", *out]) if out else []


def floor_lines(records: list[Record]) -> list[str]:
    """pvnet's reference mode over the ``tap-relay`` path (the least a Python driver over the
    same two TAPs does: ``shared.lab.bench.tap_relay``), per workload and direction, same run:
    the primary figure's ratio and the whole machine's CPU per frame of each, whose difference
    is what the split driver itself costs."""
    out = []
    for r in records:
        if r.path != "pvnet-netns" or r.mode != REF:
            continue
        floor = find(records, "tap-relay", "-", r.workload, r.direction)
        if floor is None or r.primary is None or not floor.primary:
            continue
        line = f"- {r.workload} {r.direction}: {r.primary / floor.primary:.2f}x the relay"
        ours, least = r.cpu_machine_us_per_frame, floor.cpu_machine_us_per_frame
        if ours is not None and least is not None:
            line += (f"; CPU per frame, whole machine, {ours:.1f} vs {least:.1f} µs "
                     f"(the split driver: {ours - least:+.1f} µs)")
        out.append(line)
    return (["pvnet-netns " + REF + " against the tap-relay floor (same run):", *out]
            if out else [])


def write_json(records: list[Record], path: FsPath) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.as_dict() for r in records], indent=1) + "\n")


def read_json(path: FsPath) -> list[Record]:
    return [Record.from_dict(d) for d in json.loads(path.read_text())]


def _label(r: Record) -> str:
    return r.path if r.mode == "-" else f"{r.path}\n{r.mode}"


def plot(records: list[Record], out: FsPath) -> FsPath | None:
    """Four panels (TCP Gbit/s, UDP 64 B and trafgen kframes/s, rr latency); None if no
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.error is None or r.primary is not None]
    labels = list(dict.fromkeys(_label(r) for r in ok))
    if not labels:
        return None
    panels = [
        ("TCP, one stream (Gbit/s)", "gbps", 1.0,
         [("tcp", "tx"), ("tcp", "rx"), ("tcp-nogso", "tx"), ("tcp-nogso", "rx")]),
        ("UDP 64 B delivered (kframes/s)", "fps", 1e-3, [("udp64", "tx"), ("udp64", "rx")]),
        ("trafgen frames delivered (kframes/s)", "fps", 1e-3,
         [("pps64", "tx"), ("pps64", "rx"), ("pps1496", "tx"), ("pps1496", "rx")]),
        ("1-byte TCP request/response (µs)", None, 1.0, [("rr", "both")]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.4 * len(labels)), 11))
    x = list(range(len(labels)))
    for ax, (title, attr, scale, series) in zip(axes, panels, strict=True):
        bars = ([(f"{w} {d}", w, d, attr) for w, d in series] if attr
                else [("p50", "rr", "both", "p50_us"), ("p99", "rr", "both", "p99_us")])
        width = 0.8 / len(bars)
        for i, (name, w, d, field) in enumerate(bars):
            vals = []
            for lab in labels:
                r = next((r for r in ok if _label(r) == lab and r.workload == w
                          and r.direction == d), None)
                v = getattr(r, field) if r else None
                vals.append(0.0 if v is None else v * scale)
            ax.bar([xi + (i - (len(bars) - 1) / 2) * width for xi in x], vals, width, label=name)
        ax.set_title(title)
        ax.set_xticks(x, labels, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
