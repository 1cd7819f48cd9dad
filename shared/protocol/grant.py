"""The grant table: entries shaped like Xen's ``grant_entry_v1`` {flags u16, domid u16, frame u32}.

The frontend writes an entry to let one backend domain reach one page of its region
(``grant``) and clears it to take that back (``end_access``). The backend checks an entry
before touching the page and sets ``GTF_reading``/``GTF_writing`` while it holds a mapping, so
``end_access`` refuses to revoke a grant in use, as ``gnttab_end_foreign_access_ref`` does.

Python has no compare-and-swap on shared memory, so unlike Xen the in-use bits are advisory:
a frontend that revokes a grant racing the backend's map only damages its own page (the region
is the frontend's memory); the backend's own safety never depends on them.
"""

from __future__ import annotations

import functools
import struct
from array import array
from dataclasses import dataclass

from shared.faults import PeerFault

GRANT_ENTRY = struct.Struct("<HHI")
GTF_permit_access = 1
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_in_use = GTF_reading | GTF_writing
#: Linux's GNTTAB_NR_RESERVED_ENTRIES: refs below this are never handed out.
RESERVED_REFS = 8


@functools.cache
def entries(n: int) -> struct.Struct:
    """n consecutive grant entries, unpacked in one call (flags, domid, frame, ...)."""
    return struct.Struct(GRANT_ENTRY.format[0] + GRANT_ENTRY.format[1:] * n)


#: one entry read as a little-endian u64 (``GrantTable.words``: a whole entry compared or
#: remembered as one value): flags in its low 16 bits, the frame in its high 32
WORD_FLAGS = 0xFFFF
WORD_FRAME_SHIFT = 32


class GrantError(PeerFault):
    """A grant reference the backend must not use: the frontend is buggy or hostile."""


@dataclass(frozen=True, slots=True)
class Grant:
    flags: int
    domid: int
    frame: int


class GrantTable:
    """``count`` entries at the start of ``buf``; frames are page numbers in the region."""

    def __init__(self, buf: memoryview, count: int) -> None:
        if count * GRANT_ENTRY.size > len(buf):
            raise ValueError("grant table does not fit its area")
        self.buf = buf
        self.count = count
        table = buf[: count * GRANT_ENTRY.size]
        #: the table as u16s (flags of entry ``ref`` at ``ref * GRANT_ENTRY.size // 2``)
        self.flags = table.cast("H")
        #: ``ref_flags[ref]``: the flags of entry ``ref`` (a strided view: a run of entries'
        #: flags is one slice, read or stored in one operation)
        self.ref_flags = self.flags[::GRANT_ENTRY.size // 2]
        #: ``words[ref]``: entry ``ref`` as one u64 (see WORD_FLAGS, WORD_FRAME_SHIFT)
        self.words = table.cast("Q")
        assert self.words.itemsize == GRANT_ENTRY.size
        #: end_access_run's source of zeros: built on first use, as long as the longest run
        #: revoked (a frontend's frame), never per declared entry - the backend, which never
        #: revokes, builds nothing per entry of a table whose size the frontend declares
        self._no_flags = memoryview(array("H"))
        self._views = (table, self.flags, self.ref_flags, self.words)

    def release(self) -> None:
        """Release the views this table made of ``buf`` (derived views keep a mapping alive:
        ``Region.close`` calls this before it unmaps). Idempotent."""
        for view in reversed(self._views):
            try:
                view.release()
            except BufferError:  # someone exported it: the mapping stays pinned (Region says)
                pass

    def span(self, ref: int, n: int) -> memoryview:
        """The bytes of ``n`` entries from ``ref`` on (a frontend grants a run with one copy)."""
        return self.buf[ref * GRANT_ENTRY.size:(ref + n) * GRANT_ENTRY.size]

    def read(self, ref: int) -> Grant:
        if not 0 <= ref < self.count:
            raise GrantError(f"gref {ref} outside the table (0..{self.count - 1})")
        return Grant(*GRANT_ENTRY.unpack_from(self.buf, ref * GRANT_ENTRY.size))

    # --- frontend side ------------------------------------------------------------------
    def grant(self, ref: int, domid: int, frame: int, readonly: bool = False) -> None:
        """gnttab_grant_foreign_access_ref. One store of the whole entry is enough: the backend
        reads an entry only after it sees a ring request published later (x86 keeps stores in
        order), never by scanning the table."""
        GRANT_ENTRY.pack_into(self.buf, ref * GRANT_ENTRY.size,
                              GTF_permit_access | (GTF_readonly if readonly else 0), domid, frame)

    def end_access(self, ref: int) -> bool:
        """Revoke; refused (False) while the backend has the grant in use."""
        if self.ref_flags[ref] & GTF_in_use:
            return False
        self.ref_flags[ref] = 0
        return True

    def end_access_run(self, ref: int, n: int) -> bool:
        """Revoke ``n`` consecutive grants from ``ref`` on with two C-level operations;
        refused (False, nothing changed) while the backend has any of them in use."""
        flags = self.ref_flags[ref:ref + n]
        # GTF_reading/GTF_writing are the only flag bits >= 8: one max() checks them all
        if n and max(flags) >= GTF_reading:
            return False
        if len(self._no_flags) < len(flags):
            self._no_flags = memoryview(array("H", bytes(2 * len(flags))))
        flags[:] = self._no_flags[:len(flags)]
        return True

    def in_use(self, ref: int) -> bool:
        return bool(self.ref_flags[ref] & GTF_in_use)

    # --- backend side -------------------------------------------------------------------
    def check(self, ref: int, domid: int, write: bool, frames: range) -> int:
        """Validate ``ref`` for access by ``domid``; return the frame it grants."""
        if not 0 <= ref < self.count:
            raise GrantError(f"gref {ref} outside the table (0..{self.count - 1})")
        flags, gdomid, frame = GRANT_ENTRY.unpack_from(self.buf, ref * GRANT_ENTRY.size)
        if not flags & GTF_permit_access:
            raise GrantError(f"gref {ref} is not granted")
        if gdomid != domid:
            raise GrantError(f"gref {ref} is granted to domain {gdomid}, not {domid}")
        if write and flags & GTF_readonly:
            raise GrantError(f"gref {ref} is read-only")
        if frame not in frames:
            raise GrantError(f"gref {ref} grants frame {frame}, outside the payload area")
        return frame

    def check_many(self, refs: list[int], domid: int, write: bool, frames: range) -> list[int]:
        """``check`` for a batch (an RX refill's buffers): each entry read as one word and
        judged in one loop; the first bad one is judged again by ``check``, which raises
        naming its fault."""
        words, count = self.words, self.count
        want = GTF_permit_access | (domid << 16)
        mask = 0xFFFF0000 | GTF_permit_access | (GTF_readonly if write else 0)
        out = []
        for ref in refs:
            if 0 <= ref < count:
                w = words[ref]
                frame = w >> WORD_FRAME_SHIFT
                if w & mask == want and frame in frames:
                    out.append(frame)
                    continue
            out.append(self.check(ref, domid, write, frames))
        return out

    def mark(self, ref: int, write: bool) -> None:
        self.ref_flags[ref] |= GTF_writing if write else GTF_reading

    def unmark(self, ref: int) -> None:
        self.ref_flags[ref] &= ~GTF_in_use & 0xFFFF
