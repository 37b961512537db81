#!/usr/bin/env python3
"""What `serve`'s start-up check of the queue costs at a million messages (startup.check_queue).

    python3 bench/startup_check.py --dir /var/tmp --messages 1000000 --lock /work/wt/cpu.lock

Fills QUEUE (DIR/startup-check/queue.db, kept for the next run) with --messages
messages of 2 KB over 100 domains by bench/backlog.py's fast path, if it holds
fewer, then times, --runs times each: PRAGMA quick_check as `serve` ran it at
every start (store.check_database), with the file's pages in the page cache
("warm") and dropped from it first for this file only (posix_fadvise
DONTNEED: "cold"); and check_queue after a clean stop (record_clean_stop),
which leaves quick_check out. With --lock each step holds the lock (at most a
fill chunk of 200,000 messages).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from backlog import CPULock, Filler, domain_name, fill_in_chunks  # noqa: E402

from backupmx.config import load_config  # noqa: E402
from backupmx.startup import check_queue, record_clean_stop  # noqa: E402
from backupmx.store import QueueStore, check_database  # noqa: E402


def queued(path: Path) -> int:
    if not path.exists():
        return 0
    with QueueStore(str(path)) as store:
        return store.connection.execute("SELECT COUNT(*) FROM queue").fetchone()[0]


def drop_cached(path: Path) -> None:
    for name in (path, Path(f"{path}-wal")):
        if name.exists():
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(step, runs: int, lock: CPULock, before=lambda: None) -> list[float]:
    times = []
    for _ in range(runs):
        with lock.held():
            before()
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lock")
    args = parser.parse_args()
    lock = CPULock(args.lock)
    work = Path(args.dir) / "startup-check"
    work.mkdir(parents=True, exist_ok=True)
    queue = work / "queue.db"
    have = queued(queue)
    if have < args.messages:
        filler = Filler(queue, 5000)
        filler.n = have
        fill_in_chunks(filler, lock, 200_000, [domain_name(i) for i in range(100)], args.messages - have)
        filler.close()
        print(f"filled {args.messages - have:,} messages in {filler.seconds:.0f} s", flush=True)
    ini = work / "backupmx.ini"
    ini.write_text(f"[backupmx]\nhostname = mx2.test\nqueue = {queue}\n\n[domain:d00.bench]\nprimary = 127.0.0.1:25\n")
    config = load_config(str(ini))
    size = queue.stat().st_size
    print(f"queue: {queued(queue):,} messages, {size / 2**20:,.0f} MB", flush=True)

    def check():
        assert check_database(str(queue)) == []

    def clean_start():
        record_clean_stop(str(queue))
        check_queue(config)

    for name, step, before in (("quick_check, warm", check, lambda: None),
                               ("quick_check, cold", check, lambda: drop_cached(queue)),
                               ("check_queue after a clean stop, warm", clean_start, lambda: None),
                               ("check_queue after a clean stop, cold", clean_start, lambda: drop_cached(queue))):
        times = timed(step, args.runs, lock, before)
        print(f"{name}: median {statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})",
              flush=True)


if __name__ == "__main__":
    main()
