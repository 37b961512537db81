#!/usr/bin/env python3
"""How many durable enqueues per second the queue takes.

Each enqueue is one transaction (WAL, synchronous=FULL: an fsync of the WAL
per commit) of a 2 KB message with one recipient, exactly what the SMTP side
does before it answers 250. Run it on the filesystem the queue will live on:

    python3 bench/sqlite_commit.py [--dir /var/spool/backupmx] [--seconds 3] [--procs 1] [--size 2048]
"""

import argparse
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from backupmx.envelope import Envelope, Recipient  # noqa: E402
from backupmx.store import QueueStore, Submission  # noqa: E402


def run(path: str, seconds: float, size: int, start, results) -> None:
    store = QueueStore(path, busy_timeout=30)  # opened after the fork, as in the server
    body = (b"X" * 76 + b"\r\n") * (size // 78) + b"Y" * (size % 78)
    envelope = Envelope("sender@example.org", [Recipient("user@example.com", "example.com")])
    start.wait()
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        # One message per transaction: the cost of a commit alone (the SMTP workers batch a loop round's).
        store.enqueue_many([Submission(store.new_queue_id(), envelope, io.BytesIO(body), len(body), "192.0.2.1",
                                       "bench")])
        done += 1
    store.close()
    results.put(done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to put the scratch database (default: the system temp dir)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--procs", type=int, default=1, help="processes enqueueing at once")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="backupmx-bench-", dir=args.dir)
    try:
        path = os.path.join(scratch, "queue.db")
        QueueStore(path).close()  # create the schema once, before the workers
        ctx = multiprocessing.get_context("fork")
        start = ctx.Barrier(args.procs + 1)
        results = ctx.Queue()
        procs = [ctx.Process(target=run, args=(path, args.seconds, args.size, start, results)) for _ in range(args.procs)]
        for p in procs:
            p.start()
        start.wait()
        began = time.monotonic()
        total = sum(results.get(timeout=args.seconds + 60) for _ in procs)
        elapsed = time.monotonic() - began
        for p in procs:
            p.join()
        print(f"{total / elapsed:.0f} durable enqueues/s ({total} messages of {args.size} bytes, "
              f"{args.procs} process(es), {elapsed:.1f}s, WAL + synchronous=FULL, {scratch})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
