"""Failed AUTH attempts per client, in the queue database: the count every session shares.

max_auth_failures_per_client is counted across all sessions, SMTP workers
and `serve --inetd` processes, and must outlive a worker's death: the queue
database is the one place all of them share (schema.sql, auth_failures). A
client is what clients.limit_key names (an IPv6 client's /64). Reads are
cheap (an index); each failure is one small write transaction.
"""

from __future__ import annotations

from backupmx.store_db import QueueDatabase
from backupmx.store_errors import sqlite_errors


class AuthFailures(QueueDatabase):
    """Failed AUTH attempts (SMTP workers, inetd sessions) and their expiry (housekeeping)."""

    def auth_failures(self, client: str, window: float) -> int:
        """The failures recorded for `client` in the last `window` seconds."""
        with sqlite_errors():
            return self.connection.execute(
                "SELECT COUNT(*) FROM auth_failures WHERE client = ? AND at > ?", (client, self._clock() - window)
            ).fetchone()[0]

    def record_auth_failure(self, client: str, window: float) -> int:
        """Record one failure of `client`; returns its failures in the window, this one included.

        The client's rows older than the window go in the same transaction, so
        a client never holds more rows than it made in one window.
        """
        now = self._clock()
        with self._write() as db:
            db.execute("DELETE FROM auth_failures WHERE client = ? AND at <= ?", (client, now - window))
            db.execute("INSERT INTO auth_failures (client, at) VALUES (?, ?)", (client, now))
            return db.execute("SELECT COUNT(*) FROM auth_failures WHERE client = ?", (client,)).fetchone()[0]

    def purge_auth_failures(self, window: float) -> int:
        """Delete every failure older than `window` seconds; returns how many."""
        with self._write() as db:
            return db.execute("DELETE FROM auth_failures WHERE at <= ?", (self._clock() - window,)).rowcount
