"""One client connection: socket <-> (TLS) <-> SMTP session <-> queue.

The driver around the sans-I/O session. A worker's selector loop calls
`on_readable`, `on_writable` and `on_timeout`; this module never blocks on the
network (sockets are non-blocking, TLS runs over memory buffers), so one
process can drive hundreds of sessions.

The driver answers the session's events (smtp.py lists them with their
answers): at once when the answer is cheap (recipient admission: a cached
quota and free-space look; ETRN's flush request), or later, from the
worker's Offload, when it is slow (a password check on its thread pool).
What the worker loop must do for it goes out as outcomes (the list `outcomes`):
QueueMessage (connection_messages.py) for the loop's group commit, after which
the loop calls committed(); FlushRequested for a mode that starts flushers itself.

Every session ends (SPEC Part 2, "Hostile clients"): each of SMTPConnection's
deadlines fires once and then either closes the connection or clears itself,
so a peer that neither reads nor writes costs no CPU, and its unsent replies
are bounded (client_socket.OUTPUT_BOUND; the session itself stops at
smtp.OUTPUT_PAUSE):

  greet        greet_pause is over: the 220 goes out
  handshake    the TLS handshake took too long
  idle         no command for `timeout` (RFC 5321 4.5.3.2): 421 4.4.2, or
               closed at once when the client is not reading its replies
  write        no octet of the replies could be written for `timeout`
  session      max_session_time passed: 421 4.4.2 (or closed at once)
  close        the final reply had CLOSE_GRACE to go out
  stop         the server is stopping (begin_shutdown)
  auth_due     a failed AUTH is answered after its delay
"""

import logging
import selectors
import socket
from dataclasses import dataclass
from typing import Callable

from backupmx import replies
from backupmx.auth import Credentials
from backupmx.client_socket import ROOM, Unsent
from backupmx.clients import shown_address
from backupmx.connection_auth import AuthAnswers
from backupmx.connection_context import ConnectionContext
from backupmx.connection_messages import MessageIntake
from backupmx.log import log_event
from backupmx.policy import RecipientQuestion
from backupmx.smtp import (AuthRequest, AuthResponse, EtrnRequest, MailAdmission, MessageAborted, MessageData,
                           MessageReceived, MessageStarted, PipeliningViolation, RecipientAdmission, Refused, Session,
                           StartTLS)
from backupmx.store import QueueUnavailable
from backupmx.tls import TLSError, TLSLayer

RECV_SIZE = 64 * 1024
# The final reply (QUIT's 221, a 421) gets this long, or `timeout` when
# shorter, to be written before the connection is closed anyway.
CLOSE_GRACE = 5.0
# A TLS handshake gets at most this long (RFC 8314 implicit TLS and STARTTLS),
# or the per-command `timeout` when that is shorter.
HANDSHAKE_TIMEOUT = 30.0
# After SIGTERM, sessions in flight get this long to finish before their 421.
SHUTDOWN_GRACE = 30.0


@dataclass(frozen=True)
class FlushRequested:
    """Outcome: an ETRN recorded flush requests for these domains (they have mail waiting)."""
    domains: tuple[str, ...]


def _earliest(times) -> float | None:
    """The earliest of `times` that is not None (a loop, not min() of a list: the worker loop asks
    for a connection's deadline after each of its callbacks)."""
    earliest = None
    for when in times:
        if when is not None and (earliest is None or when < earliest):
            earliest = when
    return earliest


class SMTPConnection(MessageIntake, AuthAnswers):
    """One client, from accept to close; its deadlines as the module docstring says. Its bases
    answer the message events (connection_messages.MessageIntake) and AUTH (connection_auth.AuthAnswers)."""

    session_class = Session  # the protocol spoken; a port with its own table has its own (odmr.OdmrSession)

    def __init__(self, sock, peer, ctx: ConnectionContext, *, implicit_tls: bool = False):
        """`sock`: connected, and best made ready by prepare_socket() (the worker loop's add_session does)."""
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
        self.sock, self.ctx = sock, ctx
        self.client_ip = shown_address(peer[0] if isinstance(peer, tuple) else str(peer))
        self.closed = False
        self._out = Unsent(ctx.clock, ctx.config.timeout)  # replies for the socket (encrypted under TLS)
        self._closing = False  # the last reply is queued; close once it is written
        self._tls = TLSLayer(ctx.ssl_context) if implicit_tls else None
        self._spool, self._spool_failed = None, False  # the message's content as it arrives
        self._queue_id = None
        self._protocol = None  # the message's, as Received: and XFORWARD PROTO name it
        self._awaiting_commit = None  # the MessageReceived waiting for the group commit
        self._submission = None  # its Submission (the store says which domains it started queueing)
        # AUTH: the SASL exchange in progress; the Credentials being checked
        # on ctx.offload; when a failure may be answered (it waits a while).
        self._sasl = None
        self._auth_checking: Credentials | None = None
        self._auth_due: float | None = None
        # RCPT: None, "asking" while the policy runs, "waiting" when its answer comes later.
        self._admission: str | None = None
        self._stop_at = None  # set by begin_shutdown
        self.outcomes = []  # QueueMessage, FlushRequested: for the worker loop, which takes them after each callback
        now = ctx.clock()
        config = ctx.config
        self._handshake_deadline = now + self._handshake_time() if implicit_tls else None
        self._idle_deadline = now + config.timeout
        self._session_deadline = now + config.max_session_time
        self._close_by: float | None = None
        self._greet_at: float | None = None
        self.session = self.session_class(ctx.session_settings(implicit_tls), hold_greeting=True)
        self._progress = self.session.progress
        self.client = ctx.client_dns.look_up(self, self.client_ip)  # its name, for Received: and XFORWARD
        log_event(ctx.logger, "connect", client=self.client_ip, tls="implicit" if implicit_tls else None)
        if config.greet_pause > 0:
            self._greet_at = now + config.greet_pause
        elif implicit_tls or not self._client_spoke_first():
            self.session.greet()
        # else: what it sent is read at once, and ends the session (smtp rule 10)
        self._pump()  # the 220 now (Unsent.write): a new socket has room, no need to wait for the selector

    def _client_spoke_first(self) -> bool:
        """Input already waiting before our 220 (plain listeners; implicit TLS starts with the client)."""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:  # BlockingIOError: nothing yet
            return False

    # --- the selector loop's interface -------------------------------------

    def interest(self) -> int:
        """The selector events wanted now (0 once closed)."""
        if self.closed:
            return 0
        unsent = len(self._out.data)
        events = selectors.EVENT_WRITE if unsent else 0
        # Backpressure: no reading while replies pile up unsent (Unsent.has_room), while the
        # session holds input back, while a password is checked or a recipient admitted.
        if (not self._closing and self._auth_checking is None and self._auth_due is None and self._admission is None
                and unsent <= ROOM and self.session.wants_input):
            events |= selectors.EVENT_READ
        return events

    @property
    def handshaking(self) -> bool:
        """Its next input is a TLS handshake step (the worker loop serves those after the cheap work)."""
        return self._tls is not None and not self._tls.handshake_complete

    @property
    def _auth_busy(self) -> bool:
        return self._auth_checking is not None or self._auth_due is not None

    def _deadlines(self) -> tuple:
        """When each deadline is due (None: not set), in _timers()'s order."""
        return (self._auth_due, self._greet_at, self._handshake_deadline, self._close_by, self._out.deadline,
                self._session_deadline, self._stop_at, self._idle_deadline)

    def _timers(self):
        """(when, what happens then) for every deadline; each fires once (see the class doc)."""
        return zip(self._deadlines(), (self._auth_answer_due, self._greet, self._handshake_expired,
                                       self.close, self._write_expired, self._session_expired,
                                       self._stop_due, self._idle_expired))

    @property
    def deadline(self) -> float | None:
        """The earliest deadline (the loop asks after each round of a session's callbacks)."""
        return None if self.closed else _earliest(self._deadlines())

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close()
        if self._tls is not None:
            try:
                data = self._tls.receive(data)
            except TLSError as exc:
                log_event(self.ctx.logger, "tls-failed", client=self.client_ip, error=str(exc))
                return self.close()
            if self._tls.handshake_complete and self._handshake_deadline is not None:  # just completed
                self._handshake_deadline = None
                log_event(self.ctx.logger, "tls", client=self.client_ip, version=self._tls.version(),
                          cipher=self._tls.cipher(), bits=self._tls.cipher_bits())
            if data:
                self._feed(data)  # which moves the TLS layer's records out too
            if self._tls.closed:
                return self._peer_closed()
            if not data:
                self._pump()  # the handshake's records
        elif data:
            self._feed(data)
        else:
            return self._peer_closed()
        self.on_writable()

    def on_writable(self) -> None:
        """Write what the socket takes; with room again, let the session go on with its backlog."""
        while self._send_some() and self.session.backlogged and self._out.has_room():
            self.session.resume()
            self._after_session()
        if self._closing and not self._out.data and not self.closed:
            self.close()

    def _send_some(self) -> bool:
        """Write until the socket takes no more; False once the connection is closed."""
        if self._out.data and not self._out.send(self.sock):
            self.close()
        return not self.closed

    def on_timeout(self) -> None:
        """Called by the loop when `deadline` has passed: what is due fires, once."""
        now = self.ctx.clock()
        for when, expire in self._timers():
            if self.closed:
                return
            if when is not None and when <= now:
                expire()
        if not self.closed:
            self.on_writable()
        if not self.closed and self.deadline is not None and self.deadline <= now:
            # A deadline that is still due would have the loop call us again at once.
            log_event(self.ctx.logger, "session-error", client=self.client_ip, error="a deadline did not clear",
                      level=logging.ERROR)
            self.close()

    # --- the deadlines (each clears itself or closes) ----------------------------

    def _auth_answer_due(self) -> None:
        self._auth_due = None
        self.session.auth_result(None)
        self._after_session()

    def _greet(self) -> None:
        self._greet_at = None
        self.session.greet()
        self._pump()

    def _handshake_expired(self) -> None:
        log_event(self.ctx.logger, "tls-failed", client=self.client_ip, error="handshake timeout")
        self.close()

    def _write_expired(self) -> None:
        log_event(self.ctx.logger, "write-timeout", client=self.client_ip, unsent=len(self._out))
        self.close()

    def _session_expired(self) -> None:
        self._session_deadline = None
        log_event(self.ctx.logger, "session-time-exceeded", client=self.client_ip,
                  seconds=f"{self.ctx.config.max_session_time:g}", unsent=len(self._out) or None)
        self._end_with(self.session.time_limit_reached)

    def _stop_due(self) -> None:
        self._stop_at = None
        self.session.shutdown()
        self._after_session()

    def _idle_expired(self) -> None:
        self._idle_deadline = None
        if self.session.closed:
            return
        log_event(self.ctx.logger, "timeout", client=self.client_ip, unsent=len(self._out) or None)
        self._end_with(self.session.timeout)

    def _end_with(self, final_reply) -> None:
        """End the session with its final reply; a client that is not reading what it has gets none."""
        if self._out:
            return self.close()
        final_reply()
        self._after_session()

    def begin_shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """The server is stopping: finish the transaction in flight, then 421."""
        if self.closed:
            return
        self._stop_at = self.ctx.clock() + grace
        if self.session.idle and not self._auth_busy:
            self._stop_at = None
            self.session.shutdown()
            self._after_session()
            self.on_writable()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._drop_spool()
        self.ctx.client_dns.forget(self.client)
        if self.ctx.socket_closing is not None:
            self.ctx.socket_closing(self)
        try:
            self.sock.close()
        except OSError:
            pass
        log_event(self.ctx.logger, "disconnect", client=self.client_ip, **self.session.commands.summary())

    # --- session plumbing -------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self.session.receive_data(data)
        self._after_session()

    def _after_session(self) -> None:
        """Answer the session's events and move its replies out; go on with its backlog while there is room."""
        session = self.session
        while True:
            if session.events:
                self._handle_events()
            if session.progress != self._progress:
                self._progress = session.progress
                self._idle_deadline = self.ctx.clock() + self.ctx.config.timeout
            if self._stop_at is not None and session.idle and not self._auth_busy:
                session.shutdown()
            self._pump()
            if self.closed or not (session.backlogged and self._out.has_room()):
                return
            session.resume()

    def _pump(self) -> None:
        """Move the session's replies to the socket (through TLS when active)."""
        session = self.session
        data = session.data_to_send() if session.output_size else b""
        if self._tls is not None:
            if data and not self._tls.closed:  # a peer that sent close_notify reads no more
                self._tls.send(data)
            if session.closed and not self._tls.closing:
                self._tls.close()
            data = self._tls.outgoing()
        if data:
            self._out.write(self.sock, data)
        if session.closed and not self._closing:
            self._closing = True
            self._close_by = self.ctx.clock() + min(CLOSE_GRACE, self.ctx.config.timeout)

    def _peer_closed(self) -> None:
        if not self.session.closed:
            log_event(self.ctx.logger, "lost-connection", client=self.client_ip,
                      state=self.session.phase.value)
        self.close()

    def _handle_events(self) -> None:
        """Answer (or start answering) every event the session has; answers may make more."""
        events = self.session.events
        while events:
            self._EVENTS[type(events[0])](self, events.pop(0))

    def _on_violation(self, event: PipeliningViolation) -> None:
        """Postfix logs "improper command pipelining after X"; the session has closed itself."""
        log_event(self.ctx.logger, "improper-pipelining", client=self.client_ip, after=event.after,
                  input=event.early_input.decode("latin-1"), level=logging.WARNING)

    def _on_aborted(self, event: MessageAborted) -> None:
        self._drop_spool()  # its reply, at the end of the content, is a Refused (logged there)

    def _on_refused(self, event: Refused) -> None:
        """Postfix's "reject:" line. Ours first (client, command, the reason it is counted under in
        backupmx_rejects_total), then what the client named, then the reply: a fail2ban regex reads
        the fixed part before any value a client chose."""
        reason = replies.reason(event.reply)
        self.ctx.rejects[reason] += 1
        log_event(self.ctx.logger, "reject", client=self.client_ip, command=event.command, reason=reason,
                  helo=event.helo, from_=None if event.sender is None else f"<{event.sender}>",
                  to=None if event.recipient is None else f"<{event.recipient}>",
                  nrcpt=event.recipients or None, reply=event.text)

    def _admit_mail(self, event: MailAdmission) -> None:
        """A declared SIZE must fit on the disk (RFC 1870); without one there is nothing to check yet."""
        size = event.envelope.declared_size
        self.session.mail_admitted(None if size is None else self.ctx.admission.message_size(size))

    def _admit_recipient(self, event: RecipientAdmission) -> None:
        """The recipient policy (policy.py): quotas, callouts, ... answered now or later."""
        self._admission = "asking"
        self.ctx.policy.admit(RecipientQuestion(self, self.client, self.session.helo, event.envelope,
                                                event.recipient, self.session.user is not None),
                              self._recipient_answered)
        if self._admission == "asking":
            self._admission = "waiting"

    def _recipient_answered(self, refusal) -> None:
        later, self._admission = self._admission == "waiting", None
        if self.closed or self.session.closed:
            return
        reply, fields = refusal if refusal is not None else (None, {})
        self.session.recipient_admitted(reply, **fields)
        if later:  # from the loop, not from _handle_events: the session goes on here
            self._after_session()
            self.on_writable()

    # --- STARTTLS, ETRN ------------------------------------------------------

    def _start_tls(self) -> None:
        # RFC 3207 4: the 220 goes out in plaintext; then the handshake.
        self._out.add(self.session.data_to_send())
        self._tls = TLSLayer(self.ctx.ssl_context)
        self._handshake_deadline = self.ctx.clock() + self._handshake_time()
        self.session.tls_started()

    def _handshake_time(self) -> float:
        return min(HANDSHAKE_TIMEOUT, self.ctx.config.timeout)

    def _etrn(self, request: EtrnRequest) -> None:
        try:
            pending = self.ctx.store.request_flush(request.domains, etrn=True)
        except QueueUnavailable as exc:
            log_event(self.ctx.logger, "etrn-failed", client=self.client_ip, error=str(exc),
                      level=logging.WARNING)
            pending = None
        log_event(self.ctx.logger, "etrn", client=self.client_ip, user=self.session.user,
                  domains=",".join(request.domains),
                  pending=sum(pending.values()) if pending is not None else None)
        waiting = tuple(domain for domain, count in (pending or {}).items() if count)
        if waiting:
            self.outcomes.append(FlushRequested(waiting))
        self.session.etrn_result(pending, request.argument)

    _EVENTS: dict[type, Callable] = {
        MessageStarted: lambda self, event: self._start_message(event.envelope),
        MessageData: lambda self, event: self._spool_write(event.data),
        MessageAborted: _on_aborted,
        MessageReceived: MessageIntake._commit,
        MailAdmission: _admit_mail,
        RecipientAdmission: _admit_recipient,
        StartTLS: lambda self, event: self._start_tls(),
        AuthRequest: AuthAnswers._auth_step,
        AuthResponse: AuthAnswers._auth_step,
        EtrnRequest: _etrn,
        Refused: _on_refused,
        PipeliningViolation: _on_violation,
    }
