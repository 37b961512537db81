#!/usr/bin/env python3
"""What one delay-warning look (store_housekeeping.claim_delay_warnings' read) costs with a big queue.

    python3 bench/delay_scan.py --rows 200000,1000000 [--dir /tmp]

For each --rows count it makes a queue with schema.sql (QueueStore) and fills
its `queue` table with SQL alone (no bodies: the look reads queue rows only):
100 domains, received over the last two days, the rows older than four hours
warned already (a queue where delay_warning = 4h has been on). Then it times
the look as the store runs it (its two statements: the next domain, then
that domain's oldest), with the partial index queue_unwarned and without
it (dropped in the same file; the statements without INDEXED BY), each with and
without ANALYZE's statistics, and prints its plan and the mean of 5 runs in
ms for two cut-offs: none due (the steady state between rounds) and every
unwarned row due (delay_warning just switched on, or lowered).
"""

import argparse
import os
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from backupmx.store import QueueStore  # noqa: E402
from backupmx.store_housekeeping import _NEXT_UNWARNED_DOMAIN, _OLDEST_UNWARNED  # noqa: E402

INDEX = "queue_unwarned"  # the one the store's statements name (INDEXED BY)
LIMIT = 20  # lifecycle.DSN_BATCH's order of size
SPAN, DELAY = 2 * 86400, 4 * 3600


def fill(path: str, rows: int, now: int) -> None:
    QueueStore(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys = OFF")  # queue rows without their messages: the look never joins
    db.execute("BEGIN")
    db.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)"
        " INSERT INTO queue (queue_id, domain, state, state_changed, delay_warned, message_received_at,"
        " message_size) SELECT printf('Q%09d', i), printf('d%02d.bench', i % 100), 'queued', ?2,"
        " CASE WHEN ?2 - ?3 + i * ?3 / ?4 <= ?2 - ?5 THEN ?2 END, ?2 - ?3 + i * ?3 / ?4, 2048 FROM n",
        (rows - 1, now, SPAN, rows, DELAY))
    db.execute("COMMIT")
    db.close()


def look(path: str, now: int, index: str | None) -> tuple[list[str], dict[str, float]]:
    """The store's look, or the same statements without INDEXED BY when the index is gone."""
    sql, next_domain = _OLDEST_UNWARNED, _NEXT_UNWARNED_DOMAIN
    if index is None:
        sql, next_domain = (s.replace(f" INDEXED BY {INDEX}", "") for s in (sql, next_domain))
    db = sqlite3.connect(path)
    try:
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, ("d00.bench", now, LIMIT))]
        times = {}
        for label, cutoff in (("none due", now - 100 * DELAY), ("all unwarned due", now)):
            started = time.perf_counter()
            for _ in range(5):  # as the store looks: each domain's oldest, then the oldest of those
                candidates, domain = [], ""
                while (row := db.execute(next_domain, (domain,)).fetchone()) is not None:
                    domain = row[0]
                    candidates += db.execute(sql, (domain, cutoff, LIMIT)).fetchall()
                sorted(candidates)[:LIMIT]
            times[label] = (time.perf_counter() - started) / 5 * 1000
        return plan, times
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="200000,1000000", help="queue rows, comma-separated")
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    now = int(time.time())
    for rows in (int(r) for r in args.rows.split(",")):
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            path = os.path.join(directory, "queue.db")
            fill(path, rows, now)
            for index in (INDEX, None):
                db = sqlite3.connect(path, isolation_level=None)
                if index is None:
                    db.execute(f"DROP INDEX {INDEX}")
                db.execute("DROP TABLE IF EXISTS sqlite_stat1")
                db.close()
                for stats in (False, True):
                    if stats:
                        with sqlite3.connect(path, isolation_level=None) as db:
                            db.execute("ANALYZE")
                    plan, times = look(path, now, index)
                    print(f"{rows:>9,} rows  index={index or 'none':15} analyzed={'yes' if stats else 'no ':3}  "
                          + "  ".join(f"{label} {ms:8.3f} ms" for label, ms in times.items())
                          + f"  plan: {'; '.join(plan)}", flush=True)


if __name__ == "__main__":
    main()
