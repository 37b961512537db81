"""The queue's status role: per-domain status (schema.sql, domain_status) and counters.

What `backupmx queue`, `metrics` and `health` report, and the transitions
housekeeping acts on:
  - A domain starts queueing in the transaction that queues its first message
    (store_intake sets queueing_since); it is drained once nothing waits for
    it (queued or held). reconcile_domains() finds both kinds of change that
    happened any other way (delivery, expiry, operator actions, an upgraded
    queue) in one transaction, so each is reported by exactly one process.
  - A `notify` notice is claimed (notified_* = now) before it is sent: at most
    once per queueing period; a send that fails is released for the next round.
  - Counters only grow; they live in the database, so they survive restarts.
Reports read one snapshot (WAL: they never block the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from backupmx.store_db import STATES, QueueDatabase


class DomainChange(NamedTuple):
    """A domain that started queueing or was drained, and since when it had been queueing."""

    domain: str
    since: int  # unix time


@dataclass(frozen=True)
class DomainReport:
    """One domain as the operator sees it: what waits, in which state, and the primary's last visits."""

    domain: str
    states: dict[str, int] = field(default_factory=dict)  # rows per state (queued, held, failed, expired)
    messages: int = 0  # waiting (queued or held), as queue_summary counts
    bytes: int = 0  # of the waiting messages
    oldest: int | None = None  # unix time the oldest waiting message was received
    last_etrn: int | None = None
    last_delivery: int | None = None
    queueing_since: int | None = None


class Notice(NamedTuple):
    """A notice claimed for sending to a domain's `notify` address."""

    domain: str
    kind: str  # "queueing" (the domain started queueing) or "age" (its oldest mail passed the threshold)
    since: int  # unix time the domain started queueing
    messages: int
    bytes: int
    oldest: int  # unix time of the oldest waiting message
    last_etrn: int | None
    last_delivery: int | None


_NOTICE_COLUMNS = {"queueing": "notified_queueing", "age": "notified_age"}


class DomainStatus(QueueDatabase):
    """domain_status and counters: reports, reconciliation, notices, reject counts."""

    def domain_reports(self) -> list[DomainReport]:
        """Every domain with rows in the queue (any state) or a status row, by name."""
        with self._read() as db:
            states: dict[str, dict[str, int]] = {}
            for domain, state, count in db.execute("SELECT domain, state, messages FROM queue_totals WHERE messages > 0"):
                states.setdefault(domain, dict.fromkeys(STATES, 0))[state] = count
            waiting = {row[0]: row[1:] for row in db.execute(
                "SELECT domain, messages, bytes, oldest FROM queue_summary")}
            status = {row[0]: row[1:] for row in db.execute(
                "SELECT domain, last_etrn, last_delivery, queueing_since FROM domain_status")}
        reports = []
        for domain in sorted(set(states) | set(status)):
            messages, size, oldest = waiting.get(domain, (0, 0, None))
            last_etrn, last_delivery, since = status.get(domain, (None, None, None))
            reports.append(DomainReport(domain, states.get(domain, dict.fromkeys(STATES, 0)), messages, size or 0,
                                        oldest, last_etrn, last_delivery, since))
        return reports

    def counters(self) -> dict[tuple[str, str], int]:
        """{(name, label): value} of every counter (schema.sql, counters)."""
        with self._read() as db:
            return {(name, label): value for name, label, value in db.execute(
                "SELECT name, label, value FROM counters ORDER BY name, label")}

    def add_counts(self, name: str, counts: Mapping[str, int], *, wait: bool = True) -> None:
        """Add {label: n} to the counter `name`, in one transaction (a worker's reject counts).
        wait=False: QueueUnavailable at once, not after the busy timeout, when another
        process holds the write lock."""
        with self._write(wait=wait) as db:
            for label, n in counts.items():
                self._count(db, name, n, label)

    def reconcile_domains(self, domain: str | None = None) -> tuple[list[DomainChange], list[DomainChange]]:
        """(started, drained): domains whose waiting mail appeared or went since
        queueing_since was last set, now recorded. Only `domain` when given.

        A domain waits when it has queued or held rows. Started: waiting, but
        queueing_since is NULL (mail requeued, or a queue from before schema 4):
        since = its oldest waiting message. Drained: queueing_since set, nothing
        waits; queueing_since and the notices are cleared.
        """
        only = " AND domain = ?" if domain is not None else ""
        args = [domain] if domain is not None else []
        now = self._now()
        with self._write() as db:
            drained = [DomainChange(*row) for row in db.execute(
                "SELECT domain, queueing_since FROM domain_status WHERE queueing_since IS NOT NULL AND domain NOT IN"
                f" (SELECT domain FROM queue_totals WHERE state IN ('queued', 'held') AND messages > 0){only}",
                args).fetchall()]
            db.executemany("UPDATE domain_status SET queueing_since = NULL, notified_queueing = NULL,"
                           " notified_age = NULL WHERE domain = ?", [(d.domain,) for d in drained])
            started = [DomainChange(*row) for row in db.execute(
                "SELECT domain, oldest FROM queue_summary WHERE domain NOT IN"
                f" (SELECT domain FROM domain_status WHERE queueing_since IS NOT NULL){only}", args).fetchall()]
            for change in started:
                db.execute("INSERT INTO domain_status (domain, queueing_since) VALUES (?, ?) ON CONFLICT (domain)"
                           " DO UPDATE SET queueing_since = excluded.queueing_since, notified_queueing = NULL,"
                           " notified_age = NULL", (change.domain, min(change.since, now)))
        return started, drained

    def claim_notices(self, thresholds: Mapping[str, float | None]) -> list[Notice]:
        """Claim the notices due for the domains in `thresholds` ({domain: notify_age
        seconds, None = no age notice}): "queueing" once per queueing period, "age"
        once its oldest waiting mail is older than the threshold. A claim stays
        (the notice is not sent twice) unless release_notice() gives it back."""
        now = self._now()
        notices = []
        with self._write() as db:
            for domain, age in thresholds.items():
                row = db.execute(
                    "SELECT s.queueing_since, s.notified_queueing, s.notified_age, w.messages, w.bytes, w.oldest,"
                    " w.last_etrn, w.last_delivery FROM domain_status AS s JOIN queue_summary AS w USING (domain)"
                    " WHERE s.domain = ? AND s.queueing_since IS NOT NULL", (domain,)).fetchone()
                if row is None:
                    continue
                since, told_queueing, told_age, messages, size, oldest, last_etrn, last_delivery = row
                due = [] if told_queueing is not None else ["queueing"]
                if age is not None and told_age is None and now - oldest >= age:
                    due.append("age")
                for kind in due:
                    db.execute(f"UPDATE domain_status SET {_NOTICE_COLUMNS[kind]} = ? WHERE domain = ?",
                               (now, domain))
                    notices.append(Notice(domain, kind, since, messages, size, oldest, last_etrn, last_delivery))
        return notices

    def release_notice(self, notice: Notice) -> None:
        """The notice could not be sent now: due again at the next round (unless the domain drained)."""
        with self._write() as db:
            db.execute(f"UPDATE domain_status SET {_NOTICE_COLUMNS[notice.kind]} = NULL"
                       " WHERE domain = ? AND queueing_since = ?", (notice.domain, notice.since))
