#!/usr/bin/env python3
"""What schema 13's one-time rebuild of an older queue costs (store_migrations.rebuild_clustered).

    flock /work/wt/cpu.lock python3 bench/rebuild.py QUEUE.db

Opens QUEUE.db as `serve` does (QueueStore: the migration's one transaction,
then schema.sql) and prints the time it took, the WAL the commit left, the
file's size before and after and its free pages. It rebuilds the file in
place: give it a copy, e.g. of a schema 12 queue filled by bench/backlog.py
--keep at a release before schema 13.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from backupmx.store import QueueStore  # noqa: E402


def main(path: str) -> None:
    size = os.path.getsize(path)
    start = time.monotonic()
    store = QueueStore(path, on_rebuild=lambda found: print(f"rebuilding a queue of schema {found}", flush=True))
    took = time.monotonic() - start
    wal = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    db = store.connection
    print(f"open with the rebuild: {took:.1f} s; WAL after the commit {wal / 2**20:.0f} MB; database"
          f" {size / 2**20:.0f} -> {os.path.getsize(path) / 2**20:.0f} MB,"
          f" {db.execute('PRAGMA freelist_count').fetchone()[0]:,} free pages;"
          f" {db.execute('SELECT COUNT(*) FROM queue').fetchone()[0]:,} queue rows;"
          f" schema {db.execute('PRAGMA user_version').fetchone()[0]}")
    store.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: rebuild.py QUEUE.db")
    main(sys.argv[1])
