"""A blocking QMP client that works from any thread, event loop or not."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from shared.lab.machine.failure import MachineError

T = TypeVar("T")


class SyncQMP:
    """A blocking wrapper around qemu.qmp's asyncio QMPClient.

    Why not qemu.qmp.legacy: it runs the caller's (or a new) event loop in the calling thread,
    which breaks when called from code that already runs an asyncio loop. Here the client lives
    on a private loop in a daemon thread, so calls work from any thread or context.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client: Any = None

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, path: Path, timeout: float = 5.0) -> None:
        from qemu.qmp import QMPClient

        async def go() -> None:
            client = QMPClient(self.name)
            await client.connect(str(path))
            self._client = client

        self._call(go(), timeout)

    def execute(self, cmd: str, args: dict[str, object] | None = None,
                timeout: float = 10.0) -> object:
        if self._client is None:
            raise MachineError(f"QMP not connected ({self.name})")
        return self._call(self._client.execute(cmd, args), timeout)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._client is not None:
            try:
                self._call(self._client.disconnect(), 5.0)
            except Exception:  # noqa: BLE001 - QEMU may be gone already: nothing to close
                pass
            self._client = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
