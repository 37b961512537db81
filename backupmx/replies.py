"""Every SMTP reply the server sends, as named constants that the tests import.

A Reply is (code, enhanced status, text). `{name}` fields in the text are filled
by `render`, which also makes sure nothing a client sent can put a control
character into a reply line. Enhanced codes per RFC 3463 / RFC 2034; greeting
and HELO/EHLO replies carry none (RFC 2034 section 3).
"""

import re
from typing import NamedTuple

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class Reply(NamedTuple):
    code: int
    status: str  # RFC 3463 enhanced status code, "" where none is sent
    text: str

    def render(self, **fields: object) -> bytes:
        """The reply as wire bytes, one line, CRLF terminated (render_lines of that one line)."""
        return f"{self.code} {clean(self.line_text(**fields))}\r\n".encode("ascii")

    def line_text(self, **fields: object) -> str:
        text = self.text.format(**{k: clean(str(v)) for k, v in fields.items()})
        return f"{self.status} {text}" if self.status else text

    def is_error(self) -> bool:
        return self.code >= 400


_RENDERED: dict[tuple[Reply, str], bytes] = {}


def rendered(reply: Reply, hostname: str) -> bytes:
    """reply.render(hostname=hostname) for a reply with no other field: the same octets every
    time, so kept (a bounded set: the constants here, and the configured name)."""
    key = (reply, hostname)
    data = _RENDERED.get(key)
    if data is None:
        data = reply.render(hostname=hostname)
        if len(_RENDERED) < 1024:
            _RENDERED[key] = data
    return data


def clean(text: str) -> str:
    """Printable ASCII only: what a client sent can never break a reply or log line."""
    return _UNPRINTABLE.sub("?", text)


def render_lines(code: int, lines: list[str]) -> bytes:
    """A (possibly multi-line) reply: `250-a`, `250-b`, `250 c` (RFC 5321 4.2.1)."""
    out = []
    for index, line in enumerate(lines):
        separator = " " if index == len(lines) - 1 else "-"
        out.append(f"{code}{separator}{clean(line)}\r\n")
    return "".join(out).encode("ascii")


# Connection level
GREETING = Reply(220, "", "{hostname} ESMTP")
CLOSING = Reply(221, "2.0.0", "{hostname} closing connection")
HTTP_REFUSED = Reply(221, "2.7.0", "This is an SMTP server; HTTP is not spoken here")
TIMEOUT = Reply(421, "4.4.2", "{hostname} Error: timeout exceeded")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "{hostname} Error: too many errors")
SHUTTING_DOWN = Reply(421, "4.3.2", "{hostname} Service shutting down, try again later")
BUSY = Reply(421, "4.3.2", "{hostname} Service busy, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "{hostname} Too many connections from your address")
NOT_AVAILABLE = Reply(421, "4.3.0", "{hostname} Service not available")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "{hostname} Too many authentication failures")
# max_auth_failures_per_client: refused before any password is looked at.
CLIENT_AUTH_BLOCKED = Reply(421, "4.7.0",
                            "{hostname} Too many authentication failures from your address, try again later")
# max_junk_commands (Postfix's smtpd_junk_command_limit): NOOP, RSET, VRFY, HELP, ETRN, a HELO/EHLO
# again, RCPT for a mailbox already given, BDAT 0 without LAST (smtp.py, command table rule 6).
TOO_MANY_JUNK_COMMANDS = Reply(421, "4.7.0", "{hostname} Error: too many commands that move no mail")
SESSION_TIME_EXCEEDED = Reply(421, "4.4.2", "{hostname} Error: session time limit exceeded")
# RFC 2920 3.1 and Postfix's smtpd_forbid_unauth_pipelining: the client sent before our reply.
PROTOCOL_SYNCHRONIZATION = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")

# Generic
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
HELO_OK = Reply(250, "", "{hostname}")
VRFY_CANNOT = Reply(252, "2.1.5", "Cannot verify the user, but will accept mail for it")
HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH ETRN")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
QUEUED = Reply(250, "2.0.0", "Ok: queued as {queue_id}")

# Syntax and sequence (RFC 5321 4.2.4, 4.3.2)
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax: {usage}")
BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII addresses need the SMTPUTF8 parameter of MAIL FROM")
BAD_UTF8_ADDRESS = Reply(553, "5.1.3", "Bad internationalized address: {detail}")
BAD_PARAMETER = Reply(501, "5.5.4", "Bad parameter: {detail}")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter: {detail}")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
BARE_LINE_ENDING = Reply(550, "5.5.2", "Error: bare <CR> or <LF> received; lines must end with <CR><LF>")
NOT_IN_TRANSACTION = Reply(503, "5.5.1", "Error: not allowed during a mail transaction")

# CHUNKING (RFC 3030)
CHUNK_RECEIVED = Reply(250, "2.0.0", "Ok: {octets} octets received")
# A BDAT whose size we cannot read leaves us unable to tell its chunk from the
# commands after it: answered, then the session ends (as it never stays in step).
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT count [LAST]; closing the connection")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA and BDAT cannot be mixed in one transaction")
# RFC 3030 has RCPT before the chunks; after the first one the Received: header
# (written when the content starts) could no longer name the recipients right.
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT after BDAT: recipients come before the first chunk")

# Policy
RELAY_DENIED = Reply(554, "5.7.1", "<{address}>: Relay access denied")
UNKNOWN_USER = Reply(550, "5.1.1", "<{address}>: Recipient address rejected: user unknown")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message exceeds fixed maximum message size")
MAIL_LOOP = Reply(554, "5.4.6", "Error: too many hops (mail loop?)")
# RFC 5322 2.3 forbids NUL in a message; an MTA that strips it can be led to a
# different end of data than ours (SMTP smuggling), so it is never queued.
NUL_IN_DATA = Reply(554, "5.6.0", "Error: message content contains NUL characters")
QUEUE_UNAVAILABLE = Reply(452, "4.3.1", "Error: insufficient system storage, try again later")
DOMAIN_QUEUE_FULL = Reply(452, "4.3.1", "<{address}>: Error: the queue for this domain is full, try again later")
QUEUE_FULL = Reply(452, "4.3.1", "Error: the queue for a recipient's domain is full, try again later")

# No side door for spam (docs/SPEC.md Part 2). `reply` is the primary's own
# reply line, cut short and cleaned like every field.
RECIPIENT_UNDELIVERABLE = Reply(550, "5.1.1", "<{address}>: Recipient address rejected: undeliverable address: {reply}")
RECIPIENT_UNVERIFIED = Reply(450, "4.1.1", "<{address}>: Recipient address rejected: unverified address: {reply}")
# RFC 5782: the client is on a DNS blocklist (dnsbl_action = reject / tempfail).
CLIENT_BLOCKLISTED = Reply(554, "5.7.1", "Service unavailable; client [{client}] blocked using {zone}")
CLIENT_BLOCKLISTED_TEMPFAIL = Reply(450, "4.7.1", "Service unavailable; client [{client}] blocked using {zone}")
# Monitoring mode (accept_when = primary-unreachable): RFC 5321 5.1, the sender tries its other MX hosts.
PRIMARY_IS_UP = Reply(450, "4.4.0", "<{address}>: the primary MX is up; deliver there")
GREYLISTED = Reply(450, "4.7.1", "<{address}>: Recipient address rejected: Greylisted, try again in {seconds} seconds")
VERIFY_UNREACHABLE = Reply(450, "4.4.0", "<{address}>: Recipient address rejected: unverified address: "
                                         "the primary MX cannot be reached, try again later")

# STARTTLS (RFC 3207)
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
ALREADY_TLS = Reply(503, "5.5.1", "Error: TLS already active")

# AUTH (RFC 4954)
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication credentials invalid")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Error: malformed authentication response")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_NOT_AVAILABLE = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")

# ETRN (RFC 1985)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ETRN_STARTED = Reply(250, "2.0.0", "Queuing for node {domain} started")
ETRN_NOTHING_WAITING = Reply(251, "2.0.0", "No messages waiting for node {domain}")
ETRN_PENDING_STARTED = Reply(253, "2.0.0", "{count} pending messages for node {domain} started")
ETRN_UNABLE = Reply(458, "4.3.0", "Unable to queue messages for node {domain}")
ETRN_NOT_ALLOWED = Reply(459, "4.7.1", "{domain} not allowed")
ETRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ETRN domain | ETRN @domain")

# ODMR (RFC 2645 section 7): ATRN on the listen_odmr port
ATRN_STARTED = Reply(250, "2.0.0", "OK now reversing the connection")
ATRN_REFUSED = Reply(450, "4.7.0", "ATRN request refused")
ATRN_UNABLE = Reply(451, "4.3.0", "Unable to process ATRN request now")
ATRN_NO_MAIL = Reply(453, "4.3.0", "You have no mail")
ATRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ATRN [domain[,domain...]]")
# RFC 2645 5.4: the provider may refuse every other command; mail is not taken here.
ODMR_ONLY = Reply(502, "5.5.1", "Error: this is the ODMR port: only EHLO, STARTTLS, AUTH, ATRN and QUIT here")


def reason(reply: Reply) -> str:
    """The name a refusal is counted and logged under: its constant's name in lower
    case ("relay_denied"), or "code_<n>" for a reply that is not one of them."""
    return _NAMES.get(id(reply)) or f"code_{reply.code}"


# Last in the module, so that every constant above is named.
_NAMES = {id(value): name.lower() for name, value in list(globals().items()) if isinstance(value, Reply)}
