"""The queue's verify-cache role: the primary's answers to recipient callouts (schema.sql, verify_cache).

  - SMTP workers look an address up at each RCPT for a `recipients = verify`
    domain: one search of the table's primary key, on the loop's connection
    (a WAL read never waits for a writer).
  - The answer of a callout is written by the pool thread that made it, on a
    connection of its own opened with durable=False: an answer lost to a
    power cut is only asked again.
  - The operator lists and flushes it (`backupmx verify`); housekeeping purges it.
"""

from __future__ import annotations

from dataclasses import dataclass

from backupmx.store_db import QueueDatabase
from backupmx.store_errors import sqlite_errors

ACCEPTED, REFUSED = "accepted", "refused"

# Accepted answers are kept this long past their expiry: while the primary is
# unreachable a stale "accepted" still lets mail for a known address in.
STALE_ACCEPTED_KEPT = 30 * 86400


@dataclass(frozen=True)
class VerifyAnswer:
    """One row of verify_cache."""

    address: str
    domain: str
    result: str  # ACCEPTED or REFUSED
    reply: str
    checked: int
    expires: int

    def fresh(self, now: float) -> bool:
        return now < self.expires


_COLUMNS = "address, domain, result, reply, checked, expires"
# The look-up of every RCPT for a verify domain: one search of the primary key (WITHOUT ROWID).
LOOKUP = f"SELECT {_COLUMNS} FROM verify_cache WHERE address = ?"


class VerifyCache(QueueDatabase):
    """Callout answers, per address."""

    def verify_answer(self, address: str) -> VerifyAnswer | None:
        """The cached answer for `address` (the cache key: verify.cache_key), fresh or stale; None if none."""
        with sqlite_errors():
            row = self.connection.execute(LOOKUP, (address,)).fetchone()
        return VerifyAnswer(*row) if row else None

    def record_verify(self, address: str, domain: str, result: str, reply: str, ttl: float) -> None:
        """Keep the primary's answer for `ttl` seconds (replacing an older one)."""
        now = self._now()
        with self._write() as db:
            db.execute(f"INSERT OR REPLACE INTO verify_cache ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       (address, domain, result, reply, now, now + int(ttl)))

    def verify_answers(self, address_or_domain: str | None = None, *, limit: int | None = None) -> list[VerifyAnswer]:
        """The cache (all of it, one address's or one domain's), by domain and address."""
        where, args = _selection(address_or_domain)
        sql = f"SELECT {_COLUMNS} FROM verify_cache{where} ORDER BY domain, address"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._read() as db:
            return [VerifyAnswer(*row) for row in db.execute(sql, args)]

    def flush_verify(self, address_or_domain: str | None = None) -> int:
        """Forget answers (all, one address's or one domain's): the next RCPT asks the primary. Returns how many."""
        where, args = _selection(address_or_domain)
        with self._write() as db:
            return db.execute(f"DELETE FROM verify_cache{where}", args).rowcount

    def purge_verify(self) -> int:
        """Housekeeping: refused answers once they expire, accepted ones STALE_ACCEPTED_KEPT later."""
        now = self._now()
        with self._write() as db:
            return db.execute("DELETE FROM verify_cache WHERE expires < ? AND (result = ? OR expires < ?)",
                              (now, REFUSED, now - STALE_ACCEPTED_KEPT)).rowcount


def _selection(address_or_domain: str | None) -> tuple[str, tuple]:
    if address_or_domain is None:
        return "", ()
    if "@" in address_or_domain:
        return " WHERE address = ?", (address_or_domain,)
    return " WHERE domain = ?", (address_or_domain,)
