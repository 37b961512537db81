#!/usr/bin/env python3
"""Acceptance throughput: N smtplib clients x M messages of S bytes over loopback.

    python3 bench/accept.py [--clients 8] [--messages 50] [--size 2048] [--workers 2]
    python3 bench/accept.py --port 2525      # against a server that is already running
    python3 bench/accept.py --recipients both --rounds 3   # recipients = * and = verify, interleaved

Without --port it starts `python3 backupmx.py serve` on a temporary config and
queue (every message is committed durably: WAL, synchronous=FULL, so the disk's
fsync speed is most of what is measured), and stops it afterwards.

Prints messages/s over the whole run and the p50/p99 latency from the end of
DATA (the "." line sent) to the 250 reply, which is the time the commit takes.

--recipients verify configures the domain with `recipients = verify` and the
test Sink (tests/sink.py) as its primary, and warms the callout cache (one
RCPT) before the clock starts: each RCPT then costs a cache look-up. `both`
alternates `*` and `verify` for --rounds rounds, each on a fresh server and
queue, so that drift on the machine hits both alike; medians at the end.
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


def start_server(directory, workers, clients, recipients="*", primary_port=None):
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
        f"primary = 127.0.0.1:{primary_port or free_port()}\n"
        "primary_tls = none\n"
        f"recipients = {recipients}\n"
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


def one_run(args, recipients, primary_port=None):
    """One server (unless --port), the clients, the figures: (rate, latencies, errors)."""
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="backupmx-bench-")
    try:
        if args.port:
            port = args.port
        else:
            proc, port = start_server(tmp.name, args.workers, args.clients, recipients, primary_port)
        if recipients == "verify":  # warm the callout cache: every RCPT of the run is then a hit
            with smtplib.SMTP(args.host, port, timeout=60) as smtp:
                smtp.ehlo("warm.test")
                smtp.mail("warm@sender.test")
                smtp.rcpt("rcpt@example.com")
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
    return len(latencies) / elapsed, latencies, errors


def report(label, rate, latencies, errors):
    line = f"{label}accepted={len(latencies)} errors={len(errors)} rate={rate:.1f} messages/s"
    if latencies:
        line += (f" end-of-data to 250: p50={percentile(latencies, 50) * 1000:.1f}ms "
                 f"p99={percentile(latencies, 99) * 1000:.1f}ms mean={statistics.fmean(latencies) * 1000:.1f}ms")
    print(line)
    for text in errors[:5]:
        print("error:", text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--messages", type=int, default=50, help="per client")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="use a running server instead of starting one")
    parser.add_argument("--recipients", choices=("*", "verify", "both"), default="*",
                        help="the domain's recipients setting (verify: a warm callout cache); both: interleaved")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each setting (default 1; 3 with both)")
    args = parser.parse_args(argv)
    settings = ("*", "verify") if args.recipients == "both" else (args.recipients,)
    rounds = args.rounds or (3 if args.recipients == "both" else 1)
    print(f"clients={args.clients} messages={args.messages} size={args.size} workers={args.workers}")
    sink = None
    if "verify" in settings and not args.port:
        sys.path.insert(0, str(REPO / "tests"))
        from sink import Sink

        sink = Sink().start()
        sink.session_timeout = 600
    rates, failed = {s: [] for s in settings}, False
    try:
        for n in range(rounds):
            for setting in settings:
                rate, latencies, errors = one_run(args, setting, sink.port if sink else None)
                rates[setting].append(rate)
                failed = failed or bool(errors)
                report(f"round {n + 1} recipients = {setting}: " if len(settings) > 1 or rounds > 1 else "",
                       rate, latencies, errors)
    finally:
        if sink is not None:
            sink.stop()
    if len(settings) > 1 or rounds > 1:
        for setting in settings:
            print(f"recipients = {setting}: median {statistics.median(rates[setting]):.1f} messages/s "
                  f"over {rounds} rounds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
