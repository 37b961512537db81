#!/usr/bin/env python3
"""backupmx against real peers on this machine: Postfix and aiosmtpd + SQLite (issue 5).

    sudo python3 bench/peers.py [--runs 3] [--quick] [--only backupmx,postfix,...]

Needs (see bench/README.md): Postfix installed (`apt-get install postfix`: this
script uses smtp-source, smtp-sink, postfix, postmap; it never touches the
system instance in /etc/postfix), and aiosmtpd in some Python (`--venv DIR`
reuses a venv; otherwise a throwaway venv is made in the temp dir and
`pip install aiosmtpd` is run into it).

One after another, on 127.0.0.1 only, each server gets the same workload:

  accept  smtp-source, one message per connection, N messages of S bytes
          at 1, 10 and 50 parallel sessions; time until smtp-source is done;
          then count what the server holds (must equal N).
  latency a Python smtplib client, one session, M messages of 2 KB: the time
          from the end-of-data line going out to the 250 coming back.
  flush   fill with 5000 x 2 KB (50 sessions), then ETRN into smtp-sink and
          time until the sink has counted all of them and the queue is empty.
  memory  peak RSS and PSS, summed over every process of the server, sampled
          every 0.1 s during the 50-session accept rows.

Servers:
  backupmx   python3 backupmx.py serve from this checkout (config defaults;
             max_connections_per_client raised, as Postfix exempts mynetworks);
             ETRN over STARTTLS + AUTH PLAIN.
  postfix    a private instance in the temp dir (own config, queue and data
             directories) as backup MX for example.com: relay_domains,
             transport to a closed port until the flush, fast_flush_domains,
             ETRN permitted from mynetworks; queue files fsynced (default).
  aiosmtpd   bench/aiosmtpd_sqlite.py (WAL, synchronous=FULL); its flush is a
             smtplib loop over one connection (aiosmtpd has no ETRN).
  sink       smtp-sink itself as the server: the no-durability floor (accept
             and latency rows only).

Every row is a fresh server on a fresh queue. A cell is the median of --runs
runs; a run that lost or duplicated mail (count != sent) marks the cell with
"!" and no ratio is printed for that row.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOCAL = "127.0.0.1"
DOMAIN = "example.com"
SENDER = "from@x.test"
RCPT = "bob@example.com"
ETRN_USER, ETRN_PASSWORD = "bench", "bench-secret"
ALL_SERVERS = ("backupmx", "postfix", "aiosmtpd", "sink")

STARTED = []  # every Popen we started, for the last-resort cleanup


class BenchError(Exception):
    """One-line reason a server or a row could not be measured."""


# -- processes ----------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def spawn(cmd, logfile, **kw):
    """Start cmd in its own process group, stdout+stderr to logfile."""
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, **kw)
    STARTED.append(proc)
    return proc


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_proc(proc, timeout=15.0):
    """SIGTERM, wait, then SIGKILL the whole group; always reaps."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)  # children that outlived their parent
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def run(cmd, timeout=60, check=True, **kw):
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))}: exit {res.returncode}: {(res.stderr or res.stdout).strip()[-300:]}")
    return res


def wait_banner(port, deadline, proc=None):
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before answering")
        try:
            with socket.create_connection((LOCAL, port), timeout=2) as s:
                if s.recv(200).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"nothing answered 220 on port {port}")


def ppid_map():
    children = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(roots):
    children = ppid_map()
    seen, todo = [], [r for r in roots if r]
    while todo and len(seen) < 10000:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, ()))
    return seen


def cpu_ticks(pid):
    """(user, system) clock ticks of a process, its reaped children included, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(v) for v in stat[stat.rindex(b")") + 2:].split()[11:15])
    return utime + cutime, stime + cstime


def cpu_seconds(server):
    """CPU time of the server's whole process tree, reaped children included (Postfix's smtpd
    processes come and go: their time moves into the master's cutime/cstime when it reaps them)."""
    ticks = sum(sum(t) for t in map(cpu_ticks, process_tree(server.roots())) if t is not None)
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_kb(pids):
    """(RSS, PSS) in kB summed over pids that still exist."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


class MemSampler(threading.Thread):
    """Peak summed RSS/PSS of a server's process tree, every `interval` s."""

    def __init__(self, roots_fn, interval=0.1):
        super().__init__(daemon=True)
        self.roots_fn, self.interval = roots_fn, interval
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                pids = process_tree(self.roots_fn())
                rss, pss = memory_kb(pids)
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_pss = max(self.peak_pss, pss)
                self.peak_procs = max(self.peak_procs, len(pids))
            except Exception:  # a process vanished mid-scan: next sample
                pass
            self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join(5)


class Sink:
    """smtp-sink on a port, counting messages (its -c counter on stdout)."""

    def __init__(self, workdir, port):
        self.port = port
        self.out = Path(workdir) / f"sink-{port}.out"
        cmd = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # it refuses to keep root
        cmd += [f"{LOCAL}:{port}", "1024"]
        self.proc = spawn(cmd, self.out)
        wait_banner(port, time.monotonic() + 10, self.proc)

    def counter(self, name=b"mesg="):
        """The last value of `name` the sink printed. It prints all its counters again at each
        event (~30 bytes, after a \\r), so the last record is in the file's tail: reading the
        whole file on every poll cost a flush's poller ~0.1 ms a message more with each
        10,000 messages it held (bench/README.md, "Where the flush at 1M spends its CPU")."""
        with open(self.out, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 512))
            data = f.read()
        at = data.rfind(name)
        if at < 0:
            return 0
        start = end = at + len(name)
        while end < len(data) and data[end:end + 1].isdigit():
            end += 1
        return int(data[start:end] or 0)

    def count(self):
        return self.counter(b"mesg=")

    def stop(self):
        stop_proc(self.proc, 5)


# -- the servers --------------------------------------------------------------------


class Server:
    name = "?"
    can_flush = True

    def __init__(self, workdir, sink_port):
        self.dir = Path(workdir)
        self.sink_port = sink_port  # the primary; nothing listens there until the flush
        self.port = free_port()

    def start(self):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def roots(self):
        raise NotImplementedError

    def count(self):
        """Messages held for DOMAIN (after the server has settled)."""
        raise NotImplementedError

    def prepare_flush(self):
        """Untimed: anything that must happen before the ETRN is sent."""

    def flush(self):
        """Timed: ask for the hand-over to the sink (returns once asked)."""
        raise NotImplementedError

    def flush_done(self):
        return True


class BackupMX(Server):
    name = "backupmx"

    def __init__(self, workdir, sink_port, workers=None, cert=None, key=None):
        super().__init__(workdir, sink_port)
        self.workers = workers
        self.cert = Path(cert or REPO / "tests/certs/server.pem")  # bench/tls.py brings its own
        self.key_source = Path(key or REPO / "tests/certs/server.key")
        self.db = self.dir / "queue.db"
        self.proc = None

    def start(self):
        key = self.dir / "server.key"
        shutil.copyfile(self.key_source, key)
        os.chmod(key, 0o600)
        workers = f"workers = {self.workers}\nmax_workers = {max(64, self.workers)}\n" if self.workers else ""
        cfg = self.dir / "backupmx.ini"
        cfg.write_text(
            "[backupmx]\n"
            "hostname = mx2-backupmx.bench\n"
            f"listen = {LOCAL}:{self.port}\n"
            f"queue = {self.db}\n"
            f"tls_cert = {self.cert}\n"
            f"tls_key = {key}\n"
            f"{workers}"
            "max_connections_per_client = 1000\n"
            f"log = {self.dir / 'backupmx.log'}\n"
            f"\n[domain:{DOMAIN}]\n"
            f"primary = {LOCAL}:{self.sink_port}\n"
            "primary_tls = none\n"
            "recipients = *\n"
            f"\n[user:{ETRN_USER}]\n"
            f"password = {{PLAIN}}{ETRN_PASSWORD}\n"
            f"domains = {DOMAIN}\n"
        )
        self.proc = spawn(self.command(cfg), self.dir / "backupmx.stderr", cwd=self.dir)
        wait_banner(self.port, time.monotonic() + 20, self.proc)

    def command(self, cfg):
        """The server's command line (bench/profile_accept.py runs it under its profiler)."""
        return [sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(cfg)]

    def stop(self):
        if self.proc:
            stop_proc(self.proc, 20)

    def roots(self):
        return [self.proc.pid]

    def count(self):
        if self.proc.poll() is not None:
            raise BenchError(f"backupmx exited with {self.proc.returncode}")
        with sqlite3.connect(self.db, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM queue WHERE domain = ? AND state = 'queued'",
                              (DOMAIN,)).fetchone()[0]

    def flush(self):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP(LOCAL, self.port, local_hostname="primary.bench", timeout=30) as smtp:
            smtp.ehlo()
            smtp.starttls(context=ctx)
            smtp.ehlo()
            smtp.login(ETRN_USER, ETRN_PASSWORD)
            code, text = smtp.docmd("ETRN", DOMAIN)
            if code not in (250, 251, 252, 253):
                raise BenchError(f"ETRN: {code} {text!r}")

    def flush_done(self):
        return self.count() == 0


class Postfix(Server):
    name = "postfix"
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, workdir, sink_port, main_cf_extra=""):
        super().__init__(workdir, sink_port)
        self.main_cf_extra = main_cf_extra  # more main.cf lines (bench/tls.py: smtpd_tls_*)
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.data = self.dir / "data"
        self.closed_port = free_port()  # nothing ever listens here: the primary is "down"
        self.started = False
        self.known_pids = []

    def write_transport(self, port):
        (self.etc / "transport").write_text(f"{DOMAIN} smtp:[{LOCAL}]:{port}\n")
        run(["postmap", "-c", str(self.etc), f"hash:{self.etc / 'transport'}"])

    def start(self):
        for d in (self.etc, self.spool, self.data):
            d.mkdir()
        os.chmod(self.dir, 0o755)
        shutil.chown(self.data, "postfix", "postfix")  # master.lock and the caches live here
        prefix = str(self.dir.parent)
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.spool}
data_directory = {self.data}
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx2-postfix.bench
mydomain = bench
myorigin = $myhostname
mydestination =
inet_interfaces = {LOCAL}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {DOMAIN}
relay_recipient_maps =
transport_maps = hash:{self.etc / 'transport'}
fast_flush_domains = $relay_domains
smtpd_etrn_restrictions = permit_mynetworks
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
biff = no
message_size_limit = 52428800
maillog_file = {self.dir / 'maillog'}
maillog_file_prefixes = {prefix}
""" + self.main_cf_extra)
        # The stock services, unchrooted, and smtpd on our port.
        (self.etc / "master.cf").write_text(f"""\
{LOCAL}:{self.port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
""")
        self.write_transport(self.closed_port)
        self.started = True
        run(["postfix", "-c", str(self.etc), "start"], timeout=60)
        wait_banner(self.port, time.monotonic() + 20)
        self.known_pids = process_tree(self.roots())

    def master_pid(self):
        try:
            return int((self.spool / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self):
        if not self.started:
            return
        pids = set(process_tree(self.roots())) | set(self.known_pids)
        run(["postfix", "-c", str(self.etc), "stop"], timeout=60, check=False)
        deadline = time.monotonic() + 15
        master = self.master_pid()
        while master and time.monotonic() < deadline and os.path.exists(f"/proc/{master}"):
            time.sleep(0.05)
        for pid in pids:  # leftovers we saw: Postfix daemons run in our queue directory
            try:
                if pid == master or os.readlink(f"/proc/{pid}/cwd") == str(self.spool):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.started = False

    def roots(self):
        master = self.master_pid()
        return [master] if master else []

    def queue_files(self, queues=None):
        n = 0
        for q in queues or self.QUEUES:
            for _, _, files in os.walk(self.spool / q):
                n += len(files)
        return n

    def count(self):
        # Settle: every accepted message ends in deferred (the primary is down).
        deadline = time.monotonic() + 120
        last = None
        while time.monotonic() < deadline:
            busy = self.queue_files(("maildrop", "incoming", "active"))
            total = self.queue_files()
            if busy == 0 and total == last:
                return total
            last = total
            time.sleep(0.1)
        raise BenchError(f"postfix queue did not settle ({busy} still incoming/active)")

    def prepare_flush(self):
        self.count()  # all deferred, so the flush daemon has logged them for ETRN
        before = self.qmgr_pid()
        self.write_transport(self.sink_port)
        run(["postfix", "-c", str(self.etc), "reload"], timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the new qmgr knows nothing of the dead primary
            now = self.qmgr_pid()
            if now and now != before:
                break
            time.sleep(0.05)
        else:
            raise BenchError("postfix reload: qmgr did not restart")
        self.known_pids = list(set(self.known_pids) | set(process_tree(self.roots())))

    def qmgr_pid(self):
        for pid in process_tree(self.roots()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].endswith(b"qmgr"):
                        return pid
            except OSError:
                pass
        return None

    def flush(self):
        with smtplib.SMTP(LOCAL, self.port, local_hostname="primary.bench", timeout=30) as smtp:
            smtp.ehlo()
            code, text = smtp.docmd("ETRN", DOMAIN)
            if code not in (250, 251, 252, 253):
                raise BenchError(f"ETRN: {code} {text!r}")

    def flush_done(self):
        return self.queue_files() == 0


class Aiosmtpd(Server):
    name = "aiosmtpd"

    def __init__(self, workdir, sink_port, python):
        super().__init__(workdir, sink_port)
        self.python = python
        self.db = self.dir / "aiosmtpd.db"
        self.proc = self.flusher = None

    def start(self):
        self.proc = spawn([self.python, str(HERE / "aiosmtpd_sqlite.py"), "serve", "--db", str(self.db),
                           "--port", str(self.port), "--domain", DOMAIN], self.dir / "aiosmtpd.log")
        wait_banner(self.port, time.monotonic() + 20, self.proc)

    def stop(self):
        for p in (self.flusher, self.proc):
            if p:
                stop_proc(p, 10)

    def roots(self):
        return [self.proc.pid]

    def count(self):
        if self.proc.poll() is not None:
            raise BenchError(f"aiosmtpd exited with {self.proc.returncode}")
        with sqlite3.connect(self.db, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def flush(self):
        # Stdlib only, so the interpreter that runs this script will do.
        self.flusher = spawn([sys.executable, str(HERE / "aiosmtpd_sqlite.py"), "flush", "--db", str(self.db),
                              "--primary", f"{LOCAL}:{self.sink_port}"], self.dir / "aiosmtpd-flush.log")

    def flush_done(self):
        if self.flusher.poll() is None:
            return False
        if self.flusher.returncode != 0:
            raise BenchError(f"aiosmtpd flush loop exited {self.flusher.returncode}")
        return self.count() == 0


class SinkServer(Server):
    """smtp-sink as the server under test: how fast the client side can go."""

    name = "sink"
    can_flush = False

    def start(self):
        self.sink = Sink(self.dir, self.port)

    def stop(self):
        self.sink.stop()

    def roots(self):
        return [self.sink.proc.pid]

    def count(self):
        time.sleep(0.05)
        return self.sink.count()


# -- workloads ----------------------------------------------------------------------


class TimedSMTP(smtplib.SMTP):
    """Notes when the end-of-data line went out (data() sends it in one send())."""

    eod_sent = None

    def send(self, s):
        super().send(s)
        if isinstance(s, bytes) and s.endswith(b"\r\n.\r\n"):
            self.eod_sent = time.perf_counter()


def body_2k(n):
    head = f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: latency {n}\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    return head + line * ((2048 - len(head)) // len(line))


def percentile(values, p):
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def smtp_source(port, sessions, messages, size, timeout):
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-f", SENDER, "-t", RCPT, "-M", "client.bench", f"{LOCAL}:{port}"]
    started = time.perf_counter()
    res = run(cmd, timeout=timeout, check=False)
    elapsed = time.perf_counter() - started
    note = None if res.returncode == 0 else f"smtp-source exit {res.returncode}: {res.stderr.strip()[-200:]}"
    return elapsed, note


class Result:
    """One measurement: value, plus whether the mail added up."""

    def __init__(self, value, ok=True, note=None, extra=None):
        self.value, self.ok, self.note, self.extra = value, ok, note, extra or {}

    def as_dict(self):
        return {"value": self.value, "ok": self.ok, "note": self.note, **self.extra}


def row_accept(server, messages, size, sessions, timeout):
    sampler = MemSampler(server.roots)
    sampler.start()
    cpu_before = cpu_seconds(server)
    try:
        elapsed, note = smtp_source(server.port, sessions, messages, size, timeout)
    finally:
        sampler.stop()
    cpu_ms = (cpu_seconds(server) - cpu_before) * 1000
    held = server.count()
    ok = held == messages and note is None
    if held != messages:
        note = (note + "; " if note else "") + f"sent {messages}, server holds {held}"
    return Result(messages / elapsed, ok, note, {
        "held": held, "elapsed": elapsed, "cpu_ms_per_msg": cpu_ms / messages, "peak_rss_kb": sampler.peak_rss,
        "peak_pss_kb": sampler.peak_pss, "peak_procs": sampler.peak_procs})


def row_latency(server, messages):
    lat, errors = [], []
    with TimedSMTP(LOCAL, server.port, local_hostname="client.bench", timeout=60) as smtp:
        smtp.ehlo()
        for n in range(messages):
            smtp.mail(SENDER)
            smtp.rcpt(RCPT)
            code, reply = smtp.data(body_2k(n))
            done = time.perf_counter()
            if code != 250:
                errors.append(f"{code} {reply[:80]!r}")
            else:
                lat.append(done - smtp.eod_sent)
    held = server.count()
    ok = held == messages and not errors
    note = None if ok else f"sent {messages}, server holds {held}, errors {errors[:2]}"
    p50 = percentile(lat, 50) * 1000 if lat else float("nan")
    p99 = percentile(lat, 99) * 1000 if lat else float("nan")
    return Result(p50, ok, note, {"p50_ms": p50, "p99_ms": p99, "held": held})


def row_idle(server, idle, timeout):
    """`idle` sessions connect, read the banner and sit; then one more client
    sends a message. Its connect-to-QUIT time in ms is the value."""
    socks, greeted = [], 0
    sampler = MemSampler(server.roots)
    sampler.start()
    try:
        deadline = time.monotonic() + timeout
        for _ in range(idle):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                socks.append(socket.create_connection((LOCAL, server.port), timeout=left))
            except OSError:
                break
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                greeted += s.recv(512).startswith(b"220")
            except OSError:
                pass
        started = time.perf_counter()
        try:
            with smtplib.SMTP(LOCAL, server.port, local_hostname="client.bench", timeout=timeout) as smtp:
                smtp.sendmail(SENDER, [RCPT], body_2k(0))
            took = time.perf_counter() - started
        except (OSError, smtplib.SMTPException) as exc:
            return Result(float("nan"), False, f"client {idle + 1}: {type(exc).__name__} {exc} after "
                          f"{time.perf_counter() - started:.1f}s; {greeted}/{idle} idle sessions greeted")
    finally:
        sampler.stop()
        for s in socks:
            s.close()
    held = server.count()
    ok = held == 1 and greeted == idle
    note = None if ok else f"{greeted}/{idle} idle sessions greeted, server holds {held}"
    return Result(took * 1000, ok, note, {"greeted": greeted, "held": held,
                                   "peak_rss_kb": sampler.peak_rss, "peak_pss_kb": sampler.peak_pss,
                                   "peak_procs": sampler.peak_procs})


def row_flush(server, workdir, messages, sessions, timeout):
    elapsed, note = smtp_source(server.port, sessions, messages, 2048, timeout)
    held = server.count()
    if held != messages or note:
        return Result(float("nan"), False, f"fill: sent {messages}, server holds {held}; {note or ''}")
    sink = Sink(workdir, server.sink_port)
    try:
        server.prepare_flush()
        started = time.perf_counter()
        server.flush()
        deadline = time.monotonic() + timeout
        got = 0
        while time.monotonic() < deadline:
            got = sink.count()
            if got >= messages:
                break
            time.sleep(0.01)
        took = time.perf_counter() - started
        # then the queue must empty, and nothing more may arrive (duplicates)
        while time.monotonic() < deadline and not server.flush_done():
            time.sleep(0.05)
        empty = server.flush_done()
        time.sleep(0.5)
        got = sink.count()
        sessions = sink.counter(b"sess=")
    finally:
        sink.stop()
    ok = got == messages and empty
    note = None if ok else f"queued {messages}, sink got {got}, queue empty={empty}"
    return Result(messages / took, ok, note, {"sink": got, "sessions": sessions, "elapsed": took, "fill_rate": messages / elapsed})


# -- driver -------------------------------------------------------------------------


def make_server(name, workdir, sink_port, args):
    if name == "backupmx":
        return BackupMX(workdir, sink_port, args.backupmx_workers)
    if name == "postfix":
        return Postfix(workdir, sink_port)
    if name == "aiosmtpd":
        return Aiosmtpd(workdir, sink_port, args.aiosmtpd_python)
    return SinkServer(workdir, sink_port)


def measure(kind, params, name, root, args):
    """One fresh server, one row. Returns a Result (never raises BenchError)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    os.chmod(workdir, 0o755)
    server = make_server(name, workdir, free_port(), args)
    try:
        server.start()
        if kind == "accept":
            return row_accept(server, *params, timeout=args.timeout)
        if kind == "latency":
            return row_latency(server, *params)
        if kind == "idle":
            return row_idle(server, *params, timeout=args.idle_timeout)
        return row_flush(server, workdir, *params, timeout=args.timeout)
    except (BenchError, OSError, smtplib.SMTPException, sqlite3.Error, subprocess.TimeoutExpired) as exc:
        return Result(float("nan"), False, f"{type(exc).__name__}: {exc}")
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def plan(args):
    """(label, kind, params, unit, better) for every row."""
    n2k, n1m, nlat, nflush = (1000, 40, 100, 1000) if args.quick else (5000, 200, 300, 5000)
    nidle = args.idle
    rows = []
    for size, n, tag in ((2048, n2k, "2 KB"), (1048576, n1m, "1 MB")):
        for s in (1, 10, 50):
            rows.append((f"accept {n} x {tag}, {s} sess", "accept", (n, size, s), "msg/s", "higher"))
    rows.append((f"latency p50 ({nlat} x 2 KB)", "latency", (nlat,), "ms", "lower"))
    rows.append((f"{nidle} idle sessions + 1 sending", "idle", (nidle,), "ms", "lower"))
    rows.append((f"flush {nflush} queued", "flush", (nflush, 50), "msg/s", "higher"))
    return rows


def derived_rows(rows, results):
    """Latency p99 and memory rows come out of the measured ones."""
    out = []
    for label, kind, params, unit, better in rows:
        if kind == "latency":
            out.append((label.replace("p50", "p99"), (label, "p99_ms"), "ms", "lower"))
        if kind == "idle":
            out.append((f"peak PSS, {params[0]} idle sessions", (label, "peak_pss_kb"), "MB", "lower"))
        if kind == "accept":
            out.append(("  server CPU per message", (label, "cpu_ms_per_msg"), "ms", "lower"))  # under its row
        if kind == "accept" and params[2] == 50:
            tag = label.split(",")[0].replace("accept", "peak RSS,")
            out.append((f"{tag}, 50 sess", (label, "peak_rss_kb"), "MB", "lower"))
            out.append((f"{tag.replace('RSS', 'PSS')}, 50 sess", (label, "peak_pss_kb"), "MB", "lower"))
    return out


def cell(runs, key="value", scale=1.0):
    if not runs:
        return None, True
    values = [r.extra.get(key, r.value) if key != "value" else r.value for r in runs]
    values = [v for v in values if v == v]  # drop NaN
    ok = all(r.ok for r in runs)
    return (statistics.median(values) * scale if values else None), ok


def fmt(value, ok, unit):
    if value is None:
        return "n/a" if ok else "fail!"
    if unit in ("msg/s", "MB") and value >= 10:
        text = f"{value:.0f}"
    else:
        text = f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return text if ok else text + "!"


def print_table(rows, results, servers, args, out=sys.stdout):
    cols = [s for s in ALL_SERVERS if s in servers]
    width = max(len(r[0]) for r in rows) + 14
    head = f"{'row':<{width}}" + "".join(f"{c:>10}" for c in cols)
    ratios = [r for r in ("postfix", "aiosmtpd") if r in cols and "backupmx" in cols]
    head += "".join(f"{'bmx/' + r:>13}" for r in ratios)
    print(head, file=out)
    print("-" * len(head), file=out)
    table = [(label, (label, "value"), unit, better) for label, kind, params, unit, better in rows]
    table += derived_rows(rows, results)
    order = {label: i for i, (label, *_rest) in enumerate(rows)}
    table.sort(key=lambda t: (order.get(t[1][0], 99), t[1][1] != "value", t[0]))
    for label, (source, key), unit, better in table:
        scale = 1 / 1024 if unit == "MB" else 1.0
        values = {}
        line = f"{label + ' (' + unit + ')':<{width}}"
        for c in cols:
            runs = results.get((source, c), [])
            v, ok = cell(runs, key, scale)
            values[c] = (v, ok)
            line += f"{fmt(v, ok, unit):>10}"
        for r in ratios:
            (bv, bok), (rv, rok) = values["backupmx"], values[r]
            if bv is None or rv is None or not rv:
                text = "n/a"
            elif not (bok and rok):
                text = "refused"  # someone lost or duplicated mail: no ratio
            else:
                text = f"{bv / rv:.2f}x"
            line += f"{text:>13}"
        print(line, file=out)
    print(file=out)
    print("ratios: backupmx / peer; for msg/s higher is better, for ms and MB lower is better.", file=out)
    print("'!' = some run lost or duplicated mail or failed (see notes); no ratio is given then.", file=out)


def select_rows(rows, spec):
    """The rows whose label contains one of the comma-separated words of `spec` (all when empty)."""
    words = [w.strip() for w in spec.split(",") if w.strip()]
    return [r for r in rows if any(w in r[0] for w in words)] if words else rows


def print_progress(run_no, label, name, res, unit, t0, width=32):
    """One measurement as it is done: value, ok or BAD, time taken, its extra figures, a note."""
    extra = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.extra.items())
    print(f"  run {run_no + 1} {label:<{width}} {name:<9} {res.value:9.1f} {unit:<5} "
          f"{'ok' if res.ok else 'BAD'} ({time.monotonic() - t0:.1f}s) {extra}"
          + (f"  NOTE: {res.note}" if res.note else ""), flush=True)


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    return f"{os.cpu_count()} CPUs ({cpu}), {mem} GB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def find_aiosmtpd(args, root):
    if args.aiosmtpd_python:
        return args.aiosmtpd_python
    venv = Path(args.venv) if args.venv else Path(root) / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making a venv with aiosmtpd in {venv} ...", flush=True)
        run([sys.executable, "-m", "venv", str(venv)], timeout=120)
        run([str(python), "-m", "pip", "install", "-q", "aiosmtpd"], timeout=300)
    run([str(python), "-c", "import aiosmtpd"], timeout=30)
    return str(python)


def preflight(servers):
    need = ["smtp-source"]
    if "postfix" in servers:
        need += ["postfix", "postmap"]
    need += ["smtp-sink"]
    missing = [t for t in need if not shutil.which(t)]
    if missing:
        sys.exit(f"peers: missing {', '.join(missing)}: apt-get install postfix (see bench/README.md)")
    if "postfix" in servers and os.geteuid() != 0:
        sys.exit("peers: the Postfix instance needs root (postfix start); run as root or --only without postfix")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per row, median reported (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 run, fewer messages (1000 x 2 KB, 40 x 1 MB)")
    parser.add_argument("--only", default=",".join(ALL_SERVERS), help=f"comma list of {','.join(ALL_SERVERS)}")
    parser.add_argument("--rows", default="", help="only rows whose label contains one of these comma-separated words")
    parser.add_argument("--venv", help="venv holding aiosmtpd (made there if missing; default: a throwaway one)")
    parser.add_argument("--aiosmtpd-python", help="a Python that can import aiosmtpd (skips the venv)")
    parser.add_argument("--backupmx-workers", type=int, help="workers = N in the backupmx config (default: its default)")
    parser.add_argument("--idle", type=int, default=500, help="idle sessions in the idle row (default 500)")
    parser.add_argument("--idle-timeout", type=float, default=10, help="bound on the idle row's waits, seconds")
    parser.add_argument("--timeout", type=float, default=600, help="bound on any one phase, seconds")
    parser.add_argument("--json", help="also write every run's figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, queues)")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    servers = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(servers) - set(ALL_SERVERS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    preflight(servers)

    root = tempfile.mkdtemp(prefix="peers-")
    os.chmod(root, 0o755)
    results = {}
    started = time.monotonic()
    try:
        if "aiosmtpd" in servers:
            args.aiosmtpd_python = find_aiosmtpd(args, root)
        rows = select_rows(plan(args), args.rows)
        print(f"peers: {machine()}", flush=True)
        print(f"peers: {runs} run(s), servers {', '.join(servers)}, temp {root}", flush=True)
        for run_no in range(runs):
            for label, kind, params, unit, better in rows:
                for name in servers:
                    if kind in ("flush", "idle") and name == "sink":
                        continue
                    t0 = time.monotonic()
                    res = measure(kind, params, name, root, args)
                    results.setdefault((label, name), []).append(res)
                    print_progress(run_no, label, name, res, unit, t0)
        print(flush=True)
        print(f"machine: {machine()}")
        print(f"{runs} run(s) per cell (median), {time.monotonic() - started:.0f}s in all\n")
        print_table(rows, results, servers, args)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": machine(), "runs": runs,
                "results": [{"row": k[0], "server": k[1], "runs": [r.as_dict() for r in v]} for k, v in results.items()],
            }, indent=1))
    finally:
        for proc in STARTED:  # belt and braces: every group we started
            if proc.poll() is None:
                kill_group(proc)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    bad = [k for k, v in results.items() if not all(r.ok for r in v)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
