"""Text from a peer that is not trusted (a frontend's name, a guest's control reply), made
safe to print or log: a newline would forge a log line, an escape sequence would drive the
operator's terminal."""

from __future__ import annotations

#: longest untrusted string printed or logged
MAX_TEXT = 200


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` with every non-printable character (ESC, CSI, newlines, bidi overrides) as
    its backslash escape, cut to ``limit`` characters (then marked with "...")."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)
