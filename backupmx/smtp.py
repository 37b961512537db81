"""The SMTP server session as a state machine with no I/O: bytes in, replies and events out.

The driver (connection.py) feeds socket bytes to `receive_data`, writes what
`data_to_send` returns, and handles the events in `events` (oldest first;
`next_event` takes one). Some events need an answer before the session goes
on (below: each event with its answer); until the driver gives it, input is
only buffered. Beside it: smtp_events.py (the events), smtp_arguments.py (what
a command's argument says: MAIL, RCPT, BDAT, ETRN), smtp_counts.py (the
refusals that end a session, and the commands' log), smtp_body.py (the
content after DATA and BDAT), trace_header.py (the Received: header a driver
prepends). None of them imports socket, ssl, sqlite3, os,
time or logging (tests/test_smtp.py asserts it).

Rules every change must keep:
 1. Lines end at CRLF only. A bare CR or LF is an error, never a line end, and
    only CRLF "." CRLF ends DATA (SMTP smuggling, CVE-2023-51764). A body
    with a NUL is refused too (554 5.6.0): a peer that drops NULs would frame it
    differently.
 2. Every buffer is bounded. An over-long line or message is read through to
    its end, and only then answered, so the session stays in step.
 3. While an event waits for its answer nothing else is processed.
 4. Bytes a client pipelined in plaintext behind STARTTLS are never executed
    (RFC 3207 section 6, CVE-2011-0411): STARTTLS ends a group, so they end
    the session (rule 10), and whatever is buffered after the 220 is
    dropped. TLS then resets the session to its start.
 5. A transaction (an Envelope) exists from MAIL to the end of DATA or RSET;
    ending it makes a new one rather than clearing fields.
 6. The 250 for a message is sent only when the driver says it is committed.
 7. The session never calls out. What needs the queue, a password check, the
    primary or a resolver is an event the driver answers, now or later
    (MailAdmission, RecipientAdmission, AuthRequest, EtrnRequest, ...);
    SessionSettings holds values only.
 8. What each command needs before it runs is in one table, COMMANDS, checked
    in one place (_command); see the rules above it. A listener of another
    kind has a table of its own, made of COMMANDS's rows (Session.port: Port).
 9. Output is bounded: once OUTPUT_PAUSE octets of replies wait for the driver
    (data_to_send), no further command is taken from the input until the
    driver calls resume(); `wants_input` tells the driver when to read. One
    read of input can therefore never become an unbounded amount of replies
    (EHLO answers ~16 octets per octet asked).
10. Synchronisation (RFC 2920 section 3.1; Postfix's
    smtpd_forbid_unauth_pipelining): a client may send ahead only within a
    group, and only once EHLO has offered PIPELINING. Input before the
    greeting, after a command that must end a group (COMMANDS' `last`
    column), or after any command before EHLO gets 554 5.5.0 and the session
    ends: none of it is executed. Input after QUIT is dropped unread.
"""

import base64
import dataclasses
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backupmx import addresses, replies
from backupmx.envelope import Envelope, Recipient
from backupmx.replies import Reply
from backupmx.smtp_arguments import bdat_size, etrn_request, parse_recipient, parse_sender
from backupmx.smtp_body import ChunkedTransfer, ChunkReader, DataTransfer
from backupmx.smtp_counts import CommandLog, ErrorCounts
from backupmx.smtp_events import (AuthRequest, AuthResponse, EtrnRequest, MailAdmission,  # noqa: F401 - events
                                  MessageAborted, MessageData, MessageReceived, MessageStarted, PipeliningViolation,
                                  RecipientAdmission, Refused, StartTLS)

if TYPE_CHECKING:
    from backupmx.config import Config, DomainConfig

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF. The
# AUTH line may carry an initial response: RFC 4954 section 4 allows 12288.
MAX_COMMAND_LINE = 512
MAX_AUTH_LINE = 12288
# RFC 7230 methods: an HTTP client talking to the SMTP port ends the session at once.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# Rule 9: reply octets waiting for the driver before the session stops taking commands.
OUTPUT_PAUSE = 16 * 1024
# Commands we know but do not provide (RFC 5321 4.1.3 / 4.3.2).
UNIMPLEMENTED = frozenset({"EXPN", "TURN", "SEND", "SOML", "SAML", "ATRN"})  # ATRN: odmr.py, on listen_odmr only
# SASL mechanisms where the server speaks first: no initial response (RFC 4954 4).
# SCRAM-SHA-256 (RFC 5802) is client-first: its client-first message may be the initial response.
SERVER_FIRST = frozenset({"CRAM-MD5"})
# Closing replies that are no refusal of a command: the driver logs these itself.
NOT_REFUSALS = frozenset({replies.TIMEOUT, replies.SHUTTING_DOWN, replies.SESSION_TIME_EXCEEDED})


# (ehlo_lines function, id(settings), tls_active, auth_offered) -> (settings, the reply's octets)
_EHLO_REPLIES: dict[tuple, tuple] = {}


class Phase(enum.Enum):
    GREETING = "greeting"  # the 220 is not sent yet: any input is a violation (rule 10)
    COMMAND = "command"  # reading command lines
    DATA = "data"  # reading the message content (smtp_body)
    CHUNK = "chunk"  # reading the octets a BDAT announced (smtp_body.ChunkReader)
    SASL = "sasl"  # reading an AUTH continuation line
    WAITING = "waiting"  # an event waits for the driver's answer
    REVERSED = "reversed"  # ATRN was accepted (odmr.py): the driver is the client now; nothing more is read
    CLOSED = "closed"  # the last reply is in the output; close after sending it


# The phases in which the session reads input (wants_input). A tuple: Enum's __hash__ is Python code.
_READING = (Phase.GREETING, Phase.COMMAND, Phase.SASL, Phase.DATA)


@dataclass(frozen=True)
class SessionSettings:
    """What the session knows of the server: values, given by the driver (rule 7)."""
    hostname: str
    domains: Mapping[str, "DomainConfig"]  # the configured domains: relay control and recipient lists
    etrn_domains: Mapping[str, frozenset[str]]  # user -> the domains that user may ETRN
    max_message_size: int
    max_recipients: int
    max_auth_failures: int
    max_junk_commands: int = 100  # commands that move no mail per session (rule 6; Postfix's smtpd_junk_command_limit)
    auth_mechanisms: tuple[str, ...] = ()  # offered once TLS is active; () = no AUTH
    tls_available: bool = False  # a certificate is configured (offer STARTTLS)
    tls_active: bool = False  # implicit TLS: the session starts encrypted
    # The limits on what a stranger's refusals and junk commands cost (ErrorCounts, max_junk_commands).
    # Off where the peer is the backup that `backupmx atrn` chose and verified, and the refusals are
    # the local MTA's deferrals passed on (atrn_relay): ending that session would leave the mail
    # behind them on the backup, the same mail first again at every ATRN.
    client_limits: bool = True

    @classmethod
    def from_config(cls, config: "Config", **values) -> "SessionSettings":
        return cls(hostname=config.hostname, domains=config.domains,
                   etrn_domains={name: user.domains for name, user in config.users.items()},
                   max_message_size=config.max_message_size, max_recipients=config.max_recipients,
                   max_auth_failures=config.max_auth_failures, max_junk_commands=config.max_junk_commands,
                   auth_mechanisms=config.auth_mechanisms if config.users else (), **values)

    def with_tls(self, *, available: bool, active: bool) -> "SessionSettings":
        return dataclasses.replace(self, tls_available=available, tls_active=active)

    def domain(self, name: str) -> "DomainConfig | None":
        """The configured domain `name` (any case, trailing dot, U-labels), or None."""
        found = self.domains.get(name)  # already in the form compared in: the usual case
        if found is not None:
            return found
        try:
            return self.domains.get(addresses.normalize_domain(name))
        except ValueError:
            return None

    def flushable(self, user: str | None, name: str, subdomains: bool) -> tuple[str, ...]:
        """The configured domains an ETRN for `name` (@name: and its subdomains) names that `user` may flush."""
        allowed = self.etrn_domains.get(user, frozenset())
        if subdomains:
            found = [d for d in self.domains if d == name or d.endswith("." + name)]
        else:
            found = [name] if name in self.domains else []
        return tuple(d for d in found if d in allowed)


@dataclass
class Session:
    """One SMTP connection, from the greeting to the close."""

    settings: SessionSettings
    hold_greeting: bool = False  # the driver sends the 220 later, with greet() (greet_pause)
    helo: str | None = None
    esmtp: bool = False
    tls_active: bool = False
    user: str | None = None  # the authenticated user name
    envelope: Envelope | None = None
    phase: Phase = Phase.COMMAND
    progress: int = 0  # grows with each command and DATA_PROGRESS_OCTETS of data
    error_counts: "ErrorCounts | None" = None  # made at the first refusal, dropped with each queued message
    auth_failures: int = 0
    junk_commands: int = 0  # since the session's start or its last queued message (as Postfix counts)
    _input: bytearray = field(default_factory=bytearray)
    _output: list = field(default_factory=list)
    # Plain attributes, not properties: the driver reads them after every callback.
    output_size: int = 0  # octets of replies waiting for data_to_send (rule 9)
    backlogged: bool = False  # commands wait in the input until the driver calls resume() (rule 9)
    closed: bool = False  # the final reply is produced: send the output, then close (phase CLOSED)
    events: list = field(default_factory=list)  # for the driver, oldest first (next_event() takes one)
    _discarding_long_line: bool = False
    _recipients_tried: int = 0
    _data: DataTransfer | None = None
    _chunk: ChunkReader | None = None  # the BDAT chunk being read
    _chunked: ChunkedTransfer | None = None  # the BDAT content of a transaction (stale once the envelope changes)
    _waiting_for: tuple = ()  # the event types whose answer the session waits for
    _asked: object = None  # the MailAdmission or RecipientAdmission waiting for its answer
    commands: "CommandLog" = field(default_factory=lambda: CommandLog())  # Refused events; disconnect counts

    def __post_init__(self):
        self.tls_active = self.settings.tls_active
        if self.hold_greeting:
            self.phase = Phase.GREETING
        else:
            self._reply(replies.GREETING)

    # --- the driver's interface -----------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client (already decrypted under TLS)."""
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.GREETING:
            return self._violation("CONNECT", data)
        self._input += data
        self._process()

    def greet(self) -> None:
        """Send the 220 held back by hold_greeting (the greet_pause is over)."""
        if self.phase is Phase.GREETING:
            self.phase = Phase.COMMAND
            self._reply(replies.GREETING)

    @property
    def wants_input(self) -> bool:
        """Read more now? Not while replies pile up or an event waits for its answer (rule 9)."""
        return self.phase in _READING and not self.backlogged

    def resume(self) -> None:
        """Go on with the input held back while replies piled up (rule 9)."""
        if self.backlogged:
            self._process()

    def next_event(self):
        """The next event for the driver, or None."""
        return self.events.pop(0) if self.events else None

    def data_to_send(self) -> bytes:
        """Reply bytes produced so far; the driver writes them in one go."""
        out = b"".join(self._output)
        self._output.clear()
        self.output_size = 0
        return out

    @property
    def idle(self) -> bool:
        """Between transactions, waiting for a command (safe to stop the server)."""
        return self.phase is Phase.COMMAND and self.envelope is None and not self._input

    def message_queued(self, queue_id: str) -> None:
        self._answer(MessageReceived)
        self._reply(replies.QUEUED, queue_id=queue_id)
        self.envelope = self.error_counts = None
        self.junk_commands = 0  # a client that delivers mail is forgiven its NOOPs and errors (as Postfix does)
        self._process()

    def message_refused(self, reply: Reply) -> None:
        self._answer(MessageReceived)
        self._reply(reply)
        self.envelope = None
        self._process()

    def mail_admitted(self, refusal: Reply | None = None, **fields: object) -> None:
        asked = self._answer(MailAdmission)
        if refusal is not None:
            self._reply(refusal, fields)
        else:
            self.envelope = asked.envelope
            self._recipients_tried = 0
            self._reply(replies.SENDER_OK)
        self._process()

    def recipient_admitted(self, refusal: Reply | None = None, **fields: object) -> None:
        asked = self._answer(RecipientAdmission)
        if refusal is not None:
            self._reply(refusal, fields, address=asked.recipient.address)
        else:
            self.envelope.recipients.append(asked.recipient)
            self._reply(replies.RECIPIENT_OK)
        self._process()

    def tls_started(self) -> None:
        """RFC 3207 4.2: forget everything learned from the client in plaintext."""
        self._answer(StartTLS)
        self.tls_active = True
        self.helo, self.esmtp, self.user, self.envelope = None, False, None, None
        self._input.clear()
        self._process()

    def auth_challenge(self, data: bytes) -> None:
        """The SASL exchange goes on: a 334 with `data`, then the client's next line."""
        self._answer(AuthRequest, AuthResponse)
        if self.closed:  # a deadline ended the session while the driver checked: its 421 was the last word
            return
        self._send(b"334 " + base64.b64encode(data) + b"\r\n")
        self.phase = Phase.SASL
        self._process()

    def auth_result(self, user: str | None) -> None:
        """The exchange ended: `user` authenticated, or None for wrong credentials."""
        self._answer(AuthRequest, AuthResponse)
        if user is not None:
            self.user = user
            self._reply(replies.AUTH_SUCCEEDED)
        else:
            self._auth_failed()
        self._process()

    def auth_blocked(self) -> None:
        """The client failed too often, in any session (max_auth_failures_per_client): 421, no check."""
        self._answer(AuthRequest, AuthResponse)
        self._close_with(replies.CLIENT_AUTH_BLOCKED)

    def auth_malformed(self) -> None:
        """A response that is not the mechanism's format (RFC 4954 4: 501, the exchange ends)."""
        self._answer(AuthRequest, AuthResponse)
        self._reply(replies.AUTH_BAD_RESPONSE)
        self._process()

    def etrn_result(self, pending: dict | None, argument: str) -> None:
        self._answer(EtrnRequest)
        self._reply(*etrn_reply(pending, argument))
        self._process()

    def timeout(self) -> None:
        """The per-command deadline passed (RFC 5321 4.5.3.2)."""
        self._close_with(replies.TIMEOUT)

    def shutdown(self) -> None:
        """The server is stopping and this session's time is up."""
        self._close_with(replies.SHUTTING_DOWN)

    def time_limit_reached(self) -> None:
        """The session's whole life (max_session_time) is over, whatever it was doing."""
        self._close_with(replies.SESSION_TIME_EXCEEDED)

    # --- input framing --------------------------------------------------

    def _process(self) -> None:
        self.backlogged = False
        while True:
            phase = self.phase
            if phase is Phase.COMMAND or phase is Phase.SASL:
                if self.output_size >= OUTPUT_PAUSE and self._input:
                    self.backlogged = True  # rule 9: until the driver takes the output and calls resume()
                    return
                if not self._next_line():
                    return
            elif phase is Phase.DATA:
                done = self._data.read(self._input)
                self.progress += self._data.ticks
                self._data.ticks = 0
                if done is None:
                    return
                if done:
                    self._end_of_data()
            elif phase is Phase.CHUNK:
                done = self._chunk.read(self._input)
                self.progress += self._chunk.ticks
                self._chunk.ticks = 0
                if not done:
                    return
                self._end_of_chunk()
            else:
                return

    def _next_line(self) -> bool:
        """Take the next line, up to and including its LF, and answer it (a command, or a SASL
        response); False when the input holds no complete line.

        A line longer than any limit is dropped as it arrives and answered once
        its end is seen, so memory stays bounded.
        """
        data = self._input
        end = data.find(b"\n")
        if end < 0:
            if len(data) > MAX_AUTH_LINE:
                self._discarding_long_line = True
                data.clear()
            return False
        length = end + 1
        # One copy when the input is this line alone (the usual case), not a slice and its copy.
        line = bytes(data) if length == len(data) else bytes(data[:length])
        del data[:length]
        self.progress += 1
        sasl = self.phase is Phase.SASL
        too_long = self._discarding_long_line or length > MAX_AUTH_LINE
        self._discarding_long_line = False
        # Rule 1: the line ends in CRLF and holds no other CR: its first CR is just before its LF.
        # A lone LF (end 0) has no CR at all, and find's -1 would pass for "just before it".
        if too_long or end == 0 or line.find(b"\r") != end - 1:
            if not sasl:
                self.commands.begin("UNKNOWN")  # a line we cannot frame is no command
            if too_long:
                self._reply(replies.AUTH_LINE_TOO_LONG if sasl else replies.LINE_TOO_LONG)
            else:
                self._reply(replies.BARE_LINE_ENDING)
            self._end_sasl()
            return True
        text = line[:-2].decode("latin-1")
        if sasl:
            if self._input:  # RFC 4954 4: the client waits for our answer to each response
                self._violation("AUTH", bytes(self._input))
                return True
            self._sasl_line(text)
        else:
            self._command(text, length)
        return True

    # --- commands ---------------------------------------------------------

    def _command(self, text: str, length: int) -> None:
        """One command line: framing checks, then COMMANDS: its needs, in order, then its handler."""
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        nul = "\0" in text
        command = self.port.commands.get(verb) if not nul else None
        self.commands.begin(verb if command is not None else "UNKNOWN", argument)
        if length > MAX_COMMAND_LINE and verb != "AUTH":
            return self._reply(replies.LINE_TOO_LONG)
        if verb in HTTP_METHODS:
            return self._close_with(replies.HTTP_REFUSED)
        if nul:
            return self._reply(replies.UNRECOGNIZED)
        if command is None:
            return self._reply(replies.NOT_IMPLEMENTED if verb in UNIMPLEMENTED else replies.UNRECOGNIZED)
        if self._input and verb != "QUIT" and (command.last or not self.esmtp):
            return self._violation(verb, bytes(self._input))  # rule 10
        argument = argument.strip(" ")
        if command.junk is not None and command.junk(self, argument) and self.settings.client_limits:  # rule 6
            self.junk_commands += 1
            if self.junk_commands > self.settings.max_junk_commands:
                return self._close_with(replies.TOO_MANY_JUNK_COMMANDS)
        for need in command.needs:  # rule 1 of the command table (_unmet, without its call)
            if not need.holds(self, argument):
                return self._reply(*need.refusal(self, verb))
        command.handler(self, argument)

    def _unmet(self, needs: tuple["Need", ...], verb: str, argument: str) -> tuple[Reply, dict] | None:
        """Rule 1 of the command table: the refusal of the first need that does not hold."""
        for need in needs:
            if not need.holds(self, argument):
                return need.refusal(self, verb)
        return None

    def _helo(self, argument: str, esmtp: bool) -> None:
        if not argument or " " in argument or not argument.isascii() or not argument.isprintable():
            self._reply(replies.SYNTAX_ERROR, usage=("EHLO" if esmtp else "HELO") + " hostname")
            return
        self.helo, self.esmtp, self.envelope = argument, esmtp, None
        if not esmtp:
            self._reply(replies.HELO_OK)
            return
        self._send(ehlo_reply(self.port, self.settings, self.tls_active, self._auth_offered()))

    def _cmd_helo(self, argument: str) -> None:
        self._helo(argument, esmtp=False)

    def _cmd_ehlo(self, argument: str) -> None:
        self._helo(argument, esmtp=True)

    def _cmd_mail(self, argument: str) -> None:
        if argument[:5].upper() != "FROM:":
            return self._reply(replies.SYNTAX_ERROR, usage="MAIL FROM:<address>")
        envelope = parse_sender(self.settings, argument[5:], esmtp=self.esmtp)
        if isinstance(envelope, tuple):
            return self._reply(*envelope)
        self._ask(MailAdmission(envelope))

    def _cmd_rcpt(self, argument: str) -> None:
        if argument[:3].upper() != "TO:":
            return self._reply(replies.SYNTAX_ERROR, usage="RCPT TO:<address>")
        self._recipients_tried += 1
        recipient = parse_recipient(self.settings, self.envelope, argument[3:], esmtp=self.esmtp)
        if isinstance(recipient, tuple):
            return self._reply(*recipient)
        if _already_given(self.envelope, recipient):
            return self._reply(replies.RECIPIENT_OK)  # the same mailbox twice: admitted once
        self._ask(RecipientAdmission(self.envelope, recipient))

    def _cmd_data(self, argument: str) -> None:
        self._reply(replies.START_DATA)
        self.phase = Phase.DATA
        self._data = DataTransfer(self.settings.max_message_size, self.events)
        self.events.append(MessageStarted(self.envelope))

    # --- BDAT (RFC 3030) ------------------------------------------------------

    def _cmd_bdat(self, argument: str) -> None:
        """BDAT <size> [LAST]: the chunk is read in every case, and answered at its end.

        The row has no needs: what BDAT needs is checked here, after its size is
        known, because a refused chunk must still be read through (the octets
        after the command are data, never commands: rule 2).
        """
        size = bdat_size(argument)
        if size is None:
            return self._close_with(replies.BDAT_SYNTAX)
        refusal = self._unmet(BDAT_NEEDS, "BDAT", argument)
        transfer = None
        if refusal is None:
            transfer = self._chunked_transfer()
            if transfer is None:
                transfer = ChunkedTransfer(self.envelope, self.settings.max_message_size, self.events)
                self._chunked = transfer
                self.events.append(MessageStarted(self.envelope))
        self._chunk = ChunkReader(*size, transfer, refusal)
        self.phase = Phase.CHUNK

    def _chunked_transfer(self) -> ChunkedTransfer | None:
        """The BDAT content of the current transaction, if it has any (rule 5)."""
        chunked = self._chunked
        return chunked if chunked is not None and chunked.envelope is self.envelope else None

    def _end_of_chunk(self) -> None:
        self.progress += 1
        chunk, self._chunk = self._chunk, None
        self.phase = Phase.COMMAND
        if chunk.refusal is not None:
            return self._reply(*chunk.refusal)
        transfer = chunk.transfer
        if chunk.last:
            transfer.finish()
        if transfer.failure is not None:
            # One failed message is one error (MAX_ERRORS), however many chunks
            # a client pipelined after the one that failed it.
            self._reply(transfer.failure, counted=not transfer.reported)
            transfer.reported = True
            if chunk.last:
                self.envelope = None
            return
        if not chunk.last:
            return self._reply(replies.CHUNK_RECEIVED, octets=chunk.octets)
        self._received(transfer)

    def _cmd_rset(self, argument: str) -> None:
        self.envelope = None
        self._reply(replies.OK)

    def _cmd_noop(self, argument: str) -> None:
        self._reply(replies.OK)

    def _cmd_quit(self, argument: str) -> None:
        self._close_with(replies.CLOSING)

    def _cmd_vrfy(self, argument: str) -> None:
        self._reply(replies.VRFY_CANNOT)

    def _cmd_help(self, argument: str) -> None:
        self._reply(replies.HELP)

    def _cmd_starttls(self, argument: str) -> None:
        self._reply(replies.READY_FOR_TLS)
        self._input.clear()  # rule 4: pipelined plaintext is never executed
        self._wait_for(StartTLS())

    def _cmd_etrn(self, argument: str) -> None:
        request = etrn_request(self.settings, self.user, argument)
        if isinstance(request, tuple):
            return self._reply(*request)
        self._wait_for(request)

    # --- AUTH (RFC 4954): the session frames it, the driver runs the mechanism ---

    def _auth_offered(self) -> bool:
        return self.tls_active and bool(self.settings.auth_mechanisms)

    def _cmd_auth(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self.settings.auth_mechanisms or (mechanism in SERVER_FIRST and initial):
            return self._reply(replies.AUTH_UNKNOWN_MECHANISM)
        self._wait_for(AuthRequest(mechanism, initial or None))

    def _sasl_line(self, text: str) -> None:
        if text == "*":
            self.phase = Phase.COMMAND
            return self._reply(replies.AUTH_ABORTED)
        self._wait_for(AuthResponse(text))

    def _end_sasl(self) -> None:
        if self.phase is Phase.SASL:
            self.phase = Phase.COMMAND

    def _auth_failed(self) -> None:
        self.auth_failures += 1
        if self.auth_failures >= self.settings.max_auth_failures:
            return self._close_with(replies.TOO_MANY_AUTH_FAILURES)
        self._reply(replies.AUTH_FAILED)

    # --- DATA ---------------------------------------------------------------

    def _end_of_data(self) -> None:
        self.progress += 1
        transfer, self._data = self._data, None
        self.phase = Phase.COMMAND
        if transfer.failure is not None:
            self._reply(transfer.failure)
            self.envelope = None
            return
        self._received(transfer)

    def _received(self, transfer) -> None:
        """The content is complete and clean: ask for the commit (rule 6)."""
        self.envelope.needs_smtputf8 = needs_smtputf8(self.envelope, transfer.headers.eight_bit)
        self._wait_for(MessageReceived(self.envelope, transfer.size))

    # --- replies and waiting --------------------------------------------

    def _reply(self, reply: Reply, fields: dict | None = None, *, counted: bool = True, **more: object) -> None:
        if self.closed:
            return
        if fields or more:
            rendered = reply.render(hostname=self.settings.hostname, **{**(fields or {}), **more})
        else:  # the same octets every time (kept): most replies
            rendered = replies.rendered(reply, self.settings.hostname)
        self._output.append(rendered)  # _send's work, without its call: every reply comes here
        self.output_size += len(rendered)
        if reply.code >= 400:
            refused = self.commands.refuse(reply, rendered, self.helo, self.envelope)
            if counted and refused:  # (the chunks after a refused one: one error, one line)
                self.events.append(refused)
            if counted and self.settings.client_limits:
                self.error_counts = counts = self.error_counts or ErrorCounts()  # (most sessions need none)
                if counts.one_too_many(reply) and self.phase is not Phase.CLOSED:
                    self._close_with(replies.TOO_MANY_ERRORS)

    def _close_with(self, reply: Reply) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.closed = True
        self._input.clear()
        self.backlogged = False
        self._send(rendered := replies.rendered(reply, self.settings.hostname))
        if reply.code >= 400 and reply not in NOT_REFUSALS:  # it ends the session: always worth a line
            self.events.append(self.commands.refuse(reply, rendered, self.helo, self.envelope, ends_session=True))

    def _send(self, data: bytes) -> None:
        self._output.append(data)
        self.output_size += len(data)

    def _violation(self, after: str, early_input: bytes) -> None:  # rule 10: nothing sent ahead is run
        self.events.append(PipeliningViolation(after, early_input[:64]))
        self._close_with(replies.PROTOCOL_SYNCHRONIZATION)

    def _wait_for(self, event) -> None:
        self.phase = Phase.WAITING
        self._waiting_for = (type(event),)
        self.events.append(event)

    def _ask(self, question) -> None:
        """Wait for a question's answer, keeping the question (MailAdmission, RecipientAdmission)."""
        self._asked = question
        self._wait_for(question)

    def _answer(self, *event_types: type):
        """Check that one of `event_types` is waiting for this answer; the question it asked, if kept."""
        for event_type in event_types:
            if event_type in self._waiting_for:
                break
        else:
            raise RuntimeError(f"no {event_types[0].__name__} is waiting for an answer")
        self._waiting_for = ()
        if self.phase is Phase.WAITING:
            self.phase = Phase.COMMAND
        asked, self._asked = self._asked, None
        return asked


# --- what the session answers from its own state: EHLO's lines, ETRN's reply, SMTPUTF8 ---


def needs_smtputf8(envelope: Envelope, eight_bit_header: bool) -> bool:
    """RFC 6531 3.2: a SMTPUTF8 message with a UTF-8 address or header goes only to a
    server that offers SMTPUTF8 (the flusher fails it with 5.6.7 elsewhere)."""
    return envelope.smtputf8 and (eight_bit_header or not all(
        a.isascii() for a in [envelope.sender] + [r.address for r in envelope.recipients]))


def ehlo_reply(port: "Port", settings: SessionSettings, tls_active: bool, auth_offered: bool) -> bytes:
    """The EHLO reply (port.ehlo_lines): the same octets for every session of a worker with these
    settings, TLS and AUTH state, so kept (an entry holds its settings: while it is kept, no
    other object can have its id)."""
    key = (port.ehlo_lines, id(settings), tls_active, auth_offered)
    entry = _EHLO_REPLIES.get(key)
    if entry is None or entry[0] is not settings:
        if len(_EHLO_REPLIES) >= 64:
            _EHLO_REPLIES.clear()
        lines = port.ehlo_lines(settings, tls_active, auth_offered)
        entry = _EHLO_REPLIES[key] = (settings, replies.render_lines(250, lines))
    return entry[1]


def ehlo_lines(settings: SessionSettings, tls_active: bool, auth_offered: bool) -> list[str]:
    """The EHLO reply's lines: our name, then the extensions offered now."""
    lines = [settings.hostname, "PIPELINING", f"SIZE {settings.max_message_size}",
             "8BITMIME", "ENHANCEDSTATUSCODES", "DSN", "ETRN", "SMTPUTF8", "CHUNKING"]
    if settings.tls_available and not tls_active:
        lines.append("STARTTLS")
    if auth_offered:
        lines.append("AUTH " + " ".join(settings.auth_mechanisms))
    return lines


def etrn_reply(pending: dict | None, argument: str) -> tuple[Reply, dict]:
    """The RFC 1985 reply to an ETRN whose flush requests were recorded: {domain: messages
    waiting}, or None when the queue could not record them."""
    total = sum(pending.values()) if pending is not None else 0
    if pending is None:
        return replies.ETRN_UNABLE, {"domain": argument}
    if total == 0:
        return replies.ETRN_NOTHING_WAITING, {"domain": argument}
    if argument.startswith("@"):
        return replies.ETRN_STARTED, {"domain": argument}
    return replies.ETRN_PENDING_STARTED, {"count": total, "domain": argument}


# --- the command table ---------------------------------------------------------
#
# Rule 1: a command runs only when every Need of its row holds, checked in the
#         row's order, in one place (Session._command); the first that does
#         not hold is the reply, and nothing else happens.
# Rule 2: a handler may rely on its Needs and does not check them again; what
#         it checks itself is the argument's syntax and the policy on it.
# Rule 3: a handler ends in exactly one of: a reply, a close (_close_with), or
#         an event that waits for the driver's answer (_wait_for / _ask).
# Rule 4: AUTH state (user) and the transaction (envelope) are reset by
#         STARTTLS (RFC 3207 4.2); EHLO/HELO and RSET end the transaction.
# Rule 5: a `last` command must end a pipelined group (RFC 2920 3.1: EHLO,
#         DATA, VRFY, NOOP; RFC 3207 STARTTLS and RFC 4954 AUTH change the
#         session's state too; ETRN as Exim and Postfix treat it): input
#         already waiting when one runs is a violation (module rule 10).
# Rule 6: a `junk` command counts toward max_junk_commands (Postfix's
#         smtpd_junk_command_limit: NOOP, RSET, VRFY, ETRN; HELP too here),
#         and so does any other command that moves no mail, each costing us a
#         reply: HELO/EHLO once the session has a name (sendmail's
#         MAXHELOCOMMANDS; STARTTLS clears the name, RFC 3207 4.2), RCPT for a
#         mailbox already admitted, and BDAT 0 without LAST (RFC 3030 2 allows
#         it; a client that sends it again and again is stalling).
# New columns are new fields of Command, read in _command.


@dataclass(frozen=True)
class Need:
    """A precondition: `holds(session, argument)`, else the reply `refusal` gives."""
    name: str
    holds: Callable[[Session, str], bool]
    refusal: Callable[[Session, str], tuple[Reply, dict]]


def _refuse(reply: Reply) -> Callable[[Session, str], tuple[Reply, dict]]:
    return lambda session, verb: (reply, {})


HELO = Need("HELO/EHLO first", lambda s, a: s.helo is not None, _refuse(replies.NEED_HELO))
NO_ARGUMENT = Need("no argument", lambda s, a: not a, lambda s, verb: (replies.SYNTAX_ERROR, {"usage": verb}))
AN_ARGUMENT = Need("an argument", lambda s, a: bool(a),
                   lambda s, verb: (replies.SYNTAX_ERROR, {"usage": f"{verb} address"}))
NO_TRANSACTION = Need("no transaction", lambda s, a: s.envelope is None, _refuse(replies.NOT_IN_TRANSACTION))
NOT_NESTED = Need("no transaction yet", lambda s, a: s.envelope is None, _refuse(replies.NESTED_MAIL))
TRANSACTION = Need("a transaction", lambda s, a: s.envelope is not None, _refuse(replies.NEED_MAIL))
NOT_CHUNKED = Need("no BDAT yet", lambda s, a: s._chunked_transfer() is None, _refuse(replies.DATA_AFTER_BDAT))
NO_CHUNK_YET = Need("no BDAT yet", NOT_CHUNKED.holds, _refuse(replies.RCPT_AFTER_BDAT))
A_RECIPIENT = Need("a recipient", lambda s, a: bool(s.envelope.recipients),
                   lambda s, verb: (replies.NO_VALID_RECIPIENTS if s._recipients_tried else replies.NEED_RCPT, {}))
TLS = Need("TLS", lambda s, a: s.tls_active, _refuse(replies.ENCRYPTION_REQUIRED))
NO_TLS_YET = Need("no TLS yet", lambda s, a: not s.tls_active, _refuse(replies.ALREADY_TLS))
TLS_OFFERED = Need("a certificate", lambda s, a: s.settings.tls_available, _refuse(replies.TLS_NOT_AVAILABLE))
AUTH_OFFERED = Need("AUTH offered", lambda s, a: s._auth_offered(), _refuse(replies.AUTH_NOT_AVAILABLE))
NOT_AUTHENTICATED = Need("not authenticated", lambda s, a: s.user is None, _refuse(replies.ALREADY_AUTHENTICATED))
AUTHENTICATED = Need("authenticated", lambda s, a: s.user is not None, _refuse(replies.AUTH_REQUIRED))


BDAT_NEEDS = (HELO, TRANSACTION, A_RECIPIENT)


# Rule 6's column: whether this command, with this argument, moves no mail.
def _always(session: Session, argument: str) -> bool:
    return True


def _greeting_again(session: Session, argument: str) -> bool:
    return session.helo is not None  # STARTTLS clears it (RFC 3207 4.2): that EHLO is no repeat


def _recipient_again(session: Session, argument: str) -> bool:
    # No recipient yet (a message's first RCPT, most often its only one): nothing to repeat,
    # and no second parse of the argument (_cmd_rcpt parses it) on that hot path.
    if session.envelope is None or not session.envelope.recipients or argument[:3].upper() != "TO:":
        return False
    recipient = parse_recipient(session.settings, session.envelope, argument[3:], esmtp=session.esmtp)
    return not isinstance(recipient, tuple) and _already_given(session.envelope, recipient)


def _empty_chunk(session: Session, argument: str) -> bool:
    return bdat_size(argument) == (0, False)


def _already_given(envelope: Envelope, recipient: Recipient) -> bool:
    """The transaction has this mailbox already (RFC 5321 local parts compared as we fold them)."""
    if not envelope.recipients:
        return False
    folded = addresses.fold_local_part(recipient.address)
    return any(addresses.fold_local_part(r.address) == folded for r in envelope.recipients)


@dataclass(frozen=True)
class Command:
    handler: Callable[[Session, str], None]
    needs: tuple[Need, ...] = ()
    last: bool = False  # rule 5: must end a pipelined group
    junk: Callable[[Session, str], bool] | None = None  # rule 6: when it counts toward max_junk_commands


COMMANDS: dict[str, Command] = {
    "HELO": Command(Session._cmd_helo, last=True, junk=_greeting_again),
    "EHLO": Command(Session._cmd_ehlo, last=True, junk=_greeting_again),
    "MAIL": Command(Session._cmd_mail, (HELO, NOT_NESTED)),
    "RCPT": Command(Session._cmd_rcpt, (TRANSACTION, NO_CHUNK_YET), junk=_recipient_again),
    "DATA": Command(Session._cmd_data, (NO_ARGUMENT, TRANSACTION, A_RECIPIENT, NOT_CHUNKED), last=True),
    # BDAT's octets after the command are data, not pipelined commands; its
    # needs (BDAT_NEEDS) are checked once the size is read (_cmd_bdat). It does
    # not end a group (RFC 3030 2: BDAT may be pipelined, also after MAIL and RCPT).
    "BDAT": Command(Session._cmd_bdat, junk=_empty_chunk),
    "RSET": Command(Session._cmd_rset, (NO_ARGUMENT,), junk=_always),
    "NOOP": Command(Session._cmd_noop, last=True, junk=_always),
    "QUIT": Command(Session._cmd_quit),
    "VRFY": Command(Session._cmd_vrfy, (AN_ARGUMENT,), last=True, junk=_always),
    "HELP": Command(Session._cmd_help, junk=_always),
    "STARTTLS": Command(Session._cmd_starttls, (NO_ARGUMENT, NO_TLS_YET, TLS_OFFERED), last=True),
    "AUTH": Command(Session._cmd_auth, (HELO, TLS, AUTH_OFFERED, NOT_AUTHENTICATED, NO_TRANSACTION), last=True),
    "ETRN": Command(Session._cmd_etrn, (NO_TRANSACTION, AUTHENTICATED), last=True, junk=_always),
}


@dataclass(frozen=True)
class Port:
    """What the sessions of one kind of listener speak: the command table (rule 8) and the
    EHLO lines. Session.port is the SMTP port's; a subclass for another port sets its own
    (odmr.OdmrSession)."""
    commands: Mapping[str, Command]
    ehlo_lines: Callable[[SessionSettings, bool, bool], list[str]]  # (settings, tls_active, auth_offered)


Session.port = Port(COMMANDS, ehlo_lines)
