#!/usr/bin/env python3
"""A burst of TLS handshakes ready at once in one worker's session loop (issue 16, review5).

    python3 bench/handshake_burst.py [--sessions 500] [--certs rsa,ecdsa] [--runs 3]

The worker's own SessionLoop, turned round by round (SessionLoop.turn: select,
the cheap work, then handshake steps within HANDSHAKE_BUDGET, the rest left
for the next rounds) over N SMTPConnections on real TCP sockets on 127.0.0.1
(implicit TLS: each session's first input is its client's ClientHello). All
N ClientHellos are sent before the first round; the clients are in this
process (SSLObjects over memory buffers) and do nothing while a round runs.
Measured until every session has answered its ClientHello (ServerHello ...
server Finished): the rounds' CPU time (time.process_time, inside turn()
only) and wall time, the number of rounds, the selector events those rounds
got back, and the longest round (what a plain client's command waits behind
the burst at worst). Medians over the runs; full handshakes, no resumption.
"""

import argparse
import os
import select
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backupmx import tls  # noqa: E402
from backupmx.config import load_config  # noqa: E402
from backupmx.connection_context import ConnectionContext  # noqa: E402
from backupmx.log import defer_writes, flush_pending, setup_logging  # noqa: E402
from backupmx.worker import SessionLoop  # noqa: E402
from tls_steps import NoDNS, make_certificate  # noqa: E402

MAX_SESSIONS = 2000  # two sockets each in this process


class Counted:
    """The loop's selector, counting the events its select() returns."""

    def __init__(self, selector):
        self.selector, self.events = selector, 0

    def select(self, timeout=None):
        ready = self.selector.select(timeout)
        self.events += len(ready)
        return ready

    def __getattr__(self, name):
        return getattr(self.selector, name)


def burst(workdir, server_ctx, sessions):
    """One burst: {cpu, wall, rounds, events, longest} (seconds, counts)."""
    cfg = Path(workdir) / "bench.ini"
    cfg.write_text(f"[backupmx]\nhostname = mx2.bench\nqueue = {workdir}/q.db\n"
                   "[domain:example.com]\nprimary = 127.0.0.1:25\nprimary_tls = none\nrecipients = *\n")
    logger = setup_logging(str(Path(workdir) / "bench.log"))
    defer_writes(True)
    context = ConnectionContext(config=load_config(cfg), ssl_context=server_ctx, logger=logger, resolver=NoDNS())
    loop = SessionLoop(None, context, logger)
    loop.selector = Counted(loop.selector)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    clients, waiting = [], select.poll()
    try:
        with socket.create_server(("127.0.0.1", 0), backlog=sessions) as listener:
            for _ in range(sessions):
                sock = socket.create_connection(listener.getsockname(), timeout=10)
                server_sock, peer = listener.accept()
                conn = loop.add_session(server_sock, peer, implicit_tls=True)
                hello = client_ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="mx.bench")
                try:
                    hello.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                sock.sendall(out.read())
                clients.append((sock, hello, conn))
                waiting.register(sock, select.POLLIN)
            arrived = select.poll()
            for _, _, conn in clients:
                arrived.register(conn.sock, select.POLLIN)
            deadline = time.monotonic() + 30
            while len(arrived.poll(100)) < sessions:  # every ClientHello is there before the first round
                if time.monotonic() > deadline:
                    raise TimeoutError("the ClientHellos did not arrive")
            while not all(conn.client.done for _, _, conn in clients):  # their connect-time lookups: not the burst's
                if time.monotonic() > deadline:
                    raise TimeoutError("the clients' lookups did not end")
                time.sleep(0.005)
                loop.answer_offloaded()
            loop.apply_interest()
            flush_pending()  # the sessions' connect lines, too
            left, cpu, wall, rounds, longest = sessions, 0.0, 0.0, 0, 0.0
            while left:
                started, started_cpu = time.perf_counter(), time.process_time()
                loop.turn()
                spent = time.perf_counter() - started
                cpu += time.process_time() - started_cpu
                wall += spent
                longest = max(longest, spent)
                rounds += 1
                for fd, _ in waiting.poll(0):
                    waiting.unregister(fd)
                    left -= 1
                if rounds > 100 * sessions:
                    raise RuntimeError("the burst was not served")
            return {"cpu": cpu, "wall": wall, "rounds": rounds, "events": loop.selector.events,
                    "longest": longest}
    finally:
        for sock, _, _ in clients:
            sock.close()
        loop.close_all()
        context.close()
        flush_pending()
        defer_writes(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=500, help=f"handshakes in the burst (default 500, at most "
                                                                   f"{MAX_SESSIONS})")
    parser.add_argument("--certs", default="rsa,ecdsa", help="comma list of rsa,ecdsa")
    parser.add_argument("--runs", type=int, default=3, help="bursts per certificate, median reported (default 3)")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS:
        parser.error(f"--sessions: 1 to {MAX_SESSIONS}")
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    print(f"backupmx {commit}, {ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"a burst of {args.sessions} ClientHellos x {args.runs} runs, medians")
    print(f"{'cert':<6}{'loop CPU ms':>12}{'wall ms':>10}{'CPU/handshake us':>18}{'rounds':>8}{'events':>9}"
          f"{'longest round ms':>18}")
    with tempfile.TemporaryDirectory() as root:
        for kind in args.certs.split(","):
            server_ctx = tls.server_context(*make_certificate(root, kind))
            runs = [burst(tempfile.mkdtemp(dir=root), server_ctx, args.sessions) for _ in range(args.runs)]

            def median(key):
                return statistics.median(run[key] for run in runs)

            print(f"{kind:<6}{median('cpu') * 1e3:>12.0f}{median('wall') * 1e3:>10.0f}"
                  f"{median('cpu') / args.sessions * 1e6:>18.0f}{median('rounds'):>8.0f}{median('events'):>9.0f}"
                  f"{median('longest') * 1e3:>18.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
