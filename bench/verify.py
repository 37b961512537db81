#!/usr/bin/env python3
"""recipients = verify: what a callout costs, and what a cached answer costs at RCPT.

    python3 bench/verify.py [--addresses 2000] [--clients 8] [--workers 2]

1. raw: verify.callout() in this process against the test Sink (tests/sink.py)
   over one kept-open connection (pipelined MAIL/RCPT/RSET: one round trip each),
   then from CALLOUT_THREADS threads: callouts/s.
2. through the server: `backupmx serve` with recipients = verify, N clients
   sending RCPT for distinct addresses (each a callout), then the same
   addresses again (each a cache hit): RCPT/s.
3. the cache hit itself: EXPLAIN QUERY PLAN of the look-up, and its cost in
   microseconds on a verify_cache of --rows rows.

Figures on a shared machine are indicative only.
"""

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "bench"))

from backupmx.config import DomainConfig  # noqa: E402
from backupmx.smtpclient import Primary  # noqa: E402
from backupmx.store import QueueStore  # noqa: E402
from backupmx.store_verify import LOOKUP  # noqa: E402
from backupmx.verify import CALLOUT_THREADS, Connections, callout  # noqa: E402
from accept import start_server  # noqa: E402
from sink import Sink  # noqa: E402


def timed(threads):
    """Start `threads`, wait for them all; the seconds it took."""
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def raw_callouts(sink, count, threads):
    domain = DomainConfig(name="example.com", primary=("127.0.0.1", sink.port), primary_tls="none",
                          recipients=None, primary_ca=None, max_queue_messages=None, max_queue_bytes=None,
                          queue_lifetime=86400.0, retry_interval=0.0, verify=True)
    connections = Connections(Primary(domain, hostname="mx2.bench", timeout=30, log=None))
    per_thread = count // threads

    def run(index):
        for n in range(per_thread):
            callout(connections, f"user{index}x{n}@example.com")

    elapsed = timed([threading.Thread(target=run, args=(i,)) for i in range(threads)])
    connections.close()
    return per_thread * threads / elapsed


def rcpt_round(port, addresses, clients):
    """Each client: one session, MAIL, then RCPT for its share of `addresses` (RSET every 50). RCPT/s."""
    shares = [addresses[i::clients] for i in range(clients)]
    errors = []

    def run(share):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            f = sock.makefile("rb")

            def reply():
                while True:
                    line = f.readline()
                    if line[3:4] != b"-":
                        return line

            reply()
            sock.sendall(b"EHLO bench.test\r\n")
            reply()
            for n, address in enumerate(share):
                if n % 50 == 0:
                    sock.sendall(b"RSET\r\nMAIL FROM:<a@sender.test>\r\n")
                    reply(), reply()
                sock.sendall(f"RCPT TO:<{address}>\r\n".encode())
                line = reply()
                if line[:3] != b"250":
                    errors.append(line)
            sock.sendall(b"QUIT\r\n")
            sock.close()
        except OSError as exc:
            errors.append(repr(exc))

    elapsed = timed([threading.Thread(target=run, args=(share,)) for share in shares])
    return len(addresses) / elapsed, errors


def lookup_cost(directory, rows, probes):
    with QueueStore(os.path.join(directory, "lookup.db")) as store:
        db = store.connection
        db.execute("BEGIN")
        db.executemany("INSERT INTO verify_cache (address, domain, result, reply, checked, expires)"
                       " VALUES (?, 'example.com', 'accepted', '250 2.1.5 Ok', 0, 9999999999)",
                       ((f"user{n}@example.com",) for n in range(rows)))
        db.execute("COMMIT")
        plan = " / ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + LOOKUP, ("x",)))
        keys = [f"user{random.randrange(rows)}@example.com" for _ in range(probes)]
        started = time.perf_counter()
        for key in keys:
            store.verify_answer(key)
        per_lookup = (time.perf_counter() - started) / probes
    return plan, per_lookup


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addresses", type=int, default=2000, help="distinct addresses sent through the server")
    parser.add_argument("--raw", type=int, default=4000, help="callouts in the raw measurement")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=100_000, help="rows in verify_cache for the look-up cost")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="backupmx-bench-") as tmp, Sink() as sink:
        sink.session_timeout = 600
        addresses = [f"user{n}@example.com" for n in range(args.addresses)]
        # Every address exists: a session ends after 20 refusals (smtp_counts.MAX_ERRORS), which a
        # dictionary attack would meet; a refusal costs the callout the same.
        sink.valid_users = set(addresses)
        print(f"raw callouts, 1 connection:  {raw_callouts(sink, args.raw, 1):8.0f} /s")
        print(f"raw callouts, {CALLOUT_THREADS} threads:    {raw_callouts(sink, args.raw, CALLOUT_THREADS):8.0f} /s")
        proc, port = start_server(tmp, args.workers, args.clients, "verify", sink.port)
        try:
            seen = len(sink.rcpts_seen)
            misses, errors = rcpt_round(port, addresses, args.clients)
            callouts = len(sink.rcpts_seen) - seen
            hits, more = rcpt_round(port, addresses, args.clients)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        print(f"server, {args.clients} clients, {args.workers} workers: {args.addresses} new addresses "
              f"({callouts} callouts) {misses:8.0f} RCPT/s; again (cache hits) {hits:8.0f} RCPT/s")
        plan, per_lookup = lookup_cost(tmp, args.rows, 20_000)
        print(f"cache hit: {per_lookup * 1e6:.1f} us per look-up on {args.rows} rows; plan: {plan}")
        for line in (errors + more)[:5]:
            print("error:", line)
    return 0 if not errors and not more else 1


if __name__ == "__main__":
    sys.exit(main())
