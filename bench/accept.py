#!/usr/bin/env python3
"""Acceptance throughput: N smtplib clients x M messages of S bytes over loopback.

    python3 bench/accept.py [--clients 8] [--messages 50] [--size 2048] [--workers 2]
    python3 bench/accept.py --port 2525      # against a server that is already running

Without --port it starts `python3 backupmx.py serve` on a temporary config and
queue (every message is committed durably: WAL, synchronous=FULL, so the disk's
fsync speed is most of what is measured), and stops it afterwards.

Prints messages/s over the whole run and the p50/p99 latency from the end of
DATA (the "." line sent) to the 250 reply, which is the time the commit takes.
"""

import argparse
import os
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class TimedSMTP(smtplib.SMTP):
    """smtplib.SMTP that notes when the end-of-data line went out.

    smtplib.SMTP.data() sends the dot-stuffed body and the final "." in one
    send() call, then reads the reply: the time between the two is ours.
    """

    eod_sent = None

    def send(self, s):
        super().send(s)
        if isinstance(s, bytes) and s.endswith(b"\r\n.\r\n"):
            self.eod_sent = time.perf_counter()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory, workers, clients):
    port = free_port()
    config = Path(directory) / "bench.ini"
    config.write_text(
        "[backupmx]\n"
        "hostname = mx2.bench\n"
        f"listen = 127.0.0.1:{port}\n"
        f"queue = {directory}/queue.db\n"
        f"workers = {workers}\n"
        f"max_workers = {max(workers, 8)}\n"
        "flush_workers = 1\n"
        f"max_connections_per_client = {clients + 10}\n"
        f"log = {directory}/server.log\n"
        "\n[domain:example.com]\n"
        f"primary = 127.0.0.1:{free_port()}\n"
        "primary_tls = none\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench: server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("bench: server did not answer within 10 s")


def message(size, client, n):
    """A message of exactly `size` bytes (at least its header), CRLF lines."""
    head = f"From: <bench{client}@sender.test>\r\nTo: <rcpt@example.com>\r\nSubject: bench {client}/{n}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    room = max(0, size - len(head))
    body = line * (room // len(line)) + (b"y" * (room % len(line) - 2) + b"\r\n" if room % len(line) >= 2 else b"")
    return head + body


def client(host, port, index, count, size, latencies, errors):
    try:
        with TimedSMTP(host, port, timeout=60) as smtp:
            smtp.ehlo(f"bench{index}.test")
            for n in range(count):
                smtp.mail(f"bench{index}@sender.test")
                smtp.rcpt("rcpt@example.com")
                code, reply = smtp.data(message(size, index, n))
                done = time.perf_counter()
                if code != 250:
                    errors.append(f"{code} {reply!r}")
                    continue
                latencies.append(done - smtp.eod_sent)
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(f"client {index}: {exc!r}")


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--messages", type=int, default=50, help="per client")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="use a running server instead of starting one")
    args = parser.parse_args(argv)

    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="backupmx-bench-")
    try:
        if args.port:
            port = args.port
        else:
            proc, port = start_server(tmp.name, args.workers, args.clients)
        latencies, errors = [], []
        threads = [
            threading.Thread(target=client, args=(args.host, port, i, args.messages, args.size, latencies, errors))
            for i in range(args.clients)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        tmp.cleanup()

    total = len(latencies)
    print(f"clients={args.clients} messages={args.messages} size={args.size} workers={args.workers}")
    print(f"accepted={total} errors={len(errors)} elapsed={elapsed:.2f}s rate={total / elapsed:.1f} messages/s")
    if latencies:
        print(
            f"end-of-data to 250: p50={percentile(latencies, 50) * 1000:.1f}ms "
            f"p99={percentile(latencies, 99) * 1000:.1f}ms "
            f"mean={statistics.fmean(latencies) * 1000:.1f}ms"
        )
    for line in errors[:5]:
        print("error:", line)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
