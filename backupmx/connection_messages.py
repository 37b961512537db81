"""The message a connection receives: spooled as it arrives, queued by the worker loop's group commit.

MessageIntake is the part of connection.SMTPConnection (one of its bases)
that answers the session's message events: MessageStarted makes the queue id
and the Received: header (trace_header) and opens the spool (memory, then a
temporary file beside the queue: SPOOL_IN_MEMORY); MessageData is written to
it, and a spool that fails keeps its first failure (452 at the end of the
content); MessageReceived goes to the worker loop as a QueueMessage outcome,
and `committed()`, which the loop calls after its group commit, answers the
client: 250 with the queue id, only once the message is on disk, or the
refusal. It uses what the connection holds (ctx, session, client, client_ip,
the TLS layer, `outcomes`, the spool's attributes set in its __init__) and
goes on with the session as the connection does (_after_session,
on_writable).
"""

import logging
import tempfile
from dataclasses import dataclass

from backupmx import replies, trace_header
from backupmx.client_dns import UNKNOWN
from backupmx.log import log_event
from backupmx.smtp import MessageReceived
from backupmx.store import QuotaExceeded, Submission

# Bodies up to this size stay in memory while they arrive; larger ones go to a
# temporary file beside the queue, so a 50 MB message costs disk, not memory.
SPOOL_IN_MEMORY = 256 * 1024


@dataclass(frozen=True)
class QueueMessage:
    """Outcome: this message waits for the worker loop's group commit; answer with `committed()`."""
    submission: Submission


class MessageIntake:
    """The message events of an SMTPConnection (module docstring); not used on its own."""

    def _start_message(self, envelope) -> None:
        self._drop_spool()
        self._queue_id = self.ctx.store.new_queue_id()
        self._spool_failed = False
        tls = None
        if self._tls is not None and self._tls.handshake_complete:
            tls = f"using {self._tls.version()} with cipher {self._tls.cipher()} ({self._tls.cipher_bits()} bits)"
        self._protocol = trace_header.protocol_name(esmtp=self.session.esmtp, tls=tls is not None,
                                                    authenticated=self.session.user is not None, utf8=envelope.smtputf8)
        header = trace_header.received_header(
            helo=self.session.helo, client_ip=self.client_ip, hostname=self.ctx.config.hostname,
            queue_id=self._queue_id, esmtp=self.session.esmtp, tls=tls,
            authenticated=self.session.user is not None,
            recipients=[r.address for r in envelope.recipients], timestamp=self.ctx.wallclock(),
            utf8=envelope.smtputf8, client_name=self.client.name or UNKNOWN)
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=self.ctx.spool_dir)
        self._spool_write(header)

    def _spool_write(self, data: bytes) -> None:
        if self._spool is None or self._spool_failed:
            return
        try:
            self._spool.write(data)
        except OSError as exc:  # e.g. the spool's disk is full: 452 at the end of DATA
            log_event(self.ctx.logger, "spool-failed", id=self._queue_id, error=str(exc))
            self._spool_failed = True

    def _drop_spool(self) -> None:
        if self._spool is not None:
            try:
                self._spool.close()
            except OSError:
                pass
            self._spool = None

    def _commit(self, event: MessageReceived) -> None:
        """Queue the message at the end of this loop round, with the others that ended then."""
        if self._spool is None or self._spool_failed:
            return self._refuse(event, "spool write failed")
        size = self._spool.tell()
        self._spool.seek(0)
        self._awaiting_commit = event
        self._submission = Submission(self._queue_id, event.envelope, self._spool, size, self.client_ip,
                                      self.session.helo, client_name=self.client.name, protocol=self._protocol)
        self.outcomes.append(QueueMessage(self._submission))

    def committed(self, problem: Exception | None) -> None:
        """The worker loop's group commit is done: answer the client (None: queued)."""
        event, self._awaiting_commit = self._awaiting_commit, None
        submission, self._submission = self._submission, None
        if problem is not None:
            return self._refuse(event, str(problem), quota=isinstance(problem, QuotaExceeded))
        size = self._spool.tell()
        self._drop_spool()
        envelope, domains = event.envelope, event.envelope.domains
        self.ctx.admission.queued(domains)
        for domain in domains:
            nrcpt = [r.domain for r in envelope.recipients].count(domain) if len(domains) > 1 else len(envelope.recipients)
            log_event(self.ctx.logger, "queued", id=self._queue_id, domain=domain, from_=f"<{envelope.sender}>",
                      size=size, client=self.client_ip, nrcpt=nrcpt)
        for domain in submission.started_queueing:
            log_event(self.ctx.logger, "domain-queueing", domain=domain, since=submission.queued_at,
                      id=self._queue_id)
        self.session.message_queued(self._queue_id)
        self._after_session()
        self.on_writable()

    def _refuse(self, event: MessageReceived, reason: str, *, quota: bool = False) -> None:
        log_event(self.ctx.logger, "queue-failed", id=self._queue_id, client=self.client_ip, error=reason,
                  level=logging.WARNING)
        self._drop_spool()
        self.session.message_refused(replies.QUEUE_FULL if quota else replies.QUEUE_UNAVAILABLE)
        self._after_session()
        self.on_writable()
