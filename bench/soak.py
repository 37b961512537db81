#!/usr/bin/env python3
"""Soak under faults: is every 250-acknowledged message delivered while workers are killed?

Starts a real `backupmx serve` in a temporary directory (its primary for every
domain: the test sink, tests/sink.py, in this process), then for MINUTES:

  - SENDERS smtplib clients send messages, each with a unique Message-ID, to
    random recipients of DOMAINS domains; a message counts as acknowledged
    only when its DATA got the 250;
  - every KILL_INTERVAL seconds one random SMTP worker or flush worker of the
    server gets SIGKILL (the master replaces it);
  - every ETRN_INTERVAL seconds a client does STARTTLS, AUTH and ETRN for
    every domain, as a primary would.

Then the senders and the kills stop and the queue is drained (ETRN every
second until nothing is queued and every acknowledged message arrived, at
most --drain seconds), and it prints:

  acknowledged   messages that got a 250
  delivered      distinct Message-IDs the sink received
  lost           acknowledged, never delivered: must be 0 (exit status 1 otherwise)
  duplicated     delivered more than once: allowed by docs/SPEC.md after a kill
                 mid-delivery, reported apart from loss
  unacknowledged delivered messages whose 250 never arrived (a kill between the
                 commit and the reply): allowed, a real client would retry

    python3 bench/soak.py 2                 # two minutes, the defaults
    python3 bench/soak.py 10 --senders 8 --kill-interval 1 --seed 7 --keep

Run by hand, not in CI. Everything listens on 127.0.0.1; the server runs in
its own process group, killed whatever happens; the loops are bounded by the
clock. The figures are indicative on a shared machine.
"""

import argparse
import collections
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

from sink import Sink  # noqa: E402

CERTS = os.path.join(REPO, "tests", "certs")
PASSWORD = "soak-secret"
MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>\r\n]+>)\r?$", re.M | re.I)
START_TIMEOUT = 15.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    """What the senders were told and what the sink received, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acknowledged = set()
        self.unanswered = set()  # DATA sent, no 250 (the session broke or was refused)
        self.delivered = collections.Counter()
        self.errors = collections.Counter()
        self.kills = collections.Counter()
        self.etrn = collections.Counter()

    def on_delivery(self, number, delivery):
        found = MESSAGE_ID.search(delivery.body)
        delivery.body = b""  # the sink keeps every Delivery: only the id matters here
        with self.lock:
            self.delivered[found.group(1).decode() if found else "<no Message-ID>"] += 1


def write_config(tmp, args, port, sink_port, domains):
    key = os.path.join(tmp, "server.key")
    shutil.copyfile(os.path.join(CERTS, "server.key"), key)
    os.chmod(key, 0o600)
    lines = [
        "[backupmx]", "hostname = soak.test", f"listen = 127.0.0.1:{port}", f"queue = {tmp}/queue.db",
        f"tls_cert = {CERTS}/server.pem", f"tls_key = {key}", f"workers = {args.workers}",
        f"max_workers = {max(args.workers, 8)}", f"flush_workers = {args.flush_workers}",
        f"timeout = {args.timeout}s", f"log = {tmp}/server.log", "min_free_space = 0",
    ]
    for domain in domains:
        lines += ["", f"[domain:{domain}]", f"primary = 127.0.0.1:{sink_port}", "primary_tls = none"]
    lines += ["", "[user:primary]", f"password = {{PLAIN}}{PASSWORD}", f"domains = {', '.join(domains)}"]
    path = os.path.join(tmp, "backupmx.ini")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start_server(config_path, tmp, port):
    log = open(os.path.join(tmp, "stderr.log"), "ab")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "backupmx.py"), "serve", "-c", config_path],
                            cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(3) == b"220":
                    return proc
        except OSError:
            time.sleep(0.1)
    stop_server(proc)
    raise SystemExit(f"soak: the server did not start; see {tmp}/stderr.log and server.log (use --keep)")


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


def flush_worker_pids(log_path):
    """Pids the master logged as flush workers (the other children are SMTP workers)."""
    try:
        with open(log_path, errors="replace") as f:
            return {int(m) for m in re.findall(r"flush-worker-started pid=(\d+)", f.read())}
    except OSError:
        return set()


def sender(number, args, port, domains, tally, stop, rng):
    sent = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=args.timeout + 10) as client:
                client.ehlo(f"sender{number}.soak.test")
                for _ in range(args.per_session):
                    if stop.is_set():
                        break
                    sent += 1
                    message_id = f"<soak.{number}.{sent}@soak.test>"
                    domain = rng.choice(domains)
                    body = (f"Message-ID: {message_id}\r\nSubject: soak {sent}\r\n\r\n".encode()
                            + b"x" * rng.randrange(100, args.max_size) + b"\r\n")
                    with tally.lock:
                        tally.unanswered.add(message_id)
                    client.sendmail(f"sender{number}@origin.test", [f"u{sent % 50}@{domain}"], body)
                    with tally.lock:
                        tally.unanswered.discard(message_id)
                        tally.acknowledged.add(message_id)
        except (OSError, smtplib.SMTPException) as exc:
            with tally.lock:
                tally.errors[type(exc).__name__] += 1
            stop.wait(0.05)


def etrn_all(port, domains, tally, timeout):
    context = ssl.create_default_context(cafile=os.path.join(CERTS, "ca.pem"))
    try:
        with smtplib.SMTP("localhost", port, timeout=timeout) as client:
            client.starttls(context=context)
            client.login("primary", PASSWORD)
            for domain in domains:
                code, _ = client.docmd("ETRN", domain)
                with tally.lock:
                    tally.etrn[code] += 1
    except (OSError, smtplib.SMTPException) as exc:
        with tally.lock:
            tally.etrn[type(exc).__name__] += 1


def killer(args, master, log_path, tally, stop, rng):
    while not stop.wait(args.kill_interval):
        live = children(master)
        flushers = flush_worker_pids(log_path) & live
        smtp_workers = live - flushers
        kind = rng.choice(["smtp", "flush"])
        pool = sorted(flushers if kind == "flush" else smtp_workers) or sorted(live)
        if not pool:
            continue
        victim = rng.choice(pool)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            continue
        with tally.lock:
            tally.kills["flush worker" if victim in flushers else "smtp worker"] += 1


def queue_states(queue_path):
    try:
        db = sqlite3.connect(f"file:{queue_path}?mode=ro", uri=True, timeout=5)
        try:
            return dict(db.execute("SELECT state, COUNT(*) FROM queue GROUP BY state").fetchall())
        finally:
            db.close()
    except sqlite3.Error as exc:
        return {"unreadable": str(exc)}


def drain(args, port, domains, queue_path, tally):
    """ETRN every second until nothing is queued and every acknowledged id arrived; seconds taken."""
    started = time.monotonic()
    while time.monotonic() - started < args.drain:
        states = queue_states(queue_path)
        with tally.lock:
            missing = len(tally.acknowledged - tally.delivered.keys())
        if not states.get("queued") and not missing:
            break
        etrn_all(port, domains, tally, args.timeout + 10)
        time.sleep(1.0)
    return time.monotonic() - started


def report(args, tally, states, drain_seconds, elapsed):
    acknowledged = tally.acknowledged
    delivered = tally.delivered
    lost = sorted(acknowledged - delivered.keys())
    duplicated = {m: n for m, n in delivered.items() if n > 1}
    unacked = (tally.unanswered & delivered.keys()) - acknowledged
    print(f"soak: {elapsed / 60:.1f} min, {args.senders} senders, {args.domains} domains, "
          f"a SIGKILL every {args.kill_interval:g} s, ETRN every {args.etrn_interval:g} s (seed {args.seed})")
    print(f"kills:          {dict(tally.kills) or 'none'}")
    print(f"acknowledged:   {len(acknowledged)}  ({len(acknowledged) / elapsed:.0f}/s)")
    print(f"delivered:      {len(delivered)} distinct Message-IDs, {sum(delivered.values())} copies")
    print(f"lost:           {len(lost)}" + (f"  e.g. {', '.join(lost[:5])}" if lost else ""))
    print(f"duplicated:     {len(duplicated)} Message-IDs, {sum(duplicated.values()) - len(duplicated)} extra "
          "copies (allowed after a kill mid-delivery)")
    print(f"unacknowledged delivered: {len(unacked)} (killed between the commit and the 250: allowed)")
    print(f"sender errors:  {dict(tally.errors) or 'none'}")
    print(f"ETRN replies:   {dict(tally.etrn)}")
    print(f"drain:          {drain_seconds:.1f} s; queue at the end: {states or 'empty'}")
    return 1 if lost or delivered.get("<no Message-ID>") else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("minutes", type=float, help="how long to send and kill")
    parser.add_argument("--senders", type=int, default=4, help="concurrent SMTP clients (default 4)")
    parser.add_argument("--domains", type=int, default=4, help="configured domains (default 4)")
    parser.add_argument("--kill-interval", type=float, default=2.0, help="seconds between SIGKILLs (default 2)")
    parser.add_argument("--etrn-interval", type=float, default=3.0, help="seconds between ETRN rounds (default 3)")
    parser.add_argument("--per-session", type=int, default=20, help="messages per SMTP session (default 20)")
    parser.add_argument("--max-size", type=int, default=4096, help="largest body, bytes (default 4096)")
    parser.add_argument("--workers", type=int, default=2, help="SMTP workers (default 2)")
    parser.add_argument("--flush-workers", type=int, default=2, help="flush workers (default 2)")
    parser.add_argument("--timeout", type=int, default=5,
                        help="the server's timeout in s (default 5: a killed flusher's lease lasts 3x+30 s)")
    parser.add_argument("--drain", type=float, default=240.0, help="at most this many seconds to drain (default 240)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, queue, logs)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    rng = random.Random(args.seed)

    tmp = tempfile.mkdtemp(prefix="backupmx-soak-")
    domains = [f"soak{n}.test" for n in range(args.domains)]
    tally = Tally()
    stop = threading.Event()
    proc = None
    threads = []
    try:
        with Sink() as sink:
            sink.on_delivery = tally.on_delivery
            sink.session_timeout = 120
            port = free_port()
            config = write_config(tmp, args, port, sink.port, domains)
            proc = start_server(config, tmp, port)
            started = time.monotonic()
            threads = [threading.Thread(target=sender, args=(n, args, port, domains, tally, stop,
                                                             random.Random(rng.random())), daemon=True)
                       for n in range(args.senders)]
            threads.append(threading.Thread(target=killer, args=(args, proc.pid, os.path.join(tmp, "server.log"),
                                                                 tally, stop, random.Random(rng.random())),
                                            daemon=True))
            for t in threads:
                t.start()
            end = started + args.minutes * 60
            while time.monotonic() < end and proc.poll() is None:
                etrn_all(port, domains, tally, args.timeout + 10)
                stop.wait(min(args.etrn_interval, max(0.0, end - time.monotonic())))
            stop.set()
            for t in threads:
                t.join(args.timeout + 15)
            elapsed = time.monotonic() - started
            if proc.poll() is not None:
                print(f"soak: the server exited ({proc.returncode}) during the run", file=sys.stderr)
            drain_seconds = drain(args, port, domains, os.path.join(tmp, "queue.db"), tally)
            states = queue_states(os.path.join(tmp, "queue.db"))
            stop_server(proc)
            time.sleep(0.2)  # the sink records a message before its 250: nothing is in flight now
        status = report(args, tally, states, drain_seconds, elapsed)
    finally:
        stop.set()
        if proc is not None:
            stop_server(proc)
        if args.keep:
            print(f"soak: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
