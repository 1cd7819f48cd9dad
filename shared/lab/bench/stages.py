"""Where an end's CPU goes, by stage: py-spy's sampled stacks attributed through one table.

The bench samples the netback and netfront processes from outside (``profiler.py``: py-spy,
``--nonblocking``, so the data path is neither edited nor stopped) and this module turns each
sampled stack into one stage:

    ring     parsing requests and validating them, writing responses, index updates
    grant    grant table, maps/unmaps, grant copies, the region and the CPU/DMA views
    device   the TAP/vif system calls (readv/writev: in a TAP write the receiving stack
             runs inline, so its cost lands here, as measured before)
    notify   event channel kicks (the socket write, or a doorbell)
    other    everything the table does not name (packet headers, sk_buff churn, the loop,
             stats); a growing "other" says the table has gone stale

How a stack is attributed (``attribute``), leaf first, the innermost match winning:
  1. ``FUNCTION_STAGES``: a function (qualified name as py-spy prints it, its nested
     comprehensions included) decides for everything below it;
  2. for the innermost frame in the repository, its source line: ``LINE_STAGES`` tells a
     blocking wait (epoll) and a device system call apart (py-spy reports the Python line
     that is inside the C call, and counts a thread blocked in epoll_wait as running);
  3. ``MODULE_STAGES``: the file the frame is in, or its folder (a mechanism's package);
  and a frame that matches nothing hands the question to its caller. Samples attributed to
  ``wait`` are left out of the shares: they are a process waiting for work, not working.

py-spy takes a runnable thread for a working one: an end that waits for its core while the
other end runs is sampled where it stopped. Were the ends preempted when they woke each
other, that would be the system call that woke the peer (a kick, a TAP write), and those
lines would collect every sample of the wait; the bench runs the ends SCHED_BATCH
(placement.py), which removes wake-up preemption, so an end is switched out at the end of
its slice, wherever it is, and its samples stay in proportion to its CPU.
"""

from __future__ import annotations

import linecache
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
STAGES = ("ring", "grant", "device", "notify", "other")
WAIT = "wait"

FUNCTION_STAGES: dict[str, str] = {
    "EventChannel.notify": "notify",
    "kick_if": "notify",
    "TxRelease.release": "grant",
    "RxPath._place_held": "grant",
    "RxPath._respond": "ring",
    "RxPath._drop_posted": "ring",
}
"""Functions whose stage is not their module's (a module mixing two stages)."""

LINE_STAGES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.poll\(|\.select\(|epoll_wait"), WAIT),
    (re.compile(r"\b(?:os\.)?(?:readv|writev|read|write)\(\s*(?:self\.)?\w*(?:fd|tap)\b"),
     "device"),
)
"""Source-line patterns for the innermost repository frame (the line inside a C call)."""

MODULE_STAGES: dict[str, str] = {
    **dict.fromkeys(("shared/protocol/ring.py", "shared/protocol/netif.py",
                     "shared/protocol/slots.py", "backend/tx/requests.py",
                     "backend/tx/release.py", "backend/tx/small.py", "backend/rx/small.py",
                     "frontend/tx/queue.py", "frontend/tx/flow.py",
                     "frontend/rx/queue.py", "frontend/rx/stock.py"), "ring"),
    **dict.fromkeys(("shared/protocol/grant.py", "shared/protocol/region.py", "backend/grants/",
                     "backend/tx/modes/", "backend/rx/modes/", "frontend/tx/pages.py",
                     "frontend/grants/"), "grant"),
    **dict.fromkeys(("shared/plumbing/channel.py", "shared/plumbing/transport.py",
                     "shared/plumbing/doorbell/"), "notify"),
    **dict.fromkeys(("shared/plumbing/tap.py", "shared/plumbing/netdev.py"), "device"),
}
"""Repository file (relative path), or folder (ending in "/": every file under it, so a new
mechanism module is covered) -> stage, for frames no function rule names."""

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")


_PROCESS = re.compile(r'^process \d+:".*"$')


@dataclass(frozen=True)
class Frame:
    func: str
    file: str  # as py-spy prints it: relative to sys.path for our modules
    line: int


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text.strip())
    if m is None:
        return Frame(text.strip(), "", 0)
    return Frame(m["func"], m["file"], int(m["line"]))


def parse_raw(lines: Iterable[str]) -> list[tuple[list[Frame], int]]:
    """py-spy ``--format raw`` (collapsed stacks: ``root;...;leaf COUNT``) -> stacks, root
    first, with their sample counts. Lines that do not end in a count are skipped, and so
    are the ``process N:"argv"`` roots ``--subprocesses`` puts above a queue worker's stack
    (an end's workers are the end's)."""
    out = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            out.append(([parse_frame(f) for f in stack.split(";")
                         if not _PROCESS.match(f)], int(count)))
    return out


def module_stage(file: str) -> str | None:
    """The stage MODULE_STAGES gives a file: its own entry, else its folder's."""
    stage = MODULE_STAGES.get(file)
    if stage is None and "/" in file:
        stage = MODULE_STAGES.get(file.rsplit("/", 1)[0] + "/")
    return stage


def _function_stage(func: str) -> str | None:
    for name, stage in FUNCTION_STAGES.items():
        if func == name or func.startswith(name + ".<locals>"):
            return stage
    return None


def _in_repo(frame: Frame, root: Path) -> bool:
    return bool(frame.file) and not frame.file.startswith("<") and (root / frame.file).is_file()


def source_line(frame: Frame, root: Path = REPO_ROOT) -> str:
    return linecache.getline(str(root / frame.file), frame.line).strip()


def attribute(stack: list[Frame], root: Path = REPO_ROOT) -> str:
    """The stage of one sampled stack (root first), by the rules in the module docstring."""
    first_repo = True
    for frame in reversed(stack):
        stage = _function_stage(frame.func)
        if stage is None and first_repo and _in_repo(frame, root):
            first_repo = False
            text = source_line(frame, root)
            stage = next((s for pattern, s in LINE_STAGES if pattern.search(text)), None)
        if stage is None:
            stage = module_stage(frame.file)
        if stage is not None:
            return stage
    return "other"


def stage_counts(stacks: Iterable[tuple[list[Frame], int]], root: Path = REPO_ROOT) -> Counter:
    """Samples per stage (``wait`` included) over parsed stacks."""
    counts: Counter = Counter()
    for stack, n in stacks:
        counts[attribute(stack, root)] += n
    return counts


def shares(counts: Counter) -> dict[str, float] | None:
    """Each stage's share of the working samples (``wait`` left out), rounded; None if none."""
    working = sum(n for stage, n in counts.items() if stage != WAIT)
    if not working:
        return None
    return {stage: round(counts.get(stage, 0) / working, 3) for stage in STAGES}
