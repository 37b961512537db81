"""The queue's greylist role: (client network, sender, recipient) triples (schema.sql, greylist).

  - SMTP workers look a triple up at each RCPT (greylisting on): one search of
    the table's primary key, on the loop's connection.
  - What the look-up decided is written on a pool thread with a connection of
    its own opened durable=False (a lost write only greylists a triple again).
  - One network holds at most `max_waiting` waiting rows: a client rotating
    senders gets its 450s without growing the table.
  - Housekeeping purges waiting rows past greylist_expire and passed ones
    unseen for REMEMBER_PASSED.
"""

from __future__ import annotations

from dataclasses import dataclass

from backupmx.store_db import QueueDatabase
from backupmx.store_errors import sqlite_errors

REMEMBER_PASSED = 35 * 86400  # seconds a passed triple is remembered after it was last seen

_KEY = "client = ? AND sender = ? AND recipient = ?"
# The look-up of every RCPT while greylisting: one search of the primary key (WITHOUT ROWID).
LOOKUP = f"SELECT first_seen, passed, last_seen FROM greylist WHERE {_KEY}"


@dataclass(frozen=True)
class Triple:
    client: str  # clients.network_of
    sender: str
    recipient: str


@dataclass(frozen=True)
class GreylistEntry:
    first_seen: int
    passed: int | None
    last_seen: int


class Greylist(QueueDatabase):
    """Greylisting's memory."""

    def greylist_entry(self, triple: Triple) -> GreylistEntry | None:
        with sqlite_errors():
            row = self.connection.execute(LOOKUP, (triple.client, triple.sender, triple.recipient)).fetchone()
        return GreylistEntry(*row) if row else None

    def greylist_first_attempt(self, triple: Triple, expire: float, max_waiting: int) -> bool:
        """A first attempt (or one whose earlier try expired): start its wait now.

        False when the network already has `max_waiting` waiting triples (nothing written)."""
        now = self._now()
        key = (triple.client, triple.sender, triple.recipient)
        with self._write() as db:
            row = db.execute(f"SELECT first_seen, passed FROM greylist WHERE {_KEY}", key).fetchone()
            if row is not None:
                if row[1] is None and row[0] < now - expire:  # it waited too long: a new first attempt
                    db.execute(f"UPDATE greylist SET first_seen = ?, last_seen = ? WHERE {_KEY}", (now, now, *key))
                return True
            waiting = db.execute("SELECT COUNT(*) FROM greylist WHERE client = ? AND passed IS NULL",
                                 (triple.client,)).fetchone()[0]
            if waiting >= max_waiting:
                return False
            db.execute("INSERT INTO greylist (client, sender, recipient, first_seen, passed, last_seen)"
                       " VALUES (?, ?, ?, ?, NULL, ?)", (*key, now, now))
        return True

    def greylist_seen(self, triple: Triple) -> None:
        """The triple passed (its retry came in time, or it passed before): remember it from now."""
        now = self._now()
        with self._write() as db:
            db.execute(f"UPDATE greylist SET passed = COALESCE(passed, ?), last_seen = ? WHERE {_KEY}",
                       (now, now, triple.client, triple.sender, triple.recipient))

    def purge_greylist(self, expire: float) -> int:
        """Housekeeping: waiting triples older than `expire`, passed ones unseen for REMEMBER_PASSED."""
        now = self._now()
        with self._write() as db:
            return db.execute("DELETE FROM greylist WHERE last_seen < ? AND (passed IS NULL OR last_seen < ?)",
                              (now - int(expire), now - REMEMBER_PASSED)).rowcount
