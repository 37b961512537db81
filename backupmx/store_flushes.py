"""The queue's flush requests and leases: who asked for a domain's mail, and who delivers it.

ETRN and `backupmx flush` (and the retry schedule) record a request; a flusher
claims one domain, which clears the request and gives it the domain's lease.
  - At most one flusher holds a domain's lease; a lease ends by itself
    (lease_expires), so a flusher that dies loses nothing: the domain is
    claimed again once its lease runs out, or at once when the master
    reaps the dead flusher and releases its leases (release_leases_of).
  - Requests coalesce per domain; one that arrives during a flush makes the
    domain run once more afterwards.
  - An ATRN (odmr_connection.py) takes the leases of the domains it delivers
    itself (claim_domains), all or none: a domain is never delivered by a
    flusher and an ATRN, or two ATRNs, at once.
"""

from __future__ import annotations

from typing import Iterable

from backupmx.store_db import QueueDatabase
from backupmx.store_errors import sqlite_errors


# A domain claim_flush may take: its flush was asked for, or the lease of a flusher
# that died ran out; and no live lease (`?` = now).
_CLAIMABLE = ("(requested_at IS NOT NULL OR lease_owner IS NOT NULL)"
              " AND (lease_expires IS NULL OR lease_expires <= ?)")


class FlushRequests(QueueDatabase):
    """Flush requests (written by SMTP workers, the CLI, housekeeping) and leases (held by flushers)."""

    def request_flush(self, domains: Iterable[str], *, etrn: bool = False) -> dict[str, int]:
        """Record a flush request for each domain that has queued rows.

        Returns {domain: rows in state 'queued'} for every domain asked (0 =
        nothing waiting, no request recorded). Idempotent: requests for a
        domain coalesce into one pending flush; one that arrives while the
        domain is being flushed makes it run once more afterwards.
        etrn: the request is the primary's ETRN: each domain's last_etrn
        (domain_status) becomes now, whether or not mail waits.
        """
        counts: dict[str, int] = {}
        now = self._now()
        with self._write() as db:
            for domain in dict.fromkeys(domains):
                if etrn:
                    self._domain_status(db, domain, "last_etrn", now)
                count = self._queued_count(db, domain)
                counts[domain] = count
                if count:
                    db.execute(
                        "INSERT INTO flushes (domain, requested_at) VALUES (?, ?)"
                        " ON CONFLICT (domain) DO UPDATE SET requested_at = COALESCE(requested_at, excluded.requested_at)",
                        (domain, now),
                    )
        return counts

    def claim_flush(self, owner: str, lease_seconds: float) -> str | None:
        """Take ONE domain with a pending request and no live lease, or None.

        Clears its request and gives `owner` the lease until now + lease_seconds.
        The oldest request goes first. A lease that ran out without being
        released means its flusher died mid-delivery: that domain is taken
        again even without a new request, so the interrupted flush is redone.
        """
        now = self._clock()
        with self._write() as db:
            row = db.execute(
                f"SELECT domain FROM flushes WHERE {_CLAIMABLE}"
                " ORDER BY COALESCE(requested_at, lease_expires), domain LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE flushes SET requested_at = NULL, lease_owner = ?, lease_expires = ? WHERE domain = ?",
                (owner, now + lease_seconds, row[0]),
            )
            return row[0]

    def flush_waiting(self) -> bool:
        """Whether claim_flush would find a domain now. A read: a flusher that polls
        often takes no write lock from the SMTP workers' commits while nothing waits."""
        with self._read() as db:
            return db.execute(f"SELECT 1 FROM flushes WHERE {_CLAIMABLE} LIMIT 1",
                              (self._clock(),)).fetchone() is not None

    def flush_wanted(self) -> bool:
        """Whether a flusher or an ATRN session holds a live lease now (a domain is being
        delivered), or a request waits for a flusher (an ETRN that every flush worker is
        too busy to take yet: in its housekeeping round, say): housekeeping's reclaim waits
        then, not the flush for it. A read, one row at most."""
        with self._read() as db:
            return db.execute("SELECT 1 FROM flushes WHERE requested_at IS NOT NULL"
                              " OR (lease_owner IS NOT NULL AND lease_expires > ?) LIMIT 1",
                              (self._clock(),)).fetchone() is not None

    def claim_domains(self, domains: Iterable[str], owner: str, lease_seconds: float) -> dict[str, int] | None:
        """ATRN's claim: the leases of those of `domains` that have queued rows, for `owner`.

        All or none, in one transaction: None when any of `domains` is leased
        to someone else now (its flush runs), and nothing is taken; else
        {domain: rows in state 'queued'} for each domain leased now, {} when
        none has mail (nothing is leased then). A lease that ran out (its
        flusher died) is taken over. Pending requests stay: they run once the
        leases are released.
        """
        domains = list(dict.fromkeys(domains))
        marks = ",".join("?" * len(domains))
        now = self._clock()
        with self._write() as db:
            if db.execute(f"SELECT 1 FROM flushes WHERE domain IN ({marks}) AND lease_owner IS NOT NULL"
                          " AND lease_expires > ? LIMIT 1", (*domains, now)).fetchone():
                return None
            counts = {domain: self._queued_count(db, domain) for domain in sorted(domains)}
            waiting = {domain: count for domain, count in counts.items() if count}
            db.executemany(
                "INSERT INTO flushes (domain, lease_owner, lease_expires) VALUES (?, ?, ?) ON CONFLICT (domain)"
                " DO UPDATE SET lease_owner = excluded.lease_owner, lease_expires = excluded.lease_expires",
                [(domain, owner, now + lease_seconds) for domain in waiting])
        return waiting

    def renew_lease(self, domain: str, owner: str, lease_seconds: float) -> bool:
        """Extend `owner`'s lease on `domain`; False if it is no longer theirs."""
        now = self._clock()
        with self._write() as db:
            cursor = db.execute(
                "UPDATE flushes SET lease_expires = ? WHERE domain = ? AND lease_owner = ?",
                (now + lease_seconds, domain, owner),
            )
            return cursor.rowcount == 1

    def release_flush(self, domain: str, owner: str) -> None:
        """Give up `owner`'s lease on `domain` (a request that came meanwhile stays pending)."""
        with self._write() as db:
            db.execute(
                "UPDATE flushes SET lease_owner = NULL, lease_expires = NULL WHERE domain = ? AND lease_owner = ?",
                (domain, owner),
            )

    def release_leases_of(self, owner: str) -> list[str]:
        """`owner` died holding leases: free its domains at once, each flush requested again
        (it was answered "started"; what it delivered is recorded, the rest goes again).
        Returns the domains."""
        now = self._now()
        with self._write() as db:
            domains = [r[0] for r in db.execute(
                "SELECT domain FROM flushes WHERE lease_owner = ? ORDER BY domain", (owner,)).fetchall()]
            db.execute(
                "UPDATE flushes SET lease_owner = NULL, lease_expires = NULL,"
                " requested_at = COALESCE(requested_at, ?) WHERE lease_owner = ?",
                (now, owner),
            )
        return domains

    def due_domains(self, domains: Iterable[str]) -> list[str]:
        """Those of `domains` (the ones with retry_interval on) with a queued row whose retry
        time (next_attempt) has come, in order.

        Each domain is a search of its own rows, on the queue's key (which begins with the
        domain: NOT INDEXED keeps the planner off queue_domain_state, which would cost a
        search of the table per row), stopping at the first due one: what a scan costs
        grows with the retrying domains' mail, not with the whole queue's.
        """
        now = self._now()
        due = []
        with sqlite_errors():
            for domain in sorted(set(domains)):
                if self.connection.execute(
                        "SELECT 1 FROM queue NOT INDEXED WHERE domain = ? AND state = 'queued'"
                        " AND next_attempt <= ? LIMIT 1", (domain, now)).fetchone():
                    due.append(domain)
        return due
