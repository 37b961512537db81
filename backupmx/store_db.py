"""The queue's database: one SQLite file in WAL mode, its schema (schema.sql), its transactions.

QueueDatabase opens the file (0600), applies schema.sql, migrates an older
queue (only when asked: `serve` and its processes), and gives the roles (store_*.py) their transactions: _write (BEGIN
IMMEDIATE: the busy timeout applies up front, never half-way) and _read (one
snapshot; never blocks writers under WAL). "Cannot now" SQLite errors (disk
full, locked, I/O) become QueueUnavailable, which the SMTP side answers with
452 4.3.1; real bugs pass through (store_errors). Its pieces a reader names
apart live apart: the queue ids (store_ids), the bodies' chunks and their
reader (store_bodies), the schema's one-time rebuilds of an older queue
(store_migrations).

Open the queue only in the process that uses it (after fork): an SQLite
connection must never cross a fork. All times come from the injected clock
(unix seconds), so tests can move time.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from backupmx.config import tuning
from backupmx.schema import schema_text, schema_version, view_names
from backupmx.store_bodies import STILL_QUEUED, STILL_QUEUED_FOR, BodyReader
from backupmx.store_errors import QueueUnavailable, sqlite_errors
from backupmx.store_ids import new_queue_id
from backupmx.store_migrations import name_message_domains, rebuild_clustered, statements

DEFAULT_BUSY_TIMEOUT = tuning("BACKUPMX_BUSY_TIMEOUT", 5.0)  # seconds a writer waits for another writer's lock


JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # WAL file truncated back to this after a checkpoint


# wal_autocheckpoint (pages) of the connections of a process whose checkpoints a
# checkpointer process runs (checkpointer.py, under `serve`): SQLite's own 1000 would run
# one inside whichever commit crosses it, its caller waiting while the pages are copied and
# synced. This only bounds the WAL when the checkpointer is dead or cannot keep up.
CHECKPOINT_BACKSTOP = tuning("BACKUPMX_CHECKPOINT_BACKSTOP", 10000, int)


# Whether this process's checkpoints are the checkpointer's (leave_checkpoints_to_checkpointer).
_checkpoints_elsewhere = False


def leave_checkpoints_to_checkpointer() -> None:
    """From now on the queue connections this process opens checkpoint only past
    CHECKPOINT_BACKSTOP pages, and housekeeping leaves the WAL alone: a checkpointer
    process runs them. The master calls it in each child it forks, before any opens."""
    global _checkpoints_elsewhere
    _checkpoints_elsewhere = True


def checkpoints_elsewhere() -> bool:
    """True when a checkpointer process runs this process's checkpoints."""
    return _checkpoints_elsewhere


# The page size of a new queue (schema.sql's header says what it trades: larger
# pages pack messages of a few KB tighter but make every commit's WAL write,
# and so every 250, slower).
PAGE_SIZE = 4096


# Row and recipient states (CHECK constraints in schema.sql).
QUEUED, HELD, FAILED, EXPIRED = "queued", "held", "failed", "expired"
STATES = (QUEUED, HELD, FAILED, EXPIRED)
WAITING = (QUEUED, HELD)  # what queue_summary counts: mail the primary has still to take

# Names in the counters table (schema.sql).
RECEIVED, DELIVERED, REJECTS = "messages_received", "messages_delivered", "rejects"


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient with its delivery state (show, DSNs)."""

    address: str
    notify: str | None
    orcpt: str | None
    state: str
    last_reply: str | None
    dsn_sent: int | None = None


def check_database(path: str, *, quick_check: bool = True) -> list[str]:
    """Problems with the queue database at `path`, for `backupmx check` (empty: fine).

    A database that does not exist yet is fine when its directory is writable.
    Never creates the file. `quick_check=False` leaves out PRAGMA quick_check,
    which reads the whole file (startup.check_queue: a queue unchanged since
    a clean stop).
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
            found, oldest = _queue_versions(db)
            if found > schema_version() and oldest > schema_version():
                problems.append(_too_new(path, found, oldest))
            result = db.execute("PRAGMA quick_check").fetchone()[0] if quick_check else "ok"
            if result != "ok":
                problems.append(f"{path}: integrity check failed: {result}")
        finally:
            db.close()
    except sqlite3.Error as exc:
        problems.append(f"{path}: {exc}")
    return problems


def needs_migration(path: str) -> bool:
    """Whether the queue at `path` exists and is of an older schema than this backupmx (read
    only, nothing written): `serve --inetd` then migrates it first, as `serve` does at its start."""
    if not os.path.exists(path):
        return False
    with sqlite_errors():
        db = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True, isolation_level=None)
        try:
            return 0 < db.execute("PRAGMA user_version").fetchone()[0] < schema_version()
        finally:
            db.close()


def _queue_versions(db: sqlite3.Connection) -> tuple[int, int]:
    """(schema version, oldest compatible version) of an open queue (the end of
    schema.sql). A queue from before schema_compat is compatible with itself only."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_compat'").fetchone() is None:
        return found, found
    row = db.execute("SELECT oldest_version FROM schema_compat WHERE id = 1").fetchone()
    return found, found if row is None else row[0]


def _too_new(path: str, found: int, oldest: int) -> str:
    return (f"{path}: schema version {found} is newer than this backupmx ({schema_version()})"
            f" and needs schema {oldest} or later")


def _not_migrated(path: str, found: int) -> str:
    return (f"{path}: schema version {found}, this backupmx needs {schema_version()}"
            " (start the server once to migrate the queue)")


def _create_private(path: str) -> None:
    """A new queue file is created 0600, and SQLite gives its -wal and -shm files the
    database's mode: the queue holds other people's mail.

    Not with umask: that is process-wide, and other threads (a flusher's lease
    keeper, its extra connections) create files at the same time.
    """
    if path == ":memory:" or path.startswith("file:") or os.path.exists(path):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass  # another process made it a moment ago
    except OSError as exc:
        raise sqlite3.OperationalError(f"unable to open database file: {exc.strerror or exc}") from exc


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.abspath(path))


class QueueDatabase:
    """The SQLite connection and its transactions; each role (store_*.py) builds on it."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
                 read_only: bool = False, migrate: bool = True, durable: bool = True,
                 on_rebuild: Callable[[int], None] | None = None):
        """read_only: open an existing queue for reports only (the CLI's reports,
        metrics, health): SQLite's mode=ro, no schema applied, nothing written.
        migrate=False: write, but never migrate (the CLI's actions). Only `serve`
        and the processes it starts migrate: a command run while an older server
        still serves must not change the schema under it. Read-only or not
        migrating, an older queue (or one never created) is QueueUnavailable,
        "start the server once to migrate the queue". A queue newer than this
        backupmx opens when its schema_compat row allows it (schema.sql);
        nothing is applied to it then.
        durable=False: commits are not synced to disk (WAL with synchronous=NORMAL: a
        power cut may lose the last ones, never corrupt the file). Only for state
        that can be learnt again -- the verify cache, the greylist --, never for mail.
        on_rebuild(found_version): called before the migration rebuilds the mail's
        tables (schema 13, rebuild_clustered), which takes a while at a large queue."""
        self.path = path
        self._on_rebuild = on_rebuild
        self._durable = durable
        self._busy_ms = int(busy_timeout * 1000)
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._turn_lock: int | None = None  # fd of <queue>-commit.lock: the busy writers' turn to commit (_commit_turn)
        self._page_size: int | None = None  # the file's, read once (only a VACUUM, server stopped, changes it)
        with sqlite_errors():
            if read_only:
                db = sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True, timeout=busy_timeout,
                                     isolation_level=None)
            else:
                _create_private(path)
                db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
            try:
                if read_only:
                    self._check_version(db, busy_timeout)
                else:
                    self._setup(db, busy_timeout, migrate)
            except BaseException:
                db.close()
                raise
        self._db = db

    def _check_version(self, db: sqlite3.Connection, busy_timeout: float) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self._usable(*_queue_versions(db), migrate=False)

    def _usable(self, found: int, oldest: int, *, migrate: bool) -> None:
        """Raise QueueUnavailable unless this backupmx may open a queue of schema `found`."""
        ours = schema_version()
        if found > ours and oldest > ours:
            raise QueueUnavailable(_too_new(self.path, found, oldest))
        if found < ours and not migrate:
            raise QueueUnavailable(_not_migrated(self.path, found))

    def _setup(self, db: sqlite3.Connection, busy_timeout: float, migrate: bool) -> None:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        # Only take effect on a new, empty database (before the first table and
        # before WAL writes the header): freed pages can then be returned to the
        # file system by housekeeping (incremental_vacuum) without a full VACUUM,
        # and the page size is ours (PAGE_SIZE). On an existing queue, no-ops.
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path != ":memory:" and not self.path.startswith("file::memory:"):
            raise QueueUnavailable(f"{self.path}: cannot use WAL journal mode (got {mode})")
        self._connection_pragmas(db)
        text = schema_text()
        ours = schema_version(text)
        # One transaction for the version check, the migration and the schema:
        # several processes open the queue at once after a fork, and only one
        # may migrate; one that crashes half-way leaves the old queue intact.
        db.execute("BEGIN IMMEDIATE")
        try:
            found, oldest = _queue_versions(db)
            self._usable(found, oldest, migrate=migrate)
            # A newer queue (schema_compat allowed it) already has everything this
            # schema.sql makes, and its marks must stay the newer program's.
            if found <= ours:
                if 0 < found < ours:
                    self._migrate(db, text, found)
                for statement in statements(text):
                    db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _connection_pragmas(self, db: sqlite3.Connection) -> None:
        """What each writing connection sets for itself (WAL is the file's, set once)."""
        # The commit is on disk before 250 is sent.
        db.execute("PRAGMA synchronous = FULL" if self._durable else "PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        if _checkpoints_elsewhere:
            db.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_BACKSTOP}")

    @contextmanager
    def closed_for_fork(self) -> Iterator[None]:
        """The (writing) connection closed for the block, then opened again as it was.

        A process forked inside the block inherits no SQLite state. SQLite keeps a
        per-process table of its open database files and their locks: a child that
        inherited it would believe its own new connections hold the parent's read
        locks (the database's, the -shm's) and never take them from the kernel, and
        the last other process to close could then checkpoint and delete the WAL
        under it (sqlite.org/howtocorrupt.html 2.6). The child must leave the block
        with os._exit: only the parent reopens.
        """
        if self._db is None:
            raise ValueError("queue store is closed")
        self._db.close()
        self._db = None
        self._close_turn_lock()  # a flock is the open file's: a child holding it would keep our turn
        try:
            yield
        finally:
            busy_timeout = self._busy_ms / 1000
            with sqlite_errors():
                db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
                try:
                    db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                    self._connection_pragmas(db)
                except BaseException:
                    db.close()
                    raise
            self._db = db

    # Columns added since schema version 1: (table, column, type). CREATE TABLE IF
    # NOT EXISTS does not add them to an existing table, so they are added here.
    _ADDED_COLUMNS = (
        ("queue", "delay_warned", "INTEGER"),  # version 2
        ("recipients", "dsn_claimed", "INTEGER"),  # version 2
        ("messages", "smtputf8", "INTEGER NOT NULL DEFAULT 0"),  # version 3
        ("messages", "client_name", "TEXT"),  # version 7
        ("messages", "protocol", "TEXT"),  # version 7
        ("queue", "message_received_at", "INTEGER"),  # version 10
        ("queue", "message_size", "INTEGER"),  # version 10
        ("messages", "first_chunk", "INTEGER"),  # version 11 (NULL: the body is in messages.body)
        ("messages", "last_chunk", "INTEGER"),  # version 11
    )

    def _migrate(self, db: sqlite3.Connection, text: str, found: int) -> None:
        """Bring an older queue up to date (inside _setup's transaction): the columns
        added since, and schema.sql's views dropped for it to create them anew
        (CREATE VIEW IF NOT EXISTS would keep an old definition; a view holds no
        data), and likewise the triggers whose work changed. The operator's own views
        are not ours to drop."""
        for table, column, kind in self._ADDED_COLUMNS:
            columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if columns and column not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if found < 10:
            # Schema 10: each queue row's copies of its message's size and arrival
            # time, before schema.sql counts queue_totals from them; its index
            # on (domain, state) is made anew with the arrival time.
            db.execute("UPDATE queue SET"
                       " message_size = (SELECT size FROM messages AS m WHERE m.queue_id = queue.queue_id),"
                       " message_received_at = (SELECT received_at FROM messages AS m WHERE m.queue_id = queue.queue_id)"
                       " WHERE message_size IS NULL")
            db.execute("DROP INDEX IF EXISTS queue_domain_state")
        for view in view_names(text):
            db.execute(f'DROP VIEW IF EXISTS "{view}"')
        if found < 15:
            # Schema 14: queue_gone lists a message in `reclaim` rather than deleting it
            # (CREATE TRIGGER IF NOT EXISTS would keep the old one, as for views); schema 15:
            # it and messages_gone find a message's rows through message_domains.
            db.execute("DROP TRIGGER IF EXISTS queue_gone")
            db.execute("DROP TRIGGER IF EXISTS messages_gone")
        if found < 13:
            if self._on_rebuild is not None:
                self._on_rebuild(found)
            rebuild_clustered(db, text)
        if found < 15:
            name_message_domains(db, text)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._close_turn_lock()

    def _close_turn_lock(self) -> None:
        """Closes <queue>-commit.lock (_commit_turn opens it again at the next turn)."""
        if self._turn_lock is not None and self._turn_lock >= 0:
            os.close(self._turn_lock)
        self._turn_lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection; ValueError once closed, or not opened again after a fork
        (closed_for_fork: flusher._connection_lost asks so)."""
        if self._db is None:
            raise ValueError("queue store is closed")
        return self._db

    def _now(self) -> int:
        return int(self._clock())

    @contextmanager
    def _commit_turn(self) -> Iterator[None]:
        """Take turns with the other busy writers before taking SQLite's write lock.

        SQLite's own busy handler waits by sleeping 1, 2, 5, 10... ms and
        trying again; a flock() waiter is woken the moment the holder is done.
        With several workers group-committing, that is the difference between
        back-to-back fsyncs and fsyncs with naps between them. The enqueuers
        (store_intake) and a flush's outcome batches (store_delivery: a big flush
        records from two processes) take this lock; everything else still meets
        SQLite's (busy_timeout). The file is opened at the first turn, so a
        process forked before has a lock of its own (flock is per open file).
        """
        if self._turn_lock is None:
            try:
                self._turn_lock = os.open(self.path + "-commit.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self._turn_lock = -1  # cannot have one (read-only dir...): SQLite alone decides
        if self._turn_lock < 0:
            yield
            return
        fcntl.flock(self._turn_lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn_lock, fcntl.LOCK_UN)

    @contextmanager
    def _write(self, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front,
        so the busy timeout applies here and never half-way through.
        wait=False: QueueUnavailable at once when another writer holds the lock
        (for what an event loop may put off: it must never sleep on the lock)."""
        db = self.connection
        with sqlite_errors():
            if wait:
                db.execute("BEGIN IMMEDIATE")
            else:
                db.execute("PRAGMA busy_timeout = 0")
                try:
                    db.execute("BEGIN IMMEDIATE")
                finally:
                    db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
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
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot; never blocks writers (WAL)."""
        db = self.connection
        with sqlite_errors():
            db.execute("BEGIN")
            try:
                yield db
            finally:
                if db.in_transaction:
                    db.execute("COMMIT")

    @staticmethod
    def _count(db: sqlite3.Connection, name: str, n: int = 1, label: str = "") -> None:
        """Add `n` to a counter (schema.sql, counters), inside the caller's transaction."""
        if n:
            db.execute("INSERT INTO counters (name, label, value) VALUES (?, ?, ?)"
                       " ON CONFLICT (name, label) DO UPDATE SET value = value + excluded.value", (name, label, n))

    @staticmethod
    def _totals(db: sqlite3.Connection, domain: str, states: tuple[str, ...] = WAITING) -> tuple[int, int]:
        """(rows, bytes) of `domain` in `states` (waiting: queued or held), from queue_totals:
        a search per state, however much the queue holds."""
        marks = ",".join("?" * len(states))
        return db.execute(f"SELECT COALESCE(SUM(messages), 0), COALESCE(SUM(bytes), 0) FROM queue_totals"
                          f" WHERE domain = ? AND state IN ({marks})", (domain, *states)).fetchone()

    @classmethod
    def _queued_count(cls, db: sqlite3.Connection, domain: str) -> int:
        """Rows of `domain` in state 'queued', for deciding whether to flush: 0 exactly when
        the queue itself has none (one search of queue_domain_state), else queue_totals'
        count, at least 1. A total that went wrong (schema.sql's header says how) may then
        show a wrong number, but never holds mail back nor starts an empty flush."""
        if db.execute("SELECT 1 FROM queue WHERE domain = ? AND state = 'queued' LIMIT 1", (domain,)).fetchone() is None:
            return 0
        return max(cls._totals(db, domain, (QUEUED,))[0], 1)

    @staticmethod
    def _domain_status(db: sqlite3.Connection, domain: str, column: str, at: int) -> None:
        """Set domain_status.<column> (last_etrn, last_delivery) to `at`, inside the caller's transaction."""
        db.execute(f"INSERT INTO domain_status (domain, {column}) VALUES (?, ?)"
                   f" ON CONFLICT (domain) DO UPDATE SET {column} = excluded.{column}", (domain, at))

    @staticmethod
    def _event(db: sqlite3.Connection, at: int, queue_id: str, domain: str | None, what: str, detail: str | None) -> None:
        db.execute(
            "INSERT INTO events (at, queue_id, domain, what, detail) VALUES (?, ?, ?, ?, ?)",
            (at, queue_id, domain, what, detail),
        )

    def new_queue_id(self) -> str:
        return new_queue_id(self._clock)

    def page_size(self) -> int:
        """The file's page size in bytes (what body chunks are cut to, what free_pages and
        incremental_vacuum count in)."""
        if self._page_size is None:
            with sqlite_errors():
                self._page_size = self.connection.execute("PRAGMA page_size").fetchone()[0]
        return self._page_size

    def open_body(self, queue_id: str, domain: str | None = None) -> BodyReader:
        """The message body as a binary file (read(n), seek, len); the caller closes it.

        Streamed from the blob: memory does not grow with the message.
        Raises KeyError if the message is not in the queue (for `domain`, when given:
        a flush reads a body while the domain's row waits, by the queue's key).
        """
        # Read while that domain's row waits (a flush's), else while any row of the message does.
        still = (STILL_QUEUED, (queue_id,)) if domain is None else (STILL_QUEUED_FOR, (queue_id, domain))
        with sqlite_errors():
            row = self.connection.execute("SELECT size FROM messages AS m WHERE m.queue_id = ?" + still[0],
                                          still[1]).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return BodyReader(self.connection, queue_id, row[0], still)
