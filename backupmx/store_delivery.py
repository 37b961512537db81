"""The queue's delivery role: what a flusher reads (a domain's queued mail) and records (each outcome).

  - A recipient the primary accepted is deleted; its queue row goes with its
    last recipient, and the message, once its last row is gone, is listed
    for housekeeping to delete (table reclaim; triggers in schema.sql).
  - Every other outcome is a state (queued, failed) with the reply that
    caused it, and an `events` row; nothing is "unknown" (outcome.Verdict).
  - A batch of attempts is ONE transaction: a crash before it commits means
    those messages are delivered again, never lost.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Mapping

from backupmx.envelope import Recipient
from backupmx.outcome import Outcome, Verdict
from backupmx.store_db import DELIVERED, FAILED, HELD, QUEUED, QueueDatabase


@dataclass(frozen=True)
class QueuedMessage:
    """One queue row ready for delivery: the envelope for one domain's primary."""

    queue_id: str
    domain: str
    sender: str  # "" = null sender
    recipients: list[Recipient]  # only those still to deliver (state 'queued')
    size: int
    envid: str | None
    ret: str | None
    body_type: str
    attempts: int
    received_at: int = 0
    smtputf8: int = 0  # messages.smtputf8: 2 = only for a primary that offers SMTPUTF8
    # Who sent it to us (messages.client, client_name, helo, protocol): XFORWARD to a primary that offers it.
    client: str | None = None
    client_name: str | None = None
    helo: str | None = None
    protocol: str | None = None



class Delivery(QueueDatabase):
    """A flusher's reads and writes: messages_for_flush, then record_attempts."""

    def messages_for_flush(self, domain: str, limit: int | None = None) -> list[QueuedMessage]:
        """Rows of `domain` in state 'queued' (never held ones), oldest first,
        each with its recipients still to deliver. Two queries in one snapshot,
        whatever the count: the rows in queue_domain_state's order, then their recipients."""
        with self._read() as db:
            rows = db.execute(
                "SELECT q.queue_id, m.sender, m.size, m.envid, m.ret, m.body_type, q.attempts, m.received_at,"
                " m.smtputf8, m.client, m.client_name, m.helo, m.protocol"
                " FROM queue AS q JOIN messages AS m USING (queue_id)"
                " WHERE q.domain = ? AND q.state = 'queued'"
                " ORDER BY q.message_received_at, q.queue_id LIMIT ?",
                (domain, -1 if limit is None else limit),
            ).fetchall()
            recipients: dict[str, list[Recipient]] = {row[0]: [] for row in rows}
            for queue_id, address, notify, orcpt in db.execute(
                "SELECT r.queue_id, r.address, r.notify, r.orcpt FROM queue AS q JOIN recipients AS r"
                " ON r.queue_id = q.queue_id AND r.domain = q.domain"
                " WHERE q.domain = ? AND q.state = 'queued' AND r.state = 'queued' ORDER BY r.position",
                (domain,),
            ):
                if queue_id in recipients:  # else beyond `limit`
                    recipients[queue_id].append(Recipient(address, domain, notify, orcpt))
        return [QueuedMessage(queue_id, domain, sender, recipients[queue_id], size, envid, ret, body_type, attempts,
                              received_at, smtputf8, *client)
                for queue_id, sender, size, envid, ret, body_type, attempts, received_at, smtputf8, *client in rows
                if recipients[queue_id]]

    def record_attempts(self, attempts: list[tuple[str, str, Mapping[str, Verdict], float | None]]) -> list[str | None]:
        """Record delivery attempts, one per row -- (queue_id, domain, verdicts, retry_after),
        a Verdict per recipient address -- in ONE transaction, so a flush pays one fsync
        per batch rather than one per message. A crash before it commits means those
        messages are delivered again: never lost. Each row's attempts + 1 once.

        delivered: the recipient is deleted (and the row and message when it was the last).
        deferred:  the recipient stays queued with the reply.
        failed:    the recipient is marked failed (a DSN becomes due); when no
                   queued recipient remains, the row becomes 'failed'. Kept.
        retry_after: seconds until next_attempt (retry_interval); None = no automatic retry.
        Returns each row's state afterwards, or None when the row is gone.
        """
        for _, _, verdicts, _ in attempts:
            for verdict in verdicts.values():
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"not a delivery Verdict: {verdict!r}")
        now = self._now()
        # Two processes record a big flush's batches (flush_sharing.share): turns, not SQLite's naps.
        with self._commit_turn(), self._write() as db:
            results = [self._record_attempt(db, now, *attempt) for attempt in attempts]
            # Once per batch, not per message: the primary took mail of these domains now.
            taken = [domain for (_, domain, verdicts, _), (recorded, _) in zip(attempts, results)
                     if recorded and any(v.outcome is Outcome.DELIVERED for v in verdicts.values())]
            for domain in dict.fromkeys(taken):
                self._domain_status(db, domain, "last_delivery", now)
            self._count(db, DELIVERED, len(taken))
        return [state for _, state in results]

    def _record_attempt(self, db: sqlite3.Connection, now: int, queue_id: str, domain: str,
                        verdicts: Mapping[str, Verdict], retry_after: float | None) -> tuple[bool, str | None]:
        """(whether the row was there to record, its state afterwards or None when it is gone)."""
        if db.execute("SELECT 1 FROM queue WHERE queue_id = ? AND domain = ?", (queue_id, domain)).fetchone() is None:
            return False, None
        # The row's last_reply: the one that explains why mail is still here.
        replies = {v.outcome: v.reply for v in verdicts.values()}
        row_reply = replies.get(Outcome.DEFERRED) or replies.get(Outcome.FAILED) or replies.get(Outcome.DELIVERED)
        for address, verdict in verdicts.items():
            key = (queue_id, domain, address)
            if verdict.outcome is Outcome.FAILED:
                db.execute(
                    "UPDATE recipients SET state = 'failed', last_reply = ?, dsn_sent = NULL, dsn_claimed = NULL"
                    " WHERE queue_id = ? AND domain = ? AND address = ? AND state IN ('queued', 'expired')",
                    (verdict.reply, *key),
                )
            elif verdict.outcome is Outcome.DEFERRED:
                db.execute(
                    "UPDATE recipients SET last_reply = ? WHERE queue_id = ? AND domain = ? AND address = ?",
                    (verdict.reply, *key),
                )
        # Events before the deletes, so even the last recipient's 250 is on record.
        by_outcome: dict[Outcome, list[str]] = {}
        for address, verdict in verdicts.items():
            by_outcome.setdefault(verdict.outcome, []).append(f"<{address}>")
        for outcome, addresses in by_outcome.items():
            self._event(db, now, queue_id, domain, outcome.value,
                        f"to={','.join(addresses)} reply={replies[outcome]!r}")
        # A recipient the primary accepted is gone, whatever its state was; with the
        # last one the row goes (trigger recipients_gone), and the update below finds nothing.
        db.executemany(
            "DELETE FROM recipients WHERE queue_id = ? AND domain = ? AND address = ?",
            [(queue_id, domain, address) for address, v in verdicts.items() if v.outcome is Outcome.DELIVERED],
        )
        if not db.execute(
            "UPDATE queue SET attempts = attempts + 1, last_attempt = ?, last_reply = COALESCE(?, last_reply),"
            " next_attempt = ? WHERE queue_id = ? AND domain = ?",
            (now, row_reply, None if retry_after is None else int(now + retry_after), queue_id, domain),
        ).rowcount:
            return True, None
        return True, self._row_state_after(db, now, queue_id, domain)

    @staticmethod
    def _row_state_after(db: sqlite3.Connection, now: int, queue_id: str, domain: str) -> str | None:
        """The row's state once its recipients are recorded: 'failed' when none is left to try."""
        row = db.execute("SELECT state FROM queue WHERE queue_id = ? AND domain = ?", (queue_id, domain)).fetchone()
        if row is None:
            return None
        state = row[0]
        if state in (QUEUED, HELD):
            waiting = db.execute(
                "SELECT COUNT(*) FROM recipients WHERE queue_id = ? AND domain = ? AND state = 'queued'",
                (queue_id, domain),
            ).fetchone()[0]
            if waiting == 0:
                state = FAILED
                db.execute(
                    "UPDATE queue SET state = 'failed', state_changed = ? WHERE queue_id = ? AND domain = ?",
                    (now, queue_id, domain),
                )
        return state
