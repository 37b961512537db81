"""The queue's primary-probe role: what the last probe of each monitored primary found
(schema.sql, primary_status; accept_when = primary-unreachable).

  - SMTP workers read a domain's state at RCPT (one primary-key search).
  - A prober first takes the probe (claim_probe: at most one process probes a
    domain at a time, and not again before its interval), then records it
    (record_probe), which says whether the state changed: that is logged once.
"""

from __future__ import annotations

from dataclasses import dataclass

from backupmx.store_db import QueueDatabase
from backupmx.store_errors import sqlite_errors


@dataclass(frozen=True)
class PrimaryState:
    domain: str
    up: bool | None  # None: not probed yet
    reply: str | None
    checked_at: int | None
    changed_at: int | None


class PrimaryProbes(QueueDatabase):
    """Monitoring mode's shared state."""

    def primary_state(self, domain: str) -> PrimaryState | None:
        with sqlite_errors():
            row = self.connection.execute(
                "SELECT domain, up, reply, checked_at, changed_at FROM primary_status WHERE domain = ?",
                (domain,)).fetchone()
        return _state(row) if row else None

    def claim_probe(self, domain: str, interval: float, hold: float) -> bool:
        """Take the next probe of `domain` for `hold` seconds: False when it was probed less
        than `interval` ago or another process is probing it now."""
        now = self._clock()
        with self._write() as db:
            row = db.execute("SELECT checked_at, probing_until FROM primary_status WHERE domain = ?",
                             (domain,)).fetchone()
            if row is not None:
                checked_at, probing_until = row
                if checked_at is not None and now < checked_at + interval:
                    return False
                if probing_until is not None and now < probing_until:
                    return False
            db.execute("INSERT INTO primary_status (domain, probing_until) VALUES (?, ?)"
                       " ON CONFLICT (domain) DO UPDATE SET probing_until = excluded.probing_until",
                       (domain, now + hold))
        return True

    def record_probe(self, domain: str, up: bool, reply: str) -> PrimaryState | None:
        """The probe's finding; returns the state before it (None: the first probe)."""
        now = self._now()
        with self._write() as db:
            row = db.execute("SELECT domain, up, reply, checked_at, changed_at FROM primary_status"
                             " WHERE domain = ?", (domain,)).fetchone()
            before = _state(row) if row is not None and row[1] is not None else None  # None: never probed
            changed = before is None or before.up != up
            db.execute("INSERT INTO primary_status (domain, up, reply, checked_at, changed_at, probing_until)"
                       " VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (domain) DO UPDATE SET up = excluded.up,"
                       " reply = excluded.reply, checked_at = excluded.checked_at, probing_until = NULL,"
                       " changed_at = CASE WHEN ? THEN excluded.changed_at ELSE primary_status.changed_at END",
                       (domain, int(up), reply, now, now, changed))
        return before


def _state(row) -> PrimaryState:
    domain, up, reply, checked_at, changed_at = row
    return PrimaryState(domain, None if up is None else bool(up), reply, checked_at, changed_at)
