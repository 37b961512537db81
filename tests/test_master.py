"""The pre-fork master and the worker loop, with real processes and sockets.

Two kinds of test:

- "stub" tests run the real master (this file run as a script: `stub-master`)
  on a real config and queue, with StubConnection below as the workers'
  session driver (serve's one seam, `connection_class`), so that supervision
  (respawn, hung workers, limits, drain) is tested on its own with a toy
  protocol that can report its pid, crash and hang on demand;
- "real" tests start `python3 backupmx.py serve` through conftest's
  server_factory and talk SMTP with smtplib.
"""

import logging
import os
import re
import selectors
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from backupmx import flusher as flusher_module, replies  # noqa: E402
from conftest import (banner_ready, children_of, end_process_group, free_port, read_line, wait_for,  # noqa: E402
                      write_config)


# -- a toy session driver ----------------------------------------------------------------


class StubConnection:
    """Same interface as backupmx.connection.SMTPConnection, a toy protocol.

    "220 test" banner; every line gets "250 ok"; QUIT -> "221 bye" and close;
    PID -> "250 <worker pid>"; SOCKET -> its socket's state; CRASH raises (a bug in one session); HANG
    blocks the whole worker (a bug that never returns); STOPPING -> "250 1"
    once begin_shutdown was called, else "250 0";
    MAIL starts a "transaction", DATA ends it; begin_shutdown -> "421 4.3.2
    stopping" at once when no transaction is open, else right after DATA's reply;
    on_timeout -> "421 4.4.2 timeout" and close.
    """

    def __init__(self, sock, peer, ctx, implicit_tls=False):
        self.sock = sock
        self.peer = peer
        self.closed = False
        self.quitting = False
        self.stopping = False
        self.in_transaction = False
        self.inbuf = b""
        self.out = bytearray(b"220 test tls=%d\r\n" % implicit_tls)
        self.timeout = ctx.config.timeout
        self.deadline = time.monotonic() + self.timeout
        self.handshaking = False  # no TLS: every input is cheap

    def interest(self):
        if self.closed:
            return 0
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)

    def on_readable(self):
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.inbuf += data
        while b"\r\n" in self.inbuf and not self.quitting:
            line, self.inbuf = self.inbuf.split(b"\r\n", 1)
            self.command(line.decode())
        self.deadline = time.monotonic() + self.timeout
        self.on_writable()

    def command(self, line):
        if line == "CRASH":
            raise RuntimeError("stub crash")
        if line == "HANG":
            hang_the_worker()
        if line == "STOPPING":
            self.out += b"250 %d\r\n" % self.stopping
            return
        if line.startswith("MAIL"):
            self.in_transaction = True
        if self.stopping and not self.in_transaction:
            self.out += b"421 4.3.2 stopping\r\n"
            self.quitting = True
        elif line == "DATA":
            self.in_transaction = False
            self.out += b"250 ok\r\n"
            if self.stopping:
                self.out += b"421 4.3.2 stopping\r\n"
                self.quitting = True
        elif line == "QUIT":
            self.out += b"221 bye\r\n"
            self.quitting = True
        elif line == "PID":
            self.out += b"250 %d\r\n" % os.getpid()
        elif line == "SOCKET":  # how the worker got the socket: non-blocking, Nagle, send buffer
            self.out += b"250 timeout=%r nodelay=%d sndbuf=%d\r\n" % (
                self.sock.gettimeout(), self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        else:
            self.out += b"250 ok\r\n"

    def on_writable(self):
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            del self.out[:sent]
        if self.quitting and not self.out:
            self.close()

    def on_timeout(self):
        self.out += b"421 4.4.2 timeout\r\n"
        self.quitting = True
        self.on_writable()
        self.close()

    def begin_shutdown(self, grace=30.0):
        self.stopping = True
        if not self.in_transaction:
            self.out += b"421 4.3.2 stopping\r\n"
            self.quitting = True
            self.on_writable()

    outcomes = ()  # nothing to commit: the toy protocol queues no mail

    def close(self):
        if not self.closed:
            self.closed = True
            self.sock.close()


def hang_the_worker():
    """Stuck for good (until the master aborts the worker): the frame the log must show."""
    while True:
        time.sleep(60)


def stub_master_main(config_path):
    """`python3 tests/test_master.py stub-master CONFIG`: the real master, stub sessions."""
    from backupmx import master
    from backupmx.config import load_config

    return master.serve(load_config(config_path), connection_class=StubConnection)


def broken_flush_worker(config, owner, should_stop, *, ready):
    """A flush worker that cannot start: what a broken installation gives."""
    import backupmx_no_such_module  # noqa: F401


def broken_flusher_master_main(config_path):
    """`... broken-flusher CONFIG`: the real master (and SMTP workers) with broken_flush_worker."""
    from backupmx import master
    from backupmx.config import load_config
    from backupmx.startup import ServeError

    try:
        return master.serve(load_config(config_path), flush_worker=broken_flush_worker)
    except ServeError as exc:
        print(f"backupmx: {exc}", file=sys.stderr)  # what the CLI does with it
        return 1


def slow_dns_master_main(config_path):
    """`... slow-dns CONFIG`: the real server, whose DNS answers wait, once CONFIG.slow exists, until
    CONFIG.answer does (CONFIG.looking says one is waiting), never come for a name ending in
    "hang.invalid", and for one ending in "later.invalid" are errors until CONFIG.resolvable exists."""
    from backupmx import master, primaries
    from backupmx.config import load_config

    def slow(host, port):
        if host.endswith("hang.invalid"):
            time.sleep(3600)
        if host.endswith("later.invalid") and not os.path.exists(config_path + ".resolvable"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if os.path.exists(config_path + ".slow"):  # (the lookups run in a child: no counting in memory)
            Path(config_path + ".looking").touch()
            for _ in range(1000):  # bounded: 10 s
                if os.path.exists(config_path + ".answer"):
                    break
                time.sleep(0.01)
        return ("127.0.0.1",)

    primaries.resolve = slow
    primaries.pin.__kwdefaults__["resolver"] = slow  # wherever the lookups run
    return master.serve(load_config(config_path))


# -- helpers ----------------------------------------------------------------------


def connect(port, host="127.0.0.1"):
    s = socket.create_connection((host, port), timeout=5)
    return s


def talk(sock, line):
    sock.sendall(line.encode() + b"\r\n")
    return read_line(sock)


class StubServer:
    def __init__(self, tmp_path, env=None, **config):
        self.port = free_port()
        self.log_path = tmp_path / "stub-master.log"
        config_path = write_config(tmp_path / "stub.ini", port=self.port, queue=tmp_path / "queue.db", **config)
        full_env = dict(os.environ, PYTHONPATH=str(REPO))
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "stub-master", str(config_path)],
                cwd=str(tmp_path),  # where a core file would go, if the system writes them
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=full_env,
                start_new_session=True,
            )
        if not wait_for(lambda: self.proc.poll() is not None or self.answers(), 10, 0.01) or self.proc.poll() is not None:
            raise AssertionError("stub master did not start:\n" + self.log())

    def answers(self):
        """A banner comes; the probe session is then ended and seen to end."""
        try:
            with connect(self.port) as s:
                if not read_line(s, 0.5).startswith(b"220"):
                    return False
                talk(s, "QUIT")
                return read_line(s, 2) == b""
        except OSError:
            return False

    def open_sessions(self, count):
        """`count` sessions that all got their banner.

        The master counts a session until the worker's "closed" reaches it, so
        right after the start-up probe a limit may still count that one: then
        close these and try again, until the count has settled.
        """
        def attempt():
            socks = [connect(self.port) for _ in range(count)]
            if all(read_line(s).startswith(b"220") for s in socks):
                return socks
            for s in socks:
                s.close()
            return None

        socks = wait_for(attempt, 5, 0.05)
        assert socks, "the sessions of the start-up probe were never released"
        return socks

    def log(self):
        return self.log_path.read_text(errors="replace")

    def workers(self):
        return children_of(self.proc.pid)

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def stub_server(tmp_path):
    started = []

    def factory(env=None, **config):
        s = StubServer(tmp_path, env, **config)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.close()


def pid_of_session(sock):
    return int(talk(sock, "PID").split()[1])


# -- the worker loop alone (forked, stub sessions, a SEQPACKET control pair) ---------


class ForkedWorker:
    """run_worker() in a child process, driven over its control socket like the master does."""

    def __init__(self, tmp_path, grace=5.0, close_after=5.0, timeout=30.0):
        import logging

        from backupmx import worker
        from backupmx.config import load_config

        config = load_config(write_config(tmp_path / "worker.ini", port=free_port(), queue=tmp_path / "queue.db",
                                          timeout=timeout))
        self.ctrl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child
            try:
                self.ctrl.close()
                worker.DRAIN_GRACE = grace
                worker.DRAIN_CLOSE = close_after
                worker.run_worker(child, config, None, logging.getLogger("backupmx"), connection_class=StubConnection)
            finally:
                os._exit(99)
        child.close()
        self.ctrl.settimeout(5)
        self.messages = []

    def hand(self, tls=False):
        """A connected client socket whose server side now lives in the worker."""
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server_side, addr = listener.accept()
        listener.close()
        header = f"conn {'tls' if tls else 'plain'} {addr[0]} {addr[1]}".encode()
        socket.send_fds(self.ctrl, [header], [server_side.fileno()])
        server_side.close()
        return client

    def next_message(self, prefix, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, m in enumerate(self.messages):
                if m.startswith(prefix):
                    return self.messages.pop(i)
            self.ctrl.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.ctrl.recv(256)
            except socket.timeout:
                break
            if not data:
                break
            self.messages.append(data.decode())
        return None

    def wait_exit(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        return None

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def forked_worker(tmp_path):
    made = []

    def factory(**kw):
        w = ForkedWorker(tmp_path, **kw)
        made.append(w)
        return w

    yield factory
    for w in made:
        w.kill()


def test_worker_serves_many_sessions_and_reports_closed(forked_worker):
    w = forked_worker()
    clients = [w.hand(tls=(i == 2)) for i in range(3)]
    assert [read_line(c) for c in clients] == [b"220 test tls=0\r\n", b"220 test tls=0\r\n", b"220 test tls=1\r\n"]
    assert all(talk(c, "NOOP") == b"250 ok\r\n" for c in clients)
    assert talk(clients[0], "QUIT") == b"221 bye\r\n"
    assert w.next_message("closed ") == "closed 127.0.0.1"
    assert w.next_message("hb ") is not None
    for c in clients:
        c.close()


def test_worker_reports_the_sessions_one_round_ended_in_one_message(forked_worker):
    """A "stop" ends every idle session in the same loop round: one "closed" names them all
    (the master reads each ip: test_master_counts_every_ip_of_a_closed_message)."""
    w = forked_worker()
    clients = [w.hand() for _ in range(3)]
    assert all(read_line(c).startswith(b"220") for c in clients)
    w.ctrl.send(b"stop")
    assert w.next_message("closed ") == "closed 127.0.0.1 127.0.0.1 127.0.0.1"
    assert w.wait_exit() == 0
    for c in clients:
        c.close()


def test_master_counts_every_ip_of_a_closed_message(tmp_path):
    """The master's side of the batched "closed": each ip of the message ends one session."""
    from backupmx import master, smtp_workers
    from backupmx.config import load_config

    config = load_config(write_config(tmp_path / "m.ini", port=free_port(), queue=tmp_path / "queue.db"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    m = master.Master(config, None, logging.getLogger("backupmx"))
    try:
        w = smtp_workers.WorkerHandle(0, ours, 0)
        for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
            w.sessions += 1
            w.clients[ip] += 1
            m.clients.opened(ip)
        theirs.send(b"closed 192.0.2.1 192.0.2.2")
        m.smtp_workers.read(w)
        assert (w.sessions, dict(w.clients), m.clients.of("192.0.2.1"), m.clients.of("192.0.2.2")) == \
            (1, {"192.0.2.1": 1}, 1, 0)
    finally:
        m.selector.close()
        m.wakeup_r.close()
        m.wakeup_w.close()
        ours.close()
        theirs.close()


def test_worker_one_crashing_session_does_not_end_the_others(forked_worker):
    w = forked_worker()
    a, b = w.hand(), w.hand()
    read_line(a), read_line(b)
    a.sendall(b"CRASH\r\n")
    assert read_line(a) == b""  # that session is closed
    assert w.next_message("closed ") == "closed 127.0.0.1"
    assert talk(b, "NOOP") == b"250 ok\r\n"


def test_worker_drain_lets_sessions_finish_then_exits(forked_worker):
    w = forked_worker(grace=10)
    a = w.hand()
    read_line(a)
    w.ctrl.send(b"drain")
    assert talk(a, "MAIL FROM:<a@b>") == b"250 ok\r\n"  # still served while draining
    assert w.wait_exit(0.3) is None
    assert talk(a, "QUIT") == b"221 bye\r\n"
    assert w.wait_exit(3) == 0


def test_worker_drain_is_bounded(forked_worker):
    # A grace far above the bound: "at once" (a loaded machine's fork and exit included) and
    # "after the grace" cannot be taken for each other (with grace=0.3 and a 0.3 s bound they could).
    w = forked_worker(grace=5, close_after=5)
    a = w.hand()
    read_line(a)
    started = time.monotonic()
    w.ctrl.send(b"stop")
    assert read_line(a) == b"421 4.3.2 stopping\r\n"  # idle: begin_shutdown at once
    assert w.wait_exit(3) == 0
    assert time.monotonic() - started < 2


def test_worker_stop_lets_the_transaction_finish_then_closes(forked_worker):
    w = forked_worker(grace=1, close_after=0.2)
    a, b = w.hand(), w.hand()
    read_line(a), read_line(b)
    talk(a, "MAIL FROM:<a@b>")
    talk(b, "MAIL FROM:<a@b>")
    started = time.monotonic()
    w.ctrl.send(b"stop")
    assert talk(a, "RCPT TO:<c@d>") == b"250 ok\r\n"
    assert talk(a, "DATA") == b"250 ok\r\n"
    assert read_line(a) == b"421 4.3.2 stopping\r\n"  # after the transaction
    # b never finishes its transaction: closed at DRAIN_GRACE + DRAIN_CLOSE.
    assert read_line(b, 5) == b""
    assert 1.0 <= time.monotonic() - started < 2.5
    assert w.wait_exit(3) == 0


def test_worker_gentle_drain_is_bounded(forked_worker):
    w = forked_worker(grace=0.3, close_after=0.3)
    a = w.hand()
    read_line(a)
    started = time.monotonic()
    w.ctrl.send(b"drain")
    assert read_line(a) == b"421 4.3.2 stopping\r\n"  # begin_shutdown only after DRAIN_GRACE
    assert 0.25 < time.monotonic() - started < 1.5
    assert w.wait_exit(3) == 0


def test_worker_exits_when_master_goes_away(forked_worker):
    w = forked_worker(grace=0.2, close_after=0.2)
    a = w.hand()
    read_line(a)
    w.ctrl.close()  # EOF on the control socket
    assert w.wait_exit(3) == 0
    assert read_line(a) in (b"421 4.3.2 stopping\r\n", b"")


def test_worker_honours_session_deadlines(forked_worker):
    w = forked_worker(timeout=0.3)
    started = time.monotonic()  # before the hand-over: the session's deadline runs from after it
    a = w.hand()
    read_line(a)
    assert read_line(a) == b"421 4.4.2 timeout\r\n"
    assert 0.2 < time.monotonic() - started < 1.5
    assert w.next_message("closed ") == "closed 127.0.0.1"


# -- the master with stub sessions ---------------------------------------------------------


def test_stub_master_banner_and_workers(stub_server):
    srv = stub_server(workers=2, max_workers=2, flush_workers=1)
    assert wait_for(lambda: len(srv.workers()) == 4, 5)  # and one flush worker, the checkpointer
    with connect(srv.port) as s:
        assert read_line(s) == b"220 test tls=0\r\n"
        assert talk(s, "QUIT") == b"221 bye\r\n"


def test_sessions_get_a_prepared_socket(stub_server, forked_worker):
    """client_socket.prepare_socket: the master readies the socket before the hand-off (non-blocking,
    no Nagle, SEND_BUFFER; the worker's session driver, a stub here, does none of it), and
    names its family so the worker asks the kernel nothing; a hand-off without the family
    (an older master) is prepared by the worker."""
    from backupmx.client_socket import SEND_BUFFER

    prepared = f"250 timeout=0.0 nodelay=1 sndbuf={2 * SEND_BUFFER}\r\n".encode()  # Linux doubles SO_SNDBUF
    srv = stub_server()
    with connect(srv.port) as s:
        read_line(s)
        assert talk(s, "SOCKET") == prepared
    w = forked_worker()
    c = w.hand()
    read_line(c)
    assert talk(c, "SOCKET") == prepared
    c.close()


def test_stub_master_tls_listener_flag(stub_server, certs):
    tls_port = free_port()
    stub_server(tls_port=tls_port, certs=certs)
    with connect(tls_port) as s:
        assert read_line(s) == b"220 test tls=1\r\n"


def test_killed_worker_is_replaced(stub_server):
    srv = stub_server(workers=1, max_workers=1)
    with connect(srv.port) as s:
        read_line(s)
        victim = pid_of_session(s)
        os.kill(victim, signal.SIGKILL)
        assert read_line(s) == b""
    assert wait_for(lambda: srv.workers() and victim not in srv.workers(), 5)
    assert wait_for(srv.answers, 5)
    assert f"worker-died pid={victim}" in srv.log()


def test_hung_worker_is_aborted_and_its_stack_reaches_the_log(stub_server):
    srv = stub_server(workers=1, max_workers=1, env={"BACKUPMX_HEARTBEAT_TIMEOUT": "1"})
    with connect(srv.port) as s:
        read_line(s)
        victim = pid_of_session(s)
        s.sendall(b"HANG\r\n")
        assert wait_for(lambda: "worker-hung pid=%d" % victim in srv.log(), 5)
        assert read_line(s) == b""  # SIGABRT ended it
    assert wait_for(lambda: f"worker-died pid={victim} status=signal-{signal.SIGABRT.value}" in srv.log(), 5)
    log = srv.log()
    assert "Fatal Python error: Aborted" in log and "in hang_the_worker" in log  # faulthandler's dump
    assert f"worker-killed pid={victim}" not in log  # it went on SIGABRT
    assert wait_for(srv.answers, 5)


def test_hung_worker_that_ignores_sigabrt_is_killed_and_replaced(stub_server):
    srv = stub_server(workers=1, max_workers=1, env={"BACKUPMX_HEARTBEAT_TIMEOUT": "1"})
    with connect(srv.port) as s:
        read_line(s)
        victim = pid_of_session(s)
    os.kill(victim, signal.SIGSTOP)  # a stopped process takes no SIGABRT, only SIGKILL
    started = time.monotonic()
    assert wait_for(lambda: "worker-hung pid=%d" % victim in srv.log(), 5)
    assert wait_for(lambda: f"worker-killed pid={victim}" in srv.log(), 5)
    assert wait_for(lambda: srv.workers() and victim not in srv.workers(), 5)
    assert wait_for(srv.answers, 5)
    assert time.monotonic() - started < 6


def test_per_client_limit(stub_server):
    srv = stub_server(max_connections_per_client=2)
    a, b = srv.open_sessions(2)
    with connect(srv.port) as c:
        assert read_line(c) == replies.TOO_MANY_CONNECTIONS.render(hostname="mx2.test")
        assert read_line(c) == b""
    talk(a, "QUIT")
    read_line(a)
    a.close()
    assert wait_for(srv.answers, 5)  # the slot is free again
    b.close()
    assert "reject client=127.0.0.1 command=CONNECT reason=too_many_connections" in srv.log()


def test_busy_when_every_worker_is_full(stub_server):
    srv = stub_server(workers=1, max_workers=1, env={"BACKUPMX_SESSIONS_PER_WORKER": "2"})
    a, b = srv.open_sessions(2)
    with connect(srv.port) as c:
        assert read_line(c) == replies.BUSY.render(hostname="mx2.test")
    talk(a, "QUIT")
    read_line(a)
    a.close()
    assert wait_for(srv.answers, 5)
    b.close()
    assert "reject client=127.0.0.1 command=CONNECT reason=busy" in srv.log()


def test_extra_workers_spawned_when_busy(stub_server):
    srv = stub_server(workers=1, max_workers=3, env={"BACKUPMX_SPAWN_THRESHOLD": "2"})
    socks = [connect(srv.port) for _ in range(6)]
    assert all(read_line(s).startswith(b"220") for s in socks)
    pids = {pid_of_session(s) for s in socks}
    assert len(pids) == 3
    for s in socks:
        # EOF after QUIT: a worker forked while a connection was being handed
        # over must not keep a copy of that client's socket.
        assert talk(s, "QUIT") == b"221 bye\r\n"
        assert read_line(s, 2) == b""
        s.close()


def test_new_sessions_fill_one_worker_before_the_next(stub_server):
    """BACKUPMX_PACK_SESSIONS: the busiest worker below it gets the next session (one group
    commit serves more of them), not the least loaded: runs of sessions in one worker, not
    turns. (The start-up probe may still be counted on one worker: hence no exact split.)"""
    srv = stub_server(workers=2, max_workers=2, env={"BACKUPMX_PACK_SESSIONS": "6"})
    socks = [connect(srv.port) for _ in range(6)]
    assert all(read_line(s).startswith(b"220") for s in socks)
    pids = [pid_of_session(s) for s in socks]
    changes = sum(a != b for a, b in zip(pids, pids[1:]))
    assert changes <= 2, pids  # taking turns: 4 or 5
    for s in socks:
        s.close()


def test_sigterm_idle_exits_quickly(stub_server):
    srv = stub_server()
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(5) == 0
    assert time.monotonic() - started < 2
    assert wait_for(lambda: not children_alive(srv.proc.pid), 3)


def children_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_lets_a_session_finish(stub_server):
    srv = stub_server(env={"BACKUPMX_DRAIN_GRACE": "20"})
    s = connect(srv.port)
    read_line(s)
    talk(s, "MAIL FROM:<a@b>")
    srv.proc.send_signal(signal.SIGTERM)
    # New connections are refused once the listeners are closed.
    assert wait_for(lambda: not srv.answers(), 3)
    # The stop has reached the worker, and the master waits for the transaction.
    assert wait_for(lambda: talk(s, "STOPPING") == b"250 1\r\n", 3)
    assert srv.proc.poll() is None
    assert talk(s, "DATA") == b"250 ok\r\n"
    assert read_line(s) == b"421 4.3.2 stopping\r\n"
    assert srv.proc.wait(5) == 0


def test_sigint_is_a_stop_too(stub_server):
    srv = stub_server()
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(5) == 0


# -- the real server -----------------------------------------------------------------


def test_real_banner_on_each_listener(server_factory, certs):
    srv = server_factory(tls=True, listen_tls=True, certs=certs)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=5) as c:
        code, text = c.ehlo("client.test")
        assert code == 250
        assert b"STARTTLS" in text
    context = ssl.create_default_context(cafile=certs["ca"])
    with smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, timeout=5, context=context) as c:
        code, _ = c.noop()
        assert code == 250
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        assert read_line(s).startswith(b"220 mx2.test")


def assert_queued(srv, reply_text):
    """The queue id the 250 named is in the queue."""
    queue_id = reply_text.decode().split()[-1]
    db = sqlite3.connect(srv.queue_path)
    try:
        assert db.execute("SELECT count(*) FROM queue WHERE queue_id = ?", (queue_id,)).fetchone()[0] == 1
    finally:
        db.close()


def test_real_tls_ticket_key_is_rotated_with_the_workers(server_factory, certs):
    """A TLS 1.2 session resumes (its ticket) until the master rotates the TLS context,
    not after; a rotation that cannot build a context keeps the old one; a transaction
    open across the rotation is still queued (its old worker drains: the reload path)."""
    srv = server_factory(tls=True, listen_tls=True, certs=certs, env={"BACKUPMX_TLS_TICKET_LIFETIME": "0.5"})
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(certs["ca"])
    client.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2: the tickets that lose forward secrecy

    def rotations():
        return srv.log().count("tls-keys-rotated")

    def handshake(session=None):
        with socket.create_connection(("127.0.0.1", srv.tls_port), timeout=5) as raw:
            with client.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                return s.session, s.session_reused

    in_flight = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    in_flight.ehlo("client.test")
    assert in_flight.mail("a@sender.test")[0] == 250
    assert in_flight.rcpt("someone@example.com")[0] == 250
    for _ in range(5):  # the pair must fall within one key's life (0.5 s here)
        seen = rotations()
        session, _ = handshake()
        _, reused = handshake(session)
        if rotations() == seen:
            assert reused
            break
    else:
        pytest.fail("no two handshakes within one ticket key's life")
    assert wait_for(lambda: rotations() > seen, 5)
    assert not handshake(session)[1]  # a new key: the old ticket is refused, a full handshake
    Path(certs["server_key"]).write_text("not a key\n")  # from now on every rebuild fails
    assert wait_for(lambda: "tls-keys-rotation-failed" in srv.log(), 5)
    assert handshake(handshake()[0])[1]  # the context in place goes on serving, tickets and all
    assert srv.proc.poll() is None
    code, text = in_flight.data(b"Subject: across a rotation\r\n\r\nhello\r\n")
    assert code == 250, text
    in_flight.quit()
    assert_queued(srv, text)


def test_real_master_holds_no_sqlite_fd(server):
    assert wait_for(lambda: len(server.children()) >= 2, 5)
    fds = os.listdir(f"/proc/{server.pid}/fd")
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/{server.pid}/fd/{fd}"))
        except OSError:
            pass
    assert not [t for t in targets if "queue.db" in t], targets
    assert Path(server.queue_path).exists()  # the master did apply the schema


def test_real_sigterm_with_transaction_in_flight(server_factory):
    srv = server_factory(env={"BACKUPMX_DRAIN_GRACE": "20"})
    c = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    c.ehlo("client.test")
    assert c.mail("a@sender.test")[0] == 250
    assert c.rcpt("someone@example.com")[0] == 250
    srv.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: not banner_ready(srv.port), 5)  # the master has taken the SIGTERM
    code, text = c.data(b"Subject: t\r\n\r\nhello\r\n")
    assert code == 250, text
    c.quit()
    assert srv.proc.wait(10) == 0


def test_real_sighup_reload(server_factory, tmp_path):
    srv = server_factory()
    before = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    assert before.ehlo("x")[0] == 250
    cfg = Path(srv.config_path)
    cfg.write_text(cfg.read_text().replace("hostname = mx2.test", "hostname = mx3.test"))
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reloaded" in srv.log(), 5)

    def banner():
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            return read_line(s)

    assert wait_for(lambda: banner().startswith(b"220 mx3.test"), 5)
    assert before.noop()[0] == 250  # the old session goes on (old settings)
    before.quit()
    # A broken config is refused; the running one stays.
    cfg.write_text(cfg.read_text().replace("[backupmx]", "[backupmx]\nbogus_key = 1"))
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload-failed" in srv.log(), 5)
    assert banner().startswith(b"220 mx3.test")


def test_real_inetd_session(tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "i.ini", port=free_port(), queue=tmp_path / "q.db", log=str(tmp_path / "i.log"))
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "backupmx.py"), "serve", "--inetd", "-c", str(cfg)],
        stdin=theirs,
        stdout=theirs,
        stderr=theirs,
        cwd=str(tmp_path),
    )
    theirs.close()
    try:
        assert read_line(ours).startswith(b"220 mx2.test")
        ours.sendall(b"QUIT\r\n")
        assert read_line(ours).startswith(b"221")
        assert proc.wait(5) == 0
        ours.settimeout(2)
        assert ours.recv(100) == b""  # nothing else ever written to the client
    finally:
        proc.kill()
        proc.wait()


def wake_ups(pid):
    """Times the process's threads gave up the CPU of their own accord (slept, waited) so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def test_real_sigterm_idle_exits_quickly_and_an_idle_flush_worker_sleeps(server):
    assert wait_for(lambda: len(server.children()) >= 3, 5)  # 2 workers + 1 flusher
    # Its looks for a flush (POLL_INTERVAL: 20 a second) wake it, its stop no more (it polled its
    # flag every 10 ms: ~120 wake-ups a second); the SIGTERM ends its pause at once.
    [flusher] = [int(pid) for pid in re.findall(r"flush-worker-started pid=(\d+)", server.log())]
    before, since = wake_ups(flusher), time.monotonic()
    time.sleep(0.5)
    rate = (wake_ups(flusher) - before) / (time.monotonic() - since)
    print(f"idle flush worker: {rate:.0f} wake-ups a second")
    assert rate < 2 / flusher_module.POLL_INTERVAL
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 2
    assert wait_for(lambda: not children_alive(server.pid), 3)
    assert "stopped" in server.log()


def test_real_port_in_use_is_one_line(server, tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "second.ini", port=server.port, queue=tmp_path / "q2.db")
    proc = subprocess.run(
        [sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(cfg)],
        capture_output=True, text=True, timeout=10,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"127.0.0.1:{server.port}" in proc.stderr and "in use" in proc.stderr


def test_real_systemd_socket_activation(tmp_path, certs):
    from conftest import banner_ready, write_config

    plain, tls = free_port(), free_port()
    configured = free_port()  # in the config, but the passed sockets win
    cfg = write_config(tmp_path / "a.ini", port=configured, queue=tmp_path / "q.db", tls_port=free_port(), certs=certs)
    log = open(tmp_path / "a.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "launch_activation.py"), "--plain", f"127.0.0.1:{plain}", "--tls",
         f"127.0.0.1:{tls}", "--", sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(cfg)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        assert wait_for(lambda: banner_ready(plain), 10), (tmp_path / "a.log").read_text()
        context = ssl.create_default_context(cafile=certs["ca"])
        with smtplib.SMTP_SSL("127.0.0.1", tls, timeout=5, context=context) as c:
            assert c.noop()[0] == 250
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", configured), timeout=1).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        end_process_group(proc)
        log.close()


def test_real_inetd_refuses_with_421_when_the_queue_cannot_open(tmp_path):
    from conftest import write_config

    cfg = write_config(tmp_path / "i.ini", port=free_port(), queue=tmp_path / "missing-dir" / "q.db",
                       log=str(tmp_path / "i.log"))
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "backupmx.py"), "serve", "--inetd", "-c", str(cfg)],
        stdin=theirs, stdout=theirs, stderr=theirs, cwd=str(tmp_path),
    )
    theirs.close()
    try:
        assert read_line(ours).startswith(b"421 4.3.0 mx2.test")
        assert proc.wait(5) == 1
        ours.settimeout(2)
        assert ours.recv(100) == b""
        assert "inetd-failed" in (tmp_path / "i.log").read_text()
    finally:
        proc.kill()
        proc.wait()


def test_real_500_idle_sessions_and_one_more_transaction(server_factory):
    srv = server_factory(max_connections_per_client=1000, max_workers=8, workers=2)
    socks = []
    try:
        for _ in range(500):
            socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        for s in socks:
            assert read_line(s, 10).startswith(b"220")
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as c:
            c.ehlo("client.test")
            c.mail("a@sender.test")
            c.rcpt("x@example.com")
            code, _ = c.data(b"Subject: 501\r\n\r\nhi\r\n")
            assert code == 250
    finally:
        for s in socks:
            s.close()


def test_a_flush_worker_that_cannot_start_fails_the_start_up(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "b.ini", port=port, queue=tmp_path / "q.db")
    proc = subprocess.run([sys.executable, __file__, "broken-flusher", str(cfg)], capture_output=True, text=True,
                          timeout=30, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("backupmx: a flush worker could not start: ModuleNotFoundError: "
                    "No module named 'backupmx_no_such_module'; not starting"), proc.stderr
    assert "flush-worker-boot-failed" in proc.stderr
    assert ": worker-started" not in proc.stderr and "server-started" not in proc.stderr  # never served
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def start_slow_dns_server(tmp_path, primary, settings=None, domain=None, **env):
    """slow_dns_master_main in a process group of its own: (process, port, config path, log path).
    `settings`: more write_config keywords; `domain`: more keys for example.com."""
    port = free_port()
    cfg = write_config(tmp_path / "s.ini", port=port, queue=tmp_path / "q.db",
                       domains={"example.com": {"primary": primary, "primary_tls": "none", **(domain or {})}},
                       **(settings or {}))
    log_path = tmp_path / "s.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, "slow-dns", str(cfg)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    return proc, port, cfg, log_path


def test_a_reload_s_slow_dns_lookups_do_not_hold_up_new_connections(tmp_path):
    proc, port, cfg, log_path = start_slow_dns_server(tmp_path, "localhost:2526")
    try:
        assert wait_for(lambda: banner_ready(port), 10), log_path.read_text()
        Path(str(cfg) + ".slow").touch()
        proc.send_signal(signal.SIGHUP)
        # The reload's lookups are under way, and stay so until the test lets them answer: the
        # connection is served meanwhile however slow the machine (a fixed 1 s lookup, a 0.1 s
        # sleep for it to start and a 0.7 s bound on the banner raced a loaded scheduler).
        assert wait_for(lambda: os.path.exists(str(cfg) + ".looking"), 10), log_path.read_text()
        with connect(port) as sock:
            assert read_line(sock).startswith(b"220")  # the master went on handing connections over
        assert "reloaded generation=1" not in log_path.read_text()  # the old configuration served it
        Path(str(cfg) + ".answer").touch()
        assert wait_for(lambda: "reloaded generation=1" in log_path.read_text(), 10)
        assert log_path.read_text().count("primary-pinned domain=example.com primary=localhost:2526") == 2
    finally:
        end_process_group(proc)


def test_start_up_dns_lookups_are_bounded_and_a_name_without_an_answer_defers_its_mail(tmp_path):
    """getaddrinfo has no timeout: a resolver that never answers must not keep the server from starting."""
    proc, port, _, log_path = start_slow_dns_server(tmp_path, "stuck.hang.invalid:25", BACKUPMX_LOOKUP_TIMEOUT="0.5")
    try:
        assert wait_for(lambda: banner_ready(port), 8), log_path.read_text()
        text = log_path.read_text()
        assert "primary-lookup-timeout seconds=0.5" in text
        assert ('primary-unresolved domain=example.com primary=stuck.hang.invalid:25 error="no answer in time" '
                'effect="mail stays queued until the name resolves"') in text
        assert proc.poll() is None and len(children_of(proc.pid)) == 4  # 2 SMTP workers, 1 flusher, the checkpointer: no lookup left
    finally:
        end_process_group(proc)


def test_a_primary_unresolved_at_start_up_is_looked_up_again_and_its_mail_goes_on_etrn(tmp_path, certs, sink):
    """DNS broken at boot: the master looks the name up again every BACKUPMX_UNRESOLVED_RETRY,
    pins it once it answers (no SIGHUP), and the mail queued meanwhile goes there on ETRN."""
    proc, port, cfg, log_path = start_slow_dns_server(
        tmp_path, f"mx.later.invalid:{sink.port}", BACKUPMX_UNRESOLVED_RETRY="0.2",
        settings={"certs": certs, "users": {"prim": ("{PLAIN}s3cret", "example.com")}})
    try:
        assert wait_for(lambda: banner_ready(port), 8), log_path.read_text()
        assert "primary-unresolved domain=example.com primary=mx.later.invalid" in log_path.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@origin.test", ["bob@example.com"], b"Subject: waited\r\n\r\nx\r\n")
        Path(str(cfg) + ".resolvable").touch()  # DNS is back
        resolved = f"primary-resolved domain=example.com primary=mx.later.invalid:{sink.port} addresses=127.0.0.1"
        assert wait_for(lambda: resolved in log_path.read_text(), 5), log_path.read_text()
        with smtplib.SMTP("localhost", port, timeout=10) as client:
            client.starttls(context=ssl.create_default_context(cafile=certs["ca"]))
            client.login("prim", "s3cret")
            assert client.docmd("ETRN", "example.com")[0] == 253
        assert sink.wait_for(1, timeout=5)[0][2].endswith(b"Subject: waited\r\n\r\nx\r\n")
        text = log_path.read_text()
        assert "reloaded" not in text and "generation=1" not in text  # the SMTP workers never use the pin here
    finally:
        end_process_group(proc)


def test_a_primary_resolved_later_reaches_the_smtp_workers_callouts(tmp_path, sink):
    """`recipients = verify`: the SMTP workers ask the primary, so they are replaced with the new pin."""
    proc, port, cfg, log_path = start_slow_dns_server(
        tmp_path, f"mx.later.invalid:{sink.port}", domain={"recipients": "verify", "verify_unreachable": "tempfail"},
        BACKUPMX_UNRESOLVED_RETRY="0.2")
    try:
        assert wait_for(lambda: banner_ready(port), 8), log_path.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.mail("a@origin.test")[0] == 250
            assert client.rcpt("bob@example.com")[0] == 450  # no address to ask
        Path(str(cfg) + ".resolvable").touch()
        assert wait_for(lambda: "worker-started" in log_path.read_text().partition("primary-resolved")[2], 5)
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.mail("a@origin.test")[0] == 250
            assert client.rcpt("bob@example.com")[0] == 250, log_path.read_text()  # the sink was asked, took it
    finally:
        end_process_group(proc)


if __name__ == "__main__":
    if sys.argv[1:2] == ["slow-dns"]:
        sys.exit(slow_dns_master_main(sys.argv[2]))
    if sys.argv[1:2] == ["stub-master"]:
        sys.exit(stub_master_main(sys.argv[2]))
    if sys.argv[1:2] == ["broken-flusher"]:
        sys.exit(broken_flusher_master_main(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} stub-master|broken-flusher CONFIG")


def test_the_listening_line_names_starttls_only_with_a_certificate():
    """review-1 m9: a plain listener without tls_cert offers no STARTTLS, and its log line says so."""
    from backupmx.listeners import Listener

    plain, implicit = Listener(("127.0.0.1", 0), None, False), Listener(("127.0.0.1", 0), None, True)
    try:
        assert plain.log_fields(False)["tls"] == "none" and plain.log_fields(True)["tls"] == "starttls"
        assert implicit.log_fields(True)["tls"] == "implicit"
    finally:
        plain.server_close()
        implicit.server_close()


def test_real_a_rotation_does_not_hurry_a_slow_client_but_a_stop_still_does(server_factory, certs):
    """The hourly rotation's old worker "retires": a transaction that outlasts a reload's
    DRAIN_GRACE + DRAIN_CLOSE (0.4 s here) is not cut off, and its message is queued; a
    SIGTERM afterwards still reaches that worker and ends the server within its bound."""
    srv = server_factory(tls=True, certs=certs, env={"BACKUPMX_TLS_TICKET_LIFETIME": "0.3",
                                                     "BACKUPMX_DRAIN_GRACE": "0.2", "BACKUPMX_DRAIN_CLOSE": "0.2"})
    slow = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    slow.ehlo("client.test")
    assert slow.mail("a@sender.test")[0] == 250
    assert slow.rcpt("someone@example.com")[0] == 250
    assert slow.docmd("DATA")[0] == 354
    slow.send(b"Subject: slow\r\n\r\nfirst half\r\n")
    seen = srv.log().count("tls-keys-rotated")
    assert wait_for(lambda: srv.log().count("tls-keys-rotated") >= seen + 2, 5)  # two retirements since
    time.sleep(0.6)  # past DRAIN_GRACE + DRAIN_CLOSE of the first (what must NOT happen cannot be waited for)
    slow.send(b"second half\r\n.\r\n")
    code, text = slow.getreply()
    assert code == 250, text
    assert_queued(srv, text)
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - started < 3.0  # STOP_TIMEOUT would be 5.4 s: the retiring worker heard the stop
    slow.close()
