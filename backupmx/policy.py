"""Recipient admission: may mail for this recipient be queued? The checks of one RCPT, in order.

The session asks (smtp.RecipientAdmission) once relay control passed;
connection.py hands the question to `RecipientPolicy.admit` with the
function that answers the session. Each check calls its `resume` with None
(go on) or a refusal, either at once or later from the worker's loop (a
callout or a DNS lookup ran on the Offload meanwhile); the first refusal is
the answer, and nothing after it is asked. Cheap checks come first, the
callout last: a refused client costs the primary nothing.

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
        if index == len(self._checks):
            return answer(None)

        def resume(refusal: Refusal | None) -> None:
            if refusal is not None:
                return answer(refusal)
            self._from(index + 1, question, answer)

        self._checks[index](question, resume)

    def _client_known(self, question: RecipientQuestion, resume: Answer) -> None:
        question.client.when_known(lambda: resume(None))

    def _dnsbl(self, question: RecipientQuestion, resume: Answer) -> None:
        """RFC 5782: the client's listing, looked up at connect (client_dns)."""
        listing = question.client.listing(self.config.dnsbl)
        if listing is None or question.authenticated:
            return resume(None)
        reply = replies.CLIENT_BLOCKLISTED if self.config.dnsbl_action == "reject" else replies.CLIENT_BLOCKLISTED_TEMPFAIL
        resume((reply, {"client": question.client.address, "zone": listing.zone}))

    def _primary_up(self, question: RecipientQuestion, resume: Answer) -> None:
        """Monitoring mode: while the primary takes mail, the sender should deliver there."""
        domain = self.config.domains[question.recipient.domain]
        if domain.accept_when == "always" or question.authenticated or not self.monitor.primary_up(domain):
            return resume(None)
        resume((replies.PRIMARY_IS_UP, {}))

    def _quota(self, question: RecipientQuestion, resume: Answer) -> None:
        reply = self.admission.recipient(question.recipient.domain)
        resume(None if reply is None else (reply, {}))

    def _greylist(self, question: RecipientQuestion, resume: Answer) -> None:
        client = question.client.address
        if self.greylisting is None or self.greylisting.exempt(client, question.authenticated):
            return resume(None)
        resume(self.greylisting.check(client, question.envelope.sender, question.recipient.address))

    def _verify(self, question: RecipientQuestion, resume: Answer) -> None:
        if not self.config.domains[question.recipient.domain].verify:
            return resume(None)
        self.verifier.check(question.owner, question.recipient, resume)

    def upkeep(self) -> None:
        """Once per loop turn."""
        self.verifier.upkeep()

    def close(self) -> None:
        self.verifier.close()
