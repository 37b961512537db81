#!/usr/bin/env python3
"""Where the accept's store time goes, statement by statement and b-tree by b-tree: a queue of a million against a nearly empty one (issue 16).

    python3 bench/accept_phases.py --queue /tmp/q1m.db --no-checkpointer --autocheckpoint 0
    python3 bench/accept_phases.py --no-checkpointer --autocheckpoint 0     # a fresh queue
    python3 bench/accept_phases.py --queue /tmp/q1m.db                      # timed, a checkpointer beside it

No SMTP: it does the store's share of the accept as the SMTP workers do it
(Intake.enqueue_many in group commits of --group messages), in this process,
on a copy of the queue (read once first, so the page cache holds it). The
mail is a backlog.py window's: 2 KB, one recipient each, round-robin over
997 recipients of the domains d03.bench ... (the ones backlog.py does not
flush), so each group commit holds mail for --group different domains. The
queue connection is wrapped as in flush_phases.py: every statement's time
is summed by its text, the COMMITs (the fsync) apart.

A checkpointer process runs beside it as under `serve`, unless
--no-checkpointer: then SQLite's automatic checkpoint runs in the commits
every --autocheckpoint pages, and with 0 none runs at all: the WAL then
holds every page each commit wrote, and its frame headers say which
(page numbers, mapped to their table or index with the dbstat virtual
table once the run is done): the WAL frames a message costs, per b-tree.

The copy is opened by this checkout's backupmx, so a queue of an older schema
is migrated first: to measure
another version's accept, run this file from that version's checkout.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import sqlite3
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from backlog import domain_name  # noqa: E402
from flush_phases import Timed, TimedConnection, frames_per_btree, open_measured, start_measuring  # noqa: E402
from smtpload import body_2k  # noqa: E402

from backupmx import store_db  # noqa: E402
from backupmx.envelope import Envelope, Recipient  # noqa: E402
from backupmx.store import QueueStore, Submission  # noqa: E402



def window_mail(store: QueueStore, n: int, domains: list[str]) -> Submission:
    """Message `n` as a backlog.py window sends it (smtpload: recipient n of 997, round-robin over `domains`)."""
    i = n % 997
    rcpt = f"user{i}@{domains[i % len(domains)]}"
    body = b"Received: from accept.bench (localhost [127.0.0.1])\r\n\tby backupmx; Sat, 5 Dec 2026 21:00:00 +0000\r\n" \
        + body_2k(n, rcpt)
    envelope = Envelope("load@client.test", [Recipient(rcpt, domains[i % len(domains)])])
    return Submission(store.new_queue_id(), envelope, body, len(body), "127.0.0.1", "client.test",
                      client_name="localhost", protocol="ESMTP")


def without_indexes(names: list[str]) -> None:
    """schema.sql as this process's opens apply it, without those indexes (else every open makes them again)."""
    text = store_db.schema_text()
    for name in names:
        text = re.sub(rf"CREATE INDEX IF NOT EXISTS {re.escape(name)} [^;]*;", "", text)
    store_db.schema_text = lambda: text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", help="a queue to copy (backlog.py --save-queue); default: a fresh one")
    parser.add_argument("--messages", type=int, default=20000, help="messages accepted")
    parser.add_argument("--group", type=int, default=4, help="messages a group commit (the workers' at 10 sessions)")
    parser.add_argument("--domains", type=int, default=100, help="backlog.py's --domains")
    parser.add_argument("--flushes", type=int, default=3, help="backlog.py's --flushes (domains the windows leave out)")
    parser.add_argument("--dir", help="where the copy goes")
    parser.add_argument("--no-checkpointer", action="store_true")
    parser.add_argument("--autocheckpoint", type=int, default=1000,
                        help="with --no-checkpointer: wal_autocheckpoint pages (0: none at all; the WAL frames"
                             " are counted per b-tree)")
    parser.add_argument("--pragma", action="append", default=[],
                        help="a PRAGMA for the accepting connection (cache_size=-65536)")
    parser.add_argument("--drop-index", action="append", default=[], metavar="NAME",
                        help="drop this index from the copy first (what the accept would save without it)")
    parser.add_argument("--top", type=int, default=14, help="statements shown")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="accept-phases-", dir=args.dir))
    db = root / "queue.db"
    domains = [domain_name(i) for i in range(args.flushes, args.domains)]
    pid = None
    try:
        if args.queue:
            shutil.copyfile(args.queue, db)
            if os.path.exists(f"{args.queue}-wal"):
                shutil.copyfile(f"{args.queue}-wal", f"{db}-wal")
        if args.drop_index:
            without_indexes(args.drop_index)
        store = QueueStore(str(db))
        for index in args.drop_index:
            store.connection.execute(f'DROP INDEX IF EXISTS "{index}"')
        if args.drop_index:  # its pages handed back, as housekeeping's vacuum would: no free list to reuse
            store.incremental_vacuum()
        # The copy's WAL moved into it and emptied: what the WAL holds after the run is the run's.
        store.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        pid = start_measuring(db, args)
        store, page, queued = open_measured(db, args)
        print(f"accept_phases: {db} ({queued:,} queued), groups of {args.group} over {len(domains)} domains, "
              + ("a checkpointer" if pid else f"no checkpointer, autocheckpoint {args.autocheckpoint}")
              + "".join(f", PRAGMA {pragma}" for pragma in args.pragma)
              + "".join(f", without {index}" for index in args.drop_index), flush=True)
        mail = [window_mail(store, n, domains) for n in range(args.messages)]
        timed = Timed()
        store._db = TimedConnection(store._db, timed)
        started = time.perf_counter()
        for first in range(0, len(mail), args.group):
            problems = store.enqueue_many(mail[first:first + args.group])
            if any(problems):
                raise SystemExit(f"accept_phases: refused: {[p for p in problems if p][0]}")
        elapsed = time.perf_counter() - started
        frames = None
        if args.no_checkpointer and not args.autocheckpoint:  # (read before the close checkpoints the WAL)
            frames = frames_per_btree(db, page, store.connection._db)
        store.close()
        report(args, timed, elapsed, frames)
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(args, timed: Timed, elapsed: float, frames: tuple[collections.Counter, int] | None) -> None:
    n = args.messages
    print(f"\n{n:,} messages in {elapsed:.2f} s: {elapsed / n * 1e6:.0f} us a message"
          f" ({n / elapsed:,.0f} msg/s), statements (us a message, calls a message):")
    for key in sorted(timed.seconds, key=lambda k: -timed.seconds[k])[:args.top]:
        print(f"  {timed.seconds[key] / n * 1e6:7.1f}  ({timed.calls[key] / n:.2f})  {key}")
    if frames:
        counts, distinct = frames
        total = sum(counts.values())
        print(f"\n{total / n:.2f} WAL frames a message ({total:,}; {distinct:,} distinct pages):")
        for name, count in counts.most_common():
            print(f"  {count / n:6.2f}  {name}")


if __name__ == "__main__":
    sys.exit(main())
