#!/usr/bin/env python3
"""The queue's own CPU per message on the two hot paths, without the disk's fsync.

    python3 bench/store_cpu.py [--messages 10000] [--batch 8] [--size 2048] [--domains 1] [--rounds 3]

accept   Intake.enqueue_many, the SMTP workers' group commit: --batch messages
         of --size bytes (one recipient each, over --domains domains) per call
flush    record_attempts, the flusher's outcome write: every message delivered
         (250), 64 outcomes per call, so each row leaves the queue

The queue is opened with durable=False (synchronous=NORMAL): what is left is
the SQL and the Python around it, time.process_time() of this one process,
which is what each commit holds the write lock for, fsync aside. Prints
microseconds per message for each round; a fresh queue in a temp dir per round.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from backupmx.envelope import Envelope, Recipient  # noqa: E402
from backupmx.outcome import Outcome, Verdict  # noqa: E402
from backupmx.store import QueueStore, Submission  # noqa: E402

OUTCOMES_PER_WRITE = 64


def one_round(args) -> tuple[float, float]:
    """(accept, flush) CPU microseconds per message."""
    body = (b"X" * 76 + b"\r\n") * (args.size // 78) + b"Y" * (args.size % 78)
    with tempfile.TemporaryDirectory() as directory:
        store = QueueStore(os.path.join(directory, "queue.db"), durable=False)
        try:
            queued, accept = [], 0.0
            while len(queued) < args.messages:
                batch = []
                for _ in range(args.batch):
                    n = len(queued) + len(batch)
                    domain = f"d{n % args.domains:02d}.bench"
                    recipient = Recipient(f"user{n}@{domain}", domain)
                    batch.append(Submission(store.new_queue_id(), Envelope("sender@example.org", [recipient]),
                                            body, len(body), "192.0.2.7", "client.test"))
                started = time.process_time()
                problems = store.enqueue_many(batch)
                accept += time.process_time() - started
                assert problems == [None] * len(batch), problems
                queued += [(s.queue_id, s.envelope.recipients[0]) for s in batch]
            delivered = Verdict(Outcome.DELIVERED, "250 2.0.0 Ok")
            started = time.process_time()
            for i in range(0, len(queued), OUTCOMES_PER_WRITE):
                store.record_attempts([(qid, r.domain, {r.address: delivered}, None)
                                       for qid, r in queued[i:i + OUTCOMES_PER_WRITE]])
            flush = time.process_time() - started
            assert store.connection.execute("SELECT COUNT(*) FROM queue").fetchone()[0] == 0
        finally:
            store.close()
    return accept / len(queued) * 1e6, flush / len(queued) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=8, help="messages per group commit (default 8)")
    parser.add_argument("--size", type=int, default=2048, help="body bytes (default 2048)")
    parser.add_argument("--domains", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for n in range(args.rounds):
        accept, flush = one_round(args)
        print(f"round {n + 1}: accept {accept:6.1f} us/message (batches of {args.batch}), "
              f"flush {flush:6.1f} us/message ({args.messages} x {args.size} B, {args.domains} domain(s))", flush=True)


if __name__ == "__main__":
    main()
