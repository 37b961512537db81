"""Message bodies in the queue: the body_chunks rows a body is cut into, and a body read back in pieces.

A body is stored in consecutive body_chunks rows whose lengths pack SQLite's
pages (chunk_lengths: schema.sql says why); BodyReader reads it back as a
binary file, in short read transactions, and only while a queue row still
refers to its message (STILL_QUEUED). A body whose chunks do not add up to
its size is DamagedBody: nothing of it is delivered.
"""

from __future__ import annotations

import bisect
import io
import sqlite3

from backupmx.store_errors import sqlite_errors

CHUNK = 64 * 1024  # bytes copied per step into and out of a body blob

BIG_CHUNK_PAGES = 16  # overflow pages of the longest body chunk (64 KB with 4 KB pages)

def chunk_lengths(size: int, page_size: int) -> list[int]:
    """The lengths of the body_chunks rows a body of `size` bytes is stored in (schema.sql).

    Small rows pack a leaf page: eight of them fill it (with their cell
    headers, a 4-byte rowid and 2-byte pointers), so the pages of 2 KB bodies
    are full, where a body in its own row took a page to itself. Past one
    overflow page's worth a chunk takes what fills its overflow pages
    exactly (up to BIG_CHUNK_PAGES), so that a long body costs few rows (a
    row each costs time at accept) and wastes no space either. SQLite keeps
    the first min_local bytes of an overflowing row on the leaf page and the
    rest on overflow pages of page_size - 4 payload bytes each (the file
    format, section 1.6, "Cell Payload Overflow Pages"); 5 bytes of those are
    the record's header, the rest the chunk's first bytes (`on_leaf`).
    """
    overflow = page_size - 4
    on_leaf = (page_size - 12) * 32 // 255 - 23 - 5
    small = (page_size - 8) // 8 - 12
    lengths = []
    left = size
    while (pages := min(BIG_CHUNK_PAGES, (left - on_leaf) // overflow)) > 0:
        lengths.append(on_leaf + pages * overflow)
        left -= lengths[-1]
    full, rest = divmod(left, small)  # the rest fits no overflow page: small pieces
    return lengths + [small] * full + ([rest] if rest else [])

class DamagedBody(Exception):
    """A message's stored chunks do not add up to its size (a chunk deleted by hand?).

    Nothing of it is delivered: the flusher drops the connection mid-DATA and
    the message stays queued.
    """

# A body is read only while a queue row refers to its message: once the last one left
# (delivered, or deleted by the operator while a flush announced it: flush_session._Gone), the
# message waits for housekeeping's reclaim (schema.sql, reclaim) but is no longer there
# to send. Its domains in message_domains, then each row by the queue's key (schema 15).
STILL_QUEUED = (" AND EXISTS (SELECT 1 FROM message_domains AS d JOIN queue AS q"
                " ON q.domain = d.domain AND q.queue_id = d.queue_id WHERE d.queue_id = m.queue_id)")
# ... and where the reader knows the domain (a flush): that domain's row, one search of
# the queue's key (its parameter follows the queue id's).
STILL_QUEUED_FOR = " AND EXISTS (SELECT 1 FROM queue AS q WHERE q.domain = ? AND q.queue_id = m.queue_id)"

class BodyReader(io.RawIOBase):
    """A message body, read from its chunks in pieces.

    Each refill reads in its own short read transaction, so a slow delivery
    never pins an old WAL snapshot (which would stop checkpoints and make the
    caller's later writes fail with SQLITE_BUSY_SNAPSHOT). Refills are
    READAHEAD bytes, so fewer, larger refills keep a 50 MB read cheap; a
    body of at most READAHEAD bytes (all but the longest) is read whole, at
    once.
    """

    READAHEAD = 1024 * 1024

    def __init__(self, db: sqlite3.Connection, queue_id: str, size: int, still: tuple[str, tuple]):
        super().__init__()
        self._db = db
        self.queue_id = queue_id
        self.size = size
        # When the body may still be read: STILL_QUEUED or STILL_QUEUED_FOR, and its parameters
        # (QueueDatabase.open_body).
        self._still = still
        self._pos = 0
        self._buf = b""
        self._buf_start = 0
        self._starts: list[int] | None = None  # where each chunk starts in the body, once a refill needed it

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self.size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read of closed body")
        if n is None or n < 0:
            n = self.size - self._pos
        n = min(n, self.size - self._pos)
        if n <= 0:
            return b""
        offset = self._pos - self._buf_start
        if not (0 <= offset and offset + n <= len(self._buf)):
            self._buf = b""  # free the old buffer before the new one is read
            self._buf = self._fetch(self._pos, max(n, min(self.READAHEAD, self.size - self._pos)))
            self._buf_start, offset = self._pos, 0
        data = self._buf[offset:offset + n]
        self._pos += len(data)
        return data

    def _fetch(self, pos: int, n: int) -> bytes:
        if pos == 0 and n >= self.size:
            return self._whole()
        with sqlite_errors():
            own = not self._db.in_transaction
            if own:
                self._db.execute("BEGIN")
            try:
                row = self._db.execute("SELECT first_chunk, last_chunk FROM messages AS m WHERE m.queue_id = ?"
                                       + self._still[0], self._still[1]).fetchone()
                if row is None:
                    raise KeyError(f"message {self.queue_id} is no longer in the queue")
                return self._read_chunks(*row, pos, n)
            finally:
                if own:
                    self._db.execute("COMMIT")

    def _whole(self) -> bytes:
        """The whole body (a flush reads all but the longest so): the message's row and its
        chunks in ONE statement, which is a snapshot of its own, where a BEGIN, two SELECTs
        and a COMMIT took four round trips into SQLite for every message delivered."""
        with sqlite_errors():
            rows = self._db.execute(
                "SELECT c.data FROM messages AS m LEFT JOIN body_chunks AS c ON c.id BETWEEN m.first_chunk"
                " AND m.last_chunk WHERE m.queue_id = ?" + self._still[0] + " ORDER BY c.id", self._still[1]).fetchall()
        if not rows:
            raise KeyError(f"message {self.queue_id} is no longer in the queue")
        return self._checked(b"".join(data for data, in rows if data is not None), self.size)

    def _read_chunks(self, first: int, last: int, pos: int, n: int) -> bytes:
        """Bytes pos .. pos + n of a body in chunks first .. last (in the caller's transaction)."""
        if self._starts is None:
            lengths = self._db.execute("SELECT length(data) FROM body_chunks WHERE id BETWEEN ? AND ? ORDER BY id",
                                       (first, last)).fetchall()
            self._starts = [0]
            for (length,) in lengths:
                self._starts.append(self._starts[-1] + length)
            if len(lengths) != last - first + 1 or self._starts[-1] != self.size:
                raise DamagedBody(f"message {self.queue_id}: its {len(lengths)} body chunks of {self._starts[-1]}"
                                  f" bytes are not chunks {first}..{last} of {self.size} bytes")
        i = bisect.bisect_right(self._starts, pos) - 1
        j = bisect.bisect_left(self._starts, pos + n)
        data = self._checked(self._chunks(first + i, first + j - 1), self._starts[j] - self._starts[i])
        return data[pos - self._starts[i]:pos - self._starts[i] + n]

    def _chunks(self, first: int, last: int) -> bytes:
        return b"".join(row[0] for row in self._db.execute(
            "SELECT data FROM body_chunks WHERE id BETWEEN ? AND ? ORDER BY id", (first, last)))

    def _checked(self, data: bytes, expected: int) -> bytes:
        if len(data) != expected:
            raise DamagedBody(f"message {self.queue_id}: its body chunks hold {len(data)} bytes, not {expected}")
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._buf = b""
        super().close()
