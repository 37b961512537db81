"""SMTP load for the benchmarks (backlog.py, tls.py): plain or STARTTLS, from several processes.

Not a script of its own. run_load() forks `processes` processes; each runs
its share of `sessions` threads, and each thread is one client connection
after another: banner, EHLO, [STARTTLS, EHLO], then `per_connection`
messages (MAIL, RCPT, DATA and the body, waiting for each reply: no
pipelining, as smtp-source sends them), then QUIT. per_connection = 0 makes
a connection that only says EHLO (and STARTTLS) and QUIT: handshakes/s.

Blocking sockets and threads rather than asyncio: the ssl module releases
the GIL while OpenSSL computes a handshake or a record, and only a blocking
client can offer the previous connection's TLS session for resumption
(SSLContext.wrap_socket(session=...); asyncio's start_tls takes no session).

Measured per message: end of data ("." sent) to its 250 (what the commit
costs), and MAIL to that 250 (a whole transaction); per connection the
STARTTLS handshake's time and whether the session was resumed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

LOCAL = "127.0.0.1"
SENDER = "from@x.test"


def body_2k(n: int, rcpt: str = "bob@example.com", size: int = 2048) -> bytes:
    """A message of about `size` bytes: a small header and 80-octet lines (peers.py's body)."""
    head = f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: load {n}\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class ReplyError(Exception):
    """The server answered something the client did not expect."""


@dataclass
class LoadResult:
    """What every client of one run saw."""

    messages: int = 0  # 250 after the end of data
    connections: int = 0  # connections that ended with QUIT's 221 (or were refused cleanly)
    handshakes: int = 0  # STARTTLS handshakes completed
    resumed: int = 0  # of which resumed a previous session
    errors: int = 0
    samples: list[str] = field(default_factory=list)  # the first few errors
    eod: list[float] = field(default_factory=list)  # seconds, end of data -> 250
    txn: list[float] = field(default_factory=list)  # seconds, MAIL -> the 250 after the data
    handshake: list[float] = field(default_factory=list)  # seconds, STARTTLS sent -> handshake done
    started: float = 0.0  # time.time() of the first client's start
    ended: float = 0.0

    @property
    def elapsed(self) -> float:
        return max(1e-9, self.ended - self.started)

    def add(self, other: "LoadResult") -> None:
        for name in ("messages", "connections", "handshakes", "resumed", "errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.samples = (self.samples + other.samples)[:5]
        self.eod += other.eod
        self.txn += other.txn
        self.handshake += other.handshake
        self.started = min(self.started or other.started, other.started or self.started)
        self.ended = max(self.ended, other.ended)


def percentile(values, p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; NaN when there are none."""
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


class Client:
    """One blocking SMTP client connection, line by line."""

    def __init__(self, port: int, host: str = LOCAL, timeout: float = 60.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def reply(self) -> tuple[int, bytes]:
        """One (possibly multi-line) reply: (code, its last line)."""
        while True:
            end = self.buffer.find(b"\r\n")
            while end < 0:
                data = self.sock.recv(65536)
                if not data:
                    raise ReplyError("connection closed by the server")
                self.buffer += data
                end = self.buffer.find(b"\r\n")
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            if line[3:4] != b"-":
                try:
                    return int(line[:3]), line
                except ValueError:
                    raise ReplyError(f"not a reply: {line[:80]!r}") from None

    def command(self, line: bytes, expect: int) -> bytes:
        self.sock.sendall(line + b"\r\n")
        code, text = self.reply()
        if code != expect:
            raise ReplyError(f"{line.split()[0].decode()}: {text[:120]!r}")
        return text

    def starttls(self, context: ssl.SSLContext, session: ssl.SSLSession | None) -> None:
        self.command(b"STARTTLS", 220)
        self.sock = context.wrap_socket(self.sock, server_hostname="mx.bench", session=session)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Thread(threading.Thread):
    """One client: connections one after another until its budget or the deadline."""

    def __init__(self, load: "Load", budget: int | None, result: LoadResult, lock: threading.Lock):
        super().__init__(daemon=True)
        self.load, self.budget, self.result, self.lock = load, budget, result, lock
        self.session: ssl.SSLSession | None = None
        self.n = 0

    def more(self) -> bool:
        if self.budget is not None and self.n >= self.budget:
            return False
        return self.load.deadline is None or time.monotonic() < self.load.deadline

    def run(self) -> None:
        while self.more():
            try:
                self.connection()
            except (OSError, ReplyError, ssl.SSLError) as exc:
                with self.lock:
                    self.result.errors += 1
                    if len(self.result.samples) < 5:
                        self.result.samples.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)

    def connection(self) -> None:
        load = self.load
        if load.per_connection == 0:
            self.n += 1  # a handshake-only connection counts against the budget, failed or not
        client = Client(load.port, timeout=load.timeout)
        try:
            client.reply()  # the banner (a 421 raises at EHLO)
            client.command(b"EHLO client.bench", 250)
            if load.tls is not None:
                started = time.perf_counter()
                client.starttls(load.tls, self.session if load.resume else None)
                client.command(b"EHLO client.bench", 250)
                took = time.perf_counter() - started
                with self.lock:
                    self.result.handshakes += 1
                    self.result.resumed += bool(client.sock.session_reused)
                    self.result.handshake.append(took)
            for _ in range(load.per_connection):
                if not self.more():
                    break
                self.message(client)
            client.command(b"QUIT", 221)
            if load.tls is not None and load.resume:
                self.session = client.sock.session  # TLS 1.3: the ticket came with a later record
            with self.lock:
                self.result.connections += 1
        finally:
            client.close()

    def message(self, client: Client) -> None:
        load = self.load
        rcpt = load.recipients[self.n % len(load.recipients)]
        started = time.perf_counter()
        client.command(f"MAIL FROM:<{SENDER}>".encode(), 250)
        client.command(f"RCPT TO:<{rcpt}>".encode(), 250)
        client.command(b"DATA", 354)
        client.sock.sendall(load.body(self.n, rcpt) + b".\r\n")
        eod = time.perf_counter()
        code, text = client.reply()
        done = time.perf_counter()
        self.n += 1
        if code != 250:
            raise ReplyError(f"end of data: {text[:120]!r}")
        with self.lock:
            self.result.messages += 1
            self.result.eod.append(done - eod)
            self.result.txn.append(done - started)


@dataclass
class Load:
    """What the clients do (see the module docstring)."""

    port: int
    sessions: int
    messages: int | None = None  # in all; None: until `duration` is over
    duration: float | None = None
    per_connection: int = 1
    tls: ssl.SSLContext | None = None  # STARTTLS with this client context
    resume: bool = False  # offer the previous connection's TLS session
    recipients: tuple[str, ...] = ("bob@example.com",)
    size: int = 2048
    processes: int = 2
    timeout: float = 60.0
    deadline: float | None = None  # monotonic, set in each process

    def body(self, n: int, rcpt: str) -> bytes:
        return body_2k(n, rcpt, self.size)

    def budgets(self, sessions: int, share: int | None) -> list[int | None]:
        if share is None:
            return [None] * sessions
        return [share // sessions + (i < share % sessions) for i in range(sessions)]


def client_context() -> ssl.SSLContext:
    """A client context that does not verify (the bench's certificates are its own)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _child(load: Load, sessions: int, share: int | None, go, conn) -> None:
    """One load process: its threads, then its LoadResult down the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    result, lock = LoadResult(), threading.Lock()
    go.wait(60)
    result.started = time.time()
    if load.duration is not None:
        load.deadline = time.monotonic() + load.duration
    threads = [_Thread(load, budget, result, lock) for budget in load.budgets(sessions, share)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.ended = time.time()
    conn.send(result)
    conn.close()


def run_load(load: Load) -> LoadResult:
    """Run `load` from load.processes forked processes; their results summed."""
    if load.messages is None and load.duration is None:
        raise ValueError("give messages or duration")
    context = multiprocessing.get_context("fork")
    processes = max(1, min(load.processes, load.sessions))
    go = context.Event()
    children = []
    for i in range(processes):
        sessions = load.sessions // processes + (i < load.sessions % processes)
        share = None if load.messages is None else load.messages * sessions // load.sessions
        if load.messages is not None and i == processes - 1:
            share = load.messages - sum(s for _, _, s in children)
        ours, theirs = context.Pipe(duplex=False)
        proc = context.Process(target=_child, args=(load, sessions, share, go, theirs), daemon=True)
        proc.start()
        theirs.close()
        children.append((proc, ours, share or 0))
    go.set()
    total = LoadResult()
    bound = (load.duration or 0) + load.timeout * 4 + 60
    try:
        for proc, ours, _ in children:
            if not ours.poll(bound):
                raise TimeoutError(f"load process {proc.pid} sent nothing within {bound:.0f} s")
            total.add(ours.recv())
    finally:
        for proc, ours, _ in children:
            ours.close()
            proc.join(5)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
    return total
