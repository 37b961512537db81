"""The queue's intake role: what the SMTP workers write (new mail), in one durable transaction.

  - The caller may say "250 queued as <id>" only after enqueue_many() returned:
    the commit is durable then (journal_mode=WAL, synchronous=FULL).
  - Nothing is ever half-queued: a message that fails is rolled back whole
    (its own savepoint), and the others of the group commit are kept.
  - A message is in `messages` once, with one `queue` row per recipient domain
    and one `recipients` row per RCPT TO of that domain.
  - Per-domain quotas are checked inside the transaction, so concurrent
    senders can never push a domain over its quota.
  - The group commit is the SMTP workers' turn at the write lock: what is
    asked once per batch (the next body chunk id, whether a domain starts
    queueing) is not asked again per message, and the accept writes no
    `queued` event (schema.sql: trigger queue_history writes it when the row
    leaves).
"""

from __future__ import annotations

import io
import sqlite3
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Mapping

from backupmx.envelope import Envelope
from backupmx.store_bodies import CHUNK, chunk_lengths
from backupmx.store_db import RECEIVED, QueueDatabase
from backupmx.store_errors import QueueUnavailable, is_unavailable, sqlite_errors


@dataclass
class Submission:
    """One message handed to enqueue_many."""

    queue_id: str
    envelope: Envelope
    body_file: BinaryIO | bytes
    size: int
    client: str | None
    helo: str | None
    received_at: float | None = None
    client_name: str | None = None  # the client's verified DNS name, "unknown" (client_dns); XFORWARD NAME
    protocol: str | None = None  # trace_header.protocol_name, e.g. "ESMTPS"; XFORWARD PROTO
    # Filled in by enqueue_many once the message is queued: the domains that had
    # nothing waiting before it (the driver logs domain-queueing for them), and
    # the unix time of the commit (their domain_status.queueing_since).
    started_queueing: list[str] = field(default_factory=list)
    queued_at: int | None = None


class QuotaExceeded(QueueUnavailable):
    """The message would take a domain over max_queue_messages / max_queue_bytes."""


class Intake(QueueDatabase):
    """New mail from the SMTP workers (and the per-domain usage their quotas look at)."""

    def enqueue_many(self, submissions: list[Submission], *,
                     quotas: Mapping[str, tuple[int | None, int | None]] | None = None,
                     counts: Mapping[str, Mapping[str, int]] | None = None) -> list[Exception | None]:
        """Queue several messages in ONE durable transaction (group commit), each for
        every domain of its recipients. Returns once the commit is durable.

        Each body is copied from its `body_file` (exactly `size` bytes, read
        one chunk of at most 64 KiB at a time, so memory does not grow with the
        message) into consecutive rows of body_chunks (chunk_lengths). `quotas` ({domain: (max messages, max
        bytes)}, None = no limit) are checked inside the transaction, so
        concurrent senders can never push a domain over its quota (QuotaExceeded).

        Each message is its own savepoint: one refused by its quota, or whose
        id is taken, is left out and the others are queued. Returns, per
        submission, None (queued) or the exception saying why not. A database
        that cannot commit at all raises QueueUnavailable: then nothing is queued,
        and nothing is counted. `counts` ({name: {label: n}}) are added to the
        counters in the same transaction: the worker's refusals ride along.
        """
        results: list[Exception | None] = [None] * len(submissions)
        now = self._now()
        with self._commit_turn(), self._write() as db:
            # The write lock is ours: nobody else adds chunks until the commit.
            batch = _Batch(db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM body_chunks").fetchone()[0])
            for index, submission in enumerate(submissions):
                submission.started_queueing, submission.queued_at = [], now
                first_chunk = batch.next_chunk
                db.execute("SAVEPOINT message")
                try:
                    domains = self._insert_message(db, submission, now, quotas or {}, batch)
                except (QueueUnavailable, ValueError) as exc:
                    db.execute("ROLLBACK TO message")
                    results[index] = exc
                except sqlite3.Error as exc:
                    if is_unavailable(exc):
                        raise  # the whole transaction is lost: nothing is queued
                    db.execute("ROLLBACK TO message")  # e.g. SQLITE_TOOBIG: this message only
                    results[index] = QueueUnavailable(f"queue database: {exc}")
                if results[index] is None:
                    batch.queueing.update(domains)
                else:  # rolled back: its chunk ids and its domain_status changes are free again
                    submission.started_queueing = []
                    batch.next_chunk = first_chunk
                db.execute("RELEASE message")
            self._count(db, RECEIVED, results.count(None))
            for name, labels in (counts or {}).items():
                for label, n in labels.items():
                    self._count(db, name, n, label)
        return results

    def _insert_message(self, db: sqlite3.Connection, submission: Submission, now: int,
                        quotas: Mapping[str, tuple[int | None, int | None]], batch: _Batch) -> list[str]:
        """Write one message (in the caller's savepoint); returns its domains."""
        queue_id, envelope, size = submission.queue_id, submission.envelope, submission.size
        domains = envelope.domains
        if not domains:
            raise ValueError("enqueue: envelope has no recipients")
        body_file = submission.body_file
        if isinstance(body_file, (bytes, bytearray, memoryview)):
            body_file = io.BytesIO(body_file)
        at = now if submission.received_at is None else int(submission.received_at)
        self._check_quotas(db, domains, size, quotas)
        lengths = chunk_lengths(size, self.page_size())
        first = batch.next_chunk
        batch.next_chunk += len(lengths)
        try:
            db.execute(
                "INSERT INTO messages (queue_id, sender, received_at, size, first_chunk, last_chunk, client,"
                " helo, envid, ret, body_type, smtputf8, client_name, protocol)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (queue_id, envelope.sender, at, size, first, first + len(lengths) - 1, submission.client,
                 submission.helo, envelope.envid, envelope.ret, envelope.body_type or "7BIT",
                 envelope.smtputf8_state, submission.client_name, submission.protocol),
            )
        except sqlite3.IntegrityError as exc:
            raise QueueUnavailable(f"queue id {queue_id} is already in use") from exc
        db.executemany("INSERT INTO body_chunks (id, data) VALUES (?, ?)",
                       enumerate(_chunks(queue_id, body_file, size, lengths), first))
        db.executemany(
            "INSERT INTO queue (queue_id, domain, state, attempts, next_attempt, state_changed, message_received_at,"
            " message_size) VALUES (?, ?, 'queued', 0, ?, ?, ?, ?)",
            [(queue_id, domain, at, now, at, size) for domain in domains],
        )
        # position: the RCPT order, in which the primary gets them (a duplicate keeps its first).
        db.executemany(
            "INSERT OR IGNORE INTO recipients (queue_id, domain, address, position, notify, orcpt)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(queue_id, r.domain, r.address, n, r.notify, r.orcpt) for n, r in enumerate(envelope.recipients)],
        )
        for domain in domains:
            if domain in batch.queueing:
                continue  # an earlier message of this commit left its queueing_since set
            # The first message after the domain was empty: it starts queueing now.
            started = db.execute(
                "INSERT INTO domain_status (domain, queueing_since) VALUES (?, ?) ON CONFLICT (domain)"
                " DO UPDATE SET queueing_since = excluded.queueing_since, notified_queueing = NULL,"
                " notified_age = NULL WHERE queueing_since IS NULL",
                (domain, now),
            ).rowcount
            if started:
                submission.started_queueing.append(domain)
        return domains

    def usage(self, domain: str) -> tuple[int, int]:
        """(messages, bytes) waiting for `domain` (queued or held): for the per-domain quotas."""
        with sqlite_errors():
            return tuple(self._totals(self.connection, domain))

    def _check_quotas(self, db: sqlite3.Connection, domains: list[str], size: int,
                      quotas: Mapping[str, tuple[int | None, int | None]]) -> None:
        for domain in domains:
            max_messages, max_bytes = quotas.get(domain, (None, None))
            if max_messages is None and max_bytes is None:
                continue
            messages, queued = self._totals(db, domain)
            if (max_messages is not None and messages + 1 > max_messages) or (
                    max_bytes is not None and queued + size > max_bytes):
                raise QuotaExceeded(f"queue for {domain} is full")


@dataclass
class _Batch:
    """What one group commit knows across its messages."""

    next_chunk: int  # the body_chunks id the next message's body starts at
    queueing: set[str] = field(default_factory=set)  # domains a queued message of this commit set queueing_since for


def _chunks(queue_id: str, body_file: BinaryIO, size: int, lengths: list[int]) -> Iterable[bytes]:
    """The body read from `body_file` in pieces of `lengths`; ValueError unless it holds exactly `size` bytes.

    A body of one chunk's size at most (most mail) is read in one go and cut: a few calls per
    message rather than a generator's per chunk. A longer one streams, a chunk in memory at a time."""
    if size > CHUNK:
        return _streamed(queue_id, body_file, size, lengths)
    body = _read(body_file, size)
    if len(body) < size:
        raise ValueError(f"enqueue {queue_id}: body has {len(body)} bytes, size={size}")
    if body_file.read(1):
        raise ValueError(f"enqueue {queue_id}: body is longer than size={size}")
    pieces, start = [], 0
    for length in lengths:
        pieces.append(body[start:start + length])
        start += length
    return pieces


def _streamed(queue_id: str, body_file: BinaryIO, size: int, lengths: list[int]) -> Iterator[bytes]:
    """_chunks for a long body: one chunk read at a time."""
    written = 0
    for length in lengths:
        chunk = _read(body_file, length)
        written += len(chunk)
        if len(chunk) < length:
            raise ValueError(f"enqueue {queue_id}: body has {written} bytes, size={size}")
        yield chunk
    if body_file.read(1):
        raise ValueError(f"enqueue {queue_id}: body is longer than size={size}")


def _read(body_file: BinaryIO, n: int) -> bytes:
    """`n` bytes of `body_file`, fewer only at its end (a short read before it is read on: a pipe, a raw file)."""
    data = body_file.read(n)
    while 0 < len(data) < n:
        more = body_file.read(n - len(data))
        if not more:
            break
        data += more
    return data
