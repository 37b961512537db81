#!/usr/bin/env python3
"""What a flush worker's housekeeping round costs on a queue, step by step (issue 16).

    python3 bench/housekeeping_cost.py --queue /tmp/q1m.db             # backlog.py --save-queue's queue (changed!)
    python3 bench/housekeeping_cost.py --queue /tmp/q1m.db --retry-interval 10m
    python3 bench/housekeeping_cost.py --queue /tmp/q1m.db --after d00.bench

Runs lifecycle.housekeeping's steps in this process as a flush worker runs them
under `serve` (the checkpointer's WAL copy left to it), on the queue itself, not
a copy (--after deletes a domain's rows; --retry-interval's scan asks for
flushes): each step's CPU (time.process_time), wall time and the pages it read
(rchar / 4 KB of /proc/self/io; "disk": read_bytes). --rounds rounds on a fresh
connection each (as after a flush's writes), then on one kept, then the retry
scan (store.due_domains) alone. With --after DOMAIN: that domain's rows deleted
first (as its flush would), then one round: its reclaim and vacuum.
The config: backlog.py's 100 domains d00.bench ... d99.bench.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backupmx import lifecycle, store_db  # noqa: E402
from backupmx.config import load_config  # noqa: E402
from backupmx.store import QueueStore  # noqa: E402

STEPS = ("expire", "bounces", "delay_warnings", "retries", "purge", "purge_verify", "purge_greylist",
         "domains", "reclaim", "upkeep")


def read_io() -> tuple[int, int]:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"]), int(fields["read_bytes"])


def one_round(store, config) -> dict[str, tuple[float, float, float, float]]:
    """{step: (CPU ms, wall ms, pages read, pages from the disk)} of one round."""
    r = lifecycle._Round(store, config, logging.getLogger("housekeeping_cost"), time.time, lifecycle.send_dsn)
    out = {}
    for name in STEPS:
        cpu, wall, (chars, disk) = time.process_time(), time.perf_counter(), read_io()
        r.step(name, getattr(r, name))
        chars2, disk2 = read_io()
        out[name] = ((time.process_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3,
                     (chars2 - chars) / 4096, (disk2 - disk) / 4096)
    return out


def show(title: str, rounds: list[dict]) -> None:
    print(f"{title}: medians of {len(rounds)} (CPU ms, wall ms, 4 KB pages read, from the disk)")
    total = [0.0] * 4
    for name in STEPS:
        values = [statistics.median(r[name][k] for r in rounds) for k in range(4)]
        total = [a + b for a, b in zip(total, values)]
        print(f"  {name:<16} {values[0]:8.1f} {values[1]:8.1f} {values[2]:9.0f} {values[3]:9.0f}")
    print(f"  {'all':<16} {total[0]:8.1f} {total[1]:8.1f} {total[2]:9.0f} {total[3]:9.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", required=True, help="the queue (used in place)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--retry-interval", default="", help="retry_interval of every domain (its scan runs)")
    parser.add_argument("--after", help="delete this domain's rows first, then one round (its reclaim)")
    args = parser.parse_args(argv)
    store_db._checkpoints_elsewhere = True  # as under serve: the checkpointer process copies the WAL
    with tempfile.TemporaryDirectory() as tmp:
        retry = f"retry_interval = {args.retry_interval}\n" if args.retry_interval else ""
        domains = "".join(f"\n[domain:d{i:02d}.bench]\nprimary = 127.0.0.1:9\nprimary_tls = none\n{retry}"
                          for i in range(100))
        cfg = Path(tmp) / "backupmx.ini"
        cfg.write_text(f"[backupmx]\nhostname = mx2.bench\nqueue = {Path(args.queue).resolve()}\n{domains}")
        config = load_config(str(cfg))
    if args.after:
        with sqlite3.connect(config.queue, timeout=60) as db:
            gone = db.execute("DELETE FROM queue WHERE domain = ?", (args.after,)).rowcount
        print(f"{args.after}: {gone:,} rows deleted")
        with QueueStore(config.queue) as store:
            show(f"the round after {args.after}'s rows left", [one_round(store, config)])
        return 0
    fresh, kept = [], []
    with QueueStore(config.queue) as store:
        queued = store.connection.execute("SELECT COALESCE(SUM(messages), 0) FROM queue_totals"
                                          " WHERE state = 'queued'").fetchone()[0]
    print(f"{args.queue}: {queued:,} queued")
    for _ in range(args.rounds):
        with QueueStore(config.queue) as store:
            fresh.append(one_round(store, config))
    with QueueStore(config.queue) as store:
        for _ in range(args.rounds):
            kept.append(one_round(store, config))
        show("a round, a fresh connection each", fresh)
        show("a round, one connection", kept)
        scans = []
        for _ in range(args.rounds):
            cpu, wall, (chars, _) = time.process_time(), time.perf_counter(), read_io()
            store.due_domains(config.domains)  # as if every domain had retry_interval on: the worst case
            scans.append(f"{(time.process_time() - cpu) * 1e3:.1f} ms CPU / {(time.perf_counter() - wall) * 1e3:.1f}"
                         f" wall / {(read_io()[0] - chars) / 4096:,.0f} pages")
        print("the retry scan (store.due_domains) alone: " + "; ".join(scans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
