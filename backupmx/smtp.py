"""The SMTP server session as a state machine with no I/O: bytes in, replies and events out.

The driver (connection.py) feeds socket bytes to `receive_data`, writes what
`data_to_send` returns, and handles the events from `next_event`. Some events
need an answer before the session goes on (the message is committed, the
password checked, the flush recorded, TLS started); until the driver gives it,
input is only buffered. This module never imports socket, ssl, sqlite3, os,
time or logging (tests/test_smtp.py asserts it).

Rules every change must keep:
 1. Lines end at CRLF only. A bare CR or LF is an error, never a line end, and
    only CRLF "." CRLF ends DATA (SMTP smuggling, CVE-2023-51764). A body
    with a NUL is refused too (554 5.6.0): a peer that drops NULs would frame it
    differently.
 2. Every buffer is bounded. An over-long line or message is read through to
    its end, and only then answered, so the session stays in step.
 3. While an event waits for its answer nothing else is processed.
 4. After the 220 to STARTTLS everything already buffered is dropped: bytes a
    client pipelined in plaintext are never executed (RFC 3207 section 6,
    CVE-2011-0411). TLS then resets the session to its start.
 5. A transaction (an Envelope) exists from MAIL to the end of DATA or RSET;
    ending it makes a new one rather than clearing fields.
 6. The 250 for a message is sent only when the driver says it is committed.

Policy comes from the settings: the config (domains, users, limits) and an
optional `admission` object (quota.Admission) that answers "may this domain
take more mail now?". That object is the driver's and may look at the queue;
the session only asks, so it stays free of I/O itself.
"""

import base64
import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime

from backupmx import addresses, replies
from backupmx import auth as sasl
from backupmx.addresses import AddressError, NonASCIIAddress
from backupmx.envelope import Envelope, Recipient
from backupmx.replies import Reply

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF. The
# AUTH line may carry an initial response: RFC 4954 section 4 allows 12288.
MAX_COMMAND_LINE = 512
MAX_AUTH_LINE = 12288
# RFC 5321 4.5.3.1.6 says 1000 octets per text line; real mail breaks that, so
# we accept longer lines up to this bound and refuse the message beyond it.
MAX_DATA_LINE = 64 * 1024
# DATA counts as progress (for the per-command deadline) once per this many octets.
DATA_PROGRESS_OCTETS = 64 * 1024
# 5xx replies in one session before it is ended with 421 (Postfix's hard limit is 20).
MAX_ERRORS = 20
# More Received headers than this means a loop (RFC 5321 6.3); Postfix uses 50.
MAX_RECEIVED_HEADERS = 50
# RFC 7230 methods: an HTTP client talking to the SMTP port ends the session at once.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# Commands we know but do not provide (RFC 5321 4.1.3 / 4.3.2).
UNIMPLEMENTED = frozenset({"EXPN", "TURN", "SEND", "SOML", "SAML", "BDAT"})


# --- events ---------------------------------------------------------------

@dataclass(frozen=True)
class MessageStarted:
    """DATA accepted: the driver opens a spool for the body."""
    envelope: Envelope


@dataclass(frozen=True)
class MessageData:
    """A piece of the body, dot-unstuffed, CRLF line endings as received."""
    data: bytes


@dataclass(frozen=True)
class MessageAborted:
    """The body will not be queued (bare line ending, too big, loop): drop the spool."""
    reply: Reply


@dataclass(frozen=True)
class MessageReceived:
    """End of DATA. Answer with `message_queued(queue_id)` or `message_refused(reply)`."""
    envelope: Envelope
    size: int


@dataclass(frozen=True)
class StartTLS:
    """The 220 is in the output. Send it in plaintext, then answer with `tls_started()`."""


@dataclass(frozen=True)
class AuthRequest:
    """Check credentials; answer with `auth_result(ok)`.

    PLAIN and LOGIN carry `password`; CRAM-MD5 carries `challenge` and `digest`.
    The credentials are checked outside: scrypt is slow, and is not protocol.
    """
    mechanism: str
    username: str
    password: str | None = None
    challenge: bytes | None = None
    digest: str | None = None
    authzid: str = ""  # PLAIN's authorization identity (RFC 4616), checked by the driver


@dataclass(frozen=True)
class EtrnRequest:
    """Record a flush for `domains`; answer with `etrn_result({domain: pending} or None)`."""
    domains: tuple[str, ...]
    argument: str


class Phase(enum.Enum):
    COMMAND = "command"  # reading command lines
    DATA = "data"  # reading the message body
    SASL = "sasl"  # reading an AUTH continuation line
    WAITING = "waiting"  # an event waits for the driver's answer
    CLOSED = "closed"  # the last reply is in the output; close after sending it


@dataclass
class _SaslExchange:
    """An AUTH exchange in progress."""
    mechanism: str
    step: int = 0
    username: str = ""
    challenge: bytes = b""


@dataclass
class _DataTransfer:
    """What we know about the body being received."""
    size: int = 0
    received_headers: int = 0
    in_headers: bool = True
    at_line_start: bool = True
    failure: Reply | None = None
    progress_octets: int = 0


@dataclass
class SessionSettings:
    """What the session needs to know of the server, filled in by the driver."""
    hostname: str
    config: object  # backupmx.config.Config: domains, users, limits
    tls_available: bool = False  # a certificate is configured (offer STARTTLS)
    tls_active: bool = False  # implicit TLS: the session starts encrypted
    cram_challenge: object = None  # callable returning a fresh CRAM-MD5 challenge (bytes)
    admission: object = None  # quota.Admission: recipient(domain) / message_size(n) -> Reply | None


@dataclass
class Session:
    """One SMTP connection, from the greeting to the close."""

    settings: SessionSettings
    helo: str | None = None
    esmtp: bool = False
    tls_active: bool = False
    user: str | None = None  # the authenticated user name
    envelope: Envelope | None = None
    phase: Phase = Phase.COMMAND
    progress: int = 0  # grows with each command and DATA_PROGRESS_OCTETS of data
    errors: int = 0
    auth_failures: int = 0
    _input: bytearray = field(default_factory=bytearray)
    _output: list = field(default_factory=list)
    _events: list = field(default_factory=list)
    _discarding_long_line: bool = False
    _recipients_tried: int = 0
    _sasl: _SaslExchange | None = None
    _data: _DataTransfer | None = None
    _waiting_for: type | None = None

    def __post_init__(self):
        self.tls_active = self.settings.tls_active
        self._reply(replies.GREETING)

    # --- the driver's interface -----------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client (already decrypted under TLS)."""
        if self.phase is Phase.CLOSED:
            return
        self._input += data
        self._process()

    def next_event(self):
        """The next event for the driver, or None."""
        return self._events.pop(0) if self._events else None

    def data_to_send(self) -> bytes:
        """Reply bytes produced so far; the driver writes them in one go."""
        out = b"".join(self._output)
        self._output.clear()
        return out

    @property
    def closed(self) -> bool:
        """True once the final reply is produced: send the output, then close."""
        return self.phase is Phase.CLOSED

    @property
    def idle(self) -> bool:
        """Between transactions, waiting for a command (safe to stop the server)."""
        return self.phase is Phase.COMMAND and self.envelope is None and not self._input

    @property
    def in_data(self) -> bool:
        return self.phase is Phase.DATA

    def message_queued(self, queue_id: str) -> None:
        self._answer(MessageReceived)
        self._reply(replies.QUEUED, queue_id=queue_id)
        self.envelope = None
        self._process()

    def message_refused(self, reply: Reply) -> None:
        self._answer(MessageReceived)
        self._reply(reply)
        self.envelope = None
        self._process()

    def tls_started(self) -> None:
        """RFC 3207 4.2: forget everything learned from the client in plaintext."""
        self._answer(StartTLS)
        self.tls_active = True
        self.helo, self.esmtp, self.user, self.envelope = None, False, None, None
        self._input.clear()
        self._process()

    def auth_result(self, ok: bool) -> None:
        exchange = self._sasl
        self._sasl = None
        self._answer(AuthRequest)
        if ok:
            self.user = exchange.username
            self._reply(replies.AUTH_SUCCEEDED)
        else:
            self._auth_failed()
        self._process()

    def etrn_result(self, pending: dict | None, argument: str) -> None:
        self._answer(EtrnRequest)
        total = sum(pending.values()) if pending is not None else 0
        if pending is None:
            self._reply(replies.ETRN_UNABLE, domain=argument)
        elif total == 0:
            self._reply(replies.ETRN_NOTHING_WAITING, domain=argument)
        elif argument.startswith("@"):
            self._reply(replies.ETRN_STARTED, domain=argument)
        else:
            self._reply(replies.ETRN_PENDING_STARTED, count=total, domain=argument)
        self._process()

    def timeout(self) -> None:
        """The per-command deadline passed (RFC 5321 4.5.3.2)."""
        self._close_with(replies.TIMEOUT)

    def shutdown(self) -> None:
        """The server is stopping and this session's time is up."""
        self._close_with(replies.SHUTTING_DOWN)

    # --- input framing --------------------------------------------------

    def _process(self) -> None:
        while self.phase in (Phase.COMMAND, Phase.SASL, Phase.DATA):
            if self.phase is Phase.DATA:
                if not self._process_data():
                    return
            else:
                line = self._next_line()
                if line is None:
                    return
                self.progress += 1
                self._process_line(line)

    def _next_line(self) -> bytes | None:
        """The next line up to and including its LF, or None if incomplete.

        A line longer than any limit is dropped as it arrives and returned as
        an empty marker (b"") once its end is seen, so memory stays bounded.
        """
        end = self._input.find(b"\n")
        if end < 0:
            if len(self._input) > MAX_AUTH_LINE:
                self._discarding_long_line = True
                self._input.clear()
            return None
        line = bytes(self._input[:end + 1])
        del self._input[:end + 1]
        if self._discarding_long_line:
            self._discarding_long_line = False
            return b""
        return line

    def _process_line(self, line: bytes) -> None:
        sasl = self.phase is Phase.SASL
        if len(line) > MAX_AUTH_LINE:
            line = b""
        if line == b"":
            self._reply(replies.AUTH_LINE_TOO_LONG if sasl else replies.LINE_TOO_LONG)
            self._abort_sasl()
            return
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            self._reply(replies.BARE_LINE_ENDING)
            self._abort_sasl()
            return
        text = line[:-2].decode("latin-1")
        if sasl:
            self._sasl_response(text)
        else:
            self._command(text, len(line))

    # --- commands ---------------------------------------------------------

    def _command(self, text: str, length: int) -> None:
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if length > MAX_COMMAND_LINE and verb != "AUTH":
            self._reply(replies.LINE_TOO_LONG)
            return
        if verb in HTTP_METHODS:
            self._close_with(replies.HTTP_REFUSED)
            return
        if "\0" in text:
            self._reply(replies.UNRECOGNIZED)
            return
        handler = self._COMMANDS.get(verb)
        if handler is not None:
            handler(self, argument.strip(" "))
        elif verb in UNIMPLEMENTED:
            self._reply(replies.NOT_IMPLEMENTED)
        else:
            self._reply(replies.UNRECOGNIZED)

    def _helo(self, argument: str, esmtp: bool) -> None:
        if not argument or " " in argument or not argument.isascii() or not argument.isprintable():
            self._reply(replies.SYNTAX_ERROR, usage=("EHLO" if esmtp else "HELO") + " hostname")
            return
        self.helo, self.esmtp, self.envelope = argument, esmtp, None
        hostname = self.settings.hostname
        if not esmtp:
            self._reply(replies.HELO_OK)
            return
        lines = [hostname, "PIPELINING", f"SIZE {self.settings.config.max_message_size}",
                 "8BITMIME", "ENHANCEDSTATUSCODES", "DSN", "ETRN"]
        if self.settings.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(self._mechanisms()))
        self._output.append(replies.render_lines(250, lines))

    def _cmd_helo(self, argument: str) -> None:
        self._helo(argument, esmtp=False)

    def _cmd_ehlo(self, argument: str) -> None:
        self._helo(argument, esmtp=True)

    def _cmd_mail(self, argument: str) -> None:
        if self.helo is None:
            return self._reply(replies.NEED_HELO)
        if self.envelope is not None:
            return self._reply(replies.NESTED_MAIL)
        if argument[:5].upper() != "FROM:":
            return self._reply(replies.SYNTAX_ERROR, usage="MAIL FROM:<address>")
        try:
            path, raw_parameters = addresses.split_path_and_parameters(argument[5:])
            sender = addresses.parse_path(path, allow_null=True)
            parameters = addresses.parse_parameters(raw_parameters)
        except NonASCIIAddress:
            return self._reply(replies.NON_ASCII_ADDRESS)
        except AddressError:
            return self._reply(replies.BAD_SENDER)
        envelope = Envelope(sender=sender.address if sender else "")
        problem = self._apply_mail_parameters(envelope, parameters)
        if problem is not None:
            return self._reply(*problem)
        self.envelope = envelope
        self._recipients_tried = 0
        self._reply(replies.SENDER_OK)

    def _apply_mail_parameters(self, envelope: Envelope, parameters: dict):
        """Fill the envelope from MAIL parameters; a (Reply, fields) problem or None."""
        if parameters and not self.esmtp:
            return replies.UNKNOWN_PARAMETER, {"detail": "parameters need EHLO"}
        for keyword, value in parameters.items():
            if keyword == "SIZE":  # RFC 1870
                if value is None or not addresses.DIGITS_RE.fullmatch(value):
                    return replies.BAD_PARAMETER, {"detail": "SIZE"}
                if int(value) > self.settings.config.max_message_size:
                    return replies.MESSAGE_TOO_BIG, {}
                refusal = self._admission("message_size", int(value))
                if refusal is not None:
                    return refusal, {}
                envelope.declared_size = int(value)
            elif keyword == "BODY":  # RFC 6152
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_PARAMETER, {"detail": "BODY"}
                envelope.body_type = value.upper()
            elif keyword == "RET":  # RFC 3461 4.3
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return replies.BAD_PARAMETER, {"detail": "RET"}
                envelope.ret = value.upper()
            elif keyword == "ENVID":  # RFC 3461 4.4
                if not value or len(value) > 100 or not addresses.XTEXT_RE.fullmatch(value):
                    return replies.BAD_PARAMETER, {"detail": "ENVID"}
                envelope.envid = value
            elif keyword == "AUTH":  # RFC 4954 5: accepted, not passed on
                if not value:
                    return replies.BAD_PARAMETER, {"detail": "AUTH"}
            else:
                return replies.UNKNOWN_PARAMETER, {"detail": keyword}
        return None

    def _cmd_rcpt(self, argument: str) -> None:
        if self.envelope is None:
            return self._reply(replies.NEED_MAIL)
        if argument[:3].upper() != "TO:":
            return self._reply(replies.SYNTAX_ERROR, usage="RCPT TO:<address>")
        self._recipients_tried += 1
        path = argument[3:].strip(" ")
        try:
            path, raw_parameters = addresses.split_path_and_parameters(argument[3:])
            mailbox = addresses.parse_path(path, allow_null=False)
            parameters = addresses.parse_parameters(raw_parameters)
        except NonASCIIAddress:
            return self._reply(replies.NON_ASCII_ADDRESS)
        except AddressError:
            if path.strip("<>").lower() == "postmaster":
                return self._reply(replies.UNKNOWN_USER, address=path.strip("<>"))
            return self._reply(replies.BAD_ADDRESS)
        refusal = self._check_recipient(mailbox)
        if refusal is not None:
            return self._reply(refusal, address=mailbox.address)
        if len(self.envelope.recipients) >= self.settings.config.max_recipients:
            return self._reply(replies.TOO_MANY_RECIPIENTS)
        recipient = self._recipient_with_parameters(mailbox, parameters)
        if isinstance(recipient, tuple):
            return self._reply(*recipient)
        if all(r.address.lower() != recipient.address.lower() for r in self.envelope.recipients):
            self.envelope.recipients.append(recipient)
        self._reply(replies.RECIPIENT_OK)

    def _check_recipient(self, mailbox: addresses.Mailbox) -> Reply | None:
        """Relay control: only configured domains, only listed local parts, no routing tricks."""
        config = self.settings.config
        domain = None if mailbox.is_literal else config.domain(mailbox.domain_key)
        if domain is None or addresses.is_routing_trick(mailbox):
            return replies.RELAY_DENIED
        if not domain.accepts(f"{mailbox.bare_local_part}@{domain.name}"):
            return replies.UNKNOWN_USER
        return self._admission("recipient", domain.name)

    def _admission(self, check: str, argument):
        """Quotas and free space (quota.Admission), when the driver gave us one."""
        admission = self.settings.admission
        return None if admission is None else getattr(admission, check)(argument)

    def _recipient_with_parameters(self, mailbox, parameters):
        """A Recipient, or a (Reply, fields) problem with its RFC 3461 parameters."""
        notify = orcpt = None
        if parameters and not self.esmtp:
            return replies.UNKNOWN_PARAMETER, {"detail": "parameters need EHLO"}
        for keyword, value in parameters.items():
            if keyword == "NOTIFY":  # RFC 3461 4.1
                words = (value or "").upper().split(",")
                if not value or not set(words) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                        "NEVER" in words and len(words) > 1):
                    return replies.BAD_PARAMETER, {"detail": "NOTIFY"}
                notify = ",".join(words)
            elif keyword == "ORCPT":  # RFC 3461 4.2: addr-type ";" xtext
                addr_type, _, xtext = (value or "").partition(";")
                if not addr_type or not xtext or not addresses.XTEXT_RE.fullmatch(xtext) or len(value) > 500:
                    return replies.BAD_PARAMETER, {"detail": "ORCPT"}
                orcpt = value
            else:
                return replies.UNKNOWN_PARAMETER, {"detail": keyword}
        config_domain = self.settings.config.domain(mailbox.domain_key)
        return Recipient(address=mailbox.address, domain=config_domain.name, notify=notify, orcpt=orcpt)

    def _cmd_data(self, argument: str) -> None:
        if argument:
            return self._reply(replies.SYNTAX_ERROR, usage="DATA")
        if self.envelope is None:
            return self._reply(replies.NEED_MAIL)
        if not self.envelope.recipients:
            return self._reply(replies.NO_VALID_RECIPIENTS if self._recipients_tried else replies.NEED_RCPT)
        self._reply(replies.START_DATA)
        self.phase = Phase.DATA
        self._data = _DataTransfer()
        self._events.append(MessageStarted(self.envelope))

    def _cmd_rset(self, argument: str) -> None:
        if argument:
            return self._reply(replies.SYNTAX_ERROR, usage="RSET")
        self.envelope = None
        self._reply(replies.OK)

    def _cmd_noop(self, argument: str) -> None:
        self._reply(replies.OK)

    def _cmd_quit(self, argument: str) -> None:
        self._close_with(replies.CLOSING)

    def _cmd_vrfy(self, argument: str) -> None:
        if not argument:
            return self._reply(replies.SYNTAX_ERROR, usage="VRFY address")
        self._reply(replies.VRFY_CANNOT)

    def _cmd_help(self, argument: str) -> None:
        self._reply(replies.HELP)

    def _cmd_starttls(self, argument: str) -> None:
        if argument:
            return self._reply(replies.SYNTAX_ERROR, usage="STARTTLS")
        if self.tls_active:
            return self._reply(replies.ALREADY_TLS)
        if not self.settings.tls_available:
            return self._reply(replies.TLS_NOT_AVAILABLE)
        self._reply(replies.READY_FOR_TLS)
        self._input.clear()  # rule 4: pipelined plaintext is never executed
        self._wait_for(StartTLS())

    def _cmd_etrn(self, argument: str) -> None:
        if self.envelope is not None:
            return self._reply(replies.NOT_IN_TRANSACTION)
        if self.user is None:
            return self._reply(replies.AUTH_REQUIRED)
        if not argument or " " in argument:
            return self._reply(replies.ETRN_SYNTAX)
        if argument.startswith("#"):  # RFC 1985 queue names: we only have domains
            return self._reply(replies.ETRN_UNABLE, domain=argument)
        subdomains = argument.startswith("@")
        name = argument[1:] if subdomains else argument
        if not addresses.is_domain(name):
            return self._reply(replies.ETRN_SYNTAX)
        domains = self._flushable_domains(addresses.normalize_domain(name), subdomains)
        if not domains:
            return self._reply(replies.ETRN_NOT_ALLOWED, domain=argument)
        self._wait_for(EtrnRequest(domains, argument))

    def _flushable_domains(self, name: str, subdomains: bool) -> tuple[str, ...]:
        """Configured domains this ETRN names that the authenticated user may flush."""
        config = self.settings.config
        allowed = config.users[self.user].domains
        if subdomains:
            found = [d for d in config.domains if d == name or d.endswith("." + name)]
        else:
            found = [name] if config.domain(name) is not None else []
        return tuple(d for d in found if d in allowed)

    # --- AUTH (RFC 4954) ---------------------------------------------------

    def _auth_offered(self) -> bool:
        return self.tls_active and bool(self.settings.config.users)

    def _mechanisms(self) -> list[str]:
        mechanisms = ["PLAIN", "LOGIN"]
        if self.settings.config.cram_md5_available:
            mechanisms.append("CRAM-MD5")
        return mechanisms

    def _cmd_auth(self, argument: str) -> None:
        if self.helo is None:
            return self._reply(replies.NEED_HELO)
        if not self.tls_active:
            return self._reply(replies.ENCRYPTION_REQUIRED)
        if not self._auth_offered():
            return self._reply(replies.AUTH_NOT_AVAILABLE)
        if self.user is not None:
            return self._reply(replies.ALREADY_AUTHENTICATED)
        if self.envelope is not None:
            return self._reply(replies.NOT_IN_TRANSACTION)
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self._mechanisms() or (mechanism == "CRAM-MD5" and initial):
            return self._reply(replies.AUTH_UNKNOWN_MECHANISM)
        self._sasl = _SaslExchange(mechanism)
        self.phase = Phase.SASL
        if mechanism == "CRAM-MD5":
            self._sasl.challenge = self.settings.cram_challenge()
            return self._continue(self._sasl.challenge)
        if initial:  # RFC 4954 4: "=" is an empty initial response
            return self._sasl_response(initial)
        self._continue(b"" if mechanism == "PLAIN" else b"Username:")

    def _continue(self, challenge: bytes) -> None:
        self._output.append(b"334 " + base64.b64encode(challenge) + b"\r\n")

    def _sasl_response(self, text: str) -> None:
        if text == "*":
            self._abort_sasl()
            return self._reply(replies.AUTH_ABORTED)
        exchange = self._sasl
        try:
            if exchange.mechanism == "PLAIN":
                authzid, username, password = sasl.decode_sasl_plain(text)
                request = AuthRequest("PLAIN", username, password=password, authzid=authzid)
            elif exchange.mechanism == "LOGIN" and exchange.step == 0:
                exchange.username, exchange.step = sasl.decode_sasl_login(text), 1
                return self._continue(b"Password:")
            elif exchange.mechanism == "LOGIN":
                request = AuthRequest("LOGIN", exchange.username, password=sasl.decode_sasl_login(text))
            else:  # CRAM-MD5, RFC 2195: "user SP hex-digest"
                username, digest = sasl.decode_cram_md5_response(text)
                request = AuthRequest("CRAM-MD5", username, challenge=exchange.challenge, digest=digest)
        except sasl.SASLSyntaxError:
            self._abort_sasl()
            return self._reply(replies.AUTH_BAD_RESPONSE)
        exchange.username = request.username
        self._check(request)

    def _check(self, request: AuthRequest) -> None:
        self.phase = Phase.COMMAND
        self._wait_for(request)

    def _abort_sasl(self) -> None:
        if self.phase is Phase.SASL:
            self._sasl = None
            self.phase = Phase.COMMAND

    def _auth_failed(self) -> None:
        self.auth_failures += 1
        if self.auth_failures >= self.settings.config.max_auth_failures:
            return self._close_with(replies.TOO_MANY_AUTH_FAILURES)
        self._reply(replies.AUTH_FAILED)

    # --- DATA ---------------------------------------------------------------

    def _process_data(self) -> bool:
        """Consume complete lines of the body; False when more input is needed."""
        buffer, transfer = self._input, self._data
        if not buffer:
            return False
        if transfer.at_line_start and buffer.startswith(b".\r\n"):
            end = 0
        else:
            marker = buffer.find(b"\r\n.\r\n")
            end = marker + 2 if marker >= 0 else -1
        if end >= 0:
            self._body_lines(bytes(buffer[:end]))
            del buffer[:end + 3]
            self._end_of_data()
            return True
        last = buffer.rfind(b"\r\n")
        if last < 0:
            if len(buffer) > MAX_DATA_LINE:
                # Rule 2: keep the last octet, it may be the CR of a CRLF.
                self._fail_data(replies.LINE_TOO_LONG)
                self._count_progress(len(buffer) - 1)
                del buffer[:-1]
                transfer.at_line_start = False
            return False
        self._body_lines(bytes(buffer[:last + 2]))
        del buffer[:last + 2]
        return True

    def _body_lines(self, block: bytes) -> None:
        """Whole lines of the body (the last ends in CRLF) or the end of a long one."""
        transfer = self._data
        self._count_progress(len(block))
        if not block:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            self._fail_data(replies.BARE_LINE_ENDING)
        if b"\0" in block:
            self._fail_data(replies.NUL_IN_DATA)
        if len(block) > MAX_DATA_LINE and max(map(len, block.split(b"\r\n"))) + 2 > MAX_DATA_LINE:
            self._fail_data(replies.LINE_TOO_LONG)
        if transfer.at_line_start and block.startswith(b"."):
            block = block[1:]
        block = block.replace(b"\r\n.", b"\r\n")  # RFC 5321 4.5.2 transparency
        transfer.at_line_start = True
        if transfer.in_headers:
            self._scan_headers(block)
        transfer.size += len(block)
        if transfer.size > self.settings.config.max_message_size:
            self._fail_data(replies.MESSAGE_TOO_BIG)
        if transfer.failure is None:
            self._events.append(MessageData(block))

    def _scan_headers(self, block: bytes) -> None:
        """Count Received: lines in the header section (RFC 5321 6.3 loop detection)."""
        transfer = self._data
        for line in block.split(b"\r\n")[:-1]:
            if line == b"":
                transfer.in_headers = False
                break
            if line[:9].lower() == b"received:":
                transfer.received_headers += 1
        if transfer.received_headers > MAX_RECEIVED_HEADERS:
            self._fail_data(replies.MAIL_LOOP)

    def _count_progress(self, octets: int) -> None:
        transfer = self._data
        transfer.progress_octets += octets
        while transfer.progress_octets >= DATA_PROGRESS_OCTETS:
            transfer.progress_octets -= DATA_PROGRESS_OCTETS
            self.progress += 1

    def _fail_data(self, reply: Reply) -> None:
        """The message will not be queued; keep reading to the end of DATA, then say why."""
        if self._data.failure is None:
            self._data.failure = reply
            self._events.append(MessageAborted(reply))

    def _end_of_data(self) -> None:
        self.progress += 1
        transfer, self._data = self._data, None
        self.phase = Phase.COMMAND
        if transfer.failure is not None:
            self._reply(transfer.failure)
            self.envelope = None
            return
        self._wait_for(MessageReceived(self.envelope, transfer.size))

    # --- replies and waiting --------------------------------------------

    def _reply(self, reply: Reply, fields: dict | None = None, **more: object) -> None:
        if self.phase is Phase.CLOSED:
            return
        fields = {**(fields or {}), **more}
        self._output.append(reply.render(hostname=self.settings.hostname, **fields))
        if reply.code >= 500 and reply is not replies.AUTH_FAILED:
            self.errors += 1
            if self.errors >= MAX_ERRORS and self.phase is not Phase.CLOSED:
                self._close_with(replies.TOO_MANY_ERRORS)

    def _close_with(self, reply: Reply) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._input.clear()
        self._output.append(reply.render(hostname=self.settings.hostname))

    def _wait_for(self, event) -> None:
        self.phase = Phase.WAITING
        self._waiting_for = type(event)
        self._events.append(event)

    def _answer(self, event_type: type) -> None:
        if self._waiting_for is not event_type:
            raise RuntimeError(f"no {event_type.__name__} is waiting for an answer")
        self._waiting_for = None
        if self.phase is Phase.WAITING:
            self.phase = Phase.COMMAND

    _COMMANDS = {
        "HELO": _cmd_helo, "EHLO": _cmd_ehlo, "MAIL": _cmd_mail, "RCPT": _cmd_rcpt,
        "DATA": _cmd_data, "RSET": _cmd_rset, "NOOP": _cmd_noop, "QUIT": _cmd_quit,
        "VRFY": _cmd_vrfy, "HELP": _cmd_help, "STARTTLS": _cmd_starttls,
        "AUTH": _cmd_auth, "ETRN": _cmd_etrn,
    }


def received_header(*, helo: str | None, client_ip: str, hostname: str, queue_id: str,
                    esmtp: bool, tls: str | None, authenticated: bool,
                    recipients: list[str], timestamp: float) -> bytes:
    """The trace header we prepend (RFC 5321 4.4; protocol names per RFC 3848).

    Everything the client chose is cleaned so it cannot add lines to the header,
    and the HELO name is shown only in a safe form (addresses.received_helo).
    """
    protocol = ("ESMTP" if esmtp else "SMTP") + ("S" if tls else "") + ("A" if authenticated else "")
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    lines = [f"Received: from {addresses.received_helo(helo) if helo else 'unknown'} ([{literal}])",
             f"\tby {hostname} (backupmx) with {protocol} id {queue_id}"]
    if tls:
        lines.append(f"\t({replies.clean(tls)})")
    when = format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))
    if len(recipients) == 1:
        lines.append(f"\tfor <{replies.clean(recipients[0])}>; {when}")
    else:
        lines.append(f"\t; {when}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
