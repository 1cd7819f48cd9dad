"""What every build step shares: the failure type, progress lines and running a tool."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator


class ImageBuildError(RuntimeError):
    """The image cannot be built; the message says which step failed and why."""



class Progress:
    """Step lines with the elapsed time since the build started, on stderr.

    Why: a build from nothing takes ~20 s (mostly unpacking 400 MB of modules); silence that
    long looks like a hang.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, msg: str) -> Iterator[None]:
        self.say(msg + " ...")
        t = time.monotonic()
        yield
        if self.enabled and time.monotonic() - t >= 0.5:
            self.say(f"  done in {time.monotonic() - t:.1f}s")



def run_tool(argv: list[str], what: str, **kw: object) -> str:
    """Run a build tool; its stdout, or ImageBuildError naming the step and its stderr."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what}: {argv[0]} not found ({e})") from e
    if res.returncode != 0:
        raise ImageBuildError(
            f"{what}: `{' '.join(argv)}` exited {res.returncode}: {res.stderr.strip()[-800:]}"
        )
    return res.stdout

