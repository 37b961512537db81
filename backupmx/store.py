"""The queue: one SQLite database in WAL mode, schema in schema.sql.

What must always hold (each public method keeps it in ONE transaction):
  - A message is in `messages` once, with one `queue` row per recipient domain
    and one `recipients` row per RCPT TO of that domain.
  - The caller may say "250 queued as <id>" only after enqueue() returned:
    the commit is durable then (journal_mode=WAL, synchronous=FULL).
  - Nothing is ever half-queued: any failure rolls the whole enqueue back.
  - A recipient the primary accepted is deleted; its queue row goes with its
    last recipient, the message with its last row (triggers in schema.sql).
  - Every other outcome is a state (queued, held, failed, expired) with the
    reply that caused it, and an `events` row; nothing is "unknown".
  - At most one flusher holds a domain's lease; a lease ends by itself.

Open a QueueStore only in the process that uses it (after fork): an SQLite
connection must never cross a fork. All times come from the injected clock
(unix seconds), so tests can move time.
"""

from __future__ import annotations

import fcntl
import io
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, NamedTuple

from backupmx.envelope import Envelope, Recipient
from backupmx.schema import schema_text, schema_version

CHUNK = 64 * 1024  # bytes copied per step into and out of a body blob
DEFAULT_BUSY_TIMEOUT = 5.0  # seconds a writer waits for another writer's lock
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # WAL file truncated back to this after a checkpoint

# Row and recipient states (CHECK constraints in schema.sql).
QUEUED, HELD, FAILED, EXPIRED = "queued", "held", "failed", "expired"
# Per-recipient delivery outcomes for record_attempt().
DELIVERED, DEFERRED = "delivered", "deferred"
OUTCOMES = (DELIVERED, DEFERRED, FAILED)

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

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ID_EPOCH = 1577836800  # 2020-01-01T00:00:00Z; 8 base-36 digits of milliseconds last until 2109
_ID_TIME_DIGITS = 8
_ID_RANDOM_DIGITS = 6


def is_queue_id(text: str) -> bool:
    """True if `text` looks like a queue id (14 of [0-9A-Z]) rather than a domain:
    for `backupmx hold|release|delete|requeue ID|DOMAIN`."""
    return len(text) == _ID_TIME_DIGITS + _ID_RANDOM_DIGITS and all(c in _ID_ALPHABET for c in text)


class QueueUnavailable(Exception):
    """The queue cannot be written (or read) now: disk full, locked, I/O error.

    The SMTP side answers 452 4.3.1; nothing was changed.
    """


@dataclass
class Submission:
    """One message handed to enqueue_many: what enqueue() takes as arguments."""

    queue_id: str
    envelope: Envelope
    body_file: BinaryIO | bytes
    size: int
    client: str | None
    helo: str | None
    received_at: float | None = None


class QuotaExceeded(QueueUnavailable):
    """The message would take a domain over max_queue_messages / max_queue_bytes."""


def new_queue_id(clock: Callable[[], float] = time.time) -> str:
    """A new queue id: 14 characters of [0-9A-Z].

    Eight base-36 digits of milliseconds since 2020 (so ids sort by time, as
    Postfix's do), then six random ones (36**6 = 2.2e9 per millisecond: at
    3,000 messages/s a clash comes about once a week). A clash is still
    possible in principle; enqueue() then raises QueueUnavailable and the
    client simply retries, so nothing is lost.
    """
    milliseconds = max(0, int(clock() * 1000) - _ID_EPOCH * 1000) % (36**_ID_TIME_DIGITS)
    number = milliseconds * 36**_ID_RANDOM_DIGITS + secrets.randbelow(36**_ID_RANDOM_DIGITS)
    digits = []
    for _ in range(_ID_TIME_DIGITS + _ID_RANDOM_DIGITS):
        number, digit = divmod(number, 36)
        digits.append(_ID_ALPHABET[digit])
    return "".join(reversed(digits))


# --- what the queue hands out ------------------------------------------------------


@dataclass(frozen=True)
class QueuedMessage:
    """One queue row ready for delivery: the envelope for one domain's primary."""

    queue_id: str
    domain: str
    sender: str  # "" = null sender
    recipients: list[Recipient]  # only those still to deliver (state 'queued')
    size: int
    envid: str | None
    ret: str | None
    body_type: str
    attempts: int
    received_at: int = 0


class QueueSummary(NamedTuple):
    """One row of the queue_summary view."""

    domain: str
    messages: int
    bytes: int
    oldest: int  # unix time of the oldest message


@dataclass(frozen=True)
class MessageRow:
    """One queue row for `backupmx queue list`."""

    queue_id: str
    domain: str
    state: str
    received_at: int
    size: int
    sender: str
    recipients: list[str]
    attempts: int
    last_reply: str | None
    last_attempt: int | None = None
    next_attempt: int | None = None


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient with its delivery state (show, DSNs)."""

    address: str
    notify: str | None
    orcpt: str | None
    state: str
    last_reply: str | None
    dsn_sent: int | None = None


@dataclass(frozen=True)
class RowDetail:
    """One queue row of a message, for `backupmx show`."""

    domain: str
    state: str
    attempts: int
    last_attempt: int | None
    last_reply: str | None
    next_attempt: int | None
    state_changed: int
    recipients: list[RecipientStatus]


@dataclass(frozen=True)
class Event:
    """One line of a message's history."""

    at: int
    domain: str | None
    what: str
    detail: str | None


@dataclass(frozen=True)
class MessageDetail:
    """Everything the queue knows about one message, for `backupmx show`."""

    queue_id: str
    sender: str
    received_at: int
    size: int
    client: str | None
    helo: str | None
    envid: str | None
    ret: str | None
    body_type: str
    rows: list[RowDetail]
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True)
class Bounce:
    """Failed or expired recipients of one row whose delivery status notification is due."""

    queue_id: str
    domain: str
    sender: str
    envid: str | None
    ret: str | None
    received_at: int
    client: str | None
    helo: str | None
    recipients: list[RecipientStatus]
    size: int = 0  # of the message, bytes
    body_type: str = "7BIT"
    attempts: int = 0  # delivery attempts of the row
    last_attempt: int | None = None  # unix time of the row's last attempt, None if none
    last_reply: str | None = None  # the row's last reply (or connection error)
    state_changed: int = 0  # unix time the row's state last changed


class ExpiredRow(NamedTuple):
    """A queue row that expire_rows() just marked expired."""

    queue_id: str
    domain: str
    received_at: int
    lifetime: float


class PurgedRow(NamedTuple):
    """A failed or expired queue row that purge_rows() deleted."""

    queue_id: str
    domain: str
    state: str
    state_changed: int


DSN_CLAIM_SECONDS = 600  # a DSN claim older than this is void (its housekeeper died): sent again


class BodyReader(io.RawIOBase):
    """A message body, read from its blob in pieces.

    Each refill opens the blob in its own short read transaction, so a slow
    delivery never pins an old WAL snapshot (which would stop checkpoints and
    make the caller's later writes fail with SQLITE_BUSY_SNAPSHOT). Refills
    are READAHEAD bytes: seeking into a blob walks its overflow-page chain
    from the start, so fewer, larger refills keep a 50 MB read linear enough.
    """

    READAHEAD = 1024 * 1024

    def __init__(self, db: sqlite3.Connection, queue_id: str, size: int):
        super().__init__()
        self._db = db
        self.queue_id = queue_id
        self.size = size
        self._pos = 0
        self._buf = b""
        self._buf_start = 0

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
        with _sqlite_errors():
            own = not self._db.in_transaction
            if own:
                self._db.execute("BEGIN")
            try:
                row = self._db.execute("SELECT rowid FROM messages WHERE queue_id = ?", (self.queue_id,)).fetchone()
                if row is None:
                    raise KeyError(f"message {self.queue_id} is no longer in the queue")
                with self._db.blobopen("messages", "body", row[0], readonly=True) as blob:
                    blob.seek(pos)
                    return blob.read(n)
            finally:
                if own:
                    self._db.execute("COMMIT")

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._buf = b""
        super().close()


# --- errors and transactions -------------------------------------------------------


def _is_unavailable(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        # No code (e.g. raised by the sqlite3 module itself): go by the text.
        text = str(exc).lower()
        return any(w in text for w in ("locked", "busy", "disk", "full", "i/o", "unable to open"))
    return (code & 0xFF) in _UNAVAILABLE_CODES


@contextmanager
def _sqlite_errors() -> Iterator[None]:
    """Turn "cannot now" SQLite errors into QueueUnavailable; let real bugs through."""
    try:
        yield
    except sqlite3.Error as exc:
        if _is_unavailable(exc):
            raise QueueUnavailable(f"queue database: {exc}") from exc
        raise


def check_database(path: str) -> list[str]:
    """Problems with the queue database at `path`, for `backupmx check` (empty: fine).

    A database that does not exist yet is fine when its directory is writable.
    Never creates the file.
    """
    problems: list[str] = []
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        if not os.path.isdir(directory):
            problems.append(f"{path}: directory {directory} does not exist")
        elif not os.access(directory, os.W_OK | os.X_OK):
            problems.append(f"{path}: directory {directory} is not writable")
        return problems
    if not os.path.isfile(path):
        return [f"{path}: not a regular file"]
    if not os.access(path, os.R_OK | os.W_OK):
        problems.append(f"{path}: not readable and writable")
    if not os.access(directory, os.W_OK | os.X_OK):
        problems.append(f"{path}: directory {directory} is not writable (SQLite needs it for the -wal and -shm files)")
    try:
        db = sqlite3.connect(f"file:{_uri_path(path)}?mode=rw", uri=True, timeout=1.0, isolation_level=None)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            ours = schema_version()
            if version > ours:
                problems.append(f"{path}: schema version {version} is newer than this backupmx ({ours})")
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                problems.append(f"{path}: integrity check failed: {result}")
        finally:
            db.close()
    except sqlite3.Error as exc:
        problems.append(f"{path}: {exc}")
    return problems


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.abspath(path))


# --- the store ---------------------------------------------------------------------


class QueueStore:
    """The SQLite queue. One instance per process, created after fork."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT):
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._turn_lock: int | None = None  # fd of <queue>-commit.lock, opened on first enqueue
        # 0600 for the database and (SQLite copies its mode) the -wal and -shm files:
        # the queue holds other people's mail.
        old_umask = os.umask(0o077)
        try:
            with _sqlite_errors():
                db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
                try:
                    self._setup(db, busy_timeout)
                except BaseException:
                    db.close()
                    raise
        finally:
            os.umask(old_umask)
        self._db = db

    def _setup(self, db: sqlite3.Connection, busy_timeout: float) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        # Only takes effect on a new, empty database (before the first table):
        # freed pages can then be returned to the file system by housekeeping
        # (incremental_vacuum) without a full VACUUM. On an existing queue it is a no-op.
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path != ":memory:" and not self.path.startswith("file::memory:"):
            raise QueueUnavailable(f"{self.path}: cannot use WAL journal mode (got {mode})")
        db.execute("PRAGMA synchronous = FULL")  # the commit is on disk before 250 is sent
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        text = schema_text()
        ours = schema_version(text)
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > ours:
            raise QueueUnavailable(f"{self.path}: schema version {found} is newer than this backupmx ({ours})")
        if 0 < found < ours:
            self._migrate(db)
        try:
            db.executescript("BEGIN IMMEDIATE;\n" + text + "\nCOMMIT;")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # Columns added since schema version 1: (table, column, type). CREATE TABLE IF
    # NOT EXISTS does not add them to an existing table, so they are added here.
    _ADDED_COLUMNS = (
        ("queue", "delay_warned", "INTEGER"),  # version 2
        ("recipients", "dsn_claimed", "INTEGER"),  # version 2
    )

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring an older queue up to date, under the write lock (several
        processes open the store at once after fork; only one adds a column)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, column, kind in self._ADDED_COLUMNS:
                columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if columns and column not in columns:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- plumbing

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._turn_lock is not None and self._turn_lock >= 0:
            os.close(self._turn_lock)
        self._turn_lock = None

    def __enter__(self) -> QueueStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection (tests, `backupmx check`)."""
        if self._db is None:
            raise ValueError("queue store is closed")
        return self._db

    def _now(self) -> int:
        return int(self._clock())

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front,
        so the busy timeout applies here and never half-way through."""
        db = self.connection
        with _sqlite_errors():
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite may have rolled back already (e.g. SQLITE_FULL)
                raise

    @contextmanager
    def _commit_turn(self) -> Iterator[None]:
        """Take turns with the other SMTP workers before taking SQLite's write lock.

        SQLite's own busy handler waits by sleeping 1, 2, 5, 10... ms and
        trying again; a flock() waiter is woken the moment the holder is done.
        With several workers group-committing, that is the difference between
        back-to-back fsyncs and fsyncs with naps between them. Only enqueuers
        take this lock; everything else still meets SQLite's (busy_timeout).
        """
        if self._turn_lock is None:
            old_umask = os.umask(0o077)
            try:
                self._turn_lock = os.open(self.path + "-commit.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self._turn_lock = -1  # cannot have one (read-only dir...): SQLite alone decides
            finally:
                os.umask(old_umask)
        if self._turn_lock < 0:
            yield
            return
        fcntl.flock(self._turn_lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn_lock, fcntl.LOCK_UN)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot; never blocks writers (WAL)."""
        db = self.connection
        with _sqlite_errors():
            db.execute("BEGIN")
            try:
                yield db
            finally:
                if db.in_transaction:
                    db.execute("COMMIT")

    @staticmethod
    def _event(db: sqlite3.Connection, at: int, queue_id: str, domain: str | None, what: str, detail: str | None) -> None:
        db.execute(
            "INSERT INTO events (at, queue_id, domain, what, detail) VALUES (?, ?, ?, ?, ?)",
            (at, queue_id, domain, what, detail),
        )

    # -- accepting mail

    def new_queue_id(self) -> str:
        return new_queue_id(self._clock)

    def enqueue(
        self,
        queue_id: str,
        envelope: Envelope,
        body_file: BinaryIO | bytes,
        size: int,
        *,
        client: str | None,
        helo: str | None,
        received_at: float | None = None,
        quotas: Mapping[str, tuple[int | None, int | None]] | None = None,
    ) -> None:
        """Queue one message for every domain of its recipients, in ONE transaction.

        The body is copied from `body_file` (exactly `size` bytes, read 64 KiB
        at a time, so memory does not grow with the message) into a blob
        allocated with zeroblob(size). Returns once the commit is durable.
        Raises QueueUnavailable (nothing queued) when the database cannot take it,
        and its QuotaExceeded when `quotas` ({domain: (max messages, max bytes)},
        None = no limit) would be passed: checked inside the transaction, so
        concurrent senders can never push a domain over its quota.
        """
        submission = Submission(queue_id, envelope, body_file, size, client, helo, received_at)
        problem = self.enqueue_many([submission], quotas=quotas)[0]
        if problem is not None:
            raise problem

    def enqueue_many(self, submissions: list[Submission], *,
                     quotas: Mapping[str, tuple[int | None, int | None]] | None = None) -> list[Exception | None]:
        """Queue several messages in ONE durable transaction (group commit).

        Each message is its own savepoint: one refused by its quota, or whose
        id is taken, is left out and the others are queued. Returns, per
        submission, None (queued) or the exception saying why not. A database
        that cannot commit at all raises QueueUnavailable: then nothing is queued.
        """
        results: list[Exception | None] = [None] * len(submissions)
        now = self._now()
        with self._commit_turn(), self._write() as db:
            for index, submission in enumerate(submissions):
                db.execute("SAVEPOINT message")
                try:
                    self._insert_message(db, submission, now, quotas or {})
                except (QueueUnavailable, ValueError) as exc:
                    db.execute("ROLLBACK TO message")
                    results[index] = exc
                except sqlite3.Error as exc:
                    if _is_unavailable(exc):
                        raise  # the whole transaction is lost: nothing is queued
                    db.execute("ROLLBACK TO message")  # e.g. SQLITE_TOOBIG: this message only
                    results[index] = QueueUnavailable(f"queue database: {exc}")
                db.execute("RELEASE message")
        return results

    def _insert_message(self, db: sqlite3.Connection, submission: Submission, now: int,
                        quotas: Mapping[str, tuple[int | None, int | None]]) -> None:
        queue_id, envelope, size = submission.queue_id, submission.envelope, submission.size
        domains = envelope.domains
        if not domains:
            raise ValueError("enqueue: envelope has no recipients")
        body_file = submission.body_file
        if isinstance(body_file, (bytes, bytearray, memoryview)):
            body_file = io.BytesIO(body_file)
        at = now if submission.received_at is None else int(submission.received_at)
        self._check_quotas(db, domains, size, quotas)
        try:
            cursor = db.execute(
                "INSERT INTO messages (queue_id, sender, received_at, size, body, client, helo, envid, ret, body_type)"
                " VALUES (?, ?, ?, ?, zeroblob(?), ?, ?, ?, ?, ?)",
                (queue_id, envelope.sender, at, size, size, submission.client, submission.helo, envelope.envid,
                 envelope.ret, envelope.body_type or "7BIT"),
            )
        except sqlite3.IntegrityError as exc:
            raise QueueUnavailable(f"queue id {queue_id} is already in use") from exc
        written = 0
        with db.blobopen("messages", "body", cursor.lastrowid) as blob:
            while True:
                chunk = body_file.read(CHUNK)
                if not chunk:
                    break
                if written + len(chunk) > size:
                    raise ValueError(f"enqueue {queue_id}: body is longer than size={size}")
                blob.write(chunk)
                written += len(chunk)
        if written != size:
            raise ValueError(f"enqueue {queue_id}: body has {written} bytes, size={size}")
        db.executemany(
            "INSERT INTO queue (queue_id, domain, state, attempts, next_attempt, state_changed)"
            " VALUES (?, ?, 'queued', 0, ?, ?)",
            [(queue_id, domain, at, now) for domain in domains],
        )
        db.executemany(
            "INSERT OR IGNORE INTO recipients (queue_id, domain, address, notify, orcpt) VALUES (?, ?, ?, ?, ?)",
            [(queue_id, r.domain, r.address, r.notify, r.orcpt) for r in envelope.recipients],
        )
        for domain in domains:
            to = ",".join(f"<{r.address}>" for r in envelope.recipients if r.domain == domain)
            self._event(db, now, queue_id, domain, "queued",
                        f"from=<{envelope.sender}> to={to} size={size} client={submission.client}")

    def usage(self, domain: str) -> tuple[int, int]:
        """(messages, bytes) waiting for `domain` (queued or held): for the per-domain quotas."""
        with _sqlite_errors():
            row = self.connection.execute(
                "SELECT messages, bytes FROM queue_summary WHERE domain = ?", (domain,)
            ).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    @staticmethod
    def _check_quotas(db: sqlite3.Connection, domains: list[str], size: int,
                      quotas: Mapping[str, tuple[int | None, int | None]]) -> None:
        for domain in domains:
            max_messages, max_bytes = quotas.get(domain, (None, None))
            if max_messages is None and max_bytes is None:
                continue
            row = db.execute("SELECT messages, bytes FROM queue_summary WHERE domain = ?", (domain,)).fetchone()
            messages, queued = row if row else (0, 0)
            if (max_messages is not None and messages + 1 > max_messages) or (
                    max_bytes is not None and queued + size > max_bytes):
                raise QuotaExceeded(f"queue for {domain} is full")

    # -- flush requests (ETRN) and leases

    def request_flush(self, domains: Iterable[str]) -> dict[str, int]:
        """Record a flush request for each domain that has queued rows.

        Returns {domain: rows in state 'queued'} for every domain asked (0 =
        nothing waiting, no request recorded). Idempotent: requests for a
        domain coalesce into one pending flush; one that arrives while the
        domain is being flushed makes it run once more afterwards.
        """
        counts: dict[str, int] = {}
        now = self._now()
        with self._write() as db:
            for domain in dict.fromkeys(domains):
                count = db.execute(
                    "SELECT COUNT(*) FROM queue WHERE domain = ? AND state = 'queued'", (domain,)
                ).fetchone()[0]
                counts[domain] = count
                if count:
                    db.execute(
                        "INSERT INTO flushes (domain, requested_at) VALUES (?, ?)"
                        " ON CONFLICT (domain) DO UPDATE SET requested_at = COALESCE(requested_at, excluded.requested_at)",
                        (domain, now),
                    )
        return counts

    def claim_flush(self, owner: str, lease_seconds: float) -> str | None:
        """Take ONE domain with a pending request and no live lease, or None.

        Clears its request and gives `owner` the lease until now + lease_seconds.
        The oldest request goes first. A lease that ran out without being
        released means its flusher died mid-delivery: that domain is taken
        again even without a new request, so the interrupted flush is redone.
        """
        now = self._clock()
        with self._write() as db:
            row = db.execute(
                "SELECT domain FROM flushes WHERE (requested_at IS NOT NULL OR lease_owner IS NOT NULL)"
                " AND (lease_expires IS NULL OR lease_expires <= ?)"
                " ORDER BY COALESCE(requested_at, lease_expires), domain LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE flushes SET requested_at = NULL, lease_owner = ?, lease_expires = ? WHERE domain = ?",
                (owner, now + lease_seconds, row[0]),
            )
            return row[0]

    def renew_lease(self, domain: str, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s lease on `domain`; False if it is no longer theirs."""
        now = self._clock()
        with self._write() as db:
            cursor = db.execute(
                "UPDATE flushes SET lease_expires = ? WHERE domain = ? AND lease_owner = ?",
                (now + lease_seconds, domain, owner),
            )
            return cursor.rowcount == 1

    def release_flush(self, domain: str, owner: str) -> None:
        """Give up `owner`'s lease on `domain` (a request that came meanwhile stays pending)."""
        with self._write() as db:
            db.execute(
                "UPDATE flushes SET lease_owner = NULL, lease_expires = NULL WHERE domain = ? AND lease_owner = ?",
                (domain, owner),
            )

    def pending_flushes(self) -> list[str]:
        """Domains with a flush request waiting (whether or not leased)."""
        with _sqlite_errors():
            rows = self.connection.execute(
                "SELECT domain FROM flushes WHERE requested_at IS NOT NULL ORDER BY requested_at, domain"
            ).fetchall()
        return [r[0] for r in rows]

    def due_domains(self) -> list[str]:
        """Domains with queued rows whose retry time (next_attempt) has come.

        Only meaningful for domains with retry_interval on; the caller decides.
        """
        with _sqlite_errors():
            rows = self.connection.execute(
                "SELECT DISTINCT domain FROM queue WHERE state = 'queued' AND next_attempt <= ? ORDER BY domain",
                (self._now(),),
            ).fetchall()
        return [r[0] for r in rows]

    # -- delivery

    def messages_for_flush(self, domain: str, limit: int | None = None) -> list[QueuedMessage]:
        """Rows of `domain` in state 'queued' (never held ones), oldest first,
        each with its recipients still to deliver."""
        with self._read() as db:
            rows = db.execute(
                "SELECT q.queue_id, m.sender, m.size, m.envid, m.ret, m.body_type, q.attempts, m.received_at"
                " FROM queue AS q JOIN messages AS m USING (queue_id)"
                " WHERE q.domain = ? AND q.state = 'queued'"
                " ORDER BY m.received_at, m.rowid LIMIT ?",
                (domain, -1 if limit is None else limit),
            ).fetchall()
            result = []
            for queue_id, sender, size, envid, ret, body_type, attempts, received_at in rows:
                recipients = [
                    Recipient(address, domain, notify, orcpt)
                    for address, notify, orcpt in db.execute(
                        "SELECT address, notify, orcpt FROM recipients"
                        " WHERE queue_id = ? AND domain = ? AND state = 'queued' ORDER BY rowid",
                        (queue_id, domain),
                    )
                ]
                if recipients:
                    result.append(QueuedMessage(queue_id, domain, sender, recipients, size, envid, ret, body_type,
                                                attempts, received_at))
        return result

    def open_body(self, queue_id: str) -> BodyReader:
        """The message body as a binary file (read(n), seek, len); the caller closes it.

        Streamed from the blob: memory does not grow with the message.
        Raises KeyError if the message is not in the queue.
        """
        with _sqlite_errors():
            row = self.connection.execute("SELECT size FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return BodyReader(self.connection, queue_id, row[0])

    def record_attempt(
        self,
        queue_id: str,
        domain: str,
        outcomes: Iterable[tuple[str, str, str]],
        *,
        retry_after: float | None = None,
    ) -> str | None:
        """Record one delivery attempt of a row: (address, outcome, reply) per recipient,
        outcome one of DELIVERED, DEFERRED, FAILED. One transaction; attempts + 1 once.

        delivered: the recipient is deleted (and the row and message when it was the last).
        deferred:  the recipient stays queued with the reply.
        failed:    the recipient is marked failed (a DSN becomes due); when no
                   queued recipient remains, the row becomes 'failed'. Kept.
        retry_after: seconds until next_attempt (retry_interval); None = no automatic retry.
        Returns the row's state afterwards, or None when the row is gone.
        """
        return self.record_attempts([(queue_id, domain, list(outcomes), retry_after)])[0]

    def record_attempts(self, attempts: list[tuple[str, str, list, float | None]]) -> list[str | None]:
        """Several record_attempt()s — (queue_id, domain, outcomes, retry_after) each — in ONE
        transaction, so a flush pays one fsync per batch rather than one per message.
        A crash before it commits means those messages are delivered again: never lost."""
        for _, _, outcomes, _ in attempts:
            for _, outcome, _ in outcomes:
                if outcome not in OUTCOMES:
                    raise ValueError(f"unknown delivery outcome {outcome!r}")
        now = self._now()
        with self._write() as db:
            return [self._record_attempt(db, now, *attempt) for attempt in attempts]

    def _record_attempt(self, db: sqlite3.Connection, now: int, queue_id: str, domain: str,
                        outcomes: list, retry_after: float | None) -> str | None:
        if db.execute("SELECT 1 FROM queue WHERE queue_id = ? AND domain = ?", (queue_id, domain)).fetchone() is None:
            return None
        # The row's last_reply: the one that explains why mail is still here.
        replies = {outcome: reply for _, outcome, reply in outcomes}
        row_reply = replies.get(DEFERRED) or replies.get(FAILED) or replies.get(DELIVERED)
        db.execute(
            "UPDATE queue SET attempts = attempts + 1, last_attempt = ?, last_reply = COALESCE(?, last_reply),"
            " next_attempt = ? WHERE queue_id = ? AND domain = ?",
            (now, row_reply, None if retry_after is None else int(now + retry_after), queue_id, domain),
        )
        for address, outcome, reply in outcomes:
            key = (queue_id, domain, address)
            if outcome == FAILED:
                db.execute(
                    "UPDATE recipients SET state = 'failed', last_reply = ?, dsn_sent = NULL, dsn_claimed = NULL"
                    " WHERE queue_id = ? AND domain = ? AND address = ? AND state IN ('queued', 'expired')",
                    (reply, *key),
                )
            elif outcome == DEFERRED:
                db.execute(
                    "UPDATE recipients SET last_reply = ? WHERE queue_id = ? AND domain = ? AND address = ?",
                    (reply, *key),
                )
        # Events before the deletes, so even the last recipient's 250 is on record.
        by_outcome: dict[str, list[str]] = {}
        for address, outcome, reply in outcomes:
            by_outcome.setdefault(outcome, []).append(f"<{address}>")
        for outcome, addresses in by_outcome.items():
            self._event(db, now, queue_id, domain, outcome, f"to={','.join(addresses)} reply={replies[outcome]!r}")
        # A recipient the primary accepted is gone, whatever its state was.
        db.executemany(
            "DELETE FROM recipients WHERE queue_id = ? AND domain = ? AND address = ?",
            [(queue_id, domain, address) for address, outcome, _ in outcomes if outcome == DELIVERED],
        )
        row = db.execute("SELECT state FROM queue WHERE queue_id = ? AND domain = ?", (queue_id, domain)).fetchone()
        if row is None:
            return None
        state = row[0]
        if state in (QUEUED, HELD):
            waiting = db.execute(
                "SELECT COUNT(*) FROM recipients WHERE queue_id = ? AND domain = ? AND state = 'queued'",
                (queue_id, domain),
            ).fetchone()[0]
            if waiting == 0:
                state = FAILED
                db.execute(
                    "UPDATE queue SET state = 'failed', state_changed = ? WHERE queue_id = ? AND domain = ?",
                    (now, queue_id, domain),
                )
        return state

    def delivered(self, queue_id: str, domain: str, addresses: Iterable[str], reply: str) -> str | None:
        """The primary accepted these recipients (2xx): they leave the queue."""
        return self.record_attempt(queue_id, domain, [(a, DELIVERED, reply) for a in addresses])

    def deferred(self, queue_id: str, domain: str, addresses: Iterable[str], reply: str, *,
                 retry_after: float | None = None) -> str | None:
        """4xx or connection trouble: they stay queued, with the reply and attempts + 1."""
        return self.record_attempt(queue_id, domain, [(a, DEFERRED, reply) for a in addresses], retry_after=retry_after)

    def failed(self, queue_id: str, domain: str, addresses: Iterable[str], reply: str) -> str | None:
        """5xx: they are marked failed (kept; a DSN is due)."""
        return self.record_attempt(queue_id, domain, [(a, FAILED, reply) for a in addresses])

    # -- lifecycle: expiry, DSNs, delay warnings, retention, housekeeping

    def expire(self, lifetimes: Mapping[str, float], default: float) -> list[tuple[str, str]]:
        """Mark queued rows older than their domain's lifetime (seconds) 'expired'.

        Held rows do not expire: the operator holds them on purpose. Returns
        the (queue_id, domain) rows that expired; their recipients' DSNs are due.
        """
        return [(r.queue_id, r.domain) for r in self.expire_rows(lifetimes, default)]

    def expire_rows(self, lifetimes: Mapping[str, float], default: float) -> list[ExpiredRow]:
        """expire(), returning an ExpiredRow (with received_at and the lifetime) per row.

        The lifetime counts from received_at, or from the row's last state change
        when that is later: mail the operator released or requeued gets a fresh
        lifetime, rather than expiring again at the next housekeeping round.
        """
        now = self._now()
        expired: list[ExpiredRow] = []
        with self._write() as db:
            domains = [r[0] for r in db.execute("SELECT DISTINCT domain FROM queue WHERE state = 'queued'")]
            for domain in domains:
                lifetime = lifetimes.get(domain, default)
                cutoff = now - lifetime
                rows = db.execute(
                    "SELECT q.queue_id, m.received_at FROM queue AS q JOIN messages AS m USING (queue_id)"
                    " WHERE q.domain = ? AND q.state = 'queued' AND m.received_at <= ? AND q.state_changed <= ?"
                    " ORDER BY m.received_at, m.rowid",
                    (domain, cutoff, cutoff),
                ).fetchall()
                for queue_id, received_at in rows:
                    db.execute(
                        "UPDATE queue SET state = 'expired', state_changed = ? WHERE queue_id = ? AND domain = ?",
                        (now, queue_id, domain),
                    )
                    db.execute(
                        "UPDATE recipients SET state = 'expired', dsn_sent = NULL, dsn_claimed = NULL"
                        " WHERE queue_id = ? AND domain = ? AND state = 'queued'",
                        (queue_id, domain),
                    )
                    self._event(db, now, queue_id, domain, "expired", f"lifetime={lifetime:g}s")
                    expired.append(ExpiredRow(queue_id, domain, received_at, lifetime))
        return expired

    @staticmethod
    def _bounce(db: sqlite3.Connection, queue_id: str, domain: str, recipient_where: str,
                args: tuple = ()) -> Bounce | None:
        """The Bounce of one row with the recipients matching `recipient_where`."""
        m = db.execute(
            "SELECT m.sender, m.envid, m.ret, m.received_at, m.client, m.helo, m.size, m.body_type,"
            " q.attempts, q.last_attempt, q.last_reply, q.state_changed"
            " FROM queue AS q JOIN messages AS m USING (queue_id) WHERE q.queue_id = ? AND q.domain = ?",
            (queue_id, domain),
        ).fetchone()
        if m is None:
            return None
        recipients = [
            RecipientStatus(*r)
            for r in db.execute(
                "SELECT address, notify, orcpt, state, last_reply, dsn_sent FROM recipients"
                f" WHERE queue_id = ? AND domain = ? AND {recipient_where} ORDER BY rowid",
                (queue_id, domain, *args),
            )
        ]
        sender, envid, ret, received_at, client, helo, size, body_type, attempts, last_attempt, last_reply, changed = m
        return Bounce(queue_id, domain, sender, envid, ret, received_at, client, helo, recipients,
                      size, body_type, attempts, last_attempt, last_reply, changed)

    _DSN_DUE = "state IN ('failed', 'expired') AND dsn_sent IS NULL"

    def pending_dsns(self, limit: int = 100) -> list[Bounce]:
        """Rows with failed or expired recipients whose DSN has not been sent (or skipped).

        Read only (claimed ones included); a housekeeper that sends uses claim_dsns().
        """
        with self._read() as db:
            keys = db.execute(
                f"SELECT DISTINCT queue_id, domain FROM recipients WHERE {self._DSN_DUE} LIMIT ?", (limit,)
            ).fetchall()
            bounces = [self._bounce(db, queue_id, domain, self._DSN_DUE) for queue_id, domain in keys]
        return [b for b in bounces if b is not None]

    def claim_dsns(self, limit: int = 20, lease_seconds: float = DSN_CLAIM_SECONDS) -> list[Bounce]:
        """Claim up to `limit` rows whose DSN is due and not claimed by another
        housekeeper (or whose claim is older than lease_seconds: that one died).

        One transaction, so two housekeepers never get the same recipient. End
        each claim with dsn_sent() (sent or deliberately skipped) or release_dsns()
        (could not send now: due again at the next round). A housekeeper that dies
        between sending and dsn_sent() makes the DSN go out twice: at least once.
        """
        now = self._now()
        stale = now - lease_seconds
        where = f"{self._DSN_DUE} AND (dsn_claimed IS NULL OR dsn_claimed <= ?)"
        with self._write() as db:
            keys = db.execute(
                f"SELECT DISTINCT queue_id, domain FROM recipients WHERE {where} LIMIT ?", (stale, limit)
            ).fetchall()
            bounces = []
            for queue_id, domain in keys:
                bounce = self._bounce(db, queue_id, domain, where, (stale,))
                if bounce is None or not bounce.recipients:
                    continue
                db.execute(
                    f"UPDATE recipients SET dsn_claimed = ? WHERE queue_id = ? AND domain = ? AND {where}",
                    (now, queue_id, domain, stale),
                )
                bounces.append(bounce)
        return bounces

    def release_dsns(self, queue_id: str, domain: str, addresses: Iterable[str], detail: str | None = None) -> None:
        """Give up the claim on these recipients' DSN: it is due again (bounce_relay
        down). `detail` (the error) goes into the message's history."""
        addresses = list(addresses)
        now = self._now()
        with self._write() as db:
            db.executemany(
                "UPDATE recipients SET dsn_claimed = NULL WHERE queue_id = ? AND domain = ? AND address = ?",
                [(queue_id, domain, a) for a in addresses],
            )
            if detail is not None:
                self._event(db, now, queue_id, domain, "dsn-failed",
                            f"to={','.join(f'<{a}>' for a in addresses)} {detail}")

    def dsn_sent(self, queue_id: str, domain: str, addresses: Iterable[str], detail: str = "sent") -> None:
        """The DSN for these recipients was sent, or deliberately skipped (say so in `detail`)."""
        addresses = list(addresses)
        now = self._now()
        with self._write() as db:
            db.executemany(
                "UPDATE recipients SET dsn_sent = ?, dsn_claimed = NULL WHERE queue_id = ? AND domain = ?"
                " AND address = ? AND state IN ('failed', 'expired')",
                [(now, queue_id, domain, a) for a in addresses],
            )
            self._event(db, now, queue_id, domain, "dsn", f"to={','.join(f'<{a}>' for a in addresses)} {detail}")

    def claim_delay_warnings(self, delay: float, limit: int = 20) -> list[Bounce]:
        """Claim up to `limit` queued rows received `delay` seconds ago or more that
        have had no delay warning: each gets delay_warned = now (one warning per row).

        The Bounce lists the row's recipients still queued. End each claim with
        delay_warning_done() or release_delay_warning(). A housekeeper that dies
        in between loses that warning: at most once (it is only a warning).
        """
        now = self._now()
        with self._write() as db:
            keys = db.execute(
                "SELECT q.queue_id, q.domain FROM queue AS q JOIN messages AS m USING (queue_id)"
                " WHERE q.state = 'queued' AND q.delay_warned IS NULL AND m.received_at <= ?"
                " ORDER BY m.received_at, m.rowid LIMIT ?",
                (now - delay, limit),
            ).fetchall()
            bounces = []
            for queue_id, domain in keys:
                db.execute("UPDATE queue SET delay_warned = ? WHERE queue_id = ? AND domain = ?",
                           (now, queue_id, domain))
                bounce = self._bounce(db, queue_id, domain, "state = 'queued'")
                if bounce is not None and bounce.recipients:
                    bounces.append(bounce)
        return bounces

    def delay_warning_done(self, queue_id: str, domain: str, addresses: Iterable[str], detail: str = "sent") -> None:
        """The delay warning of a claimed row was sent (or skipped: say why in `detail`)."""
        now = self._now()
        with self._write() as db:
            self._event(db, now, queue_id, domain, "delay-warning",
                        f"to={','.join(f'<{a}>' for a in addresses)} {detail}")

    def release_delay_warning(self, queue_id: str, domain: str, detail: str | None = None) -> None:
        """Give up the claim on a row's delay warning: it is due again next round."""
        now = self._now()
        with self._write() as db:
            db.execute("UPDATE queue SET delay_warned = NULL WHERE queue_id = ? AND domain = ?", (queue_id, domain))
            if detail is not None:
                self._event(db, now, queue_id, domain, "dsn-failed", f"delay warning: {detail}")

    def purge(self, retention: float) -> int:
        """Delete failed and expired rows older than `retention` seconds (expired_retention),
        and the history of messages gone that long. Returns the rows deleted."""
        return len(self.purge_rows(retention))

    def purge_rows(self, retention: float) -> list[PurgedRow]:
        """purge(), returning a PurgedRow per row deleted."""
        now = self._now()
        cutoff = now - retention
        with self._write() as db:
            rows = [PurgedRow(*r) for r in db.execute(
                "SELECT queue_id, domain, state, state_changed FROM queue"
                " WHERE state IN ('failed', 'expired') AND state_changed <= ?",
                (cutoff,),
            ).fetchall()]
            for row in rows:
                self._event(db, now, row.queue_id, row.domain, "deleted", f"retention over ({row.state})")
                db.execute("DELETE FROM queue WHERE queue_id = ? AND domain = ?", (row.queue_id, row.domain))
            db.execute(
                "DELETE FROM events WHERE at <= ? AND queue_id NOT IN (SELECT queue_id FROM messages)", (cutoff,)
            )
        return rows

    def incremental_vacuum(self) -> int:
        """Give the free pages back to the file system when the queue was created
        with auto_vacuum = INCREMENTAL (after a big flush the file would otherwise
        keep its size). Returns the pages freed (0 when the mode is not incremental)."""
        db = self.connection
        with _sqlite_errors():
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                return 0
            before = db.execute("PRAGMA freelist_count").fetchone()[0]
            if before == 0:
                return 0
            # executescript steps the pragma to the end; execute() would free one page.
            db.executescript("BEGIN IMMEDIATE; PRAGMA incremental_vacuum; COMMIT;")
            return before - db.execute("PRAGMA freelist_count").fetchone()[0]

    def checkpoint(self, mode: str = "TRUNCATE", busy_timeout: float = 1.0) -> tuple[int, int, int]:
        """PRAGMA wal_checkpoint(mode): copy the WAL into the database (TRUNCATE:
        and empty the -wal file), so it does not grow without bound. Waits at most
        `busy_timeout` seconds for other connections. Returns SQLite's (busy,
        wal pages, pages checkpointed); busy = 1: not complete, try next round."""
        if mode.upper() not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        db = self.connection
        with _sqlite_errors():
            old = db.execute("PRAGMA busy_timeout").fetchone()[0]
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            try:
                return tuple(db.execute(f"PRAGMA wal_checkpoint({mode.upper()})").fetchone())
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(old)}")

    # -- operator actions (postsuper-style): by queue id, by domain, or both

    def _rows(self, db: sqlite3.Connection, queue_id: str | None, domain: str | None,
              states: tuple[str, ...]) -> list[tuple[str, str]]:
        if queue_id is None and domain is None:
            raise ValueError("give a queue id or a domain")
        where = [f"state IN ({','.join('?' * len(states))})"]
        args: list = list(states)
        if queue_id is not None:
            where.append("queue_id = ?")
            args.append(queue_id)
        if domain is not None:
            where.append("domain = ?")
            args.append(domain)
        return db.execute(f"SELECT queue_id, domain FROM queue WHERE {' AND '.join(where)}", args).fetchall()

    def _transition(self, queue_id, domain, from_states, to_state, what) -> int:
        now = self._now()
        with self._write() as db:
            rows = self._rows(db, queue_id, domain, from_states)
            for qid, dom in rows:
                db.execute(
                    "UPDATE queue SET state = ?, state_changed = ?, next_attempt = ? WHERE queue_id = ? AND domain = ?",
                    (to_state, now, now, qid, dom),
                )
                if to_state == QUEUED:
                    db.execute(
                        "UPDATE recipients SET state = 'queued', dsn_sent = NULL, dsn_claimed = NULL"
                        " WHERE queue_id = ? AND domain = ? AND state IN ('failed', 'expired')",
                        (qid, dom),
                    )
                self._event(db, now, qid, dom, what, "by operator")
        return len(rows)

    def hold(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """queued -> held (never flushed until released). Returns the rows changed."""
        return self._transition(queue_id, domain, (QUEUED,), HELD, "held")

    def release(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """held -> queued."""
        return self._transition(queue_id, domain, (HELD,), QUEUED, "released")

    def requeue(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """held, failed or expired -> queued, recipients too (postsuper -r)."""
        return self._transition(queue_id, domain, (HELD, FAILED, EXPIRED), QUEUED, "requeued")

    def delete(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """Delete rows in any state (the message goes with its last row)."""
        now = self._now()
        with self._write() as db:
            rows = self._rows(db, queue_id, domain, (QUEUED, HELD, FAILED, EXPIRED))
            for qid, dom in rows:
                self._event(db, now, qid, dom, "deleted", "by operator")
                db.execute("DELETE FROM queue WHERE queue_id = ? AND domain = ?", (qid, dom))
        return len(rows)

    # -- reporting

    def summary(self) -> list[QueueSummary]:
        """Per domain with mail waiting (queued or held): messages, bytes, oldest."""
        with _sqlite_errors():
            rows = self.connection.execute(
                "SELECT domain, messages, bytes, oldest FROM queue_summary ORDER BY domain"
            ).fetchall()
        return [QueueSummary(*r) for r in rows]

    def list_messages(self, domain: str | None = None, state: str | None = None) -> list[MessageRow]:
        """One MessageRow per queue row, oldest first; optionally one domain and/or state."""
        where, args = [], []
        if domain is not None:
            where.append("q.domain = ?")
            args.append(domain)
        if state is not None:
            where.append("q.state = ?")
            args.append(state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as db:
            rows = db.execute(
                "SELECT q.queue_id, q.domain, q.state, m.received_at, m.size, m.sender, q.attempts, q.last_reply,"
                " q.last_attempt, q.next_attempt FROM queue AS q JOIN messages AS m USING (queue_id)"
                f" {clause} ORDER BY m.received_at, m.rowid, q.domain",
                args,
            ).fetchall()
            recipients: dict[tuple[str, str], list[str]] = {}
            rcpt_clause = "WHERE domain = ?" if domain is not None else ""
            for queue_id, dom, address in db.execute(
                f"SELECT queue_id, domain, address FROM recipients {rcpt_clause} ORDER BY rowid",
                [domain] if domain is not None else [],
            ):
                recipients.setdefault((queue_id, dom), []).append(address)
        return [
            MessageRow(qid, dom, st, rec, size, sender, recipients.get((qid, dom), []), att, reply, last, nxt)
            for qid, dom, st, rec, size, sender, att, reply, last, nxt in rows
        ]

    def show(self, queue_id: str) -> MessageDetail | None:
        """Everything about one message, or None if it is not in the queue."""
        with self._read() as db:
            m = db.execute(
                "SELECT queue_id, sender, received_at, size, client, helo, envid, ret, body_type"
                " FROM messages WHERE queue_id = ?",
                (queue_id,),
            ).fetchone()
            events = [
                Event(*e)
                for e in db.execute("SELECT at, domain, what, detail FROM events WHERE queue_id = ? ORDER BY id",
                                    (queue_id,))
            ]
            if m is None:
                return None
            rows = []
            for dom, st, att, last, reply, nxt, changed in db.execute(
                "SELECT domain, state, attempts, last_attempt, last_reply, next_attempt, state_changed"
                " FROM queue WHERE queue_id = ? ORDER BY domain",
                (queue_id,),
            ).fetchall():
                rcpts = [
                    RecipientStatus(*r)
                    for r in db.execute(
                        "SELECT address, notify, orcpt, state, last_reply, dsn_sent FROM recipients"
                        " WHERE queue_id = ? AND domain = ? ORDER BY rowid",
                        (queue_id, dom),
                    )
                ]
                rows.append(RowDetail(dom, st, att, last, reply, nxt, changed, rcpts))
        return MessageDetail(*m, rows=rows, events=events)

    def history(self, queue_id: str) -> list[Event]:
        """The events of a message, also after it left the queue."""
        with _sqlite_errors():
            rows = self.connection.execute(
                "SELECT at, domain, what, detail FROM events WHERE queue_id = ? ORDER BY id", (queue_id,)
            ).fetchall()
        return [Event(*r) for r in rows]
