#!/usr/bin/env python3
"""Where a flush's store time goes, statement by statement: a queue of a million against a nearly empty one (issue 16).

    python3 bench/flush_phases.py --queue /tmp/q1m.db     # a copy of backlog.py --save-queue's queue
    python3 bench/flush_phases.py                         # a fresh queue holding only the flushed domains

No SMTP: for each flushed domain (d00, d01, ... as backlog.py fills them) it
does the store's share of a flush as the flusher does it, in this process,
on a copy of the queue (read once first, so the page cache holds it):
the work list (Delivery.messages_for_flush), each body read as send_body
reads it (open_body, then BODY_CHUNK pieces), and every recipient recorded
delivered (record_attempts, OUTCOME_BATCH messages a transaction). The
queue connection is wrapped so that every statement's time (execute and
its fetches; the triggers run inside the statement that fires them) is
summed by its text, the COMMITs (the fsync) apart.

A checkpointer process runs beside it as under `serve` (checkpointer.Checkpointer,
and this process's connection checkpoints only past CHECKPOINT_BACKSTOP pages),
unless --no-checkpointer: then SQLite's own automatic checkpoint runs in the
commits, every --autocheckpoint pages (0: none at all, and the WAL frames
written per message are counted: the pages a delivered message dirties).

Since schema 14 a delivered message's own row and body are deleted later, by
housekeeping's reclaim (schema.sql, table reclaim): after the flushes, the
reclaim runs as lifecycle does it (all the listed messages in queue id order,
RECLAIM_BATCH a transaction, no time budget) and its cost is shown apart, per
message reclaimed, so that the total is not just moved out of sight.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import shutil
import signal
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from backlog import Filler, domain_name  # noqa: E402

from backupmx import flush_session, store_db  # noqa: E402
from backupmx import reclaim as reclaimer  # noqa: E402
from backupmx.checkpointer import Checkpointer  # noqa: E402
from backupmx.outcome import Verdict  # noqa: E402
from backupmx.store import QueueStore  # noqa: E402


class Timed:
    """Seconds per statement text (execute plus the fetches of its rows), shared by the wrappers."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def add(self, sql: str, seconds: float, call: bool = False) -> None:
        key = re.sub(r"\s+", " ", sql).strip()[:90]
        self.seconds[key] += seconds
        if call:
            self.calls[key] += 1


class TimedCursor:
    def __init__(self, cursor, sql: str, timed: Timed):
        self._cursor, self._sql, self._timed = cursor, sql, timed

    def _timing(self, name):
        method = getattr(self._cursor, name)

        def timed(*args):
            started = time.perf_counter()
            try:
                return method(*args)
            finally:
                self._timed.add(self._sql, time.perf_counter() - started)
        return timed

    def __getattr__(self, name):
        if name in ("fetchone", "fetchall", "fetchmany"):
            return self._timing(name)
        return getattr(self._cursor, name)

    def __iter__(self):
        return self

    def __next__(self):
        return self._timing("__next__")()


class TimedConnection:
    """The store's sqlite3 connection, its execute/executemany timed."""

    def __init__(self, db, timed: Timed):
        self._db, self._timed = db, timed

    def _run(self, method, sql, *args):
        started = time.perf_counter()
        try:
            cursor = method(sql, *args)
        finally:
            self._timed.add(sql, time.perf_counter() - started, call=True)
        return TimedCursor(cursor, sql, self._timed)

    def execute(self, sql, *args):
        return self._run(self._db.execute, sql, *args)

    def executemany(self, sql, *args):
        return self._run(self._db.executemany, sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def checkpointer_process(path: str) -> int:
    """A checkpointer as under `serve`, in a child of its own; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        checkpointer = Checkpointer(path, logging.getLogger("checkpointer"))
        while True:
            time.sleep(checkpointer.turn())
    finally:
        os._exit(1)


def warm(path: Path) -> None:
    """Read the file (and its WAL) once: the page cache holds it for the runs (a warm cache)."""
    for p in (path, Path(f"{path}-wal")):
        if p.exists():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


WAL_HEADER, FRAME_HEADER = 32, 24


def wal_pages(path: Path, page: int) -> list[int]:
    """The page number of every frame in the WAL, in order (a WAL no checkpoint has reset meanwhile)."""
    pages = []
    with open(f"{path}-wal", "rb") as f:
        f.seek(WAL_HEADER)
        while True:
            header = f.read(FRAME_HEADER)
            if len(header) < FRAME_HEADER:
                break
            pages.append(struct.unpack(">I", header[:4])[0])
            f.seek(page, os.SEEK_CUR)
    return pages


def frames_per_btree(path: Path, page: int, db: sqlite3.Connection, first: int = 0) -> tuple[collections.Counter, int]:
    """({table or index: WAL frames}, distinct pages) of the WAL's frames from the `first`th on,
    the pages named by dbstat (one walk of every b-tree)."""
    pages = wal_pages(path, page)[first:]
    wanted, names = set(pages), {}
    for name, pageno in db.execute("SELECT name, pageno FROM dbstat"):
        if pageno in wanted:
            names[pageno] = name
    return collections.Counter(names.get(p, "(freelist, pointer map)") for p in pages), len(wanted)


def wal_frames(path: Path, page: int) -> int:
    try:
        return max(0, (Path(f"{path}-wal").stat().st_size - 32) // (page + 24))
    except OSError:
        return 0


def start_measuring(db: Path, args) -> int | None:
    """The queue read once (a warm page cache) and its dirty pages written back now, not
    during the measured commits' fsyncs; the checkpointer process started as under
    `serve`, unless --no-checkpointer: its pid, or None."""
    warm(db)
    os.sync()
    if args.no_checkpointer:
        return None
    pid = checkpointer_process(str(db))
    store_db.leave_checkpoints_to_checkpointer()
    return pid


def open_measured(db: Path, args) -> tuple[QueueStore, int, int]:
    """The measured connection: --autocheckpoint (with --no-checkpointer) and --pragma
    applied. (store, page size, queued rows)."""
    store = QueueStore(str(db))
    if args.no_checkpointer:
        store.connection.execute(f"PRAGMA wal_autocheckpoint = {args.autocheckpoint}")
    for pragma in args.pragma:
        store.connection.execute(f"PRAGMA {pragma}")
    page = store.connection.execute("PRAGMA page_size").fetchone()[0]
    queued = store.connection.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
    # The WAL emptied: one left by the copy, or written by the migration of an older queue at
    # its open, would be written over from its start (once checkpointed), and the frames a
    # flush writes there not counted (wal_frames counts the file's growth).
    store.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store, page, queued


def flush_domain(store: QueueStore, timed: Timed, domain: str, db: Path, page: int) -> dict:
    """The store's share of one flush of `domain`; seconds per phase."""
    phases = collections.defaultdict(float)
    frames = wal_frames(db, page)
    started = time.perf_counter()
    messages = store.messages_for_flush(domain)
    phases["work list"] = time.perf_counter() - started
    delivered = Verdict.of_reply(250, "250 2.0.0 Ok: queued as 1")
    for first in range(0, len(messages), flush_session.OUTCOME_BATCH):
        batch = messages[first:first + flush_session.OUTCOME_BATCH]
        started = time.perf_counter()
        for message in batch:
            with store.open_body(message.queue_id, domain) as body:  # as send_body: while the domain's row waits
                while body.read(flush_session.BODY_CHUNK):
                    pass
        phases["bodies"] += time.perf_counter() - started
        started = time.perf_counter()
        store.record_attempts([(m.queue_id, domain, {r.address: delivered for r in m.recipients}, None)
                               for m in batch])
        phases["record_attempts"] += time.perf_counter() - started
    phases["messages"] = len(messages)
    phases["frames"] = wal_frames(db, page) - frames
    phases["first_frame"] = frames
    return phases


def reclaim(store: QueueStore, db: Path, page: int) -> tuple[int, float, int]:
    """Housekeeping's reclaim of every listed message (reclaim.reclaim_round without
    its time budget): (messages deleted, seconds, WAL frames written)."""
    frames = wal_frames(db, page)
    started = time.perf_counter()
    listed = store.reclaim_listed(10 ** 7)
    queue_ids = sorted({queue_id for _, queue_id in listed})
    deleted = done = 0
    while done < len(queue_ids):
        reclaimed, taken = store.reclaim(queue_ids[done:done + reclaimer.RECLAIM_BATCH], reclaimer.RECLAIM_BYTES)
        deleted, done = deleted + reclaimed, done + taken
    store.forget_reclaimed(listed)
    return deleted, time.perf_counter() - started, wal_frames(db, page) - frames


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", help="a queue to copy (backlog.py --save-queue); default: a fresh one")
    parser.add_argument("--flushes", type=int, default=3, help="domains d00, d01, ... flushed in turn")
    parser.add_argument("--domains", help="the domains flushed instead (numbers: 10,11,12); the other domains'"
                                          " mail of an interleaved fill is as scattered as d00's")
    parser.add_argument("--in-place", action="store_true",
                        help="flush --queue itself, not a copy (several runs on one copy, other --domains each)")
    parser.add_argument("--pragma", action="append", default=[],
                        help="a PRAGMA for the flushing connection (cache_size=-65536, mmap_size=4294967296)")
    parser.add_argument("--flush-size", type=int, default=10000, help="messages of each (a fresh queue)")
    parser.add_argument("--dir", help="where the copy goes")
    parser.add_argument("--no-checkpointer", action="store_true")
    parser.add_argument("--autocheckpoint", type=int, default=1000,
                        help="with --no-checkpointer: wal_autocheckpoint pages (0: none, count the frames)")
    parser.add_argument("--top", type=int, default=14, help="statements shown")
    parser.add_argument("--btrees", action="store_true",
                        help="with --no-checkpointer --autocheckpoint 0: each flush's WAL frames by table"
                             " and index (dbstat: a walk of every b-tree after each flush)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="phases-", dir=args.dir))
    db = Path(args.queue) if args.in_place else root / "queue.db"
    domains = [domain_name(int(i)) for i in args.domains.split(",")] if args.domains else \
        [domain_name(i) for i in range(args.flushes)]
    pid = None
    try:
        if args.in_place:
            pass
        elif args.queue:
            shutil.copyfile(args.queue, db)
            if os.path.exists(f"{args.queue}-wal"):
                shutil.copyfile(f"{args.queue}-wal", f"{db}-wal")
        else:
            filler = Filler(db, 5000)
            for domain in domains:
                filler.fill([domain], args.flush_size)
            filler.close()
        pid = start_measuring(db, args)
        store, page, queued = open_measured(db, args)
        print(f"flush_phases: {db} ({queued:,} queued), {'a checkpointer' if pid else 'no checkpointer, autocheckpoint ' + str(args.autocheckpoint)}"
              + "".join(f", PRAGMA {pragma}" for pragma in args.pragma),
              flush=True)
        timed = Timed()
        store._db = TimedConnection(store._db, timed)
        runs = []
        for domain in domains:
            before = dict(timed.seconds)
            phases = flush_domain(store, timed, domain, db, page)
            phases["statements"] = {k: v - before.get(k, 0.0) for k, v in timed.seconds.items()}
            runs.append(phases)
            n = max(1, phases["messages"])
            total = phases["work list"] + phases["bodies"] + phases["record_attempts"]
            print(f"  {domain}: {phases['messages']:,} messages, {total / n * 1e6:6.0f} us a message: work list"
                  f" {phases['work list'] / n * 1e6:5.0f}, bodies {phases['bodies'] / n * 1e6:5.0f},"
                  f" record_attempts {phases['record_attempts'] / n * 1e6:5.0f}"
                  + (f"; {phases['frames'] / n:.1f} WAL frames a message" if args.no_checkpointer
                     and not args.autocheckpoint else ""), flush=True)
            if args.btrees and args.no_checkpointer and not args.autocheckpoint:
                counts, _ = frames_per_btree(db, page, store.connection._db, phases["first_frame"])
                print("    " + ", ".join(f"{name} {count / n:.2f}" for name, count in counts.most_common()), flush=True)
        reclaimed, seconds, frames = reclaim(store, db, page)
        print(f"  reclaim: {reclaimed:,} messages, {seconds / max(1, reclaimed) * 1e6:6.0f} us a message"
              + (f"; {frames / max(1, reclaimed):.1f} WAL frames a message" if args.no_checkpointer
                 and not args.autocheckpoint else ""), flush=True)
        store.close()
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        shutil.rmtree(root, ignore_errors=True)

    def per_message(phases, value):
        return value / max(1, phases["messages"]) * 1e6

    print(f"\nmedians of {len(runs)} flushes, us a message:")
    for name in ("work list", "bodies", "record_attempts"):
        print(f"  {name:<20} {statistics.median(per_message(r, r[name]) for r in runs):7.1f}")
    keys = sorted(timed.seconds, key=lambda k: -timed.seconds[k])[:args.top]
    for key in keys:
        print(f"  {statistics.median(per_message(r, r['statements'].get(key, 0.0)) for r in runs):7.1f}"
              f"  ({timed.calls[key] / max(1, sum(r['messages'] for r in runs)):.2f} a message)  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
