"""What an SQLite error means to the queue: "cannot now" (QueueUnavailable) or a bug.

"Cannot now" SQLite errors (disk full, locked, I/O) become QueueUnavailable,
which the SMTP side answers with 452 4.3.1; real bugs pass through
(sqlite_errors, around every statement of the store's roles).
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator

# SQLite primary result codes that mean "the queue cannot take this now"
# (disk full, locked by another writer, I/O trouble): the SMTP side answers
# 452 4.3.1 and the client retries later (RFC 5321 4.5.3.1.10, RFC 3463 4.3.1).
_UNAVAILABLE_CODES = frozenset(
    getattr(sqlite3, name)
    for name in (
        "SQLITE_FULL", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_CANTOPEN",
        "SQLITE_NOMEM", "SQLITE_PROTOCOL", "SQLITE_READONLY", "SQLITE_CORRUPT", "SQLITE_NOTADB",
        "SQLITE_NOLFS", "SQLITE_PERM",
    )
)


class QueueUnavailable(Exception):
    """The queue cannot be written (or read) now: disk full, locked, I/O error.

    The SMTP side answers 452 4.3.1; nothing was changed.
    """


def is_unavailable(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # No code (e.g. raised by the sqlite3 module itself): go by the text.
        text = str(exc).lower()
        return any(w in text for w in ("locked", "busy", "disk", "full", "i/o", "unable to open"))
    return (code & 0xFF) in _UNAVAILABLE_CODES


@contextmanager
def sqlite_errors() -> Iterator[None]:
    """Turn "cannot now" SQLite errors into QueueUnavailable; let real bugs through."""
    try:
        yield
    except sqlite3.Error as exc:
        if is_unavailable(exc):
            raise QueueUnavailable(f"queue database: {exc}") from exc
        raise
