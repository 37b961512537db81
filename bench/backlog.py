#!/usr/bin/env python3
"""The worst hour at scale: how backupmx's costs grow with a million messages waiting (issue 16).

    python3 bench/backlog.py                          # 1,000,000 x 2 KB over 100 domains; ~15-25 minutes
    python3 bench/backlog.py --levels 0,20000 --flush-size 2000 --window 10   # a quick look

Needs smtp-sink (apt-get install postfix: the primary that takes the
flushes; the system Postfix is never started) and about 5 GB of disk in
--dir (default: the system temp dir). Everything listens on 127.0.0.1 only.

It starts `python3 backupmx.py serve` (config defaults: 4 SMTP workers, 2
flush workers) on a fresh queue with --domains domains d00.bench ... and
then, in this order:

  accept windows  at each --levels count of queued messages: --sessions
                  clients (smtpload.py, one message of 2 KB per connection,
                  through the real SMTP path) for --window seconds (default
                  35: every window holds at least one housekeeping round,
                  which the flush workers run every 30 s); msg/s and the
                  p50/p99/max from end of data to 250
  the fill        between windows the queue is filled to the next level by
                  the fast path: the store's own intake code (Intake.enqueue_many,
                  the SMTP workers' group commit) in transactions of
                  --fill-batch messages, from this process, while the server runs
  flushes         --flushes domains (d00, d01, ...) of --flush-size messages each,
                  flushed one after the other, once with nothing else waiting
                  ("empty") and once at the last level: STARTTLS + AUTH + ETRN,
                  each timed until smtp-sink counted them all; the figure per
                  level is the median of those flushes (one is ~3 s: alone it
                  is too noisy to compare)
  operator        wall time of `backupmx queue`, `queue list DOMAIN | head`,
                  `metrics` and `health` at the last level
  size            the database (+ WAL) against the sum of the bodies' sizes
  memory          RSS of every SMTP worker and flush worker, sampled every 0.5 s
                  (the largest of each kind, per phase)
  CPU             for each flush, each server process's CPU (and the sink's, and
                  this one's), the flushers' and checkpointer's I/O, the
                  machine's idle/iowait and what else ran, a line a flush and a
                  table of medians per level (proc_usage.py)

With --lock FILE (a shared machine: flock /work/wt/cpu.lock) the lock is
taken for each step (a fill chunk of --lock-chunk messages, a window, a
flush, the operator commands) and let go in between, so that nobody
waits for it long; the server stays up meanwhile.

The windows' mail goes to the other domains; each flushed domain holds
exactly --flush-size messages when it is flushed: at the last level they are
filled as one block each after the others' (their rows side by side in every
table), or with --interleaved spread evenly among them, as mail for many
domains arrives (each of its rows then shares its pages with other domains'
rows: every delivery dirties pages of its own).

--save-queue FILE copies the queue once the last level is filled (the fill of
1M takes ~3 minutes); --from-queue FILE starts from such a copy instead of an
empty queue: the levels below its count are skipped (so is the empty flush),
nothing is filled, and the last level is measured (a run that compares code
on the same 1M queue). Exit status 1 when a window or a flush lost mail or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import smtplib
import statistics
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from peers import Sink, free_port, machine, spawn, stop_proc, wait_banner  # noqa: E402
import proc_usage  # noqa: E402
from smtpload import Load, body_2k, client_context, percentile, run_load  # noqa: E402

from backupmx.envelope import Envelope, Recipient  # noqa: E402
from backupmx.store import QueueStore, QueueUnavailable, Submission  # noqa: E402
from backupmx.store_housekeeping import wal_left_bytes  # noqa: E402

LOCAL = "127.0.0.1"
USER, PASSWORD = "bench", "bench-secret"


def domain_name(i: int) -> str:
    return f"d{i:02d}.bench"


class Server:
    """backupmx serve on a fresh queue, --domains domains, the primary on `sink_port`."""

    def __init__(self, workdir: Path, domains: int, sink_port: int, workers: int | None, retry_interval: str = "",
                 retrying: int = 0):
        self.dir = workdir
        self.db = workdir / "queue.db"
        self.log = workdir / "backupmx.log"
        self.port = free_port()
        self.domains = [domain_name(i) for i in range(domains)]
        key = workdir / "server.key"
        shutil.copyfile(REPO / "tests/certs/server.key", key)
        os.chmod(key, 0o600)
        retry = f"retry_interval = {retry_interval}\n" if retry_interval else ""
        sections = "".join(f"\n[domain:{d}]\nprimary = {LOCAL}:{sink_port}\nprimary_tls = none\n"
                           + (retry if n < retrying else "") for n, d in enumerate(self.domains))
        self.config = workdir / "backupmx.ini"
        self.config.write_text(
            "[backupmx]\n"
            "hostname = mx2.bench\n"
            f"listen = {LOCAL}:{self.port}\n"
            f"queue = {self.db}\n"
            f"tls_cert = {REPO / 'tests/certs/server.pem'}\n"
            f"tls_key = {key}\n"
            + (f"workers = {workers}\n" if workers else "")
            + "max_connections_per_client = 1000\n"
            f"log = {self.log}\n"
            f"{sections}"
            f"\n[user:{USER}]\npassword = {{PLAIN}}{PASSWORD}\ndomains = {', '.join(self.domains)}\n")
        self.proc = None
        self.roles: dict[int, str] = {}
        self.log_read = 0  # bytes of the log children() has read
        self.usage: proc_usage.Usage | None = None  # flush(): each process's CPU and I/O

    def start(self) -> None:
        self.proc = spawn([sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(self.config)],
                          self.dir / "backupmx.stderr", cwd=self.dir)
        wait_banner(self.port, time.monotonic() + 60, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_proc(self.proc, 60)

    def children(self) -> dict[int, str]:
        """pid -> "worker" | "flusher", from the master's log lines (those since the last call
        added to those before: the log holds a line a message, ~25 MB after 100,000 flushed)."""
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(self.log_read)
            data = f.read()
            data = data[:data.rfind(b"\n") + 1]  # whole lines only: the rest next time
            self.log_read += len(data)
            for kind, pid in re.findall(rb"\b(worker-started|flush-worker-started) pid=(\d+)", data):
                self.roles[int(pid)] = "flusher" if kind.startswith(b"flush") else "worker"
        return dict(self.roles)

    def cli(self, *words: str, pipe: str = "") -> tuple[float, str]:
        """Wall time of `backupmx WORDS [| pipe]` and its last output line."""
        command = " ".join([sys.executable, str(REPO / "backupmx.py"), *words, "-c", str(self.config)])
        started = time.perf_counter()
        res = subprocess.run(f"{command} {('| ' + pipe) if pipe else ''}", shell=True, capture_output=True,
                             text=True, timeout=900, stdin=subprocess.DEVNULL)
        took = time.perf_counter() - started
        lines = (res.stdout or res.stderr).strip().splitlines()
        return took, (lines[-1][:100] if lines else "")

    def queued(self, domain: str | None = None) -> int:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=60) as db:
            if domain is None:
                return db.execute("SELECT COUNT(*) FROM queue WHERE state = 'queued'").fetchone()[0]
            return db.execute("SELECT COUNT(*) FROM queue WHERE domain = ? AND state = 'queued'",
                              (domain,)).fetchone()[0]

    def etrn(self, domain: str) -> str:
        with smtplib.SMTP(LOCAL, self.port, local_hostname="primary.bench", timeout=120) as smtp:
            smtp.ehlo()
            smtp.starttls(context=client_context())
            smtp.ehlo()
            smtp.login(USER, PASSWORD)
            code, text = smtp.docmd("ETRN", domain)
        if code not in (250, 253):
            raise RuntimeError(f"ETRN {domain}: {code} {text!r}")
        return f"{code} {text.decode(errors='replace')}"


class Memory(threading.Thread):
    """The largest RSS (kB) of each kind of child, and of the -wal file, per phase, sampled every `interval` seconds."""

    def __init__(self, server: Server, interval: float = 0.5):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        roles, refreshed = {}, 0.0
        while not self.halt.wait(self.interval):
            if time.monotonic() - refreshed > 5:
                roles, refreshed = self.server.children(), time.monotonic()
            peak = self.peaks.setdefault(self.phase, {})
            for pid, role in roles.items():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
                except (OSError, StopIteration):
                    continue
                peak[role] = max(peak.get(role, 0), rss)
            try:
                peak["WAL"] = max(peak.get("WAL", 0), os.stat(f"{self.server.db}-wal").st_size // 1024)
            except OSError:
                pass

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


class Filler:
    """The fast path: the store's own intake (enqueue_many), big transactions, from this process."""

    def __init__(self, db: Path, batch: int):
        self.store = QueueStore(str(db))
        self.batch = batch
        self.n = 0
        self.seconds = 0.0
        self.locked = 0  # fill transactions that met the busy timeout (the server held the lock longer)
        self.owed = 0.5  # fill(first_share=...): the first domains' share due but not yet made (rounded, over all calls)
        self.firsts = 0  # messages given to the first domains, which take their turns

    def fill(self, domains: list[str], count: int, first_share: float = 0.0, first: int = 1) -> None:
        """`count` messages, round-robin over `domains`, one recipient each; with `first_share`,
        that share of them goes to the `first` domains (in turn), spread evenly among the
        others' (the rest round-robin)."""
        started = time.perf_counter()
        left = count
        firsts, rest = domains[:first], domains[first:] or domains
        while left:
            submissions = []
            for _ in range(min(self.batch, left)):
                self.owed += first_share
                if self.owed >= 1.0:
                    self.owed -= 1.0
                    domain = firsts[self.firsts % len(firsts)]
                    self.firsts += 1
                elif first_share:
                    domain = rest[self.n % len(rest)]
                else:
                    domain = domains[self.n % len(domains)]
                rcpt = f"user{self.n % 1000}@{domain}"
                body = body_2k(self.n, rcpt)
                envelope = Envelope(f"sender{self.n % 5000}@x.test", [Recipient(rcpt, domain)])
                submissions.append(Submission(self.store.new_queue_id(), envelope, body, len(body),
                                              LOCAL, "fill.bench"))
                self.n += 1
            problems = self._enqueue(submissions)
            bad = [p for p in problems if p is not None]
            if bad:
                raise RuntimeError(f"fill: {len(bad)} refused, e.g. {bad[0]}")
            left -= len(submissions)
        self.seconds += time.perf_counter() - started

    def _enqueue(self, submissions):
        """enqueue_many; while the server holds the write lock longer than the busy timeout, again."""
        for attempt in range(60):
            try:
                return self.store.enqueue_many(submissions)
            except QueueUnavailable as exc:
                self.locked += 1
                print(f"  fill: {exc}; again", flush=True)
                time.sleep(1)
        raise RuntimeError("fill: the queue stayed locked")

    def save(self, db: Path, to: Path) -> None:
        """Copy the queue (and its WAL) to `to` holding the write lock: no commit can change it,
        and what a checkpoint copies meanwhile into the file is in the copied WAL too. The copy
        is cp's, another process: closing a descriptor of the file here would drop every POSIX
        lock this process holds on it, the write lock held for the copy with them (fcntl(2))."""
        db_conn = self.store.connection
        db_conn.execute("BEGIN IMMEDIATE")
        try:
            subprocess.run(["cp", "--", str(db), str(to)], check=True)
            wal = Path(f"{db}-wal")
            if wal.exists():
                subprocess.run(["cp", "--", str(wal), f"{to}-wal"], check=True)
        finally:
            db_conn.execute("ROLLBACK")

    def close(self) -> None:
        self.store.close()


class CPULock:
    """flock(FILE) around each step of the run (--lock), let go in between; a no-op without FILE."""

    def __init__(self, path: str | None):
        self.path = path
        self.waited = 0.0

    @contextlib.contextmanager
    def held(self):
        if self.path is None:
            yield
            return
        with open(self.path, "a") as f:
            started = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            self.waited += time.monotonic() - started
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def fill_in_chunks(filler: Filler, lock: CPULock, chunk: int, domains: list[str], count: int,
                   first_share: float = 0.0, first: int = 1) -> None:
    while count > 0:
        with lock.held():
            filler.fill(domains, min(chunk, count), first_share, first)
        count -= chunk


SETTLE_SECONDS = 120  # bound on the wait for the checkpointer after a fill


def settle(db: Path, lock: CPULock) -> None:
    """After a fill (and --save-queue's copy), before a measured step: let the checkpointer
    copy the fill's WAL into the database and the kernel write the dirty pages back. The fast
    path fills 250,000 messages (~600 MB) in a minute, faster than SMTP ever brings them, and
    --save-queue's copy dirties the whole file's size (2.4 GB at 1M: the one run without this
    gave 0.74x at 1M, 0.93x from a synced copy): that copying and writeback landed in the next
    window's commits and fsyncs (a measure of the fill, not of the queue's size)."""
    started = time.monotonic()
    with lock.held():
        while wal_left_bytes(str(db)) and time.monotonic() - started < SETTLE_SECONDS:
            time.sleep(0.2)
        left = wal_left_bytes(str(db))
        os.sync()
    print(f"  settled in {time.monotonic() - started:.1f} s (WAL left {left / 1e6:.0f} MB)", flush=True)


def window(server: Server, args, level: int) -> dict:
    """--window seconds of --sessions clients through the real SMTP path."""
    others = server.domains[args.flushes:]
    recipients = tuple(f"user{i}@{others[i % len(others)]}" for i in range(997))
    before = server.queued()
    result = run_load(Load(server.port, sessions=args.sessions, duration=args.window, recipients=recipients,
                           processes=args.client_processes))
    after = server.queued()
    ms = [x * 1000 for x in result.eod]
    return {
        "level": level, "queued_before": before, "messages": result.messages,
        "rate": result.messages / result.elapsed, "p50": percentile(ms, 50), "p99": percentile(ms, 99),
        "max": max(ms, default=float("nan")), "errors": result.errors, "samples": result.samples,
        "lost": before + result.messages - after,
    }


def flush(server: Server, sink: Sink, domain: str, expected: int, timeout: float) -> dict:
    """ETRN `domain` and time it until the sink counted `expected` more messages and the domain is
    empty; with each process's CPU and I/O until the sink counted them (proc_usage.py)."""
    queued = server.queued(domain)
    base = sink.count()
    usage = server.usage = server.usage or proc_usage.Usage(server.proc.pid, server.log, sink.proc.pid)
    before = usage.snapshot()
    started = time.perf_counter()
    reply = server.etrn(domain)
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = sink.count() - base
        if got >= expected:
            break
        time.sleep(0.02)
    took = time.perf_counter() - started
    spent = usage.between(before, usage.snapshot())
    while time.monotonic() < deadline and server.queued(domain):
        time.sleep(0.1)
    time.sleep(0.5)
    got = sink.count() - base
    left = server.queued(domain)
    return {"queued": queued, "delivered": got, "left": left, "seconds": took, "rate": got / took,
            "reply": reply, "ok": queued == expected and got == expected and left == 0, "usage": spent}


def flush_each(server: Server, sink: Sink, domains: list[str], expected: int) -> list[dict]:
    """flush() of each of `domains` in turn, each line printed as it comes."""
    done = []
    for domain in domains:
        f = flush(server, sink, domain, expected, 900)
        done.append(f)
        print(f"  flush of {f['queued']:,} with {server.queued():,} others waiting: {f['rate']:7.0f} msg/s"
              f" ({f['seconds']:.2f} s, {f['delivered']} delivered, {f['left']} left; {domain})", flush=True)
        print(proc_usage.line(f["usage"], f["delivered"]), flush=True)
    if len(done) > 1:
        print(f"  flush median of {len(done)}: {median_rate(done):7.0f} msg/s", flush=True)
    return done


def median_rate(flushes: list[dict]) -> float:
    return statistics.median(f["rate"] for f in flushes)


def sizes(db: Path, breakdown: bool = False) -> dict:
    """The file, its WAL and free pages against the bodies; with `breakdown`, the bytes of
    each table and index (SQLite's dbstat: it reads every page, ~10 s at 1M)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60) as conn:
        bodies, messages = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages").fetchone()
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        tables = conn.execute("SELECT name, SUM(pgsize), SUM(unused) FROM dbstat GROUP BY name ORDER BY 2 DESC"
                              ).fetchall() if breakdown else []
    wal = Path(f"{db}-wal")
    file = db.stat().st_size
    return {"file": file, "wal": wal.stat().st_size if wal.exists() else 0, "bodies": bodies,
            "messages": messages, "free": free * page, "page": page, "tables": tables}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0,100000,500000,1000000",
                        help="queued counts with an accept window (the last one also gets the operator commands and the flush)")
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--flush-size", type=int, default=10000, help="messages of each flushed domain")
    parser.add_argument("--flushes", type=int, default=3,
                        help="domains (d00, d01, ...) flushed one after the other at each flushed level: "
                             "the median is the level's figure")
    parser.add_argument("--window", type=float, default=35.0, help="seconds per accept window")
    parser.add_argument("--sessions", type=int, default=10, help="concurrent clients in a window")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--fill-batch", type=int, default=5000, help="messages per fill transaction")
    parser.add_argument("--workers", type=int, help="workers = N (default: the config default)")
    parser.add_argument("--retry-interval", default="",
                        help="retry_interval of the flushed domains (default: none, ETRN only): the flush"
                             " workers' retry scans then run (each reads every queued row); with --from-queue,"
                             " a queue whose flushed domains' rows are not due yet (else the scans flush them)")
    parser.add_argument("--dir", help="where the temporary directory goes (needs ~5 GB for 1M)")
    parser.add_argument("--keep", action="store_true", help="keep the directory (queue, config, log)")
    parser.add_argument("--lock", help="flock this file for each step, let go in between (a shared machine)")
    parser.add_argument("--lock-chunk", type=int, default=200000, help="messages filled per --lock hold")
    parser.add_argument("--interleaved", action="store_true",
                        help="the flushed domain's messages at the last level arrive spread among the others' "
                             "(as mail for many domains does), not as one block after them: its rows are then "
                             "scattered over every table (the flush's worst case)")
    parser.add_argument("--save-queue", metavar="FILE",
                        help="copy the queue to FILE (and FILE-wal) once the last level is filled")
    parser.add_argument("--from-queue", metavar="FILE",
                        help="start from a copy of FILE (--save-queue's, with its flushed domains full): "
                             "no fill, only the levels from its count on")
    parser.add_argument("--breakdown", action="store_true",
                        help="the database's bytes per table and index at the last level (dbstat)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the server
    levels = sorted(int(x) for x in args.levels.split(","))
    if not shutil.which("smtp-sink"):
        sys.exit("backlog: smtp-sink is missing: apt-get install postfix (see bench/README.md)")
    if args.flushes < 1 or args.domains < args.flushes + 1 or levels[-1] < args.flush_size * args.flushes:
        parser.error("need more domains than --flushes and a last level of at least --flush-size x --flushes")
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: no such directory")

    root = Path(tempfile.mkdtemp(prefix="backlog-", dir=args.dir))
    os.chmod(root, 0o755)
    sink_port = free_port()
    server = Server(root, args.domains, sink_port, args.workers, args.retry_interval, args.flushes)
    lock = CPULock(args.lock)
    if args.from_queue:
        with lock.held():  # gigabytes of writes: nobody's measurement beside them
            shutil.copyfile(args.from_queue, server.db)
            if os.path.exists(f"{args.from_queue}-wal"):
                shutil.copyfile(f"{args.from_queue}-wal", f"{server.db}-wal")
            os.sync()  # the copy's dirty pages written back now, not during the measured steps' fsyncs
    memory = Memory(server)
    filler = sink = None
    before = {}
    windows, flushes, operator = [], {}, []  # flushes: "empty" / "full" -> each flush of that level
    print(f"backlog: {machine()}", flush=True)
    print(f"backlog: {root}, levels {levels}, {args.domains} domains, windows of {args.window:g} s x "
          f"{args.sessions} sessions, {args.flushes} flushes of {args.flush_size}", flush=True)
    started = time.monotonic()
    try:
        server.start()
        memory.start()
        filler = Filler(server.db, args.fill_batch)
        flushed, others = server.domains[:args.flushes], server.domains[args.flushes:]
        flushed_total = args.flush_size * args.flushes
        start_level = server.queued() if args.from_queue else 0
        for level in levels:
            if level < start_level and level != levels[-1]:
                print(f"  level {level:,}: skipped (the queue from {args.from_queue} holds {start_level:,})", flush=True)
                continue
            if args.from_queue:
                pass  # filled already, the flushed domains too
            elif level == levels[-1] and args.interleaved:
                count = max(level - server.queued(), flushed_total)  # (the windows' mail may be past a low level)
                fill_in_chunks(filler, lock, args.lock_chunk, server.domains, count, flushed_total / count,
                               args.flushes)
            elif level == levels[-1]:
                fill_in_chunks(filler, lock, args.lock_chunk, others, level - flushed_total - server.queued())
                for domain in flushed:
                    fill_in_chunks(filler, lock, args.lock_chunk, [domain], args.flush_size)
            else:
                fill_in_chunks(filler, lock, args.lock_chunk, others, level - server.queued())
            if level == levels[-1] and args.save_queue:
                with lock.held():
                    filler.save(server.db, Path(args.save_queue))
                print(f"  queue of {server.queued():,} saved to {args.save_queue}", flush=True)
            if not args.from_queue:
                settle(server.db, lock)
            memory.phase = f"window {level}"
            with lock.held():
                w = window(server, args, level)
            windows.append(w)
            print(f"  window at {w['queued_before']:>9,} queued: {w['rate']:7.0f} msg/s  p50 {w['p50']:6.1f} ms"
                  f"  p99 {w['p99']:6.1f} ms  max {w['max']:7.1f} ms  errors {w['errors']}  lost {w['lost']}"
                  + (f"  e.g. {w['samples'][0]}" if w["samples"] else ""), flush=True)
            if sink is None:
                sink = Sink(root, sink_port)
            if level == levels[0] and not args.from_queue:
                with lock.held():
                    for domain in flushed:
                        filler.fill([domain], args.flush_size)
                    memory.phase = "flush empty"
                    flushes["empty"] = flush_each(server, sink, flushed, args.flush_size)
        memory.phase = "operator"
        top = server.domains[7]
        with lock.held():
            for label, words, pipe in (("backupmx queue", ("queue",), ""),
                                       (f"backupmx queue list {top} | head", ("queue", "list", top), "head"),
                                       ("backupmx metrics", ("metrics",), ""),
                                       ("backupmx health", ("health",), "")):
                took, last = server.cli(*words, pipe=pipe)
                operator.append((label, took, last))
                print(f"  {label:<36} {took:6.2f} s   {last[:70]}", flush=True)
        with lock.held():
            before = sizes(server.db, args.breakdown)
        print(f"  database {before['file'] / 2**20:,.0f} MB + WAL {before['wal'] / 2**20:,.0f} MB for "
              f"{before['messages']:,} messages of {before['bodies'] / 2**20:,.0f} MB: "
              f"{(before['file'] + before['wal']) / max(1, before['bodies']):.3f}x the bodies "
              f"(page {before['page']}, free {before['free'] / 2**20:,.0f} MB)", flush=True)
        memory.phase = f"flush at {levels[-1]}"
        with lock.held():
            flushes["full"] = flush_each(server, sink, flushed, args.flush_size)
    finally:
        memory.stop()
        if filler is not None:
            filler.close()
        server.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"machine: {machine()}")
    print(f"{time.monotonic() - started:.0f} s in all; fill {filler.n:,} messages in {filler.seconds:.0f} s"
          f" ({filler.locked} fill transactions met a locked queue; {lock.waited:.0f} s waited for --lock)")
    print()
    base = windows[0]
    print(f"{'queued':>10} {'msg/s':>8} {'vs empty':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for w in windows:
        print(f"{w['queued_before']:>10,} {w['rate']:>8.0f} {w['rate'] / base['rate']:>8.2f}x {w['p50']:>8.1f}"
              f" {w['p99']:>8.1f} {w['max']:>8.1f}")
    singles = {level: ", ".join(f"{f['rate']:.0f}" for f in each) for level, each in flushes.items()}
    if "empty" in flushes and "full" in flushes:
        e, f = median_rate(flushes["empty"]), median_rate(flushes["full"])
        print(f"flush {args.flush_size:,}: empty {e:.0f} msg/s, at {levels[-1]:,} {f:.0f} msg/s ({f / e:.2f}x)"
              f"  [medians of {args.flushes}; single flushes: empty {singles['empty']}; at {levels[-1]:,} {singles['full']}]")
    elif "full" in flushes:
        print(f"flush {args.flush_size:,}: at {levels[-1]:,} {median_rate(flushes['full']):.0f} msg/s"
              f"  [median of {args.flushes}: {singles['full']}]")
    if flushes:
        print("each process's CPU, the machine's busy/irq/idle/iowait/steal (both cores) and the wall time a"
              " message delivered, in the flushes (medians; proc_usage.py):")
        for row in proc_usage.table({("empty" if level == "empty" else f"at {levels[-1]:,}"):
                                     [proc_usage.per_message(f["usage"], f["delivered"]) for f in each]
                                     for level, each in flushes.items()}):
            print("  " + row)
    for label, took, _ in operator:
        print(f"{label:<40} {took:6.2f} s")
    print(f"database / bodies: {(before['file'] + before['wal']) / max(1, before['bodies']):.3f}x")
    for name, size, unused in before["tables"]:
        if size >= before["file"] / 1000:
            print(f"  {name:<32} {size / 2**20:9,.1f} MB {size / max(1, before['bodies']):6.3f}x"
                  f"  ({unused / 2**20:,.1f} MB unused)")
    print("peak RSS and -wal file (MB) per phase: " + "; ".join(
        f"{phase}: " + ", ".join(f"{role} {kb / 1024:.0f}" for role, kb in sorted(peaks.items()))
        for phase, peaks in memory.peaks.items()))
    bad = [w for w in windows if w["errors"] or w["lost"]] + [f for each in flushes.values() for f in each if not f["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
