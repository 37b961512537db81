#!/usr/bin/env python3
"""Where a STARTTLS session's server CPU goes, step by step, in one process (issue 16).

    python3 bench/tls_steps.py [--sessions 400] [--certs rsa,ecdsa] [--runs 3]

The server side is the worker's own code: a SessionLoop (not run: no select)
serving SMTPConnections on real TCP sockets on 127.0.0.1; the client is in
the same process (blocking socket; its TLS an SSLObject over memory buffers).
Only the server's calls are timed, with time.process_time: accepting the
session (SessionLoop.add_session, banner), then each readable event
(SessionLoop.service) and the group commit, per SMTP step. So the figures
are the worker's CPU per session without the loop's select() and without
the master's hand-off, and they do not move with what else runs on the
machine the way wall-clock rates do.

Each session: banner, EHLO, [STARTTLS, ClientHello, client Finished, EHLO],
MAIL, RCPT, DATA, 2 KB body, QUIT; every session a full handshake (no
resumption). The "OpenSSL" column is the time inside the server's
SSLObject calls (do_handshake, read, write, unwrap), measured by wrapping
them. Medians over the runs of the per-session means.
"""

import argparse
import os
import select
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backupmx import tls  # noqa: E402
from backupmx.config import load_config  # noqa: E402
from backupmx.connection_context import ConnectionContext  # noqa: E402
from backupmx.log import defer_writes, flush_pending, setup_logging  # noqa: E402
from backupmx.worker import SessionLoop  # noqa: E402

KEYGEN = {"rsa": ["rsa:2048"], "ecdsa": ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]}
BODY = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 26 + b".\r\n"  # ~2 KB
PLAIN_STEPS = ("accept+banner", "EHLO", "MAIL", "RCPT", "DATA", "body+commit", "QUIT")
TLS_STEPS = ("accept+banner", "EHLO", "STARTTLS", "ClientHello", "client Finished", "EHLO again",
             "MAIL", "RCPT", "DATA", "body+commit", "QUIT")


class OpenSSLClock:
    """Adds up the CPU time spent inside ssl.SSLObject's calls into OpenSSL."""

    METHODS = ("do_handshake", "read", "write", "unwrap")

    def __init__(self):
        self.seconds = 0.0
        self.saved = {}

    def install(self):
        for name in self.METHODS:
            original = getattr(ssl.SSLObject, name)
            self.saved[name] = original

            def timed(obj, *args, _original=original, **kw):
                start = time.process_time()
                try:
                    return _original(obj, *args, **kw)
                finally:
                    self.seconds += time.process_time() - start

            setattr(ssl.SSLObject, name, timed)

    def uninstall(self):
        for name, original in self.saved.items():
            setattr(ssl.SSLObject, name, original)


class Server:
    """A worker's session loop, driven by hand: each readable event is served when the client sent."""

    def __init__(self, workdir, ssl_context):
        cfg = Path(workdir) / "bench.ini"
        cfg.write_text(f"[backupmx]\nhostname = mx2.bench\nqueue = {workdir}/q.db\n"
                       "[domain:example.com]\nprimary = 127.0.0.1:25\nprimary_tls = none\nrecipients = *\n")
        logger = setup_logging(str(Path(workdir) / "bench.log"))  # as `log = FILE` sets up a worker
        defer_writes(True)  # the worker loop's: a round's lines go out in one write at its end
        self.context = ConnectionContext(config=load_config(cfg), ssl_context=ssl_context, logger=logger,
                                         resolver=NoDNS())
        self.loop = SessionLoop(None, self.context, logger)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.conn = None
        self.clock = OpenSSLClock()
        self.in_openssl = []  # seconds inside OpenSSL during each timed call, in the order of the steps

    def accept(self):
        client = socket.create_connection(self.listener.getsockname(), timeout=10)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as smtpload's clients
        sock, peer = self.listener.accept()
        start, openssl = time.process_time(), self.clock.seconds
        self.conn = self.loop.add_session(sock, peer, implicit_tls=False)
        self.loop.service(self.conn, selectors.EVENT_WRITE)  # the first writable event: the banner
        flush_pending()
        self.in_openssl.append(self.clock.seconds - openssl)
        return client, time.process_time() - start

    def serve(self, client, reply=True):
        """The loop's rounds for one readable event of the session (service, group commit,
        log lines) and, until the client has its reply, for the answers of the Offload's
        threads (RCPT's admission runs there)."""
        assert select.select([self.conn.sock], [], [], 10)[0], "the client sent nothing"
        start, openssl = time.process_time(), self.clock.seconds
        self.loop.service(self.conn, selectors.EVENT_READ)
        self.loop.commit_round()
        flush_pending()
        spent = time.process_time() - start
        offload = self.context.offload
        while reply and not select.select([client], [], [], 0)[0] and select.select([client, offload], [], [], 10)[0] == [offload]:
            start = time.process_time()
            self.loop.answer_offloaded()
            self.loop.commit_round()
            flush_pending()
            spent += time.process_time() - start
        self.in_openssl.append(self.clock.seconds - openssl)
        return spent

    def close(self):
        self.loop.close_all()
        self.listener.close()
        self.context.close()
        flush_pending()
        defer_writes(False)


class NoDNS:
    """The client's name is never looked up (no resolver on the bench's path)."""

    def names(self, address):
        return []

    def addresses(self, name, family=0):
        return []


def read_reply(sock, tls_obj=None, incoming=None):
    """Read up to the last line of one reply (plain or through the client's SSLObject)."""
    text = b""
    while not (text.endswith(b"\r\n") and text.rsplit(b"\r\n", 2)[-2][3:4] == b" "):
        if tls_obj is None:
            chunk = sock.recv(65536)
        else:
            try:
                text += tls_obj.read(65536)
                continue
            except ssl.SSLWantReadError:
                incoming.write(chunk := sock.recv(65536))
                if not chunk:
                    raise ConnectionError("server closed")
                continue
        if not chunk:
            raise ConnectionError("server closed")
        text += chunk
    return text


def one_session(server, client_ctx, starttls):
    """One session; returns the server's CPU seconds per step, and those inside OpenSSL."""
    server.in_openssl = []
    sock, banner_cpu = server.accept()
    times = [banner_cpu]
    read_reply(sock)
    tls_obj = incoming = outgoing = None

    def say(data):
        if tls_obj is None:
            sock.sendall(data)
        else:
            tls_obj.write(data)
            sock.sendall(outgoing.read())
        times.append(server.serve(sock))
        return read_reply(sock, tls_obj, incoming)

    say(b"EHLO client.bench\r\n")
    if starttls:
        assert say(b"STARTTLS\r\n").startswith(b"220")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        hello = client_ctx.wrap_bio(incoming, outgoing, server_hostname="mx.bench")
        while True:
            try:
                hello.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                times.append(server.serve(sock))
                incoming.write(sock.recv(65536))
        sock.sendall(outgoing.read())  # Finished: the server's handshake completes
        times.append(server.serve(sock, reply=False))
        tls_obj = hello
        say(b"EHLO client.bench\r\n")
    say(b"MAIL FROM:<a@sender.bench>\r\n")
    say(b"RCPT TO:<b@example.com>\r\n")
    say(b"DATA\r\n")
    assert say(BODY).startswith(b"250")
    say(b"QUIT\r\n")
    sock.close()
    server.loop.service(server.conn, selectors.EVENT_READ)  # the EOF: the session ends
    return times, server.in_openssl


def make_certificate(directory, kind):
    cert, key = Path(directory) / f"{kind}.pem", Path(directory) / f"{kind}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", *KEYGEN[kind], "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=mx.bench"], check=True, capture_output=True,
                   timeout=60)
    return str(cert), str(key)


def measure(workdir, kind, sessions, starttls):
    """(mean CPU seconds per step, mean OpenSSL seconds per step) over `sessions` sessions."""
    workdir = tempfile.mkdtemp(dir=workdir)  # a fresh queue and log each time
    server_ctx = tls.server_context(*make_certificate(workdir, kind))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    server = Server(workdir, server_ctx)
    try:
        for _ in range(min(20, sessions)):  # warm-up: imports, the database's first pages
            one_session(server, client_ctx, starttls)
        server.clock.install()
        totals = openssl = None
        for _ in range(sessions):
            times, in_openssl = one_session(server, client_ctx, starttls)
            totals = times if totals is None else [a + b for a, b in zip(totals, times)]
            openssl = in_openssl if openssl is None else [a + b for a, b in zip(openssl, in_openssl)]
    finally:
        server.clock.uninstall()
        server.close()
    return [t / sessions for t in totals], [t / sessions for t in openssl]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=400, help="sessions per measurement (default 400)")
    parser.add_argument("--certs", default="ecdsa,rsa", help="comma list of ecdsa,rsa")
    parser.add_argument("--runs", type=int, default=3, help="measurements per kind, median reported (default 3)")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    print(f"backupmx {commit}, {ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"{args.sessions} sessions x {args.runs} runs; server CPU per session (us), medians")
    with tempfile.TemporaryDirectory() as workdir:
        plain_runs = [measure(workdir, "ecdsa", args.sessions, False) for _ in range(args.runs)]
        plain = [statistics.median(run[0][i] for run in plain_runs) for i in range(len(PLAIN_STEPS))]
        columns = {"plain": dict(zip(PLAIN_STEPS, plain))}
        openssl = {"plain": dict.fromkeys(PLAIN_STEPS, 0.0)}
        for kind in args.certs.split(","):
            runs = [measure(workdir, kind, args.sessions, True) for _ in range(args.runs)]
            name = f"STARTTLS {kind}"
            columns[name] = {step: statistics.median(run[0][i] for run in runs) for i, step in enumerate(TLS_STEPS)}
            openssl[name] = {step: statistics.median(run[1][i] for run in runs) for i, step in enumerate(TLS_STEPS)}
    names = list(columns)
    print("each step: its CPU (of which inside OpenSSL)")
    print(f"{'step':<18}" + "".join(f"{name:>20}" for name in names))

    def cell(name, step):
        if step not in columns[name]:
            return f"{'':>20}"
        inside = openssl[name][step] * 1e6
        return f"{columns[name][step] * 1e6:>13.0f}" + (f" ({inside:>4.0f})" if name != "plain" else f"{'':>7}")

    for step in TLS_STEPS:
        print(f"{step:<18}" + "".join(cell(n, step) for n in names))
    totals = {n: sum(columns[n].values()) for n in names}
    in_openssl = {n: sum(openssl[n].values()) for n in names}
    print(f"{'total':<18}" + "".join(f"{totals[n] * 1e6:>20.0f}" for n in names))
    print(f"{'  in OpenSSL':<18}" + "".join(f"{in_openssl[n] * 1e6:>20.0f}" for n in names))
    print(f"{'  the rest':<18}" + "".join(f"{(totals[n] - in_openssl[n]) * 1e6:>20.0f}" for n in names))
    for n in names[1:]:
        extra = totals[n] - totals["plain"]
        print(f"{n}: +{extra * 1e6:.0f} us a session over plain, of which OpenSSL {in_openssl[n] * 1e6:.0f} us, "
              f"the rest {(extra - in_openssl[n]) * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
