"""The envelope of one message: what the SMTP session collected and the queue stores.

A value type shared by the protocol (smtp.py) and the queue (store.py), so
that neither has to know the other.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipient:
    """One RCPT TO.

    `address` is the mailbox as the client wrote it (source route removed), and
    is what the primary receives; `domain` is the configured domain it belongs
    to, lower-case, without a trailing dot: the key of the queue row.
    """

    address: str
    domain: str
    notify: str | None = None  # RFC 3461 NOTIFY=, as given (e.g. "SUCCESS,DELAY")
    orcpt: str | None = None  # RFC 3461 ORCPT=, as given (e.g. "rfc822;a@b")


@dataclass
class Envelope:
    """One transaction: MAIL FROM, its parameters, and the RCPT TOs so far.

    RSET and the end of DATA start a new Envelope rather than clearing this one.
    """

    sender: str = ""  # "" is the null reverse-path <>
    recipients: list[Recipient] = field(default_factory=list)
    declared_size: int | None = None  # RFC 1870 SIZE=
    body_type: str = "7BIT"  # RFC 6152 BODY= (7BIT or 8BITMIME)
    envid: str | None = None  # RFC 3461 ENVID=
    ret: str | None = None  # RFC 3461 RET= (FULL or HDRS)
    smtputf8: bool = False  # RFC 6531: MAIL FROM came with SMTPUTF8
    needs_smtputf8: bool = False  # and the message needs it (a UTF-8 address or header): set at its end

    @property
    def smtputf8_state(self) -> int:
        """What the queue keeps (messages.smtputf8): 0 not asked, 1 asked, 2 asked and needed."""
        return 2 if self.needs_smtputf8 else 1 if self.smtputf8 else 0

    @property
    def domains(self) -> list[str]:
        """The configured domains this message is queued for, in first-seen order."""
        return list(dict.fromkeys([r.domain for r in self.recipients]))
