"""The launcher's failure type: everything needed to see why without re-running."""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class MachineError(RuntimeError):
    """QEMU or the guest failed; carries what is needed to see why without re-running.

    The message includes the full QEMU command line, QEMU's exit code and the tails of QEMU's
    own output and of the guest console.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        exitcode: int | None = None,
        qemu_log: str = "",
        console: str = "",
    ) -> None:
        self.message = message
        self.argv = list(argv)
        self.exitcode = exitcode
        self.qemu_log = qemu_log
        self.console = console
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.message]
        if self.argv:
            parts.append(f"command: {shlex.join(self.argv)}")
        if self.exitcode is not None:
            parts.append(f"QEMU exit code: {self.exitcode}")
        if self.qemu_log.strip():
            parts.append("QEMU output (tail):\n" + self.qemu_log.rstrip())
        if self.console.strip():
            parts.append("guest console (tail):\n" + self.console.rstrip())
        return "\n".join(parts)


VMLaunchError = MachineError  # the name QEMU's machine.py uses for launch failures
