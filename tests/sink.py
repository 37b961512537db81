"""A real SMTP server playing the primary MX in tests: it records what it is given.

Threads on socketserver, real sockets, real TLS (the ssl module). It records
each message byte for byte as it arrived (dot-unstuffed, the CRLF.CRLF end
removed) so tests can compare what was queued with what the primary got.

It can also misbehave, one way per session, so the flusher's handling of a
bad primary can be tested against a real peer rather than a mock:

  behaviour           what the sink does
  -----------------   -------------------------------------------------------
  normal              a well-behaved ESMTP server
  rcpt_4xx/rcpt_5xx   450/550 to RCPT (every RCPT, or only `behaviour_addresses`)
  data_4xx/data_5xx   451/554 as the final reply after the message was sent (to every
                      message, or only to those for one of `behaviour_addresses`)
  drop_mid_data       reads part of DATA, then closes the connection
  drop_after_eod      closes the connection (FIN) right after the `drop_after` th final reply
                      to a message's content in a session
  eod_421             answers "421" (closing, RFC 5321 3.8) instead of the `drop_after` th
                      final reply to a message's content in a session, then closes
  mute_after_eod      answers nothing after the `drop_after` th final reply to a message's
                      content in a session: records what the client still sends
                      (SessionRecord.unanswered) until it closes
  no_starttls         does not offer (or accept) STARTTLS even with a cert
  -- hostile, at the reply named by `hostile_at` (banner, ehlo, mail, rcpt, data, eod):
  endless_continuation  "250-..." lines without end (bounded by `max_continuation_lines`)
  drip                a reply one byte every `drip_interval` seconds
  long_line           a 9 KB reply line
  bad_code            "2_0 ok" (int("2_0") is 20 in Python: a client must not accept it)
  extra_reply         the reply, then the same reply again (a reply to no command)

`behaviour`, `behaviour_addresses`, `hostile_at` and `data_delay` are read
when a session starts, so they may be changed between sessions.

It knows its users when `valid_users` is a set of addresses (any case): RCPT
for anyone else gets "550 5.1.1 ... User unknown", as a primary that checks
its recipients does (what a recipient callout asks). `rcpt_delay` makes each
RCPT reply wait that many seconds (a slow primary). `rcpts_seen` lists every
RCPT address in arrival order, callouts included. With `xforward = True` it
offers XFORWARD (Postfix's XFORWARD_README) and records the attributes each
message came with (Delivery.xforward, xtext-decoded). Without "PIPELINING" in
`extensions` it does not offer it; SessionRecord.pipelined counts the ends
of data after which the client's next command was there before the sink
replied (RFC 2920 3.1: sent with the end of data), and .grouped the MAIL
commands that came with the next command (RFC 2920: one group).

As a process (so a test can SIGKILL the primary):
    python3 tests/sink.py --port 0 [--tls-cert F --tls-key F] [--behaviour B] [--spool DIR]
prints the bound port on the first line of stdout, then serves until SIGTERM.
With --spool each message is written as DIR/NNNNNN.eml (the body) and
DIR/NNNNNN.json (the envelope), the JSON renamed into place last.

Sink(lmtp=True) speaks LMTP (RFC 2033: LHLO, one reply per recipient after
the content; data_4xx/data_5xx refuse the selected recipients only), and
Sink(path=...) listens on that Unix socket instead of TCP.

Sink.reverse(sock) serves one session on a socket that is already
connected (TLS or not): the customer's side of an ODMR connection once ATRN
turned it round (RFC 2645), the sink greeting first as any SMTP server.
"""

import argparse
import json
import os
import select
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

BEHAVIOURS = frozenset(
    {
        "normal",
        "rcpt_4xx",
        "rcpt_5xx",
        "data_4xx",
        "data_5xx",
        "drop_mid_data",
        "drop_after_eod",
        "eod_421",
        "mute_after_eod",
        "no_starttls",
        "endless_continuation",
        "drip",
        "long_line",
        "bad_code",
        "extra_reply",
    }
)
HOSTILE = frozenset({"endless_continuation", "drip", "long_line", "bad_code", "extra_reply"})
STAGES = ("banner", "ehlo", "mail", "rcpt", "data", "eod")

DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "SIZE 104857600", "DSN", "ENHANCEDSTATUSCODES")
MAX_LINE = 10 * 1024 * 1024  # the sink is not the thing under test: accept long body lines


@dataclass
class Delivery:
    """One message as the sink received it."""

    mail_from: str
    rcpts: list[str]
    body: bytes
    mail_params: dict[str, str | None]
    rcpt_params: list[dict[str, str | None]]
    tls: bool
    session: int  # the number of the session (connection) it came in on, from 1
    xforward: dict = field(default_factory=dict)  # XFORWARD attributes given before its MAIL


@dataclass
class SessionRecord:
    """One connection: what the client said, for assertions on the dialogue."""

    number: int
    peer: tuple
    ehlo: str | None = None
    tls: bool = False
    commands: list[str] = field(default_factory=list)
    closed: bool = False
    pipelined: int = 0  # ends of data with the next command already waiting behind them
    grouped: int = 0  # MAIL commands with the next command already waiting behind them
    unfinished: bytes | None = None  # the content of a DATA the client never ended (it closed first)
    unanswered: bytes | None = None  # mute_after_eod: what the client sent after the last reply


class _Closed(Exception):
    """The client went away or the sink is stopping: end the session quietly."""


def _parse_params(text):
    """'SIZE=10 BODY=8BITMIME RET' -> {'SIZE': '10', 'BODY': '8BITMIME', 'RET': None}."""
    params = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        params[key.upper()] = value if eq else None
    return params


def _xtext_decode(text):
    """RFC 3461 4: "+HH" is the octet HH."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "+" and len(text[i + 1:i + 3]) == 2:
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out += text[i].encode()
            i += 1
    return out.decode("utf-8", "replace")


def _parse_path(argument, keyword):
    """'FROM:<a@b> SIZE=1' -> ('a@b', {'SIZE': '1'}) or None when malformed."""
    head, _, rest = argument.partition(":")
    if head.strip().upper() != keyword:
        return None
    rest = rest.lstrip()
    if not rest.startswith("<"):
        return None
    end = rest.find(">")
    if end < 0:
        return None
    return rest[1:end], _parse_params(rest[end + 1 :])


class _Handler(socketserver.BaseRequestHandler):
    """One SMTP session. The sink's settings are copied at the start."""

    def setup(self):
        self.sink = self.server.sink
        self.sock = self.request
        self.sock.settimeout(self.sink.session_timeout)
        # Replies go out one by one; without this, a pipelining client waits
        # for Nagle and the delayed ACK (~40 ms) on every second reply.
        if self.sock.family != socket.AF_UNIX:  # a reversed session may be on a socketpair
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")
        with self.sink._cond:
            self.sink._session_count += 1
            self.record = SessionRecord(self.sink._session_count, self.client_address)
            self.sink.sessions.append(self.record)
            self.sink._live.add(self.sock)
        self.behaviour = self.sink.behaviour
        self.addresses = (
            None
            if self.sink.behaviour_addresses is None
            else {a.lower() for a in self.sink.behaviour_addresses}
        )
        self.hostile_at = self.sink.hostile_at
        self.data_delay = self.sink.data_delay
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown sink behaviour {self.behaviour!r}")
        if self.hostile_at not in STAGES:
            raise ValueError(f"unknown hostile_at stage {self.hostile_at!r}")

    def finish(self):
        with self.sink._cond:
            self.sink._live.discard(self.sock)
            self.record.closed = True
            self.sink._cond.notify_all()
        for f in (self.rfile, self.sock):
            try:
                f.close()
            except OSError:
                pass

    # -- writing ------------------------------------------------------------

    def write(self, data):
        if self.sink._stopping.is_set():
            raise _Closed()
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _Closed() from e

    def reply(self, stage, text):
        """Send `text` (one or more lines without CRLF) unless `stage` is hostile."""
        lines = text.split("\n")
        out = b"".join(
            (line[:3] + ("-" if i < len(lines) - 1 else " ") + line[4:]).encode() + b"\r\n"
            if len(line) > 3
            else line.encode() + b"\r\n"
            for i, line in enumerate(lines)
        )
        if self.behaviour in HOSTILE and stage == self.hostile_at:
            self.hostile_reply(out)
            return
        self.write(out)

    def hostile_reply(self, text):
        sink = self.sink
        if self.behaviour == "extra_reply":
            self.write(text * 2)
            return
        if self.behaviour == "endless_continuation":
            # Bounded by the sink's own count: a test sink must never spin forever.
            for i in range(sink.max_continuation_lines):
                self.write(b"250-and another line %d\r\n" % i)
            raise _Closed()
        if self.behaviour == "drip":
            for byte in b"250 2.0.0 Ok, eventually\r\n":
                self.write(bytes([byte]))
                if sink._stopping.wait(sink.drip_interval):
                    raise _Closed()
            return
        if self.behaviour == "long_line":
            self.write(b"250 " + b"x" * 9000 + b"\r\n")
            return
        if self.behaviour == "bad_code":
            self.write(b"2_0 ok\r\n")
            return
        raise AssertionError(self.behaviour)

    # -- reading ------------------------------------------------------------

    def input_waiting(self):
        """Whether the client's next bytes are here already (in the buffer or the socket)."""
        if not isinstance(self.sock, ssl.SSLSocket) and select.select([self.sock], [], [], 0)[0]:
            return True
        self.sock.setblocking(False)
        try:
            return bool(self.rfile.peek(1))  # reads the socket only when the buffer is empty
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        finally:
            self.sock.settimeout(self.sink.session_timeout)

    def hang_up(self):
        """End the session in order: FIN after the last reply, then read whatever the
        client still sends until it closes (no RST that could take the reply with it)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while self.rfile.read(65536):
                pass
        except (OSError, ValueError):
            pass
        raise _Closed()

    def listen_only(self):
        """Answer nothing more: keep what the client sends until it closes (or the session times out)."""
        received = bytearray()
        try:
            while chunk := self.rfile.read1(65536):
                received += chunk
        except (OSError, ValueError):
            pass
        with self.sink._cond:
            self.record.unanswered = bytes(received)
            self.sink._cond.notify_all()
        raise _Closed()

    def readline(self):
        try:
            line = self.rfile.readline(MAX_LINE)
        except (OSError, ValueError) as e:
            raise _Closed() from e
        if not line:
            raise _Closed()
        return line

    # -- the session --------------------------------------------------------

    def handle(self):
        try:
            self.session()
        except _Closed:
            pass
        except (OSError, ssl.SSLError):
            pass

    def session(self):
        sink = self.sink
        self.tls = isinstance(self.sock, ssl.SSLSocket)  # a reversed session (Sink.reverse) may be TLS already
        if sink.max_sessions is not None and len(sink._live) > sink.max_sessions:
            self.write(b"421 4.7.0 too many connections from your address\r\n")
            return
        self.reply("banner", f"220 {sink.hostname} ESMTP sink")
        mail_from = None
        rcpts, rcpt_params, mail_params = [], [], {}
        xforward = {}
        final_replies = 0  # to message content, in this session
        while True:
            raw = self.readline()
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            with sink._cond:
                self.record.commands.append(line)
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO", "LHLO") and (verb == "LHLO") == sink.lmtp:
                self.record.ehlo = argument.strip()
                mail_from, rcpts, rcpt_params, mail_params = None, [], [], {}
                if verb == "HELO":
                    self.reply("ehlo", f"250 {sink.hostname}")
                    continue
                lines = [f"250-{sink.hostname}"] + [f"250-{e}" for e in sink.extensions]
                if sink.xforward:
                    lines.append("250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")
                if self.starttls_offered():
                    lines.append("250-STARTTLS")
                lines[-1] = "250 " + lines[-1][4:]
                self.reply("ehlo", "\n".join(lines))
            elif verb == "STARTTLS":
                if not self.starttls_offered():
                    self.write(b"502 5.5.1 STARTTLS not available\r\n")
                    continue
                self.write(b"220 2.0.0 Ready to start TLS\r\n")
                self.start_tls()
                mail_from, rcpts, rcpt_params, mail_params = None, [], [], {}
            elif verb == "MAIL":
                parsed = _parse_path(argument, "FROM")
                if parsed is None:
                    self.write(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
                elif mail_from is not None:
                    self.write(b"503 5.5.1 Error: nested MAIL command\r\n")
                else:
                    mail_from, mail_params = parsed
                    waiting = self.input_waiting()
                    with sink._cond:
                        self.record.grouped += waiting
                    self.reply("mail", "250 2.1.0 Ok")
            elif verb == "RCPT":
                parsed = _parse_path(argument, "TO")
                if mail_from is None:
                    self.write(b"503 5.5.1 Error: need MAIL command\r\n")
                elif parsed is None:
                    self.write(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
                else:
                    address, params = parsed
                    selected = self.selected([address])
                    with sink._cond:
                        sink.rcpts_seen.append(address)
                        sink._cond.notify_all()
                    if sink.rcpt_delay and sink._stopping.wait(sink.rcpt_delay):
                        raise _Closed()
                    users = sink.valid_users
                    if users is not None and address.lower() not in {u.lower() for u in users}:
                        self.write(f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in local "
                                   "recipient table\r\n".encode())
                    elif self.behaviour == "rcpt_4xx" and selected:
                        self.write(f"450 4.2.0 <{address}>: Recipient address rejected: try later\r\n".encode())
                    elif self.behaviour == "rcpt_5xx" and selected:
                        self.write(f"550 5.1.1 <{address}>: Recipient address rejected: User unknown\r\n".encode())
                    else:
                        rcpts.append(address)
                        rcpt_params.append(params)
                        self.reply("rcpt", "250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None:
                    self.write(b"503 5.5.1 Error: need RCPT command\r\n")
                elif not rcpts:
                    self.write(b"554 5.5.1 Error: no valid recipients\r\n")
                else:
                    self.reply("data", "354 End data with <CR><LF>.<CR><LF>")
                    body = self.read_data()
                    waiting = self.input_waiting()
                    with sink._cond:
                        sink.data_received += 1
                        self.record.pipelined += waiting
                        sink._cond.notify_all()
                    if self.data_delay and sink._stopping.wait(self.data_delay):
                        raise _Closed()
                    if sink.lmtp:
                        self.lmtp_replies(mail_from, rcpts, body, mail_params, rcpt_params, xforward)
                    elif self.behaviour == "data_4xx" and self.selected(rcpts):
                        self.write(b"451 4.3.0 Error: queue file write error\r\n")
                    elif self.behaviour == "data_5xx" and self.selected(rcpts):
                        self.write(b"554 5.7.1 Error: message content rejected\r\n")
                    elif self.behaviour == "eod_421" and final_replies + 1 >= sink.drop_after:
                        self.write(b"421 4.3.2 primary.test Service shutting down, closing channel\r\n")
                        self.hang_up()
                    else:
                        # Recorded before the reply: once the client sees 250 the message
                        # must be visible to the test.
                        number = sink._record(
                            Delivery(mail_from, rcpts, body, mail_params, rcpt_params, self.tls, self.record.number,
                                     dict(xforward))
                        )
                        self.reply("eod", f"250 2.0.0 Ok: queued as SINK{number:06d}")
                    mail_from, rcpts, rcpt_params, mail_params, xforward = None, [], [], {}, {}
                    final_replies += 1
                    if self.behaviour == "drop_after_eod" and final_replies >= sink.drop_after:
                        self.hang_up()
                    if self.behaviour == "mute_after_eod" and final_replies >= sink.drop_after:
                        self.listen_only()
            elif verb == "XFORWARD" and sink.xforward:
                if mail_from is not None:
                    self.write(b"503 5.5.1 Error: MAIL transaction in progress\r\n")
                    continue
                for word in argument.split():
                    name, _, value = word.partition("=")
                    xforward[name.upper()] = _xtext_decode(value)
                self.write(b"250 2.0.0 Ok\r\n")
            elif verb == "RSET":
                mail_from, rcpts, rcpt_params, mail_params, xforward = None, [], [], {}, {}
                self.write(b"250 2.0.0 Ok\r\n")
            elif verb == "NOOP":
                self.write(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                self.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                self.write(b"502 5.5.2 Error: command not recognized\r\n")

    def lmtp_replies(self, mail_from, rcpts, body, mail_params, rcpt_params, xforward):
        """RFC 2033 4.2: one reply per recipient; data_4xx/data_5xx refuse the selected ones only.
        Those delivered are recorded as one Delivery (with only them as rcpts)."""
        refused = {r for r in rcpts if self.behaviour in ("data_4xx", "data_5xx") and self.selected([r])}
        taken = [r for r in rcpts if r not in refused]
        number = self.sink._record(Delivery(mail_from, taken, body, mail_params, rcpt_params, self.tls,
                                            self.record.number, dict(xforward))) if taken else 0
        for r in rcpts:
            if r not in refused:
                self.write(f"250 2.0.0 <{r}> Ok: queued as SINK{number:06d}\r\n".encode())
            elif self.behaviour == "data_4xx":
                self.write(f"452 4.2.2 <{r}> Mailbox full\r\n".encode())
            else:
                self.write(f"552 5.2.2 <{r}> Mailbox full\r\n".encode())

    def selected(self, addresses):
        """Whether the behaviour applies to a command for `addresses` (behaviour_addresses)."""
        return self.addresses is None or any(a.lower() in self.addresses for a in addresses)

    def starttls_offered(self):
        return self.sink._tls_context is not None and not self.tls and self.behaviour != "no_starttls"

    def start_tls(self):
        # Anything the client pipelined after STARTTLS sits in the old buffered
        # reader and is dropped with it (RFC 3207 section 4.2).
        self.rfile.close()
        try:
            self.sock = self.sink._tls_context.wrap_socket(self.sock, server_side=True)
        except (OSError, ssl.SSLError) as e:
            raise _Closed() from e
        with self.sink._cond:
            self.sink._live.discard(self.request)
            self.sink._live.add(self.sock)
        self.rfile = self.sock.makefile("rb")
        self.tls = True
        self.record.tls = True

    def read_data(self):
        """Read up to CRLF.CRLF; return the body dot-unstuffed, byte for byte."""
        parts = []
        received = 0
        while True:
            try:
                line = self.readline()
            except _Closed:
                with self.sink._cond:
                    self.record.unfinished = b"".join(parts)
                raise
            if line == b".\r\n":
                return b"".join(parts)
            if line.startswith(b"."):
                line = line[1:]
            parts.append(line)
            received += len(line)
            if self.behaviour == "drop_mid_data" and received >= self.sink.drop_after:
                # Abortive close (RST) so the client cannot mistake it for anything orderly.
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                raise _Closed()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False


class _Server6(_Server):
    address_family = socket.AF_INET6


class Sink:
    """A threaded SMTP server on `host`:`port` (0 = any free port) recording messages."""

    def __init__(self, host="127.0.0.1", port=0, *, tls_cert=None, tls_key=None, extensions=DEFAULT_EXTENSIONS,
                 lmtp=False, path=None):
        self.host = host
        self.hostname = "primary.test"
        self.extensions = list(extensions)
        self.behaviour = "normal"
        self.behaviour_addresses = None  # for rcpt_4xx / rcpt_5xx: None = every recipient
        self.hostile_at = "mail"
        self.data_delay = 0.0  # seconds between the end of DATA and the final reply
        self.drip_interval = 1.0
        self.drop_after = 1  # drop_mid_data: body bytes; drop_after_eod, eod_421, mute_after_eod: final replies
        self.max_continuation_lines = 100_000
        self.session_timeout = 30.0
        self.max_sessions = None  # more simultaneous sessions than this get a 421 greeting
        self.valid_users = None  # a set of addresses: RCPT for any other gets 550 5.1.1 (None: anyone)
        self.rcpt_delay = 0.0  # seconds before each RCPT reply
        self.rcpts_seen: list[str] = []  # every RCPT TO address, in order (callouts too)
        self.xforward = False  # offer XFORWARD and record its attributes
        self.deliveries: list[Delivery] = []
        self.sessions: list[SessionRecord] = []
        self.data_received = 0  # bodies read completely, whatever the reply was
        self.on_delivery = None  # optional callable(number, Delivery), e.g. the process mode's spool
        self._session_count = 0
        self._cond = threading.Condition()
        self._live = set()
        self._stopping = threading.Event()
        self._tls_context = None
        if tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_cert, tls_key)
            self._tls_context = context
        self.lmtp = lmtp  # LMTP (RFC 2033): LHLO, and one reply per recipient after the content
        self.path = path
        server_class = _UnixServer if path else _Server6 if ":" in host else _Server
        self._server = server_class(path or (host, port), _Handler, bind_and_activate=True)
        self._server.sink = self
        self.port = None if path else self._server.server_address[1]
        self._thread = None

    # -- life cycle ---------------------------------------------------------

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.005,), daemon=True)  # stop() waits a poll
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        with self._cond:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def reverse(self, sock, peer=("reversed", 0)):
        """Serve one session on the connected `sock` in a thread (started, returned)."""
        thread = threading.Thread(target=_Handler, args=(sock, peer, self._server), daemon=True)
        thread.start()
        return thread

    @property
    def address(self):
        return (self.host, self.port)

    # -- what was received --------------------------------------------------

    def _record(self, delivery):
        with self._cond:
            self.deliveries.append(delivery)
            number = len(self.deliveries)
            self._cond.notify_all()
        if self.on_delivery is not None:
            self.on_delivery(number, delivery)
        return number

    @property
    def messages(self):
        """[(mail_from, [rcpts], body bytes, mail params)] in order of arrival."""
        with self._cond:
            return [(d.mail_from, list(d.rcpts), d.body, dict(d.mail_params)) for d in self.deliveries]

    def wait(self, predicate, timeout=5.0):
        """Wait until predicate() (called under the sink's lock) is true; TimeoutError if not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("sink: condition not met within %.1f s" % timeout)
                self._cond.wait(remaining)

    def wait_for(self, n, timeout=5.0):
        """Wait until at least n messages arrived; return the messages."""
        self.wait(lambda: len(self.deliveries) >= n, timeout)
        return self.messages

    def wait_idle(self, timeout=5.0):
        """Wait until no session is open (the client has hung up)."""
        self.wait(lambda: not self._live and all(s.closed for s in self.sessions), timeout)


# -- process mode ---------------------------------------------------------------


def _spooler(directory):
    os.makedirs(directory, exist_ok=True)

    def spool(number, delivery):
        base = os.path.join(directory, "%06d" % number)
        with open(base + ".eml", "wb") as f:
            f.write(delivery.body)
        envelope = {
            "mail_from": delivery.mail_from,
            "rcpts": delivery.rcpts,
            "mail_params": delivery.mail_params,
            "rcpt_params": delivery.rcpt_params,
            "tls": delivery.tls,
        }
        with open(base + ".json.tmp", "w") as f:
            json.dump(envelope, f)
        os.replace(base + ".json.tmp", base + ".json")

    return spool


def main(argv=None):
    parser = argparse.ArgumentParser(description="SMTP sink playing the primary MX in tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--behaviour", default="normal", choices=sorted(BEHAVIOURS))
    parser.add_argument("--hostile-at", default="mail", choices=STAGES)
    parser.add_argument("--data-delay", type=float, default=0.0)
    parser.add_argument("--spool", help="write each message into this directory")
    args = parser.parse_args(argv)
    sink = Sink(args.host, args.port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    sink.behaviour = args.behaviour
    sink.hostile_at = args.hostile_at
    sink.data_delay = args.data_delay
    if args.spool:
        sink.on_delivery = _spooler(args.spool)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sink.start()
    print(sink.port, flush=True)
    while not stop.wait(0.2):
        pass
    sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
