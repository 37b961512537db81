#!/usr/bin/env python3
"""How fast the flusher hands a queue to the primary.

Enqueues N messages (default 5000, ~2 KB, one recipient each) into a fresh
queue in a temporary directory, starts the test Sink (tests/sink.py) as the
primary on 127.0.0.1, runs deliver_domain once and prints messages/s.

    python3 bench/flush.py [-n 5000] [--size 2048] [--dir DIR] [--tls]

Each outcome is one durable SQLite transaction (synchronous=FULL), so the
figure is mostly the disk's fsync rate; --dir on a tmpfs shows the rest.
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from backupmx.config import DomainConfig  # noqa: E402
from backupmx.envelope import Envelope, Recipient  # noqa: E402
from backupmx.flusher import deliver_domain  # noqa: E402
from backupmx.store import QueueStore, Submission  # noqa: E402
from sink import Sink  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="messages (default 5000)")
    parser.add_argument("--size", type=int, default=2048, help="body bytes per message (default 2048)")
    parser.add_argument("--dir", help="where to put the temporary queue (default: the system temp dir)")
    parser.add_argument("--tls", action="store_true", help="deliver over STARTTLS (opportunistic)")
    args = parser.parse_args(argv)

    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    body = (b"Subject: bench\r\n\r\n" + line * (args.size // len(line) + 1))[: args.size - 2] + b"\r\n"
    certs = os.path.join(REPO, "tests", "certs")
    tls_args = dict(tls_cert=os.path.join(certs, "server.pem"), tls_key=os.path.join(certs, "server.key")) if args.tls else {}

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = QueueStore(os.path.join(tmp, "queue.db"))
        started = time.monotonic()
        for _ in range(args.n):
            envelope = Envelope("sender@bench.test", [Recipient("rcpt@example.com", "example.com")])
            store.enqueue_many([Submission(store.new_queue_id(), envelope, body, len(body), "127.0.0.1", "bench")])
        enqueue_seconds = time.monotonic() - started

        sink = Sink(**tls_args).start()
        sink.session_timeout = 600
        domain = DomainConfig(name="example.com", primary=("127.0.0.1", sink.port),
                              primary_tls="opportunistic" if args.tls else "none", recipients=None, primary_ca=None,
                              max_queue_messages=None, max_queue_bytes=None, queue_lifetime=86400.0,
                              retry_interval=0.0)
        store.request_flush(["example.com"])
        assert store.claim_flush("bench", 3600) == "example.com"
        started = time.monotonic()
        counts = deliver_domain(store, domain, owner="bench", hostname="bench.test", timeout=60)
        seconds = time.monotonic() - started
        store.release_flush("example.com", "bench")
        sink.stop()
        store.close()

    assert counts["delivered"] == args.n, counts
    assert len(sink.deliveries) == args.n and sink.deliveries[0].body == body
    print(f"enqueued {args.n} x {len(body)} B in {enqueue_seconds:.2f} s ({args.n / enqueue_seconds:.0f} msg/s)")
    print(f"delivered {args.n} messages in {seconds:.2f} s over {len(sink.sessions)} connection(s): "
          f"{args.n / seconds:.0f} messages/s{' (TLS)' if args.tls else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
