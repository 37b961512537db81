"""The queue's operator role: `backupmx queue`, `show`, `hold`, `release`, `requeue`, `delete`.

postsuper-style actions on the rows a Selection names (queue ids, domains,
ALL, and filters by domain, sender and age); each action is one transaction,
changes only rows still in a state it applies to, and leaves an `events` row
per row ("by operator"). Reports read one snapshot (WAL: they never block the
server).
"""

from __future__ import annotations

import fnmatch
import sqlite3
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

from backupmx.store_db import EXPIRED, FAILED, HELD, QUEUED, STATES, QueueDatabase, RecipientStatus
from backupmx.store_errors import sqlite_errors


class QueueSummary(NamedTuple):
    """One row of the queue_summary view."""

    domain: str
    messages: int
    bytes: int
    oldest: int  # unix time of the oldest message
    last_etrn: int | None = None  # unix time of the last ETRN for the domain, None = never
    last_delivery: int | None = None  # unix time the primary last took mail of it, None = never


class RowKey(NamedTuple):
    """One queue row: a message and one of its domains."""

    queue_id: str
    domain: str


@dataclass(frozen=True)
class Selection:
    """The queue rows an operator names. A row is selected when it matches a
    target (one of queue_ids or domains; or any row with everything, i.e. ALL)
    and every filter given. With no target and no `everything`, the filters
    alone select; with nothing at all, nothing is selected (never the whole
    queue by accident).
    """

    queue_ids: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    everything: bool = False
    domain: str | None = None  # --domain
    sender: str | None = None  # --sender: a glob, case-insensitive; "" or "<>" is the null sender
    received_before: int | None = None  # --older-than: received at or before this unix time
    state: str | None = None  # queue list --state

    @property
    def filtered(self) -> bool:
        return self.domain is not None or self.sender is not None or self.received_before is not None

    @property
    def empty(self) -> bool:
        """Names nothing at all (not even a filter)."""
        return not (self.queue_ids or self.domains or self.everything or self.filtered or self.state)

    def matches(self, queue_id: str, domain: str, state: str, sender: str, received_at: int) -> bool:
        if self.empty:
            return False
        targeted = self.queue_ids or self.domains
        if targeted and not self.everything and queue_id not in self.queue_ids and domain not in self.domains:
            return False
        if self.domain is not None and domain != self.domain:
            return False
        if self.state is not None and state != self.state:
            return False
        if self.received_before is not None and received_at > self.received_before:
            return False
        return self.sender is None or sender_matches(self.sender, sender)


def sender_matches(pattern: str, sender: str) -> bool:
    """--sender PATTERN: a shell glob over the address without <>, any case; "" and "<>" mean the null sender."""
    pattern = pattern.strip()
    if pattern in ("", "<>"):
        return sender == ""
    if pattern.startswith("<") and pattern.endswith(">"):
        pattern = pattern[1:-1]
    return fnmatch.fnmatchcase(sender.lower(), pattern.lower())


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


# At most this many ids or domains named in one statement (SQLite's variables); a longer
# list (`-`: ids on stdin) reads the rows in the states asked for and picks them out.
_NAMED_IN_SQL = 500


def _named_rows(selection: Selection) -> tuple[list[str], list]:
    """WHERE terms (of queue AS q) for the rows `selection` names by queue id, domain or --domain,
    so that `hold|delete ID` or `DOMAIN` finds them by the queue's key (an id's domains from
    message_domains, schema 15) rather than reading every row at a million messages.
    Selection.matches() still decides; none when it names too many, or everything."""
    where, args = [], []
    ids, domains = sorted(selection.queue_ids), sorted(selection.domains)
    if (ids or domains) and not selection.everything and len(ids) + len(domains) <= _NAMED_IN_SQL:
        marks = ",".join("?" * len(ids))
        by_id = f"(q.domain, q.queue_id) IN (SELECT domain, queue_id FROM message_domains WHERE queue_id IN ({marks}))"
        terms = ([by_id] if ids else []) + ([f"q.domain IN ({','.join('?' * len(domains))})"] if domains else [])
        where.append(f"({' OR '.join(terms)})")
        args += ids + domains
    if selection.domain is not None:
        where.append("q.domain = ?")
        args.append(selection.domain)
    return where, args


def _selection(queue_id: str | None, domain: str | None) -> Selection:
    """The old keyword form (queue_id=, domain=; both: that message's row for that domain)."""
    if queue_id is None and domain is None:
        raise ValueError("give a queue id or a domain")
    if queue_id is not None:
        return Selection(queue_ids=frozenset({queue_id}), domain=domain)
    return Selection(domains=frozenset({domain}))


class OperatorQueries(QueueDatabase):
    """The operator's actions and reports."""

    def select(self, selection: Selection, states: Iterable[str] = STATES) -> list[RowKey]:
        """The rows `selection` names, in one of `states`, oldest first."""
        states = tuple(states)
        with self._read() as db:
            return self._select(db, selection, states)

    @staticmethod
    def _select(db: sqlite3.Connection, selection: Selection, states: tuple[str, ...]) -> list[RowKey]:
        if selection.empty:
            return []
        where, args = [f"q.state IN ({','.join('?' * len(states))})"], list(states)
        where_named, named = _named_rows(selection)
        rows = db.execute(
            "SELECT q.queue_id, q.domain, q.state, m.sender, m.received_at FROM queue AS q JOIN messages AS m"
            f" USING (queue_id) WHERE {' AND '.join(where + where_named)}"
            " ORDER BY m.received_at, m.queue_id, q.domain", args + named).fetchall()
        return [RowKey(qid, dom) for qid, dom, state, sender, received in rows
                if selection.matches(qid, dom, state, sender, received)]

    def _transition(self, rows: Iterable[RowKey], from_states, to_state, what) -> int:
        """Move each of `rows` still in one of `from_states` to `to_state`; returns how many moved."""
        now = self._now()
        changed = 0
        with self._write() as db:
            for qid, dom in rows:
                moved = db.execute(
                    "UPDATE queue SET state = ?, state_changed = ?, next_attempt = ? WHERE queue_id = ? AND domain = ?"
                    f" AND state IN ({','.join('?' * len(from_states))})",
                    (to_state, now, now, qid, dom, *from_states),
                ).rowcount
                if not moved:
                    continue
                changed += 1
                if to_state == QUEUED:
                    db.execute(
                        "UPDATE recipients SET state = 'queued', dsn_sent = NULL, dsn_claimed = NULL"
                        " WHERE queue_id = ? AND domain = ? AND state IN ('failed', 'expired')",
                        (qid, dom),
                    )
                self._event(db, now, qid, dom, what, "by operator")
        return changed

    def _rows_for(self, rows, queue_id, domain, states) -> list[RowKey]:
        return list(rows) if rows is not None else self.select(_selection(queue_id, domain), states)

    def hold(self, rows: Iterable[RowKey] | None = None, *, queue_id: str | None = None,
             domain: str | None = None) -> int:
        """queued -> held (never flushed until released). Returns the rows changed.

        `rows` (from select()), or the rows of `queue_id` and/or `domain`."""
        return self._transition(self._rows_for(rows, queue_id, domain, (QUEUED,)), (QUEUED,), HELD, "held")

    def release(self, rows: Iterable[RowKey] | None = None, *, queue_id: str | None = None,
                domain: str | None = None) -> int:
        """held -> queued."""
        return self._transition(self._rows_for(rows, queue_id, domain, (HELD,)), (HELD,), QUEUED, "released")

    def requeue(self, rows: Iterable[RowKey] | None = None, *, queue_id: str | None = None,
                domain: str | None = None) -> int:
        """held, failed or expired -> queued, recipients too (postsuper -r)."""
        states = (HELD, FAILED, EXPIRED)
        return self._transition(self._rows_for(rows, queue_id, domain, states), states, QUEUED, "requeued")

    def delete(self, rows: Iterable[RowKey] | None = None, *, queue_id: str | None = None,
               domain: str | None = None) -> int:
        """Delete rows in any state (the message goes with its last row). Returns the rows deleted."""
        rows = self._rows_for(rows, queue_id, domain, STATES)
        now = self._now()
        deleted = 0
        with self._write() as db:
            for qid, dom in rows:
                if db.execute("DELETE FROM queue WHERE queue_id = ? AND domain = ?", (qid, dom)).rowcount:
                    self._event(db, now, qid, dom, "deleted", "by operator")
                    deleted += 1
        return deleted

    def summary(self) -> list[QueueSummary]:
        """Per domain with mail waiting (queued or held): messages, bytes, oldest."""
        with sqlite_errors():
            rows = self.connection.execute(
                "SELECT domain, messages, bytes, oldest, last_etrn, last_delivery FROM queue_summary ORDER BY domain"
            ).fetchall()
        return [QueueSummary(*r) for r in rows]

    def age_histogram(self, bounds: Sequence[float], now: float) -> dict[str, list[int]]:
        """Per domain with mail waiting (queued or held, as queue_summary counts it), its rows
        by age: counts[i] is the rows younger than bounds[i] and not younger than the bounds
        before it; the last bound is infinite (the rest). One pass over queue_domain_state's
        entries in its order (no sort), never over the messages."""
        cuts = [now - bound for bound in bounds[:-1]]  # younger than `bound` <=> arrived after now - bound
        younger = "".join(", SUM(message_received_at > ?)" for _ in cuts)  # cumulative, youngest first
        histogram: dict[str, list[int]] = {}
        with self._read() as db:
            for domain, total, *within in db.execute(
                    f"SELECT domain, COUNT(*){younger} FROM queue WHERE state IN ('queued', 'held') GROUP BY domain",
                    cuts):
                edges = [0, *within, total]
                histogram[domain] = [edges[i + 1] - edges[i] for i in range(len(bounds))]
        return histogram

    def list_messages(self, domain: str | None = None, state: str | None = None,
                      selection: Selection | None = None) -> list[MessageRow]:
        """One MessageRow per queue row, oldest first; optionally one domain and/or state,
        and only the rows `selection` names."""
        if selection is not None:  # its --domain and --state narrow the search itself (the queue's index)
            domain = selection.domain if domain is None else domain
            state = selection.state if state is None else state
        where, args = _conditions("q.", domain=domain, state=state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read() as db:
            rows = db.execute(
                "SELECT q.queue_id, q.domain, q.state, m.received_at, m.size, m.sender, q.attempts, q.last_reply,"
                " q.last_attempt, q.next_attempt FROM queue AS q JOIN messages AS m USING (queue_id)"
                f" {clause} ORDER BY m.received_at, m.queue_id, q.domain",
                args,
            ).fetchall()
            if selection is not None:
                rows = [r for r in rows if selection.matches(r[0], r[1], r[2], r[5], r[3])]
            recipients: dict[tuple[str, str], list[str]] = {}
            # One domain's rows' recipients (recipients is keyed domain first), or every row's; in RCPT order.
            for queue_id, dom, address in db.execute(
                "SELECT r.queue_id, r.domain, r.address FROM queue AS q JOIN recipients AS r"
                f" ON r.queue_id = q.queue_id AND r.domain = q.domain {clause} ORDER BY r.position", args,
            ) if domain is not None else db.execute(
                "SELECT queue_id, domain, address FROM recipients ORDER BY domain, queue_id, position",
            ):
                recipients.setdefault((queue_id, dom), []).append(address)
        return [
            MessageRow(qid, dom, st, rec, size, sender, recipients.get((qid, dom), []), att, reply, last, nxt)
            for qid, dom, st, rec, size, sender, att, reply, last, nxt in rows
        ]

    def show(self, queue_id: str) -> MessageDetail | None:
        """Everything about one message, or None if it is not in the queue (history() may still know it)."""
        with self._read() as db:
            m = db.execute(
                "SELECT queue_id, sender, received_at, size, client, helo, envid, ret, body_type"
                " FROM messages WHERE queue_id = ?",
                (queue_id,),
            ).fetchone()
            events = self._history(db, queue_id)
            if m is None:
                return None
            rows: list[RowDetail] = []
            for dom, st, att, last, reply, nxt, changed in db.execute(
                "SELECT domain, state, attempts, last_attempt, last_reply, next_attempt, state_changed"
                " FROM queue WHERE domain IN (SELECT domain FROM message_domains WHERE queue_id = ?)"
                " AND queue_id = ? ORDER BY domain",
                (queue_id, queue_id),
            ).fetchall():
                rcpts = [
                    RecipientStatus(*r)
                    for r in db.execute(
                        "SELECT address, notify, orcpt, state, last_reply, dsn_sent FROM recipients"
                        " WHERE queue_id = ? AND domain = ? ORDER BY position",
                        (queue_id, dom),
                    )
                ]
                rows.append(RowDetail(dom, st, att, last, reply, nxt, changed, rcpts))
        if not rows:  # its last row left: it waits for housekeeping's reclaim (schema.sql, reclaim)
            return None
        return MessageDetail(*m, rows=rows, events=events)

    def history(self, queue_id: str) -> list[Event]:
        """The events of a message, also after it left the queue."""
        with self._read() as db:
            return self._history(db, queue_id)

    @staticmethod
    def _history(db: sqlite3.Connection, queue_id: str) -> list[Event]:
        """The message's arrival first (`queued`, per domain), then its events in order.

        A row still waiting has no `queued` event (schema.sql, events: the trigger
        queue_history writes it when the row leaves, after the others); its
        arrival is read from the row itself (view queue_arrivals).
        """
        events = [Event(*e) for e in db.execute(
            "SELECT at, domain, what, detail FROM events WHERE queue_id = ? ORDER BY id", (queue_id,))]
        arrivals = [e for e in events if e.what == "queued"]
        recorded = {e.domain for e in arrivals}
        arrivals += [Event(at, domain, "queued", detail) for domain, at, detail in db.execute(
            "SELECT domain, at, detail FROM queue_arrivals WHERE domain IN"
            " (SELECT domain FROM message_domains WHERE queue_id = ?) AND queue_id = ?", (queue_id, queue_id))
            if domain not in recorded]
        arrivals.sort(key=lambda e: (e.at, e.domain or ""))
        return arrivals + [e for e in events if e.what != "queued"]
