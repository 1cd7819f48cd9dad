"""``transient``: netif.h's grants - a page is granted when a request names it and its grant is
ended once the backend has answered (``GrantTable.end_access_run``, refused while the backend
still holds it: GTF_reading/GTF_writing). One copy of prepared entries per run, one strided
check-and-clear per run to revoke."""

from __future__ import annotations

from frontend.grants.base import GrantPolicy, RefRun, Run


class Transient(GrantPolicy):
    def grant(self, runs: list[Run]) -> None:
        for dst, entries in runs:
            dst[:] = entries

    def revoke(self, runs: list[RefRun]) -> bool:
        end = self.table.end_access_run
        return all([end(ref, n) for ref, n in runs])


MECHANISM = Transient
