"""What a primary's reply means for the mail it answers: one classification, shared.

Like smtplib's exceptions, a Verdict carries the reply that decided it. The
flusher turns every reply (or every connection trouble) into one Verdict per
recipient; the store turns each Verdict into a row state (docs/DESIGN.md,
"Every delivery outcome is a row state"): there is no "unknown".

RFC 5321 4.2.1: 2yz positive completion, 4yz transient negative completion
(try again later), 5yz permanent negative completion (do not repeat it).
Anything else where a final reply is due, and any trouble with the
connection, is transient: mail is deferred, never failed, on a reply we
cannot trust.
"""

import enum
from dataclasses import dataclass


class Outcome(str, enum.Enum):
    """One recipient's delivery attempt; the value is what the queue's events record."""

    DELIVERED = "delivered"  # 2yz: the recipient leaves the queue
    DEFERRED = "deferred"  # 4yz or connection trouble: it stays queued, with the reason
    FAILED = "failed"  # 5yz: it is marked failed and a delivery status notification is due


def classify(code: int) -> Outcome:
    """The outcome a final reply code stands for (RFC 5321 4.2.1)."""
    if 200 <= code < 300:
        return Outcome.DELIVERED
    if 500 <= code < 600:
        return Outcome.FAILED
    return Outcome.DEFERRED


@dataclass(frozen=True)
class Verdict:
    """An Outcome with the reply (or the reason) behind it, as the queue keeps it."""

    outcome: Outcome
    reply: str

    def __post_init__(self):
        object.__setattr__(self, "outcome", Outcome(self.outcome))  # ValueError for anything else

    @classmethod
    def of_reply(cls, code: int, reply: str) -> "Verdict":
        """The verdict of a final reply; `reply` is its text as recorded ("550 5.1.1 ...")."""
        return cls(classify(code), reply)

    @classmethod
    def deferred(cls, reason: str) -> "Verdict":
        """Connection trouble or a reply we cannot trust: the mail waits, with the reason."""
        return cls(Outcome.DEFERRED, reason)
