"""The checkpointer: a process of its own under the master that copies the queue's WAL into
the database, so that no writer's commit has to.

SQLite's automatic checkpoint (wal_autocheckpoint, 1000 pages) runs inside whichever
commit crosses it: that commit's caller (an SMTP worker's group commit, before its
250s; a flush worker between deliveries) waits while ~4 MB of pages are copied into
the database file and synced. Under `serve` this process runs them instead, on the
other core, and the writers keep only a backstop (store_db.CHECKPOINT_BACKSTOP, set in
every child the master forks): a checkpointer that is dead or cannot keep up still
leaves the WAL bounded.

Every INTERVAL seconds it runs a PASSIVE checkpoint, which never takes the write lock
and never waits for a reader, and again at once while the writers added frames
meanwhile (at most CATCH_UP rounds): once everything is copied, the next writer starts
the WAL over from its beginning (SQLite does that only then, and only while no reader
holds an older snapshot). Writers that never pause leave it no such moment, and the
-wal file would grow without bound: when the WAL holds more than WAL_LIMIT pages, a
RESTART checkpoint waits at most RESTART_BUSY_TIMEOUT for the writers and readers to
let it finish (it holds the write lock meanwhile: a commit waits that long), so that the
next commit starts the file over; one that could not is tried again RESTART_PAUSE later.
It runs only when the PASSIVE ones left it at most RESTART_COPY_LIMIT pages to copy, which
it also does holding the write lock.
When the writers pause, a -wal file past TRUNCATE_ABOVE is emptied (the housekeeping
round in the flush workers did that before; it now leaves the WAL to this process).

A checkpoint that runs long (a PASSIVE copying a huge WAL to a slow disk, once a reader
that held it back let go) is not taken for a hung one: while a checkpoint runs, a thread
beats every `progress_look` seconds in which the checkpointing thread used CPU (it copies
pages) or the queue's disk moved sectors (it syncs them), for as long as its WAL takes at
COPY_RATE_FLOOR at most. One hung inside a checkpoint (a dead disk, a call that never
returns) falls silent, at the latest then, and the master kills it as before
(CheckpointProgress says where that cannot be told).

A checkpoint that fails (the disk is full, an I/O error) loses nothing: the frames stay
in the WAL, are read from there, and are copied by a later checkpoint. It is logged
once, and tried again every FAILURE_PAUSE seconds until one succeeds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from backupmx.config import tuning
from backupmx.log import log_event
from backupmx.store import QueueStore, QueueUnavailable

# Seconds between looks at the WAL. A look that finds nothing to copy costs a read of
# the -shm's header; at 0.1 s the WAL holds at most a tenth of a second of commits.
INTERVAL = tuning("BACKUPMX_CHECKPOINT_INTERVAL", 0.1)
# PASSIVE checkpoints in a row while the writers keep adding frames.
CATCH_UP = 4
# WAL pages (of the page size, 4 KB: 16 MB) beyond which a RESTART checkpoint makes the
# writers start the file over. Under a steady stream of commits PASSIVE checkpoints never
# find the WAL at rest (each copies what the commits added while the one before ran), and
# the file would grow to the writers' backstop, where their own commits checkpoint again.
WAL_LIMIT = tuning("BACKUPMX_CHECKPOINT_WAL_LIMIT", 4096, int)
# How long that RESTART waits for the writer and the readers (with the write lock held),
# and the seconds before another when it could not finish (a reader kept its snapshot:
# Litestream, a long `queue list`): the writers wait at most 5% of the time.
RESTART_BUSY_TIMEOUT = 0.05
RESTART_PAUSE = 1.0
# At most this many WAL pages (1 MB) left for that RESTART to copy: it copies them holding the
# write lock. A reader that kept more from the PASSIVE checkpoints (a long `queue list`, a
# shell left in a transaction) leaves them to the next PASSIVE ones once it is gone.
RESTART_COPY_LIMIT = 256
# A -wal file larger than this (bytes) is emptied (TRUNCATE, not waiting for anyone) once
# the writers paused for a look: SQLite only cuts it back to journal_size_limit (64 MB).
TRUNCATE_ABOVE = 4 * 1024 * 1024
# Seconds between attempts after a checkpoint failed.
FAILURE_PAUSE = 1.0
# The slowest copy (bytes a second) taken for a checkpoint that gets on: one that started with
# a W-byte -wal file gets progress beats for W / COPY_RATE_FLOOR seconds at most (random 4 KB
# writes to a disk head run at ~0.5 MB/s; the file holds a page's old copies too). The sectors
# moved are the disk's, and the writers' commits move them while a checkpoint hangs: without
# this bound the master would never kill one hung while mail comes in, the WAL growing.
COPY_RATE_FLOOR = 256 * 1024


class Checkpointer:
    """The checkpoints of one queue, and whether the last one failed."""

    def __init__(self, path: str, logger: logging.Logger, store: QueueStore | None = None,
                 running: "CheckpointProgress | None" = None):
        self.path = path
        self.store = store  # opened at the first look (again while it cannot be)
        self.running = running or CheckpointProgress()  # what the progress beats watch
        self.logger = logger
        self.failing = False
        self.restart_after = 0.0  # monotonic: no RESTART before
        self.last = (-1, -1)  # the last look's (WAL pages, pages copied)

    def turn(self) -> float:
        """One look: copy what the WAL holds. Returns the seconds to wait before the next."""
        try:
            if self.store is None:  # opening writes (schema.sql's marks): a full disk can refuse it
                self.store = QueueStore(self.path, migrate=False)
            with self.running:
                self._checkpoints()
        except QueueUnavailable as exc:
            if not self.failing:
                log_event(self.logger, "checkpoint-failed", error=str(exc), retry=f"every {FAILURE_PAUSE:g}s",
                          level=logging.WARNING)
            self.failing = True
            return FAILURE_PAUSE
        if self.failing:
            log_event(self.logger, "checkpoint-recovered")
            self.failing = False
        return INTERVAL

    def _checkpoints(self) -> None:
        busy, wal, copied = self.store.checkpoint("PASSIVE", 0)
        for _ in range(CATCH_UP - 1):
            if busy or copied >= wal:
                break
            busy, wal, copied = self.store.checkpoint("PASSIVE", 0)
        if wal > WAL_LIMIT and wal - copied <= RESTART_COPY_LIMIT and time.monotonic() >= self.restart_after:
            if self.store.checkpoint("RESTART", RESTART_BUSY_TIMEOUT)[0]:
                self.restart_after = time.monotonic() + RESTART_PAUSE
        idle, self.last = (wal, copied) == self.last and copied == wal, (wal, copied)
        if idle and _size(f"{self.path}-wal") > TRUNCATE_ABOVE:
            self.store.checkpoint("TRUNCATE", 0)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class CheckpointProgress:
    """Whether a checkpoint runs now (`with` around it), and whether it gets on: its thread's
    CPU clock (it copies pages) or the sectors moved by the disk the queue is on (it syncs
    them: a long fsync uses no CPU). A checkpoint hung for good moves neither, but when others
    keep that disk busy: then only its thread's CPU tells (a queue on NFS, tmpfs: always)."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.clock = None  # the checkpointing thread's CPU clock while one runs, else None
        self.disk = _disk_stat(path) if path else None
        self.beats_until = None  # monotonic: no progress beat after (COPY_RATE_FLOOR); None: no bound

    def __enter__(self):
        if self.path is not None:
            self.beats_until = time.monotonic() + _size(f"{self.path}-wal") / COPY_RATE_FLOOR
        self.clock = time.pthread_getcpuclockid(threading.get_ident())
        return self

    def __exit__(self, *exc):
        self.clock = None

    def sample(self):
        """(the checkpoint's thread clock or None, its CPU seconds, the disk's sectors moved)."""
        clock = self.clock
        return clock, time.clock_gettime(clock) if clock is not None else 0.0, _sectors_moved(self.disk)

    def beat_while_it_copies(self, beat: Callable[[], None], look: float, stopped: threading.Event) -> None:
        """A thread's body: every `look` seconds, beat() when a checkpoint ran all along and got
        on meanwhile (CPU used, sectors moved), and not for longer than its WAL could take."""
        seen = self.sample()
        while not stopped.wait(look):
            now = self.sample()
            if now[0] is not None and now[0] == seen[0] and (now[1] > seen[1] or now[2] > seen[2]) and (
                    self.beats_until is None or time.monotonic() <= self.beats_until):
                beat()
            seen = now


def _disk_stat(path: str) -> str | None:
    """The block device's statistics file (Linux sysfs) of the file system `path` is on, or None."""
    try:
        device = os.stat(os.path.dirname(os.path.abspath(path))).st_dev
    except OSError:
        return None
    stat = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat"
    return stat if _sectors_moved(stat) else None


def _sectors_moved(stat: str | None) -> int:
    """Sectors read and written by the device so far (fields 3 and 7 of sysfs block stat); 0 unknown."""
    if stat is None:
        return 0
    try:
        with open(stat) as f:
            fields = f.read().split()
        return int(fields[2]) + int(fields[6])
    except (OSError, ValueError, IndexError):
        return 0


def run_checkpointer(config, logger: logging.Logger, should_stop: Callable[[], bool],
                     beat: Callable[[], None], progress_look: float | None = None) -> None:
    """The checkpointer process's body (helper_processes.CheckpointerProcess): until `should_stop()`,
    calling `beat()` at each look (the master kills one that stops), and every `progress_look`
    seconds while a checkpoint runs and copies (None: no such beats). A queue it cannot open
    is a failed checkpoint (logged once, tried every FAILURE_PAUSE), not a crash: the master
    would start another every second, each with its traceback and its died line."""
    running = CheckpointProgress(config.queue)
    checkpointer = Checkpointer(config.queue, logger, running=running)
    stopped = threading.Event()
    if progress_look is not None:
        threading.Thread(target=running.beat_while_it_copies, args=(beat, progress_look, stopped),
                         name="checkpoint-progress", daemon=True).start()
    try:
        while not should_stop():
            pause = checkpointer.turn()
            beat()
            time.sleep(pause)
    finally:
        stopped.set()
        checkpointer.close()
