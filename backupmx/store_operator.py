"""The queue's operator role: `backupmx queue`, `show`, `hold`, `release`, `requeue`, `delete`.

postsuper-style actions by queue id, by domain, or both; each is one
transaction and leaves an `events` row ("by operator"). Reports read one
snapshot (WAL: they never block the server).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import NamedTuple

from backupmx.store_db import EXPIRED, FAILED, HELD, QUEUED, QueueDatabase, RecipientStatus, _sqlite_errors


class QueueSummary(NamedTuple):
    """One row of the queue_summary view."""

    domain: str
    messages: int
    bytes: int
    oldest: int  # unix time of the oldest message


@dataclass(frozen=True)
class MessageRow:
    """One queue row for `backupmx queue list`."""

    queue_id: str
    domain: str
    state: str
    received_at: int
    size: int
    sender: str
    recipients: list[str]
    attempts: int
    last_reply: str | None
    last_attempt: int | None = None
    next_attempt: int | None = None


@dataclass(frozen=True)
class RowDetail:
    """One queue row of a message, for `backupmx show`."""

    domain: str
    state: str
    attempts: int
    last_attempt: int | None
    last_reply: str | None
    next_attempt: int | None
    state_changed: int
    recipients: list[RecipientStatus]


@dataclass(frozen=True)
class Event:
    """One line of a message's history."""

    at: int
    domain: str | None
    what: str
    detail: str | None


@dataclass(frozen=True)
class MessageDetail:
    """Everything the queue knows about one message, for `backupmx show`."""

    queue_id: str
    sender: str
    received_at: int
    size: int
    client: str | None
    helo: str | None
    envid: str | None
    ret: str | None
    body_type: str
    rows: list[RowDetail]
    events: list[Event] = field(default_factory=list)



def _conditions(prefix: str, **columns) -> tuple[list[str], list]:
    """("<prefix><column> = ?" for each column given a value, those values) for a WHERE clause."""
    given = {column: value for column, value in columns.items() if value is not None}
    return [f"{prefix}{column} = ?" for column in given], list(given.values())


class OperatorQueries(QueueDatabase):
    """The operator's actions and reports."""

    def _rows(self, db: sqlite3.Connection, queue_id: str | None, domain: str | None,
              states: tuple[str, ...]) -> list[tuple[str, str]]:
        if queue_id is None and domain is None:
            raise ValueError("give a queue id or a domain")
        where, args = _conditions("", queue_id=queue_id, domain=domain)
        where.append(f"state IN ({','.join('?' * len(states))})")
        args += states
        return db.execute(f"SELECT queue_id, domain FROM queue WHERE {' AND '.join(where)}", args).fetchall()

    def _transition(self, queue_id, domain, from_states, to_state, what) -> int:
        now = self._now()
        with self._write() as db:
            rows = self._rows(db, queue_id, domain, from_states)
            for qid, dom in rows:
                db.execute(
                    "UPDATE queue SET state = ?, state_changed = ?, next_attempt = ? WHERE queue_id = ? AND domain = ?",
                    (to_state, now, now, qid, dom),
                )
                if to_state == QUEUED:
                    db.execute(
                        "UPDATE recipients SET state = 'queued', dsn_sent = NULL, dsn_claimed = NULL"
                        " WHERE queue_id = ? AND domain = ? AND state IN ('failed', 'expired')",
                        (qid, dom),
                    )
                self._event(db, now, qid, dom, what, "by operator")
        return len(rows)

    def hold(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """queued -> held (never flushed until released). Returns the rows changed."""
        return self._transition(queue_id, domain, (QUEUED,), HELD, "held")

    def release(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """held -> queued."""
        return self._transition(queue_id, domain, (HELD,), QUEUED, "released")

    def requeue(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """held, failed or expired -> queued, recipients too (postsuper -r)."""
        return self._transition(queue_id, domain, (HELD, FAILED, EXPIRED), QUEUED, "requeued")

    def delete(self, *, queue_id: str | None = None, domain: str | None = None) -> int:
        """Delete rows in any state (the message goes with its last row)."""
        now = self._now()
        with self._write() as db:
            rows = self._rows(db, queue_id, domain, (QUEUED, HELD, FAILED, EXPIRED))
            for qid, dom in rows:
                self._event(db, now, qid, dom, "deleted", "by operator")
                db.execute("DELETE FROM queue WHERE queue_id = ? AND domain = ?", (qid, dom))
        return len(rows)

    def summary(self) -> list[QueueSummary]:
        """Per domain with mail waiting (queued or held): messages, bytes, oldest."""
        with _sqlite_errors():
            rows = self.connection.execute(
                "SELECT domain, messages, bytes, oldest FROM queue_summary ORDER BY domain"
            ).fetchall()
        return [QueueSummary(*r) for r in rows]

    def list_messages(self, domain: str | None = None, state: str | None = None) -> list[MessageRow]:
        """One MessageRow per queue row, oldest first; optionally one domain and/or state."""
        where, args = _conditions("q.", domain=domain, state=state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as db:
            rows = db.execute(
                "SELECT q.queue_id, q.domain, q.state, m.received_at, m.size, m.sender, q.attempts, q.last_reply,"
                " q.last_attempt, q.next_attempt FROM queue AS q JOIN messages AS m USING (queue_id)"
                f" {clause} ORDER BY m.received_at, m.rowid, q.domain",
                args,
            ).fetchall()
            recipients: dict[tuple[str, str], list[str]] = {}
            rcpt_clause = "WHERE domain = ?" if domain is not None else ""
            for queue_id, dom, address in db.execute(
                f"SELECT queue_id, domain, address FROM recipients {rcpt_clause} ORDER BY rowid",
                [domain] if domain is not None else [],
            ):
                recipients.setdefault((queue_id, dom), []).append(address)
        return [
            MessageRow(qid, dom, st, rec, size, sender, recipients.get((qid, dom), []), att, reply, last, nxt)
            for qid, dom, st, rec, size, sender, att, reply, last, nxt in rows
        ]

    def show(self, queue_id: str) -> MessageDetail | None:
        """Everything about one message, or None if it is not in the queue."""
        with self._read() as db:
            m = db.execute(
                "SELECT queue_id, sender, received_at, size, client, helo, envid, ret, body_type"
                " FROM messages WHERE queue_id = ?",
                (queue_id,),
            ).fetchone()
            events = [
                Event(*e)
                for e in db.execute("SELECT at, domain, what, detail FROM events WHERE queue_id = ? ORDER BY id",
                                    (queue_id,))
            ]
            if m is None:
                return None
            rows = []
            for dom, st, att, last, reply, nxt, changed in db.execute(
                "SELECT domain, state, attempts, last_attempt, last_reply, next_attempt, state_changed"
                " FROM queue WHERE queue_id = ? ORDER BY domain",
                (queue_id,),
            ).fetchall():
                rcpts = [
                    RecipientStatus(*r)
                    for r in db.execute(
                        "SELECT address, notify, orcpt, state, last_reply, dsn_sent FROM recipients"
                        " WHERE queue_id = ? AND domain = ? ORDER BY rowid",
                        (queue_id, dom),
                    )
                ]
                rows.append(RowDetail(dom, st, att, last, reply, nxt, changed, rcpts))
        return MessageDetail(*m, rows=rows, events=events)

    def history(self, queue_id: str) -> list[Event]:
        """The events of a message, also after it left the queue."""
        with _sqlite_errors():
            rows = self.connection.execute(
                "SELECT at, domain, what, detail FROM events WHERE queue_id = ? ORDER BY id", (queue_id,)
            ).fetchall()
        return [Event(*r) for r in rows]
