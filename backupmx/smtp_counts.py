"""What an SMTP session keeps of its commands: the refusals that end it, and the log of them.

ErrorCounts counts a session's refusals as Postfix counts its errors
(smtpd_hard_error_limit), 4xx apart from 5xx: the session ends with 421 4.7.0
when one too many comes. CommandLog is the command being answered and every
verb's counts for the driver's disconnect line; a refused command becomes a
Refused event (smtp_events) for the driver's `reject` line, for the session
itself never logs.
"""

from dataclasses import dataclass, field

from backupmx import replies
from backupmx.envelope import Envelope
from backupmx.replies import Reply
from backupmx.smtp_events import Refused

# Refusals in one session before it is ended with 421 4.7.0 too many errors; a queued message
# starts the counts again (Postfix's smtpd_hard_error_limit, 20, counts 4xx and 5xx together).
# 5xx replies: the 20th ends the session (as it did before 4xx were counted).
MAX_ERRORS = 20
# 4xx replies, counted apart: each may have cost a callout, a greylist write or a quota look-up,
# so a client is not given them for as long as a session lasts; beyond this many the session
# ends. Higher than Postfix's, and a limit exceeded rather than reached (as Postfix's are), so
# that a whole transaction of deferred recipients (a mailing list's first visit while
# greylisting, a verify outage; 100 recipients is max_recipients' default and Exim's max_rcpt)
# is answered to its end, its DATA included, and the client goes on.
MAX_TEMPORARY_ERRORS = 100
# 452 too many recipients (RFC 5321 4.5.3.1.10: the client sends the rest in another
# transaction) counts only beyond this many (Postfix's smtpd_recipient_overshoot_limit).
MAX_RECIPIENT_OVERSHOOT = 1000
# Commands whose refusals are Refused events (SPEC Part 2, "Operator's view"); a
# refusal that ends the session is one whatever the command.
REFUSALS_REPORTED = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "AUTH", "ETRN", "STARTTLS", "ATRN"})


@dataclass
class ErrorCounts:
    """A session's refusals since its start or its last queued message, as Postfix counts its
    errors (smtpd_hard_error_limit), 4xx apart from 5xx (MAX_ERRORS and the constants below it)."""
    errors: int = 0  # 5xx replies
    temporary: int = 0  # 4xx replies
    recipient_overshoot: int = 0  # 452 too many recipients, counted apart up to MAX_RECIPIENT_OVERSHOOT

    def one_too_many(self, reply: Reply) -> bool:
        """Count a refusal: True when the session must end for it (421 4.7.0 too many errors)."""
        if reply.code >= 500:
            if reply is replies.AUTH_FAILED:  # max_auth_failures counts these
                return False
            self.errors += 1
            return self.errors >= MAX_ERRORS
        if reply is replies.TOO_MANY_RECIPIENTS and self.recipient_overshoot < MAX_RECIPIENT_OVERSHOOT:
            self.recipient_overshoot += 1
            return False
        self.temporary += 1
        return self.temporary > MAX_TEMPORARY_ERRORS


@dataclass
class CommandLog:
    """The session's commands as the driver reports them (the session itself never logs):
    the one being answered (its verb, whether it was refused, the addresses it named)
    and Postfix's per-verb counts for the disconnect line."""
    verb: str | None = None
    refused: bool = False
    argument: str = ""  # the command's argument, as sent: what it names is read from it on a refusal (named)
    counts: dict = field(default_factory=dict)  # verb (lower case) -> [sent, refused]

    def begin(self, verb: str, argument: str = "") -> None:
        """A command line arrives (verb UNKNOWN when it is no command we know): count it, and
        keep its argument (the address a MAIL or RCPT names is taken from it only if refused)."""
        self.verb, self.refused, self.argument = verb, False, argument
        numbers = self.counts.get(name := verb.lower())
        if numbers is None:
            numbers = self.counts[name] = [0, 0]
        numbers[0] += 1

    def named(self) -> dict[str, str]:
        """{"from": ...} or {"to": ...}: the address the MAIL or RCPT being answered names, as the
        client wrote it (without <>); {} for any other command."""
        verb = self.verb
        if verb != "MAIL" and verb != "RCPT":
            return {}
        key, colon, path = self.argument.partition(":")
        if not colon or key.strip().upper() != ("FROM" if verb == "MAIL" else "TO"):
            return {}
        path = path.strip(" ")
        path = path[:path.find(">") + 1] if path.startswith("<") and ">" in path else path.split(" ")[0]
        return {"from" if verb == "MAIL" else "to": path.removeprefix("<").removesuffix(">")}

    def refuse(self, reply: Reply, rendered: bytes, helo: str | None, envelope: Envelope | None, *,
               ends_session: bool = False) -> "Refused | None":
        """The command being answered got a 4xx/5xx: count it (once, however many replies it gets),
        and return its Refused event when it is reported (REFUSALS_REPORTED, or it ends the session)."""
        if self.verb is not None and not self.refused:
            self.refused = True
            self.counts[self.verb.lower()][1] += 1
        if ends_session or self.verb in REFUSALS_REPORTED:
            return self.refusal(reply, rendered, helo, envelope)
        return None

    def refusal(self, reply: Reply, rendered: bytes, helo: str | None, envelope: Envelope | None) -> Refused:
        """The Refused event of the command being answered: what it named, or its transaction's addresses."""
        verb = self.verb or "UNKNOWN"
        named = self.named()
        sender = named.get("from", envelope.sender if envelope is not None else None)
        recipient, count = named.get("to"), 0
        if verb in ("DATA", "BDAT") and envelope is not None and envelope.recipients:
            recipient, count = envelope.recipients[0].address, len(envelope.recipients)
        return Refused(verb, reply, rendered.decode("ascii").rstrip("\r\n"), helo, sender, recipient, count)

    def summary(self) -> dict[str, str]:
        """{"ehlo": "1", "rcpt": "1/2", ..., "commands": "5/6"}: accepted/sent, or the number when none was refused."""
        shown, total_sent, total_refused = {}, 0, 0
        for verb, (sent, refused) in self.counts.items():  # one pass: a disconnect line per session
            shown[verb] = str(sent) if not refused else f"{sent - refused}/{sent}"
            total_sent += sent
            total_refused += refused
        shown["commands"] = str(total_sent) if not total_refused else f"{total_sent - total_refused}/{total_sent}"
        return shown
