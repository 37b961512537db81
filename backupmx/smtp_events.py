"""The events of the SMTP session (smtp.py): what it asks the driver, and what it reports.

Each is a frozen value. The session appends them to Session.events; the driver
takes them (next_event) and, for those that wait, calls the Session method
named below with the answer (smtp.py, rule 3: nothing else is processed until
then). smtp.py imports every name here, so `from backupmx.smtp import ...` finds them.
"""

from dataclasses import dataclass

from backupmx.envelope import Envelope, Recipient
from backupmx.replies import Reply


# --- events: what the session asks, and the method that answers it ------------
#
#   MessageStarted       -            the driver opens a spool for the content
#   MessageData          -            a piece of the content (smtp_body frames it)
#   MessageAborted       -            the content will not be queued (smtp_body refused it)
#   MessageReceived      message_queued(queue_id) | message_refused(reply)
#   MailAdmission        mail_admitted(refusal=None)
#   RecipientAdmission   recipient_admitted(refusal=None, **fields)
#   StartTLS             tls_started()
#   AuthRequest          auth_challenge(data) | auth_result(user or None) | auth_malformed() | auth_blocked()
#   AuthResponse         the same three
#   EtrnRequest          etrn_result({domain: pending} or None)
#   Refused              -            a command got a 4xx/5xx: the driver logs it (`reject`) and counts it
#   PipeliningViolation  -            (rule 10) the session is closed; the driver logs it


@dataclass(frozen=True)
class MessageStarted:
    """DATA accepted: the driver opens a spool for the content."""
    envelope: Envelope


@dataclass(frozen=True)
class MessageData:
    """A piece of the content (smtp_body), dot-unstuffed, CRLF line endings as received."""
    data: bytes


@dataclass(frozen=True)
class MessageAborted:
    """The content will not be queued (smtp_body: bare line ending, NUL, too big, loop): drop the spool."""
    reply: Reply


@dataclass(frozen=True)
class MessageReceived:
    """End of DATA. Answer with `message_queued(queue_id)` or `message_refused(reply)`."""
    envelope: Envelope
    size: int


@dataclass(frozen=True)
class MailAdmission:
    """May this transaction start (free space for a declared SIZE, ...)? Answer with
    `mail_admitted(refusal)`: None to accept, else the reply."""
    envelope: Envelope


@dataclass(frozen=True)
class RecipientAdmission:
    """May mail for this recipient be queued (quota, free space, and whatever the
    driver checks: a callout, a greylist)? Answer with `recipient_admitted(refusal,
    **fields)`: None to accept, else the reply (rendered with address= and fields)."""
    envelope: Envelope
    recipient: Recipient


@dataclass(frozen=True)
class StartTLS:
    """The 220 is in the output. Send it in plaintext, then answer with `tls_started()`."""


@dataclass(frozen=True)
class AuthRequest:
    """AUTH <mechanism> [initial-response]: the driver starts a SASL exchange
    (auth.sasl_exchange) and answers its first step. `initial_response` is the
    base64 text as sent, or None when there was none."""
    mechanism: str
    initial_response: str | None


@dataclass(frozen=True)
class AuthResponse:
    """The client's answer to a 334 challenge (base64 text): the exchange's next step."""
    response: str


@dataclass(frozen=True)
class EtrnRequest:
    """Record a flush for `domains`; answer with `etrn_result({domain: pending} or None)`."""
    domains: tuple[str, ...]
    argument: str


@dataclass(frozen=True)
class Refused:
    """A command was refused (SPEC Part 2: every refusal is logged). The session
    itself never logs (it has no I/O); the driver writes the `reject` line."""
    command: str  # the verb refused (MAIL, RCPT, DATA, AUTH, ETRN, STARTTLS, ...)
    reply: Reply  # the constant in replies.py: its name is the reason (replies.reason)
    text: str  # the reply line as it was sent, without CRLF
    helo: str | None
    sender: str | None  # the MAIL FROM address ("" = the null sender), None when none was given
    recipient: str | None  # the RCPT TO address; for DATA, the message's first recipient
    recipients: int = 0  # DATA: how many recipients the refused message had


@dataclass(frozen=True)
class PipeliningViolation:
    """The client sent ahead where it must wait (rule 10): `after` is the command
    (or "CONNECT" before the greeting), `early_input` the first octets sent ahead.
    The session is already closed with 554 5.5.0; nothing of it was executed."""
    after: str
    early_input: bytes
