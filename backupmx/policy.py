"""Recipient admission: may mail for this recipient be queued? The checks of one RCPT, in order.

The session asks (smtp.RecipientAdmission) once relay control passed;
connection.py hands the question to `RecipientPolicy.admit` with the
function that answers the session. Each check answers at once, None (go on)
or a refusal, or says LATER: then it has arranged to go on itself from the
worker's loop (a callout or a DNS lookup runs on the Offload meanwhile). The
first refusal is the answer, and nothing after it is asked. Cheap checks come
first, the callout last: a refused client costs the primary nothing. The
checks run in one loop, not a chain of callbacks: every RCPT of every message
passes them all.

  check       refuses with                        skipped when
  client      - (waits for the connect-time DNS     -
                lookups: client_dns)
  dnsbl       554 5.7.1 / 450 4.7.1 (dnsbl_action)  no dnsbl zone lists the client, AUTH
  primary_up  450 4.4.0 (prober.Monitor)           accept_when = always (the default), AUTH
  quota       452 4.3.1 (quota.Admission)          -
  greylist    450 4.7.1 (greylist.Greylisting)     greylist = 0, AUTH, greylist_exempt networks
  verify      550 5.1.1 / 450 4.1.1 / 450 4.4.0    the domain does not say recipients = verify

Greylisting comes before the callout: spam that never retries costs the
primary nothing, and a dictionary attack must retry each address before it
learns anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from backupmx import replies
from backupmx.client_dns import ClientFacts
from backupmx.envelope import Envelope, Recipient
from backupmx.greylist import Greylisting
from backupmx.prober import Monitor
from backupmx.offload import Offload
from backupmx.quota import Admission
from backupmx.store import QueueStore
from backupmx.verify import Refusal, Verifier

Answer = Callable[[Refusal | None], None]

# A check's answer when it will go on later, from the loop (RecipientPolicy._from).
LATER = object()


@dataclass(frozen=True)
class RecipientQuestion:
    """One RCPT to admit, with what the checks know of its session."""

    owner: object  # the session driver: where an answer that comes later is delivered (Offload owner)
    client: ClientFacts  # its address, and what DNS says of it
    helo: str | None
    envelope: Envelope
    recipient: Recipient
    authenticated: bool


class RecipientPolicy:
    """The checks of one SMTP worker process (ConnectionContext)."""

    def __init__(self, config, store: QueueStore, offload: Offload, logger: logging.Logger, admission: Admission):
        self.config, self.admission = config, admission
        self.verifier = Verifier(config, store, offload, logger)
        self.greylisting = Greylisting(config, store, offload, logger) if config.greylist else None
        self.monitor = Monitor(config, store, offload, logger)
        self._checks = (self._client_known, self._dnsbl, self._primary_up, self._quota, self._greylist,
                        self._verify)

    def admit(self, question: RecipientQuestion, answer: Answer) -> None:
        """Call `answer(None)` or `answer((reply, fields))`, now or later from the loop."""
        self._from(0, question, answer)

    def _from(self, index: int, question: RecipientQuestion, answer: Answer) -> None:
        """Run the checks from `index` on, in order, until one refuses or will answer LATER."""
        checks = self._checks
        while index < len(checks):
            check = checks[index]
            index += 1
            outcome = check(question, index, answer)
            if outcome is LATER:
                return None
            if outcome is not None:
                return answer(outcome)
        return answer(None)

    # Each check: (question, the index of the next check, the answer) -> None, a refusal, or LATER.

    def _client_known(self, question: RecipientQuestion, after: int, answer: Answer):
        if question.client.done:
            return None
        question.client.when_known(lambda: self._from(after, question, answer))
        return LATER

    def _dnsbl(self, question: RecipientQuestion, after: int, answer: Answer):
        """RFC 5782: the client's listing, looked up at connect (client_dns)."""
        if not question.client.listings:  # listed by no zone: the usual case
            return None
        listing = question.client.listing(self.config.dnsbl)
        if listing is None or question.authenticated:
            return None
        reply = replies.CLIENT_BLOCKLISTED if self.config.dnsbl_action == "reject" else replies.CLIENT_BLOCKLISTED_TEMPFAIL
        return reply, {"client": question.client.address, "zone": listing.zone}

    def _primary_up(self, question: RecipientQuestion, after: int, answer: Answer):
        """Monitoring mode: while the primary takes mail, the sender should deliver there."""
        domain = self.config.domains[question.recipient.domain]
        if domain.accept_when == "always" or question.authenticated or not self.monitor.primary_up(domain):
            return None
        return replies.PRIMARY_IS_UP, {}

    def _quota(self, question: RecipientQuestion, after: int, answer: Answer):
        reply = self.admission.recipient(question.recipient.domain)
        return None if reply is None else (reply, {})

    def _greylist(self, question: RecipientQuestion, after: int, answer: Answer):
        client = question.client.address
        if self.greylisting is None or self.greylisting.exempt(client, question.authenticated):
            return None
        return self.greylisting.check(client, question.envelope.sender, question.recipient.address)

    def _verify(self, question: RecipientQuestion, after: int, answer: Answer):
        if not self.config.domains[question.recipient.domain].verify:
            return None

        def resume(refusal: Refusal | None) -> None:  # now on a cache hit, or later after the callout
            if refusal is not None:
                return answer(refusal)
            self._from(after, question, answer)

        self.verifier.check(question.owner, question.recipient, resume)
        return LATER

    def upkeep(self) -> None:
        """Once per loop turn."""
        self.verifier.upkeep()

    def close(self) -> None:
        self.verifier.close()
