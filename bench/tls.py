#!/usr/bin/env python3
"""TLS side by side: backupmx and Postfix, plain and STARTTLS, RSA-2048 and ECDSA P-256 (issue 16).

    sudo python3 bench/tls.py [--runs 3] [--quick] [--only backupmx,postfix] [--certs rsa,ecdsa] [--sessions N]

Needs root and Postfix (see bench/README.md, peers.py): the servers are
peers.py's (a private Postfix instance in the temp dir, backupmx from this
checkout), both given the same certificate, made here with `openssl req`
(one RSA-2048, one ECDSA P-256). Postfix gets `smtpd_tls_security_level = may`
and that certificate; everything else is as in peers.py. The load is
bench/smtpload.py (threads in 2 processes, one message per connection, as
smtp-source sends them).

Rows, each on a fresh server and queue, interleaved across servers and runs:

  accept      N messages of 2 KB at 10 and 50 sessions: plain, and with
              STARTTLS on every connection (a full handshake each time, no
              resumption: a new client every time); msg/s, then the server
              must hold exactly what got a 250.
  handshakes  10 sessions (--sessions) of connect, EHLO, STARTTLS, EHLO, QUIT for a few
              seconds (per_connection = 0): handshakes/s, full and with the
              previous connection's session offered (resumption: TLS 1.3
              tickets); the share actually resumed is printed.
  probe       one plain client sending 2 KB messages back to back while 50
              STARTTLS clients (--sessions) load the server: its MAIL-to-250 p99 (a whole
              transaction, commit included), and the worst reply to MAIL (no
              disk behind it: the longest the client's worker loop left it
              waiting, i.e. the loop's longest stall, handshakes included);
              the same under 50 plain clients is the baseline.

Every accept and handshake row also gives the server's CPU time per message
or handshake (its whole process tree; Postfix's reaped smtpd processes
included), and an accept row the load generator's (its processes share the
two cores with the server, so what they spend bounds both servers' rates).

Ratios: backupmx / Postfix; and per server plain / STARTTLS at the same
session count (how much TLS costs it).
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smtpload  # noqa: E402
from peers import (  # noqa: E402
    STARTED, BackupMX, BenchError, Postfix, Result, cell, cpu_seconds, fmt, free_port, kill_group, machine,
    print_progress, run, select_rows, stop_proc,
)

SERVERS = ("backupmx", "postfix")
# --sessions at most: every client is a thread of the load generator (smtpload.py) on 127.0.0.1,
# and the server's own limit per client address is 1000 (peers.py).
MAX_SESSIONS = 600
CERTS = ("rsa", "ecdsa")
KEYGEN = {  # openssl req -newkey arguments
    "rsa": ["rsa:2048"],
    "ecdsa": ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
}


def make_certificate(directory, kind):
    """A self-signed certificate and its key for mx.bench; (cert, key) paths."""
    cert, key = Path(directory) / f"{kind}.pem", Path(directory) / f"{kind}.key"
    run(["openssl", "req", "-x509", "-newkey", *KEYGEN[kind], "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=mx.bench", "-addext", "subjectAltName=DNS:mx.bench"], timeout=60)
    os.chmod(key, 0o600)
    return cert, key


def postfix_tls(cert, key):
    """main.cf lines: STARTTLS offered with the bench's certificate (the rest stays default)."""
    return (f"smtpd_tls_security_level = may\n"
            f"smtpd_tls_chain_files = {key}, {cert}\n"
            "smtpd_tls_loglevel = 0\n")


def make_server(name, workdir, cert, key):
    if name == "backupmx":
        return BackupMX(workdir, free_port(), cert=cert, key=key)
    return Postfix(workdir, free_port(), main_cf_extra=postfix_tls(cert, key))


# -- rows -----------------------------------------------------------------------------


def timed_load(server, load):
    """run_load, and the CPU milliseconds it cost the server and the load generator (its
    processes, reaped by run_load: the two share the machine's cores with the server)."""
    before, clients_before = cpu_seconds(server), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = smtpload.run_load(load)
    server_ms = (cpu_seconds(server) - before) * 1000
    clients = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.client_cpu_ms = (clients.ru_utime + clients.ru_stime - clients_before.ru_utime
                            - clients_before.ru_stime) * 1000
    return result, server_ms


def load_errors(result):
    return f"{result.errors} client errors, e.g. {result.samples[:1]}" if result.errors else None


def row_accept(server, messages, sessions, tls):
    load = smtpload.Load(port=server.port, sessions=sessions, messages=messages,
                         tls=smtpload.client_context() if tls else None)
    result, cpu_ms = timed_load(server, load)
    held = server.count()
    ok = held == result.messages == messages and not result.errors
    note = None if ok else f"sent {messages}, 250 to {result.messages}, server holds {held}; {load_errors(result)}"
    return Result(result.messages / result.elapsed, ok, note, {
        "held": held, "elapsed": result.elapsed, "cpu_ms_per_item": cpu_ms / max(1, result.messages),
        "client_cpu_ms_per_item": result.client_cpu_ms / max(1, result.messages),
        "eod_p99_ms": smtpload.percentile(result.eod, 99) * 1000,
        "handshake_p50_ms": smtpload.percentile(result.handshake, 50) * 1000})


def row_handshakes(server, sessions, duration, resume):
    load = smtpload.Load(port=server.port, sessions=sessions, duration=duration, per_connection=0,
                         tls=smtpload.client_context(), resume=resume)
    result, cpu_ms = timed_load(server, load)
    ok = not result.errors and result.handshakes > 0
    return Result(result.handshakes / result.elapsed, ok, load_errors(result), {
        "resumed_pct": 100.0 * result.resumed / max(1, result.handshakes),
        "cpu_ms_per_item": cpu_ms / max(1, result.handshakes),
        "handshake_p50_ms": smtpload.percentile(result.handshake, 50) * 1000,
        "handshake_p99_ms": smtpload.percentile(result.handshake, 99) * 1000})


class Probe(threading.Thread):
    """One plain client: 2 KB messages back to back until told to stop, every reply timed."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.mail, self.txn, self.errors = [], [], []
        self.halt = threading.Event()

    def run(self):
        try:
            client = smtpload.Client(self.port, timeout=60)
            try:
                client.reply()
                client.command(b"EHLO probe.bench", 250)
                n = 0
                while not self.halt.is_set():
                    self.message(client, n)
                    n += 1
                client.command(b"QUIT", 221)
            finally:
                client.close()
        except (OSError, smtpload.ReplyError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def message(self, client, n):
        started = time.perf_counter()
        client.command(f"MAIL FROM:<{smtpload.SENDER}>".encode(), 250)
        self.mail.append(time.perf_counter() - started)
        client.command(b"RCPT TO:<bob@example.com>", 250)
        client.command(b"DATA", 354)
        client.sock.sendall(smtpload.body_2k(n) + b".\r\n")
        code, text = client.reply()
        if code != 250:
            raise smtpload.ReplyError(f"end of data: {text[:120]!r}")
        self.txn.append(time.perf_counter() - started)


def row_probe(server, sessions, duration, tls=True):
    """The plain probe while `sessions` clients (STARTTLS, or plain: the baseline) load the server for `duration` s."""
    load = smtpload.Load(port=server.port, sessions=sessions, duration=duration,
                         tls=smtpload.client_context() if tls else None)
    probe = Probe(server.port)
    done = {}
    loader = threading.Thread(target=lambda: done.setdefault("load", smtpload.run_load(load)), daemon=True)
    loader.start()
    time.sleep(min(1.0, duration / 4))  # the load is up before the probe starts
    probe.start()
    loader.join(duration + 300)
    probe.halt.set()
    probe.join(60)
    result = done.get("load")
    if result is None or not probe.txn:
        return Result(float("nan"), False, f"load or probe produced nothing; probe: {probe.errors[:1]}")
    ok = not probe.errors and not result.errors
    note = None if ok else f"probe {probe.errors[:1]}; load {load_errors(result)}"
    return Result(smtpload.percentile(probe.txn, 99) * 1000, ok, note, {
        "probe_messages": len(probe.txn), "load_msg_s": result.messages / result.elapsed,
        "txn_p50_ms": smtpload.percentile(probe.txn, 50) * 1000,
        "mail_p99_ms": smtpload.percentile(probe.mail, 99) * 1000,
        "mail_max_ms": max(probe.mail) * 1000})


# -- the plan and the table -----------------------------------------------------------


def plan(args):
    """(label, kind, cert or None, params, unit) for every measured row."""
    n = 500 if args.quick else args.messages
    seconds = 3.0 if args.quick else args.duration
    handshakers = args.sessions or 10
    loaders = args.sessions or 50
    rows = []
    for sessions in (10, 50):
        rows.append((f"accept {n} x 2 KB plain, {sessions} sess", "accept", None, (n, sessions, False), "msg/s"))
        for cert in args.certs:
            rows.append((f"accept {n} x 2 KB STARTTLS {cert}, {sessions} sess", "accept", cert,
                         (n, sessions, True), "msg/s"))
    for cert in args.certs:
        for resume in (False, True):
            how = "resumed" if resume else "full"
            rows.append((f"handshakes {cert} {how}, {handshakers} sess", "handshakes", cert,
                         (handshakers, seconds, resume), "/s"))
    rows.append((f"plain client under {loaders} plain: txn p99", "probe", None, (loaders, seconds * 2, False), "ms"))
    for cert in args.certs:
        rows.append((f"plain client under {loaders} STARTTLS {cert}: txn p99", "probe", cert,
                     (loaders, seconds * 2), "ms"))
    return rows


def derived(rows):
    """(label, source row, key, unit) for the figures the measured rows also carry."""
    out = []
    for label, kind, cert, params, unit in rows:
        if kind in ("accept", "handshakes"):
            what = "message" if kind == "accept" else "handshake"
            out.append((f"  server CPU per {what}", label, "cpu_ms_per_item", "ms"))
            if kind == "accept":
                out.append(("  load generator CPU per message", label, "client_cpu_ms_per_item", "ms"))
        if kind == "handshakes" and params[2]:
            out.append((f"  of which resumed, {cert}", label, "resumed_pct", "%"))
        if kind == "probe":
            under = label.split(":")[0]
            out.append((f"{under}: MAIL p99", label, "mail_p99_ms", "ms"))
            out.append((f"{under}: MAIL max (stall)", label, "mail_max_ms", "ms"))
            out.append((f"  the {params[0]} {'STARTTLS' if cert else 'plain'} clients meanwhile", label, "load_msg_s",
                        "msg/s"))
    return out


def print_table(rows, results, servers, out=sys.stdout):
    table = []
    for label, kind, cert, params, unit in rows:
        table.append((label, label, "value", unit))
        table += [d for d in derived(rows) if d[1] == label]
    width = max(len(t[0]) + len(t[3]) for t in table) + 4
    ratio = "backupmx" in servers and "postfix" in servers
    head = f"{'row':<{width}}" + "".join(f"{s:>10}" for s in servers) + (f"{'bmx/postfix':>13}" if ratio else "")
    print(head, file=out)
    print("-" * len(head), file=out)
    values = {}
    for label, source, key, unit in table:
        line = f"{label + ' (' + unit + ')':<{width}}"
        for s in servers:
            v, ok = cell(results.get((source, s), []), key)
            values[(label, s)] = v if ok else None
            line += f"{fmt(v, ok, 'msg/s' if unit in ('/s', '%') else unit):>10}"
        if ratio:
            b, p = values[(label, "backupmx")], values[(label, "postfix")]
            line += f"{(f'{b / p:.2f}x' if b and p else 'n/a'):>13}"
        print(line, file=out)
    print(file=out)
    for label, kind, cert, params, unit in rows:  # what TLS costs each server
        if kind != "accept" or cert is None:
            continue
        plain = next((r[0] for r in rows if r[1] == "accept" and r[2] is None and r[3][1] == params[1]), None)
        if plain is None:
            continue
        parts = []
        for s in servers:
            p, t = values.get((plain, s)), values.get((label, s))
            parts.append(f"{s} {p / t:.2f}" if p and t else f"{s} n/a")
        print(f"plain / STARTTLS {cert}, {params[1]} sess: " + ", ".join(parts), file=out)
    print("\nratios: backupmx / Postfix (msg/s and /s: higher is better; ms: lower is better);", file=out)
    print("plain / STARTTLS: lower means TLS costs that server less. '!' = a run lost mail or failed.", file=out)


def measure(kind, cert, params, name, root, certs):
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    os.chmod(workdir, 0o755)
    server = make_server(name, workdir, *certs[cert or "rsa"])
    try:
        server.start()
        if kind == "accept":
            return row_accept(server, *params)
        if kind == "handshakes":
            return row_handshakes(server, *params)
        return row_probe(server, *params)
    except (BenchError, OSError, smtpload.ReplyError, subprocess.TimeoutExpired, TimeoutError) as exc:
        return Result(float("nan"), False, f"{type(exc).__name__}: {exc}")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help="runs per row, median reported (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 run, 500 messages, 3 s handshake rows")
    parser.add_argument("--only", default=",".join(SERVERS), help="comma list of backupmx,postfix")
    parser.add_argument("--certs", default=",".join(CERTS), help="comma list of rsa,ecdsa")
    parser.add_argument("--rows", default="", help="only rows whose label contains one of these comma-separated words")
    parser.add_argument("--messages", type=int, default=2000, help="messages per accept row (default 2000)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per handshake row; the probe row runs twice as long (default 5)")
    parser.add_argument("--sessions", type=int, default=None,
                        help=f"clients of the handshake rows and load beside the probe (default 10 and 50; "
                             f"at most {MAX_SESSIONS}): a flood of handshakes")
    args = parser.parse_args(argv)
    if args.sessions is not None and not 1 <= args.sessions <= MAX_SESSIONS:
        parser.error(f"--sessions: 1 to {MAX_SESSIONS}")
    runs = args.runs or (1 if args.quick else 3)
    servers = [s.strip() for s in args.only.split(",") if s.strip()]
    args.certs = [c.strip() for c in args.certs.split(",") if c.strip()]
    if set(servers) - set(SERVERS) or not servers:
        parser.error(f"--only: a comma list of {','.join(SERVERS)}")
    if set(args.certs) - set(CERTS) or not args.certs:
        parser.error(f"--certs: a comma list of {','.join(CERTS)}")
    if "postfix" in servers and (os.geteuid() != 0 or not shutil.which("postfix")):
        sys.exit("tls: Postfix must be installed and this run as root (or --only backupmx)")
    if not shutil.which("openssl"):
        sys.exit("tls: openssl is needed to make the certificates")

    root = tempfile.mkdtemp(prefix="tls-")
    os.chmod(root, 0o755)
    results = {}
    started = time.monotonic()
    try:
        certs = {kind: make_certificate(root, kind) for kind in set(args.certs) | {"rsa"}}
        rows = select_rows(plan(args), args.rows)
        print(f"tls: {machine()}", flush=True)
        print(f"tls: {runs} run(s), servers {', '.join(servers)}, temp {root}", flush=True)
        for run_no in range(runs):
            for label, kind, cert, params, unit in rows:
                for name in servers:
                    t0 = time.monotonic()
                    res = measure(kind, cert, params, name, root, certs)
                    results.setdefault((label, name), []).append(res)
                    print_progress(run_no, label, name, res, unit, t0, width=48)
        print(f"\nmachine: {machine()}")
        print(f"{runs} run(s) per cell (median), {time.monotonic() - started:.0f}s in all\n")
        print_table(rows, results, servers)
    finally:
        for proc in STARTED:  # belt and braces: every group peers.py's classes started
            if proc.poll() is None:
                kill_group(proc)
                stop_proc(proc, 5)
        shutil.rmtree(root, ignore_errors=True)
    return 1 if any(not all(r.ok for r in v) for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
