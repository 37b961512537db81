#!/usr/bin/env python3
"""Hostile clients against a real server: what a normal client sees, what the server pays.

Starts a real `backupmx serve` in a temporary directory (stock settings but
`max_connections_per_client`, since all the load comes from 127.0.0.1, and
`workers`), then:

  1. baseline: one normal client sends messages back to back (smtplib, one
     session, a 2 KB message each) for --phase seconds; the time from MAIL to
     the 250 of each message is recorded;
  2. hostile: --non-readers sessions pipeline RCPT commands and never read a
     reply (a small receive buffer, like the issue's 24 MB of NOOPs, but
     within a transaction, so that RFC 2920 synchronisation does not end
     them at once), and --drippers sessions send one byte of a command every
     --drip seconds; while they sit, the normal client sends again for
     --phase seconds;
  3. the hostile sessions alone, for a third of --phase: what they cost.

It prints, for each phase, the normal client's messages, p50, p99 and max
latency, and the server's whole process tree: RSS and PSS (sum of
/proc/PID/smaps_rollup), CPU seconds used during the phase, and the hostile
sessions still open at the end. Exit status 1 if the normal client failed.

    python3 bench/hostile.py                       # 50 + 200 hostile sessions, 30 s phases
    python3 bench/hostile.py --non-readers 100 --drippers 500 --phase 60

Run by hand, not in CI. Everything listens on 127.0.0.1; every loop is
bounded by the clock; the server runs in its own process group and is killed
whatever happens. The figures are indicative on a shared machine.
"""

import argparse
import os
import shutil
import smtplib
import socket
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from peers import memory_kb, process_tree  # noqa: E402
from soak import free_port, start_server, stop_server  # noqa: E402

RCPT = b"RCPT TO:<bob@example.com>\r\n"  # the same recipient again: 250 each time


def start(tmp, args):
    """The server on a free port with this bench's config: (process, port)."""
    port = free_port()
    config = os.path.join(tmp, "backupmx.ini")
    with open(config, "w") as f:
        f.write("\n".join([
            "[backupmx]", "hostname = hostile.test", f"listen = 127.0.0.1:{port}", f"queue = {tmp}/queue.db",
            f"workers = {args.workers}", "flush_workers = 1", f"log = {tmp}/server.log", "min_free_space = 0",
            f"max_connections_per_client = {args.non_readers + args.drippers + 10}",
            # The non-readers' RCPT again and again is junk (smtp.py rule 6): out of the way, so that
            # what is measured is backpressure, not the 421 after max_junk_commands.
            "max_junk_commands = 1000000000",
            "", "[domain:example.com]", "primary = 127.0.0.1:9", "primary_tls = none", ""]))
    return start_server(config, tmp, port), port


def cpu_seconds(pids):
    total = 0.0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def normal_client(port, seconds):
    """Messages back to back for `seconds`: the latency of each, MAIL to the final 250."""
    latencies, failures = [], 0
    body = b"Subject: normal\r\n\r\n" + b"x" * 2000 + b"\r\n"
    end = time.monotonic() + seconds
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("normal.test")
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                client.sendmail("a@origin.test", ["bob@example.com"], body)
                latencies.append(time.monotonic() - started)
            except smtplib.SMTPException:
                failures += 1
    return latencies, failures


def non_reader(port):
    """A session past EHLO and MAIL that pipelines RCPTs and reads nothing, until the server stops taking them."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(10)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"EHLO nonreader.test\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"MAIL FROM:<x@hostile.test>\r\n")
    f.readline()
    sock.setblocking(False)
    sent, stalled_since, chunk = 0, None, RCPT * 600
    while sent < 8 << 20:
        try:
            sent += sock.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.3:
                break
            time.sleep(0.01)
    return sock, sent


def drip_all(socks, seconds, interval):
    """One byte of "NOOP\\r\\n" to every dripping session each `interval`, replies read, for `seconds`."""
    text = b"NOOP\r\n"
    position = [0] * len(socks)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for i, sock in enumerate(socks):
            if sock is None:
                continue
            try:
                sock.send(text[position[i] % len(text):][:1])
                position[i] += 1
                sock.recv(4096)
            except BlockingIOError:
                pass
            except OSError:
                socks[i] = None
        time.sleep(interval)


def alive(sock):
    try:
        sock.setblocking(False)
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def row(label, latencies, failures, pids, cpu, seconds):
    rss, pss = memory_kb(pids)
    ms = sorted(x * 1000 for x in latencies) or [float("nan")]  # none: the phase without the normal client
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{label:<28} {len(latencies):>6} {statistics.median(ms):>7.1f} {p99:>7.1f} {ms[-1]:>8.1f} "
          f"{failures:>5} {rss / 1024:>8.1f} {pss / 1024:>8.1f} {cpu:>7.2f} {cpu / seconds * 100:>5.1f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--non-readers", type=int, default=50)
    parser.add_argument("--drippers", type=int, default=200)
    parser.add_argument("--phase", type=float, default=30.0, help="seconds the normal client sends in each phase")
    parser.add_argument("--drip", type=float, default=1.0, help="seconds between two bytes of a dripper")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="backupmx-hostile-")
    proc, hostile = None, []
    try:
        proc, port = start(tmp, args)
        print(f"hostile: {args.non_readers} non-reading + {args.drippers} dripping sessions, "
              f"{args.phase:g} s phases, {args.workers} SMTP workers")
        print(f"{'phase':<28} {'msgs':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'fail':>5} "
              f"{'RSS MB':>8} {'PSS MB':>8} {'CPU s':>7} {'CPU':>6}")
        pids = process_tree([proc.pid])
        cpu = cpu_seconds(pids)
        latencies, failures = normal_client(port, args.phase)
        pids = process_tree([proc.pid])
        row("baseline", latencies, failures, pids, cpu_seconds(pids) - cpu, args.phase)

        readers = [non_reader(port) for _ in range(args.non_readers)]
        hostile += [sock for sock, _ in readers]
        drippers = []
        for _ in range(args.drippers):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.recv(100)
            sock.setblocking(False)
            drippers.append(sock)
        hostile += drippers
        idle = args.phase / 3
        dripping = threading.Thread(target=drip_all, args=(list(drippers), args.phase + idle + 5, args.drip),
                                    daemon=True)
        dripping.start()
        time.sleep(2.0)  # the non-readers' last reads are answered
        pids = process_tree([proc.pid])
        cpu = cpu_seconds(pids)
        latencies, failures = normal_client(port, args.phase)
        pids = process_tree([proc.pid])
        row("with the hostile sessions", latencies, failures, pids, cpu_seconds(pids) - cpu, args.phase)
        cpu = cpu_seconds(pids)
        time.sleep(idle)  # nobody but the hostile sessions
        row("the hostile sessions alone", [], 0, pids, cpu_seconds(pids) - cpu, idle)
        dripping.join()
        sent = sorted(n for _, n in readers)
        print(f"non-readers: each sent {sent[0]}..{sent[-1]} octets before the server stopped reading; "
              f"still open: {sum(alive(s) for s, _ in readers)}; drippers still open: "
              f"{sum(alive(s) for s in drippers)}")
        return 1 if failures else 0
    finally:
        for sock in hostile:
            sock.close()
        if proc is not None:
            stop_server(proc)
        if args.keep:
            print(f"hostile: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
