"""Delivery of one domain's queue to that domain's configured primary, with smtplib.

A flush worker process loops: claim a domain whose flush was requested (ETRN,
`backupmx flush`), deliver its queue to `DomainConfig.primary` -- that host
and port only, at the addresses it resolved to when the configuration was
loaded (backupmx.primaries), never a host found in DNS now -- then release
the claim.

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
- The flush lease is renewed while we work (_Lease, a thread), and when it
  is lost we stop at the next message or body chunk (closing the
  connection mid-DATA, so the primary discards that copy) rather than race
  another flusher.
- A big flush's second connection may live in a helper process (_share):
  it takes runs of the same work list, records its own outcomes under the
  same lease, and its counts join the flush's; the main connection alone
  decides that the primary is not taking mail (_suspend).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import itertools
import logging
import os
import re
import select
import signal
import smtplib
import struct
import sys
import threading
import time
from collections.abc import Callable

from backupmx import children

from backupmx.lifecycle import housekeeping, log_domain_changes, next_retry_delay, request_due_retries
from backupmx.log import flush_pending, lines_together, log_event
from backupmx.outcome import Outcome, Verdict
from backupmx.prober import PrimaryWatch, monitored
from backupmx.smtpclient import (DataEncoder, Primary, PrimaryClient, PrimaryUnavailable, describe, reply_text,
                                 xforward_commands)
from backupmx.store import FlushRequests, QueueStore, QueueUnavailable

__all__ = [
    "deliver_domain",
    "default_lease_seconds",
    "drain",
    "reopened_queue",
    "run_flush_worker",
]

LOGGER = logging.getLogger("backupmx.flusher")

BODY_CHUNK = 64 * 1024  # bytes read from the store's blob at a time
# Seconds between looks for a flush to claim when there is nothing to flush: half
# of it is how late, on average, a flush starts after its ETRN. A look is a read
# (store.flush_waiting); only a domain to claim takes the write lock.
POLL_INTERVAL = 0.05
MAX_CONSECUTIVE_TROUBLE = 3  # connection troubles in a row before the rest of the queue waits
# Seconds between housekeeping rounds (expiry, bounces, retries, purge): the
# contract (docs/SPEC.md, "Queue lifecycle") wants expiry and bounces acted on
# within a minute of becoming due.
HOUSEKEEPING_INTERVAL = 30.0
# Connections to the primary per flush beyond the first, for flushes of at
# least EXTRA_CONNECTION_MIN_MESSAGES messages: while one waits for the
# primary's reply, the other sends (the "parallel connections to the primary
# where it allows" of Postfix's qmgr, at a modest 2).
EXTRA_CONNECTIONS = 1
EXTRA_CONNECTION_MIN_MESSAGES = 20
# A flush of at least HELPER_MIN_MESSAGES messages, started in a process with no
# other thread, has its second connection in a helper process instead (_share):
# two connections in one process take turns for one GIL, and the flush worker
# was CPU-bound on one core while the machine's other core waited.
HELPER_MIN_MESSAGES = 100
MAX_HELPER_RUNS = 4096  # runs of the work list in the pipe the helper shares (8 bytes each)
_RUN = struct.Struct("=II")  # one run: (index of its first message, how many)
# Delivery outcomes are written in batches of this many messages, or at least
# this often: one fsync per batch instead of one per message.
OUTCOME_BATCH = 64
OUTCOME_BATCH_SECONDS = 0.25
# Seconds between looks for domains whose retry_interval backoff has run out, at most
# (a retry_interval shorter than twice this is looked at twice per interval).
RETRY_SCAN_INTERVAL = 2.0
MIN_RETRY_SCAN_INTERVAL = 0.25  # ... and at least: a scan of the queue's index, at most 4 a second per flush worker

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def default_lease_seconds(timeout: float) -> float:
    """A lease that outlives the longest wait between two renewals.

    Renewal happens every lease/6 at the latest between blocking steps; the
    longest step is a reply wait plus one chunk send (2 * timeout).
    """
    return 3 * timeout + 30


class _Gone(Exception):
    """The message left the queue (operator delete) while we were delivering it."""


class _LeaseLost(Exception):
    """Another flusher owns the domain now: stop without touching anything."""


class _Trouble(Exception):
    """The connection is unusable; `reason` is recorded as the recipients' last reply.

    at_connect: no session could be opened (unreachable, greeting refused,
    TLS required and not possible): the rest of the queue need not be tried.
    """

    def __init__(self, reason: str, at_connect: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.at_connect = at_connect


class _Lease:
    """Keeps a domain's flush lease alive while its flush runs, from a thread of its own.

    Entering checks once, on the caller's store, that the lease is still
    `owner`'s (_LeaseLost if not: nothing is sent). Then a thread renews it
    every lease/6 on its own SQLite connection, so a slow primary or a long
    body never lets it run out, and no SMTP read loop writes to the database.
    The delivery side asks `check()` between steps (each message, each body
    chunk), which raises _LeaseLost once the lease is another flusher's, and
    also once it is about to run out: renewals that failed for five intervals
    (the queue busy or full), or a renewal thread that died, must not let this
    flusher go on while a second one claims the domain (both would send the
    same mail). `ran_out` then tells the caller to ask for the flush again.
    """

    def __init__(self, store, domain: str, owner: str, seconds: float, log: logging.Logger = LOGGER):
        self.store, self.domain, self.owner, self.seconds, self.log = store, domain, owner, seconds, log
        self.interval = seconds / 6
        self.lost = False  # a renewal found the lease another's, or the renewals stopped
        self.ran_out = False  # ... and it was not another's: nobody may be delivering the rest
        # Monotonic time until which the lease surely holds: when the last successful
        # renewal started, plus its length (the queue's lease_expires is at least that).
        self.valid_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{domain}", daemon=True)

    def __enter__(self) -> "_Lease":
        started = time.monotonic()
        if not self.store.renew_lease(self.domain, self.owner, self.seconds):
            raise _LeaseLost()
        self.valid_until = started + self.seconds
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        try:
            with FlushRequests(self.store.path) as own:  # SQLite connections stay in their thread
                while not self._stop.wait(self.interval):
                    started = time.monotonic()
                    try:
                        renewed = own.renew_lease(self.domain, self.owner, self.seconds)
                    except QueueUnavailable:
                        continue  # busy or full now: check() stops the flush before the lease runs out
                    if not renewed:
                        self.lost = True
                        return
                    self.valid_until = started + self.seconds
        except Exception as exc:  # an unforeseen error: without renewals the lease must count as lost
            log_event(self.log, "flush-error", domain=self.domain, owner=self.owner,
                      error=f"lease renewal: {type(exc).__name__}: {exc}", level=logging.ERROR)
            self.ran_out = self.lost = True

    @property
    def stolen(self) -> bool:
        """Another flusher owns the lease now: its flush delivers every message still queued."""
        return self.lost and not self.ran_out

    def check(self) -> None:
        if not self.lost and time.monotonic() >= self.valid_until - self.interval:
            self.ran_out = self.lost = True  # one interval before anyone else may claim it
        if self.lost:
            raise _LeaseLost()


_POSITIVE = range(200, 300)  # MAIL, RCPT: go on
_START_INPUT = (354,)  # DATA: send the body


def _judge(code: int, text: bytes, proceed=()) -> Verdict | None:
    """What one reply of the primary means for the mail it answers (outcome.classify).

    None when the code is one of `proceed` (the transaction goes on); else the
    Verdict for the recipients it answers. Raises _Trouble, which ends the
    connection, for 421 (RFC 5321 3.8: the server is closing the channel) and
    for a reply that has no place at this step (a 3xx to MAIL, a 250 to DATA).
    """
    if code in proceed:
        return None
    verdict = Verdict.of_reply(code, reply_text(code, text))
    if code == 421:
        raise _Trouble(verdict.reply)
    if (proceed and verdict.outcome is Outcome.DELIVERED) or (verdict.outcome is Outcome.DEFERRED
                                                             and not 400 <= code < 500):
        # Not a reply to this command: the primary answers out of order, or more often
        # than asked. Nothing more it says can be matched to the mail it is about.
        raise _Trouble(f"reply out of sequence: {verdict.reply}")
    return verdict


@dataclasses.dataclass
class _Envelope:
    """The commands that open one message's transaction: XFORWARD..., MAIL, RCPT... (DATA follows).

    `refusal`: the Verdict that keeps the message from this primary instead
    (no command is sent). `sent`: its pipelined group already went out, with
    the previous message's end of data (_Flush.announce).
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


class _Flush:
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
        """Open a session ready for MAIL, or raise _Trouble (at_connect)."""
        try:
            client, self.tls_version = self.primary.open()
        except PrimaryUnavailable as e:
            raise _Trouble(e.reason, at_connect=True) from e
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

    def next_message(self, work: _Work):
        """The message this connection delivers next: the one whose commands went out with
        the last end of data (announce), else the next of the work list; None when none is left."""
        if self.announced is not None:
            return self.announced.message
        try:
            return work.popleft()  # atomic: the extra connections take from the same list
        except IndexError:
            return None

    def deliver(self, message, work: _Work | None = None) -> _Trouble | None:
        """Deliver one message and record every recipient's outcome.

        With `work` (the flush's work list) and a primary that offers PIPELINING,
        the next message's commands go out with this one's end of data (announce).
        Returns None, or the _Trouble that ended the connection (its `at_connect`
        tells whether no session could be opened at all).
        """
        self.counts["messages"] += 1
        outcomes: dict[str, Verdict] = {}
        trouble = None
        try:
            if self.client is None:
                self.client = self.connect()
            self.transaction(message, outcomes, work)
        except _Trouble as e:
            trouble = e
        except (OSError, smtplib.SMTPException) as e:
            trouble = _Trouble(describe(e))
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

    def transaction(self, message, outcomes: dict[str, Verdict], work: _Work | None = None):
        """MAIL, RCPT..., DATA, body: a Verdict per recipient into `outcomes`; _Trouble ends the connection.

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

    def announce(self, work: _Work) -> bytes:
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
            raise _Trouble(reply_text(code, text))
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


class _Work:
    """The messages a flush has still to take, oldest first.

    deque.popleft is atomic: the extra connections (threads) take from the same list.
    """

    def __init__(self, messages=()):
        self.queue = collections.deque(messages)

    def popleft(self):
        """The next message to deliver; IndexError when none is there now."""
        return self.queue.popleft()

    def __len__(self) -> int:
        return len(self.queue)

    def wait(self, should_stop: Callable[[], bool], lease: _Lease) -> bool:
        """None is there now: True when more may come (look again), False when none will."""
        return False

    def stop_helper(self) -> None:
        """The flush stops (suspended, interrupted, lease lost): so does a helper process."""

    def join_helper(self) -> dict[str, int]:
        """What a helper process delivered (its counts), once it is gone; {} without one."""
        return {}


class _SharedWork(_Work):
    """A work list shared with a helper process (_share): runs of it in a pipe, taken by either process.

    A run is written and read as one _RUN.size-byte piece (below PIPE_BUF: atomic),
    so each run is taken by exactly one process, which delivers it from its own
    deque. The helper holds the pipe's only write end: a run it took and will
    not deliver (it stopped early) goes back into the pipe before it exits,
    so the parent sees the pipe's end only once the helper is gone and every
    run was taken (wait). Both ends' reads are non-blocking: an empty pipe
    means, for the helper, that its work is done.
    """

    def __init__(self, messages: list, runs_fd: int, *, helper_pid: int | None = None,
                 result_fd: int | None = None, return_fd: int | None = None):
        super().__init__()
        self.messages = messages
        self.runs_fd = runs_fd
        self.helper_pid, self.result_fd = helper_pid, result_fd  # in the parent
        self.return_fd = return_fd  # in the helper: the pipe's write end
        self.run_end = 0  # index after the last message of the run in self.queue
        self.ended = False  # the pipe is empty and has no writer left

    def popleft(self):
        if not self.queue:
            self._take_run()
        return self.queue.popleft()

    def _take_run(self) -> None:
        try:
            data = os.read(self.runs_fd, _RUN.size)
        except BlockingIOError:
            return
        if not data:
            self.ended = True
            return
        first, count = _RUN.unpack(data)
        self.queue.extend(self.messages[first:first + count])
        self.run_end = first + count

    def wait(self, should_stop: Callable[[], bool], lease: _Lease) -> bool:
        while not self.ended:
            if should_stop():
                return True
            lease.check()
            if select.select([self.runs_fd], [], [], 0.1)[0]:
                return True  # a run, or the end: popleft tells
        return False

    def give_back(self, announced=None) -> bool:
        """In the helper, stopping early: the rest of its run goes back to the parent, as one run.

        `announced`: the message whose commands went out with the last end of data and
        whose content never did (_Flush.quit). It was the last one taken, so it is the
        one just before the rest (the last of the previous run when the rest is empty),
        and goes back with it. False when any of them could not go back.
        """
        first, count = self.run_end - len(self.queue), len(self.queue)
        self.queue.clear()
        if announced is not None:
            if first == 0 or self.messages[first - 1] is not announced:
                return False
            first, count = first - 1, count + 1
        if not count:
            return True
        if self.return_fd is None:
            return False
        try:
            os.write(self.return_fd, _RUN.pack(first, count))
        except OSError:  # the parent is gone: they stay queued for the next flush
            return False
        return True

    def stop_helper(self) -> None:
        if self.helper_pid is not None:
            children.send_signal(self.helper_pid, signal.SIGTERM)

    def join_helper(self) -> dict[str, int]:
        """Waits for the helper to end: it stops between messages (stop_helper), so this
        is bounded by one message's delivery, as the flush itself is."""
        if self.helper_pid is None:
            return {}
        pid, self.helper_pid = self.helper_pid, None
        _, status = _waitpid(pid)
        result = b""
        try:
            result = os.read(self.result_fd, 512)
        except OSError:
            pass
        finally:
            os.close(self.result_fd)
            os.close(self.runs_fd)
        try:
            counts = dict(zip(_HELPER_REPORT, map(int, result.split())))
        except ValueError:
            counts = {}
        if status != 0 or len(counts) != len(_HELPER_REPORT):
            # Killed (or crashed) mid-flush: what it had taken and not recorded is still
            # queued, and must not wait for the next ETRN.
            raise _HelperLost(pid, children.describe_status(status))
        return counts


# What a helper reports when it ends: its counts, and "again" (1) when it stopped with a
# message it took neither recorded nor given back: the flush must then be asked for again.
_HELPER_REPORT = ("messages", "delivered", "deferred", "failed", "again")


class _HelperLost(Exception):
    """The helper process of a flush ended without its report (killed, crashed)."""

    def __init__(self, pid: int, status: str):
        super().__init__(f"pid {pid} {status}")
        self.status = status


def _waitpid(pid: int) -> tuple[int, int]:
    while True:
        try:
            return os.waitpid(pid, 0)
        except ChildProcessError:
            return pid, 0xFF00  # reaped by someone else: no report, so a lost helper
        except InterruptedError:
            continue


def _deliver_share(flush: "_Flush", work: _Work, should_stop: Callable[[], bool],
                   finished: threading.Event | None = None) -> tuple[object | None, bool]:
    """A second connection's loop (a thread's, or a helper process's): connect, then take
    messages from `work` until none is left, should_stop(), or `finished` is set.

    It only joins in once its connection is up: a primary that refuses more
    than one connection just gets one, and no message is deferred for it. At
    the first trouble it leaves the rest to the main connection, which alone
    decides when the primary is not taking mail. Records what it did and ends
    its session, whatever happens.

    Returns the message it had announced when it stopped (taken, never sent, not
    recorded: _Flush.quit), or None; and whether it left a message it took
    unrecorded otherwise (the lease ran out mid-message, the outcome write failed).
    """
    log, name = flush.log, flush.domain.name
    unrecorded = False
    try:
        flush.client = flush.connect()
        # A message announced on this connection is delivered even once the main
        # connection is done: it was taken from the work list.
        while not should_stop() and (flush.announced is not None or finished is None or not finished.is_set()):
            message = flush.next_message(work)
            if message is None:
                break
            if flush.deliver(message, work) is not None:
                break
    except _Trouble:
        pass  # no session: the main connection carries on (or has the same trouble itself)
    except _LeaseLost:
        # Stolen: the new owner's flush takes every queued message. Ran out: nobody's does.
        unrecorded = flush.lease.ran_out
    except Exception as e:  # never lose the main flush over this one
        unrecorded = True
        log_event(log, "flush-error", domain=name, error=f"extra connection: {type(e).__name__}: {e}",
                  level=logging.WARNING)
    finally:
        try:
            flush.record_outcomes()
        except Exception as e:  # unrecorded: those messages are delivered again, never lost
            unrecorded = True
            log_event(log, "flush-error", domain=name, error=f"extra connection: {e}", level=logging.WARNING)
        withdrawn = flush.quit()
    return (withdrawn.message if withdrawn is not None else None), unrecorded


class _ExtraConnection(threading.Thread):
    """A second connection to the same primary in a thread, taking messages from the same work list
    (_deliver_share), with its own QueueStore connection (SQLite connections stay in their thread)."""

    def __init__(self, main: "_Flush", work: _Work, finished: threading.Event, should_stop: Callable[[], bool]):
        super().__init__(name=f"flush-{main.domain.name}", daemon=True)
        self.main = main
        self.work, self.finished, self.should_stop = work, finished, should_stop
        self.counts = {"messages": 0, "delivered": 0, "deferred": 0, "failed": 0}
        # It stopped with a message it took and neither recorded nor delivered (the one it had
        # announced, or one whose outcome write failed): the flush is asked for again.
        self.again = False

    def run(self):
        main = self.main
        try:
            store = QueueStore(main.store.path)
        except Exception as e:
            log_event(main.log, "flush-error", domain=main.domain.name, error=f"extra connection: {e}",
                      level=logging.WARNING)
            return
        flush = _Flush(store, main.domain, owner=main.owner, hostname=main.hostname, timeout=main.timeout,
                       lease=main.lease, log=main.log, primary=main.primary)
        try:
            # Unlike a helper's, an announced message is not handed back: the main connection
            # may be done with the work list already, and nobody would take it.
            announced, unrecorded = _deliver_share(flush, self.work, self.should_stop, self.finished)
            self.again = unrecorded or (announced is not None and not main.lease.stolen)
        finally:
            self.counts = flush.counts
            store.close()


def _share(main: "_Flush", messages: list, helper: bool = True) -> _Work:
    """The flush's work list, shared with a helper process when the flush is big enough (and
    `helper`: no flush worker whose helper's fork once cost it its queue connection forks again).

    The helper is a fork of this process with a connection of its own to the
    primary (a _Flush on its own QueueStore, opened after the fork), taking
    runs of the work list from a pipe as the main connection does
    (_SharedWork) and recording its own outcomes: a message leaves the queue
    only after the 250 to its own end of data, whichever process sent it. It
    renews the same lease, as the same owner, and stops when the lease is
    lost, when this process asks (SIGTERM: stop_helper) or is gone, and at
    its first trouble. Forked before the lease thread starts and only from a
    process with no other thread (none can be inside SQLite or hold a lock
    at the fork); otherwise, and for a primary that takes one session (a
    reversed ODMR one), the work list stays this process's own.
    """
    if (not helper or len(messages) < HELPER_MIN_MESSAGES or main.primary.single_session
            or threading.active_count() > 1 or EXTRA_CONNECTIONS < 1):
        return _Work(messages)
    runs_r, runs_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = None
    try:
        os.set_blocking(runs_r, False)
        os.set_blocking(runs_w, False)
        room = fcntl.fcntl(runs_w, fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 4096
        per_run = -(-len(messages) // max(1, min(MAX_HELPER_RUNS, room // _RUN.size)))
        runs = b"".join(_RUN.pack(first, min(per_run, len(messages) - first))
                        for first in range(0, len(messages), per_run))
        if os.write(runs_w, runs) != len(runs):
            raise BlockingIOError("the pipe took only part of the runs")
        parent = os.getpid()
        # The child must inherit no SQLite state (QueueDatabase.closed_for_fork): our
        # connection is closed across the fork, and no other may be open in this process.
        with main.store.closed_for_fork():
            if _queue_files_open(main.store.path):
                raise _QueueOpenElsewhere("another connection to the queue is open in this process")
            _flush_buffers()
            pid = children.fork_blocking((signal.SIGTERM,))
            if pid == 0:  # all the child does is inside run_child: it never unwinds into the code below
                children.run_child(lambda: _helper_start(main, messages, runs_r, runs_w, result_r, result_w, parent),
                                   main.log, "flush-helper-crashed")
    except BaseException as e:
        os.close(runs_w)
        os.close(result_w)
        if pid is not None:  # forked, and then our connection did not reopen: the flush fails, the helper stops
            _stop_forked_helper(main, _SharedWork(messages, runs_r, helper_pid=pid, result_fd=result_r))
            raise
        os.close(runs_r)
        os.close(result_r)
        if not isinstance(e, (OSError, _QueueOpenElsewhere)):
            raise
        log_event(main.log, "flush-error", domain=main.domain.name, error=f"helper: {e}", level=logging.WARNING)
        return _Work(messages)
    os.close(runs_w)
    os.close(result_w)
    return _SharedWork(messages, runs_r, helper_pid=pid, result_fd=result_r)


def _helper_start(main: "_Flush", messages: list, runs_r: int, runs_w: int, result_r: int, result_w: int,
                  parent: int) -> None:
    """In the forked helper: its ends of the pipes, then its work (_helper_main)."""
    os.close(result_r)
    _helper_main(main, _SharedWork(messages, runs_r, return_fd=runs_w), result_w, parent)


def _stop_forked_helper(main: "_Flush", work: _SharedWork) -> None:
    """A helper whose flush cannot go on right after the fork: stopped and reaped here (its
    own outcomes recorded by itself, the rest of its run left queued), never left a zombie."""
    work.stop_helper()
    try:
        work.join_helper()
    except _HelperLost as e:
        log_event(main.log, "flush-helper-lost", domain=main.domain.name, relay=main.relay, status=e.status,
                  level=logging.WARNING)


class _QueueOpenElsewhere(Exception):
    """A fork would hand the child SQLite's state of a connection we cannot close."""


def _queue_files_open(path: str) -> bool:
    """Whether a descriptor of this process is on the queue's database, -wal or -shm file
    (SQLite keeps them open for every connection; True when /proc cannot tell)."""
    files = set()
    for name in (path, path + "-wal", path + "-shm"):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        files.add((st.st_dev, st.st_ino))
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            st = os.stat(int(fd))
        except (OSError, ValueError):
            continue  # the listing's own descriptor, closed by now
        if (st.st_dev, st.st_ino) in files:
            return True
    return False


def _flush_buffers() -> None:
    """Before a fork: no line of ours waits in a buffer that the child would write again."""
    flush_pending()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, closed, or /dev/null gone
            pass


def _helper_main(main: "_Flush", work: _SharedWork, result_fd: int, parent: int) -> None:
    """The helper process (_share): deliver runs of the work list, then report its counts.

    `parent` is the flush's pid, taken before the fork: had it died before this
    runs, getppid() would already name init."""
    stop = children.StopFlag(parent=parent).install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM,))
    with QueueStore(main.store.path) as store:
        lease = _Lease(store, main.domain.name, main.owner, main.lease.seconds, main.log)
        flush = _Flush(store, main.domain, owner=main.owner, hostname=main.hostname, timeout=main.timeout,
                       lease=lease, log=main.log, primary=main.primary)
        announced, again = None, False
        try:
            with lease:
                announced, again = _deliver_share(flush, work, stop.should_stop)
        except _LeaseLost:
            pass  # it took nothing
        finally:
            if not work.give_back(announced):
                again = True
    report = " ".join(str(int(again) if k == "again" else flush.counts[k]) for k in _HELPER_REPORT)
    try:
        os.write(result_fd, report.encode())
    except OSError:  # the flush was killed (the master's stop timeout): what we recorded stays recorded
        log_event(main.log, "flush-helper-orphaned", domain=main.domain.name, relay=main.relay,
                  level=logging.WARNING)


def deliver_domain(
    store,
    domain,
    *,
    owner: str,
    hostname: str,
    timeout: float = 60.0,
    lease_seconds: float | None = None,
    log: logging.Logger = LOGGER,
    should_stop: Callable[[], bool] | None = None,
    primary: Primary | None = None,
    helper: bool = True,
) -> dict[str, int]:
    """Deliver every queued message of `domain` (a DomainConfig) to domain.primary.

    `primary` is where the SMTP sessions come from (its open() and relay):
    the domain's configured primary unless another is given (a session the
    peer opened, as ODMR reverses one). `helper`: a big flush may have its
    second connection in a helper process (_share); else in a thread.

    The caller holds the flush lease for domain.name under `owner`
    (store.claim_flush); it is kept alive here (_Lease) and released by the caller.
    Returns counts: {"messages": tried, "delivered"/"deferred"/"failed": recipients}.
    When the connection gives trouble, the next message gets a new one; after
    MAX_CONSECUTIVE_TROUBLE in a row (or when the primary cannot be reached at all)
    the rest is deferred with the same reason. When `should_stop()` turns true
    the flush stops between messages and is requested again, so that it resumes
    after a restart. Store errors (QueueUnavailable) propagate.
    """
    should_stop = should_stop or (lambda: False)
    lease = _Lease(store, domain.name, owner, lease_seconds or default_lease_seconds(timeout), log)
    flush = _Flush(store, domain, owner=owner, hostname=hostname, timeout=timeout, lease=lease, log=log,
                   primary=primary)
    messages = store.messages_for_flush(domain.name)
    if not messages:
        return flush.counts
    started = time.monotonic()
    log_event(log, "flush-start", domain=domain.name, relay=flush.relay, messages=len(messages))
    work = _share(flush, messages, helper)  # before the lease's thread starts: a fork from one thread
    try:
        with lease:
            status = _deliver_work(flush, work, should_stop)
    except _LeaseLost:
        status = "lease-lost"
        log_event(log, "flush-aborted", domain=domain.name, relay=flush.relay,
                  reason="the flush lease ran out" if lease.ran_out else "the flush lease was lost",
                  level=logging.WARNING)
        if lease.ran_out:  # no other flusher took over: the rest must not wait for the next ETRN
            _request_again(store, domain.name, log)
    finally:
        work.stop_helper()  # a no-op once it is gone
        _join_helper(flush, work)
    counts = flush.counts
    log_event(log, "flush-" + status, domain=domain.name, relay=flush.relay, messages=counts["messages"],
              delivered=counts["delivered"], deferred=counts["deferred"], failed=counts["failed"],
              seconds=f"{time.monotonic() - started:.3f}")
    return counts


def _join_helper(flush: _Flush, work: _Work) -> None:
    """The helper process's counts into the flush's; one that was lost, or that left a message
    unrecorded (its report's "again"), has the flush asked for again."""
    try:
        counts = work.join_helper()
        again = counts.pop("again", 0)
        for kind, count in counts.items():
            flush.counts[kind] += count
        if again:
            _request_again(flush.store, flush.domain.name, flush.log)
    except _HelperLost as e:
        log_event(flush.log, "flush-helper-lost", domain=flush.domain.name, relay=flush.relay, status=e.status,
                  level=logging.WARNING)
        _request_again(flush.store, flush.domain.name, flush.log)


def _deliver_work(flush: _Flush, work: _Work, should_stop: Callable[[], bool]) -> str:
    """The main connection's loop over the work list (shared with the extra connections,
    or with a helper process).

    Returns how the flush ended: done, interrupted (requested again) or suspended.
    """
    finished = threading.Event()
    extra = []
    if (len(work) >= EXTRA_CONNECTION_MIN_MESSAGES and not flush.primary.single_session
            and not isinstance(work, _SharedWork)):
        extra = [_ExtraConnection(flush, work, finished, should_stop) for _ in range(EXTRA_CONNECTIONS)]
    troubles = 0
    try:
        for thread in extra:
            thread.start()
        while True:
            if should_stop():
                work.stop_helper()
                flush.store.request_flush([flush.domain.name])
                return "interrupted"
            message = flush.next_message(work)
            if message is None:
                if work.wait(should_stop, flush.lease):
                    continue
                break
            trouble = flush.deliver(message, work)
            troubles = 0 if trouble is None else troubles + 1
            if trouble is not None and (trouble.at_connect or troubles >= MAX_CONSECUTIVE_TROUBLE):
                finished.set()
                work.stop_helper()
                _suspend(flush, work, trouble, should_stop)
                return "suspended"
        return "done"
    finally:
        finished.set()
        for thread in extra:
            if thread.is_alive() or thread.ident is not None:
                thread.join()
            for kind, count in thread.counts.items():
                flush.counts[kind] += count
        if any(thread.again for thread in extra):  # as a helper's report's "again" (_join_helper)
            _request_again(flush.store, flush.domain.name, flush.log)
        try:
            flush.record_outcomes()
        finally:
            flush.quit()


def _suspend(flush: _Flush, work: _Work, trouble: _Trouble, should_stop: Callable[[], bool]) -> None:
    """Postfix's "delivery temporarily suspended": the primary is not taking mail
    now; record why on every row left (a helper's too, once it stopped), and stop."""
    log_event(flush.log, "flush-suspended", domain=flush.domain.name, relay=flush.relay,
              reason=trouble.reason, level=logging.WARNING)
    while True:
        if should_stop():
            flush.store.request_flush([flush.domain.name])
            return
        try:
            rest = work.popleft()
        except IndexError:
            if work.wait(should_stop, flush.lease):
                continue
            return
        flush.lease.check()
        flush.counts["messages"] += 1
        flush.record(rest, {r.address: Verdict.deferred(trouble.reason) for r in rest.recipients})


def drain(store, config, owner: str, *, lease_seconds: float, log: logging.Logger = LOGGER,
          should_stop: Callable[[], bool] = lambda: False, rounds: int | None = None, helper: bool = True) -> int:
    """The one delivery loop: claim a domain with a flush request, deliver it, release it.

    Runs until nothing is left to claim, should_stop() turns true, or `rounds`
    domains were tried; returns the number delivered. Flush workers call it
    each poll; the detached flusher (inetd.py: `serve --inetd` and `backupmx
    flush`) calls it once. A flush that fails half-way is requested again
    (the ETRN that started it was answered "started") and ends this pass, so
    the caller decides how long to wait before the next one. Store errors
    while claiming (QueueUnavailable) propagate. A flush that leaves the
    store without a connection (QueueConnectionLost) can neither be released
    nor requested again here: that is the caller's, on a new connection. `helper`: as
    deliver_domain's.
    """
    delivered = 0
    for _ in itertools.repeat(None) if rounds is None else range(rounds):
        if should_stop() or not store.flush_waiting():
            break
        name = store.claim_flush(owner, lease_seconds)
        if name is None:
            break
        lost = False
        try:
            domain = config.domains.get(name)
            if domain is None:
                log_event(log, "flush-skipped", domain=name, reason="domain not configured", level=logging.WARNING)
                continue
            deliver_domain(store, domain, owner=owner, hostname=config.hostname, timeout=config.timeout,
                           lease_seconds=lease_seconds, log=log, should_stop=should_stop, helper=helper)
            delivered += 1
            log_domain_changes(store, log, name)
        except Exception as e:  # one bad flush must not end the process
            log_event(log, "flush-error", domain=name, owner=owner, error=f"{type(e).__name__}: {e}",
                      level=logging.ERROR)
            if lost := _connection_lost(store):
                raise QueueConnectionLost(name) from e
            _request_again(store, name, log)
            raise FlushFailed(name) from e
        finally:
            try:
                if not lost:
                    store.release_flush(name, owner)
            except Exception as e:
                log_event(log, "flush-error", domain=name, owner=owner,
                          error=f"release: {type(e).__name__}: {e}", level=logging.ERROR)
    return delivered


class FlushFailed(Exception):
    """A domain's flush failed half-way (logged, and requested again)."""


class QueueConnectionLost(FlushFailed):
    """A domain's flush failed and took the store's connection with it (logged; its lease
    is still held and its flush not requested again: nothing can be written on that store)."""


def _connection_lost(store) -> bool:
    """Whether the store has no connection any more: closed across a fork
    (closed_for_fork, _share) and not opened again (EMFILE, a full disk)."""
    try:
        store.connection
    except ValueError:
        return True
    return False


def run_flush_worker(config, owner: str, should_stop: Callable[[], bool], *,
                     ready: Callable[[], None] = lambda: None) -> None:
    """The flush worker process: drain(), then wait POLL_INTERVAL; repeat until should_stop().

    Opens its own QueueStore (this runs after fork) and then calls ready():
    what fails before that means this worker cannot start (the master stops
    its start-up). Returns soon after should_stop() turns true, and never
    dies because of a bad primary: errors are logged per flush, and the
    worker pauses a second after one. Nor of a queue connection that a flush
    lost (QueueConnectionLost): it opens another and gives that flush back
    (reopened_queue), pausing a second between tries while it cannot. Only
    a helper's fork loses it (the connection closed across the fork does not
    open again: EMFILE, a full disk), and a cause that persists would fail
    every big flush so, each costing a fork and its log lines, delivering
    nothing: this worker's flushes then go without a helper process (their
    second connection in a thread, as in a process with threads) for
    HELPER_RETRY_MIN, doubled each time a helper's fork loses it again.

    Every HOUSEKEEPING_INTERVAL it also runs lifecycle.housekeeping (expiry,
    bounces, retries on a backoff, retention); that is safe from several
    flush workers at once, as the store claims what each one acts on. With a
    domain in monitoring mode, a thread probes the primaries (prober.PrimaryWatch).
    """
    log = LOGGER
    lease_seconds = default_lease_seconds(config.timeout)
    retry_intervals = [d.retry_interval for d in config.domains.values() if d.retry_interval > 0]
    retrying = bool(retry_intervals)
    retry_scan = min([RETRY_SCAN_INTERVAL] + [interval / 2 for interval in retry_intervals])
    retry_scan = max(retry_scan, MIN_RETRY_SCAN_INTERVAL)
    next_housekeeping = time.monotonic() + 1.0
    next_retry_scan = time.monotonic() + min(1.0, retry_scan)
    if monitored(config):  # accept_when = primary-unreachable: the probes run here, not in SMTP workers
        PrimaryWatch(config, log, should_stop).start()
    store = QueueStore(config.queue)
    helpers = _HelperBackoff()
    try:
        ready()
        while not should_stop():
            if store is None:
                store = reopened_queue(config, owner, log)
                _pause(1.0, should_stop)  # as after any failed flush: one that fails so again is not retried at once
                continue
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
                _housekeeping(housekeeping, store, config, log)
            elif retrying and now >= next_retry_scan:
                next_retry_scan = now + retry_scan
                _housekeeping(request_due_retries, store, config, log)
            try:
                drain(store, config, owner, lease_seconds=lease_seconds, log=log, should_stop=should_stop,
                      helper=helpers.allowed())
            except QueueUnavailable as e:
                log_event(log, "flush-error", owner=owner, error=str(e), level=logging.WARNING)
                _pause(1.0, should_stop)
            except QueueConnectionLost:
                store.close()
                store = None  # opened again at once, at the top of the loop
                helpers.lost()
            except FlushFailed:
                _pause(1.0, should_stop)
            else:
                _pause(POLL_INTERVAL, should_stop)
    finally:
        if store is not None:
            store.close()


# After a helper's fork lost the flush's queue connection, a flush worker's flushes go without
# a helper for this long, doubled each time a helper's fork loses it again, up to HELPER_RETRY_MAX:
# a cause that passes (a burst of descriptors) costs no helper for ever; one that lasts, a failed
# flush and its lines once in a while, not at every big flush.
HELPER_RETRY_MIN = 60.0
HELPER_RETRY_MAX = 3600.0


class _HelperBackoff:
    """Whether a flush worker's next flush may fork a helper process (see HELPER_RETRY_MIN)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.until = 0.0  # on the clock: no helper before
        self.pause = HELPER_RETRY_MIN

    def allowed(self) -> bool:
        return self.clock() >= self.until

    def lost(self) -> None:
        self.until = self.clock() + self.pause
        self.pause = min(self.pause * 2, HELPER_RETRY_MAX)


def reopened_queue(config, owner: str, log) -> QueueStore | None:
    """A flusher's new queue connection, once a flush lost the old one (QueueConnectionLost),
    and that flush given back: the leases `owner` holds released, their flushes requested again
    (as the master does for a flush worker that died). None while the queue cannot be opened:
    the flush-error line said why (a flush worker tries again a second later)."""
    try:
        store = QueueStore(config.queue)
    except (QueueUnavailable, OSError):
        return None
    try:
        domains = store.release_leases_of(owner)
    except QueueUnavailable:
        store.close()
        return None
    for domain in domains:
        log_event(log, "flush-lease-released", domain=domain, owner=owner, reason="queue connection lost")
    return store


def _request_again(store, domain: str, log) -> None:
    """A flush that failed half-way is asked for again: the ETRN that started
    it was answered "started", so it must not be forgotten."""
    try:
        store.request_flush([domain])
    except Exception as e:
        log_event(log, "flush-error", domain=domain, error=f"re-request: {type(e).__name__}: {e}",
                  level=logging.ERROR)


def _housekeeping(step, store, config, log) -> None:
    try:
        step(store, config, logger=log)
    except Exception as e:  # housekeeping trouble must not stop deliveries
        log_event(log, "housekeeping-error", error=f"{type(e).__name__}: {e}", level=logging.ERROR)


def _pause(seconds: float, should_stop: Callable[[], bool]):
    """The flush worker's waits between its looks: children.pause, which its SIGTERM ends at once."""
    children.pause(seconds, should_stop)
