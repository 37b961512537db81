"""One flush over one SMTP connection to the domain's primary: each message's transaction and its outcomes.

Flush opens a session with the primary (smtpclient.Primary: the configured
host and port, or a session the peer reversed, as ODMR does), sends each
message's XFORWARD, MAIL, RCPT, DATA and body, judges every reply (_judge)
and records every recipient's outcome in the queue, a batch at a time. The
loop over a flush's messages and when to stop it are the flusher's
(flusher.deliver_domain); a second connection's loop, flush_sharing's.

What must always hold:

- Nothing leaves the queue without a 2xx from the primary for it. A 2xx to
  RCPT is not enough: the final reply to DATA decides for every recipient
  that RCPT accepted (RFC 5321 3.3).
- Every recipient tried ends in exactly one store call: `delivered` (2xx),
  `failed` (5xx) or `deferred` (4xx, or any trouble with the connection, with
  the reason recorded). There is no "unknown": a timeout, a dropped connection,
  or a reply we cannot trust is a deferral, never a failure -- smtplib reports
  an over-long reply line as "500 Line too long", a 5xx the primary never sent.
- The primary is a peer we do not control: every reply is bounded and
  strict (smtpclient.PrimaryClient).
- With PIPELINING, the next message's MAIL/RCPT/DATA may ride with an end
  of data (RFC 2920 3.1), never its content: each reply is read in command
  order and may only be what its place allows, a message is delivered only
  by the reply to its own end of data, and a message announced on a
  connection that is dropped is deferred with the reason (record_withdrawn).
- The body is streamed from the store in chunks, dot-stuffed across chunk
  boundaries (RFC 5321 4.5.2), sent with CRLF line ends and exactly one end
  of data; memory does not grow with the message size.
- The flush lease is asked before each message and body chunk
  (flush_lease.Lease.check); once it is lost the connection is dropped,
  mid-DATA too, never ended with QUIT (that would only become body).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import smtplib
import time
from typing import TYPE_CHECKING

from backupmx.lifecycle import next_retry_delay
from backupmx.log import lines_together, log_event
from backupmx.outcome import Outcome, Verdict
from backupmx.smtpclient import (DataEncoder, Primary, PrimaryClient, PrimaryUnavailable, describe, reply_text,
                                 xforward_commands)

if TYPE_CHECKING:
    from backupmx.flush_sharing import Work

BODY_CHUNK = 64 * 1024  # bytes read from the store's blob at a time
# Delivery outcomes are written in batches of this many messages, or at least
# this often: one fsync per batch instead of one per message.
OUTCOME_BATCH = 64
OUTCOME_BATCH_SECONDS = 0.25

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _Gone(Exception):
    """The message left the queue (operator delete) while we were delivering it."""


class Trouble(Exception):
    """The connection is unusable; `reason` is recorded as the recipients' last reply.

    at_connect: no session could be opened (unreachable, greeting refused,
    TLS required and not possible): the rest of the queue need not be tried.
    """

    def __init__(self, reason: str, at_connect: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.at_connect = at_connect


_POSITIVE = range(200, 300)  # MAIL, RCPT: go on
_START_INPUT = (354,)  # DATA: send the body


def _judge(code: int, text: bytes, proceed=()) -> Verdict | None:
    """What one reply of the primary means for the mail it answers (outcome.classify).

    None when the code is one of `proceed` (the transaction goes on); else the
    Verdict for the recipients it answers. Raises Trouble, which ends the
    connection, for 421 (RFC 5321 3.8: the server is closing the channel) and
    for a reply that has no place at this step (a 3xx to MAIL, a 250 to DATA).
    """
    if code in proceed:
        return None
    verdict = Verdict.of_reply(code, reply_text(code, text))
    if code == 421:
        raise Trouble(verdict.reply)
    if (proceed and verdict.outcome is Outcome.DELIVERED) or (verdict.outcome is Outcome.DEFERRED
                                                             and not 400 <= code < 500):
        # Not a reply to this command: the primary answers out of order, or more often
        # than asked. Nothing more it says can be matched to the mail it is about.
        raise Trouble(f"reply out of sequence: {verdict.reply}")
    return verdict


@dataclasses.dataclass
class _Envelope:
    """The commands that open one message's transaction: XFORWARD..., MAIL, RCPT... (DATA follows).

    `refusal`: the Verdict that keeps the message from this primary instead
    (no command is sent). `sent`: its pipelined group already went out, with
    the previous message's end of data (Flush.announce).
    """

    message: object
    xforward: list[str] = dataclasses.field(default_factory=list)
    mail: tuple[str, str] = ("MAIL", "")
    rcpts: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    encoding: str = "ascii"
    refusal: Verdict | None = None
    sent: bool = False

    def group(self) -> bytes:
        """RFC 2920 2: XFORWARD, MAIL, every RCPT and DATA (last: it needs its 354) as one group."""
        lines = [*self.xforward, *(f"{verb} {argument}" for verb, argument in (self.mail, *self.rcpts)), "DATA"]
        return "".join(line + "\r\n" for line in lines).encode(self.encoding)


class Flush:
    """One flush of one domain: a connection (re-opened as needed) and the outcomes."""

    def __init__(self, store, domain, *, owner, hostname, timeout, lease, log, primary: Primary | None = None):
        self.store = store
        self.domain = domain
        self.owner = owner
        self.hostname = hostname
        self.timeout = timeout
        self.lease = lease
        self.log = log
        self.primary = primary or Primary(domain, hostname=hostname, timeout=timeout, log=log)
        self.relay = self.primary.relay
        self.client: PrimaryClient | None = None
        self.tls_version: str | None = None
        self.counts = {"messages": 0, "delivered": 0, "deferred": 0, "failed": 0}
        self._unrecorded = []  # (message, outcomes, retry_after) not yet written
        self.xforward_refused = False  # logged once per flush
        self._batch_started = 0.0
        # The next message's envelope when its commands went out with the last end of
        # data (announce): this connection delivers that message next (next_message).
        self.announced: _Envelope | None = None

    # -- the connection ------------------------------------------------------

    def connect(self) -> PrimaryClient:
        """Open a session ready for MAIL, or raise Trouble (at_connect)."""
        try:
            client, self.tls_version = self.primary.open()
        except PrimaryUnavailable as e:
            raise Trouble(e.reason, at_connect=True) from e
        return client

    def drop(self) -> _Envelope | None:
        """Abandon the connection without QUIT (after trouble, or mid-DATA).

        Returns the envelope announced on it, if any: that message was taken
        from the work list and now has no connection (record_withdrawn).
        """
        withdrawn, self.announced = self.announced, None
        if self.client is not None:
            self.client.close()
            self.client = None
        return withdrawn

    def quit(self) -> _Envelope | None:
        """The flush is done with its session: the primary ends it (QUIT), or keeps it for the next.

        With a message announced (the flush stopped between messages) the primary may
        be waiting for its content: QUIT would be read as content, so the connection
        is dropped instead and the message stays queued as it was. Returns its
        envelope: it was taken from the work list and nobody delivers it now.
        """
        withdrawn = self.drop() if self.announced is not None else None
        if self.client is not None:
            client, self.client = self.client, None
            self.primary.release(client)
        return withdrawn

    # -- outcomes ---------------------------------------------------------------

    def record(self, message, outcomes: dict[str, Verdict]):
        """outcomes: address -> Verdict. Buffered, then written by record_outcomes:
        a batch of messages per transaction, one log line per verdict."""
        retry_after = None
        if self.domain.retry_interval and any(v.outcome is Outcome.DEFERRED for v in outcomes.values()):
            retry_after = next_retry_delay(self.domain.retry_interval, message.attempts + 1)
        if not self._unrecorded:
            self._batch_started = time.monotonic()
        self._unrecorded.append((message, outcomes, retry_after))
        if len(self._unrecorded) >= OUTCOME_BATCH or time.monotonic() - self._batch_started >= OUTCOME_BATCH_SECONDS:
            self.record_outcomes()

    def record_outcomes(self):
        """Write the buffered outcomes in one transaction, then log them.

        Until this commits, a crash means the primary gets those messages
        again: duplicates, never loss (docs/SPEC.md allows the former).
        """
        batch, self._unrecorded = self._unrecorded, []
        if not batch:
            return
        self.store.record_attempts([(message.queue_id, self.domain.name, outcomes, retry_after)
                                    for message, outcomes, retry_after in batch])
        now = time.time()
        with lines_together():
            for message, outcomes, _ in batch:
                self._log_outcomes(message, outcomes, now)

    def _log_outcomes(self, message, outcomes: dict[str, Verdict], now: float):
        """One line per outcome, with Postfix's delay= (seconds since the message was received) and size=."""
        groups: dict[Verdict, list[str]] = {}
        for address, verdict in outcomes.items():
            groups.setdefault(verdict, []).append(address)
        for verdict, addresses in groups.items():
            self.counts[verdict.outcome.value] += len(addresses)
            log_event(
                self.log,
                verdict.outcome.value,
                id=message.queue_id,
                domain=self.domain.name,
                from_=f"<{message.sender}>",
                to=",".join(f"<{a}>" for a in addresses),
                relay=self.relay,
                delay=f"{max(0.0, now - message.received_at):.1f}" if message.received_at else None,
                size=message.size,
                tls=self.tls_version,
                reply=verdict.reply,
            )

    # -- one message --------------------------------------------------------------

    def next_message(self, work: Work):
        """The message this connection delivers next: the one whose commands went out with
        the last end of data (announce), else the next of the work list; None when none is left."""
        if self.announced is not None:
            return self.announced.message
        try:
            return work.popleft()  # atomic: the extra connections take from the same list
        except IndexError:
            return None

    def deliver(self, message, work: Work | None = None) -> Trouble | None:
        """Deliver one message and record every recipient's outcome.

        With `work` (the flush's work list) and a primary that offers PIPELINING,
        the next message's commands go out with this one's end of data (announce).
        Returns None, or the Trouble that ended the connection (its `at_connect`
        tells whether no session could be opened at all).
        """
        self.counts["messages"] += 1
        outcomes: dict[str, Verdict] = {}
        trouble = None
        try:
            if self.client is None:
                self.client = self.connect()
            self.transaction(message, outcomes, work)
        except Trouble as e:
            trouble = e
        except (OSError, smtplib.SMTPException) as e:
            trouble = Trouble(describe(e))
        except _Gone:
            # The operator deleted the message meanwhile. If that happened
            # mid-DATA, dropping the connection makes the primary discard it.
            self.record_withdrawn(self.drop(), "connection closed: a message was deleted mid-delivery")
            log_event(self.log, "skipped", id=message.queue_id, domain=self.domain.name,
                      reason="no longer in the queue")
            return None
        except BaseException:
            # Lease lost, store trouble...: never leave a half-sent DATA open
            # (QUIT would only become part of the body). A message announced
            # stays queued as it was: nothing of it was accepted.
            self.drop()
            raise
        if trouble is not None:
            withdrawn = self.drop()
            for r in message.recipients:
                outcomes.setdefault(r.address, Verdict.deferred(trouble.reason))
            self.record(message, outcomes)
            self.record_withdrawn(withdrawn, trouble.reason)
            return trouble
        self.record(message, outcomes)
        return None

    def record_withdrawn(self, envelope: _Envelope | None, reason: str) -> None:
        """A message announced on a connection that was then dropped: its commands may
        have reached the primary, its content never did (it is sent only after its own
        354). Deferred with the reason, as the message in flight is."""
        if envelope is None:
            return
        self.counts["messages"] += 1
        verdict = envelope.refusal or Verdict.deferred(reason)
        self.record(envelope.message, {r.address: verdict for r in envelope.message.recipients})

    def command(self, verb: str, argument: str = "") -> tuple[int, bytes]:
        client = self.client
        client.putcmd(verb, argument)
        return client.getreply()

    def transaction(self, message, outcomes: dict[str, Verdict], work: Work | None = None):
        """MAIL, RCPT..., DATA, body: a Verdict per recipient into `outcomes`; Trouble ends the connection.

        Every reply is read in the order of the commands it answers, and each
        can only be the reply its place allows (_judge): a primary that answers
        out of order, or more often than asked, ends the connection rather
        than have one message's reply taken for another's.
        """
        client = self.client
        self.lease.check()
        envelope = self.take_announced(message) or self.envelope(message)
        if envelope.refusal is not None:
            outcomes.update(dict.fromkeys((r.address for r in message.recipients), envelope.refusal))
            return
        client.command_encoding = envelope.encoding
        pipelining = client.has_extn("pipelining")
        if pipelining:
            # RFC 2920: XFORWARD, MAIL, every RCPT and DATA in one write (unless it went
            # out with the previous end of data), then the replies in order.
            if not envelope.sent:
                client.send(envelope.group())
            for _ in envelope.xforward:
                self._xforwarded(*client.getreply())
            mail_reply = client.getreply()
            rcpt_replies = [client.getreply() for _ in envelope.rcpts]
            data_reply = client.getreply()
        else:
            for line in envelope.xforward:
                self._xforwarded(*self.command(*line.split(" ", 1)))
            mail_reply, rcpt_replies, data_reply = self.command(*envelope.mail), None, None

        verdict = _judge(*mail_reply, proceed=_POSITIVE)
        if verdict is not None:
            outcomes.update(dict.fromkeys((r.address for r in message.recipients), verdict))
            return self.abandon_data(data_reply)
        accepted = []
        for index, r in enumerate(message.recipients):
            verdict = _judge(*(rcpt_replies[index] if rcpt_replies is not None else self.command(*envelope.rcpts[index])),
                             proceed=_POSITIVE)
            if verdict is None:
                accepted.append(r.address)
            else:
                outcomes[r.address] = verdict
        if not accepted:
            # RFC 2920 3.1: with no recipient accepted the DATA reply (503/554, or a 354
            # abandon_data ends) answers no message: it is no failure of this one's content.
            return self.abandon_data(data_reply)
        verdict = _judge(*(data_reply if data_reply is not None else self.command("DATA")), proceed=_START_INPUT)
        if verdict is not None:
            outcomes.update(dict.fromkeys(accepted, verdict))
            return self.reset()
        end_of_data = self.send_body(message.queue_id, self.domain.name)
        client.send(end_of_data + (self.announce(work) if pipelining and work is not None else b""))
        outcomes.update(dict.fromkeys(accepted, _judge(*client.getreply())))

    def envelope(self, message) -> _Envelope:
        """The commands that open `message`'s transaction with this primary (or its refusal)."""
        refusal, params, encoding = self._mail_parameters(message)
        if refusal is not None:
            return _Envelope(message, refusal=refusal)
        dsn = self.client.has_extn("dsn")
        return _Envelope(
            message,
            xforward=self._xforward(message),
            mail=("MAIL", f"FROM:<{message.sender}>" + "".join(" " + p for p in params)),
            rcpts=[("RCPT", f"TO:<{r.address}>" + (f" NOTIFY={r.notify}" if dsn and r.notify else "")
                    + (f" ORCPT={r.orcpt}" if dsn and r.orcpt else "")) for r in message.recipients],
            encoding=encoding,
        )

    def announce(self, work: Work) -> bytes:
        """The next message's commands, to go out in the same write as this one's end of data.

        RFC 2920 3.1: the message content may be the first "command" of a group,
        so MAIL, RCPT and DATA may follow its end of data without waiting for
        its reply; the replies then come in order: this message's final reply
        first, then the next one's (read by its own transaction). Its content
        waits for its own 354 as always.
        """
        try:
            message = work.popleft()
        except IndexError:
            return b""
        self.lease.check()
        self.announced = envelope = self.envelope(message)
        if envelope.refusal is not None:
            return b""  # nothing to send: its transaction records the refusal
        envelope.sent = True
        return envelope.group()

    def take_announced(self, message) -> _Envelope | None:
        """`message`'s envelope when announce() prepared it, else None."""
        envelope = self.announced
        if envelope is None or envelope.message is not message:
            return None
        self.announced = None
        return envelope

    def _xforward(self, message) -> list[str]:
        """XFORWARD before MAIL when the primary offers it: the client as we received it
        (the queue keeps it from receive time), so the primary's checks see the real sender."""
        offered = self.client.esmtp_features.get("xforward")
        if offered is None:
            return []
        address = message.client
        if address and ":" in address:
            address = "IPV6:" + address  # as Postfix's smtp client sends it
        return xforward_commands(offered, {
            "NAME": message.client_name, "ADDR": address, "PROTO": message.protocol, "HELO": message.helo,
            "IDENT": message.queue_id, "SOURCE": "REMOTE" if message.client else None})

    def _xforwarded(self, code: int, text: bytes) -> None:
        """XFORWARD's reply: a 421 ends the connection; another refusal only loses the information."""
        if code == 421:
            raise Trouble(reply_text(code, text))
        if not 200 <= code < 300 and not self.xforward_refused:
            self.xforward_refused = True
            log_event(self.log, "xforward-refused", domain=self.domain.name, relay=self.relay,
                      reply=reply_text(code, text), level=logging.WARNING)

    def _mail_parameters(self, message) -> tuple[Verdict | None, list[str], str]:
        """The MAIL parameters for this primary and the commands' encoding,
        or the Verdict that keeps the message queued instead."""
        client = self.client
        envelope = [message.sender] + [r.address for r in message.recipients]
        params = []
        encoding = "ascii"
        if message.smtputf8 == 2 or any(not a.isascii() for a in envelope):
            # RFC 6531 3.2: a UTF-8 envelope or header goes only to a server that offers
            # SMTPUTF8; to any other it fails (5.6.7, RFC 6531 3.5), and the sender gets a DSN.
            if not client.has_extn("smtputf8"):
                return Verdict(Outcome.FAILED, f"5.6.7 SMTPUTF8 is required, but was not offered by host {self.relay}"), [], encoding
            encoding = "utf-8"
            params.append("SMTPUTF8")
        elif message.smtputf8 and client.has_extn("smtputf8"):
            params.append("SMTPUTF8")  # asked for, not needed: passed on where it can be
        if client.has_extn("size"):
            params.append(f"SIZE={message.size}")
        if (message.body_type or "").upper() == "8BITMIME" and client.has_extn("8bitmime"):
            params.append("BODY=8BITMIME")
        if client.has_extn("dsn"):
            params += [f"{key}={value}" for key, value in (("ENVID", message.envid), ("RET", message.ret)) if value]
        xtexts = [message.envid, message.ret] + [p for r in message.recipients for p in (r.notify, r.orcpt)]
        if any(_CONTROL.search(a) for a in envelope) or any(
            x and (_CONTROL.search(x) or " " in x or not x.isascii()) for x in xtexts
        ):
            # The server never queues such an envelope; if one is there, sending it
            # would inject commands. Keep it queued (and visible) instead.
            return Verdict.deferred("envelope holds characters that cannot be sent"), [], encoding
        return None, params, encoding

    def abandon_data(self, data_reply):
        """End a transaction that will not send a body, then RSET.

        A pipelined DATA may have been answered 354 even though no recipient
        was accepted (RFC 2920 3.1): the server then waits for a body, and an
        empty one ends it without a message.
        """
        if data_reply is not None and data_reply[0] == 354:
            self.client.send(".\r\n")
            self.client.getreply()
        self.reset()

    def send_body(self, queue_id: str, domain: str) -> bytes:
        """Stream the body but for its last piece; return that piece with the end of data.

        The body is read while `domain`'s row of the message waits (_Gone once it went).
        The caller sends the last piece and the end-of-data marker in one write
        (with the next message's commands, announce): two small writes in a row
        would wait for the peer's delayed ACK (Nagle), ~40 ms per message.
        """
        encoder = DataEncoder()
        try:
            body = self.store.open_body(queue_id, domain)
        except KeyError as e:
            raise _Gone() from e
        pending = b""
        try:
            while True:
                try:
                    chunk = body.read(BODY_CHUNK)
                except KeyError as e:
                    raise _Gone() from e
                if not chunk:
                    break
                self.lease.check()
                if pending:
                    self.client.send(pending)
                pending = encoder.feed(chunk)
        finally:
            body.close()
        return pending + encoder.end()

    def reset(self):
        """RSET after a failed transaction; a primary that will not reset is dropped."""
        try:
            code, _ = self.command("RSET")
        except (OSError, smtplib.SMTPException):
            self.drop()
            return
        if code != 250:
            self.drop()
