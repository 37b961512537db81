"""The queue's housekeeping role: expiry, DSN and delay-warning claims, retention, upkeep.

lifecycle.housekeeping drives it, from several flush workers at once: each
step claims what it acts on in one transaction, so two housekeepers never
send the same DSN (a claim older than DSN_CLAIM_SECONDS is void: its
housekeeper died, and the DSN goes out again -- at least once, never lost).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

from backupmx.store_db import QueueDatabase, RecipientStatus
from backupmx.store_errors import sqlite_errors


# Housekeeping's reclaim (Housekeeping.reclaim): the messages by their key, each unless
# a queue row refers to it -- its domains in message_domains, each row by the queue's key
# (schema 15) -- (tests/test_query_plans.py checks its plan reads no more).
RECLAIM_SQL = ("DELETE FROM messages WHERE queue_id IN ({marks})"
               " AND NOT EXISTS (SELECT 1 FROM message_domains AS d JOIN queue AS q"
               " ON q.domain = d.domain AND q.queue_id = d.queue_id WHERE d.queue_id = messages.queue_id)")

# What the reclaim rests on: every queue row's (queue_id, domain) is in message_domains
# (trigger message_domains_added). A row without it is invisible to the reclaim, which
# would delete its message under it once the message's other rows went: mail lost. Only
# a hand edit of message_domains leaves one; `backupmx check` counts them: the queue read
# once, each row's name searched by message_domains' key (tests/test_query_plans.py).
UNNAMED_ROWS_SQL = ("SELECT COUNT(*) FROM queue AS q WHERE NOT EXISTS (SELECT 1 FROM message_domains AS d"
                    " WHERE d.queue_id = q.queue_id AND d.domain = q.domain)")
# ... and how the operator names them again (server stopped; the reclaim then sees them).
NAME_ROWS_SQL = "INSERT OR IGNORE INTO message_domains (queue_id, domain) SELECT queue_id, domain FROM queue"


def unnamed_queue_rows(db: sqlite3.Connection) -> int:
    """Queue rows whose message_domains row is missing (0 before schema 15: no such table)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'message_domains'").fetchone() is None:
        return 0
    return db.execute(UNNAMED_ROWS_SQL).fetchone()[0]


@dataclass(frozen=True)
class Bounce:
    """Failed or expired recipients of one row whose delivery status notification is due."""

    queue_id: str
    domain: str
    sender: str
    envid: str | None
    ret: str | None
    received_at: int
    client: str | None
    helo: str | None
    recipients: list[RecipientStatus]
    size: int = 0  # of the message, bytes
    body_type: str = "7BIT"
    attempts: int = 0  # delivery attempts of the row
    last_attempt: int | None = None  # unix time of the row's last attempt, None if none
    last_reply: str | None = None  # the row's last reply (or connection error)
    state_changed: int = 0  # unix time the row's state last changed
    smtputf8: int = 0  # messages.smtputf8 (RFC 6531): the DSN is then RFC 6533's



class ExpiredRow(NamedTuple):
    """A queue row that expire_rows() just marked expired."""

    queue_id: str
    domain: str
    received_at: int
    lifetime: float



class PurgedRow(NamedTuple):
    """A failed or expired queue row that purge_rows() deleted."""

    queue_id: str
    domain: str
    state: str
    state_changed: int



DSN_CLAIM_SECONDS = 600  # a DSN claim older than this is void (its housekeeper died): sent again



# The delay-warning look (claim_delay_warnings), in the partial index queue_unwarned
# (INDEXED BY: beside queue_domain_state SQLite's planner would take that one and
# read every row already warned).
_NEXT_UNWARNED_DOMAIN = ("SELECT domain FROM queue INDEXED BY queue_unwarned"
                         " WHERE domain > ? AND state = 'queued' AND delay_warned IS NULL ORDER BY domain LIMIT 1")
_OLDEST_UNWARNED = ("SELECT message_received_at, queue_id, domain FROM queue INDEXED BY queue_unwarned"
                    " WHERE domain = ? AND state = 'queued' AND delay_warned IS NULL AND message_received_at <= ?"
                    " ORDER BY message_received_at, queue_id LIMIT ?")


class Housekeeping(QueueDatabase):
    """What lifecycle.housekeeping does to the queue, one claim or transaction per step."""

    def expire(self, lifetimes: Mapping[str, float], default: float) -> list[tuple[str, str]]:
        """Mark queued rows older than their domain's lifetime (seconds) 'expired'.

        Held rows do not expire: the operator holds them on purpose. Returns
        the (queue_id, domain) rows that expired; their recipients' DSNs are due.
        """
        return [(r.queue_id, r.domain) for r in self.expire_rows(lifetimes, default)]

    def expire_rows(self, lifetimes: Mapping[str, float], default: float) -> list[ExpiredRow]:
        """expire(), returning an ExpiredRow (with received_at and the lifetime) per row.

        The lifetime counts from received_at, or from the row's last state change
        when that is later: mail the operator released or requeued gets a fresh
        lifetime, rather than expiring again at the next housekeeping round.
        """
        now = self._now()
        expired: list[ExpiredRow] = []
        with self._write() as db:
            # Every domain that ever had queued mail (whatever its total says: a wrong
            # one must not keep mail from expiring); each costs one index search below.
            domains = [r[0] for r in db.execute(
                "SELECT domain FROM queue_totals WHERE state = 'queued' ORDER BY domain")]
            for domain in domains:
                lifetime = lifetimes.get(domain, default)
                cutoff = now - lifetime
                # The start of the domain's range in queue_domain_state: only what may be due is read.
                rows = db.execute(
                    "SELECT queue_id, message_received_at FROM queue"
                    " WHERE domain = ? AND state = 'queued' AND message_received_at <= ? AND state_changed <= ?"
                    " ORDER BY message_received_at, queue_id",
                    (domain, cutoff, cutoff),
                ).fetchall()
                for queue_id, received_at in rows:
                    db.execute(
                        "UPDATE queue SET state = 'expired', state_changed = ? WHERE queue_id = ? AND domain = ?",
                        (now, queue_id, domain),
                    )
                    db.execute(
                        "UPDATE recipients SET state = 'expired', dsn_sent = NULL, dsn_claimed = NULL"
                        " WHERE queue_id = ? AND domain = ? AND state = 'queued'",
                        (queue_id, domain),
                    )
                    self._event(db, now, queue_id, domain, "expired", f"lifetime={lifetime:g}s")
                    expired.append(ExpiredRow(queue_id, domain, received_at, lifetime))
        return expired

    @staticmethod
    def _bounce(db: sqlite3.Connection, queue_id: str, domain: str, recipient_where: str,
                args: tuple = ()) -> Bounce | None:
        """The Bounce of one row with the recipients matching `recipient_where`."""
        m = db.execute(
            "SELECT m.sender, m.envid, m.ret, m.received_at, m.client, m.helo, m.size, m.body_type,"
            " q.attempts, q.last_attempt, q.last_reply, q.state_changed, m.smtputf8"
            " FROM queue AS q JOIN messages AS m USING (queue_id) WHERE q.queue_id = ? AND q.domain = ?",
            (queue_id, domain),
        ).fetchone()
        if m is None:
            return None
        recipients = [
            RecipientStatus(*r)
            for r in db.execute(
                "SELECT address, notify, orcpt, state, last_reply, dsn_sent FROM recipients"
                f" WHERE queue_id = ? AND domain = ? AND {recipient_where} ORDER BY position",
                (queue_id, domain, *args),
            )
        ]
        return Bounce(queue_id, domain, *m[:6], recipients, *m[6:])

    _DSN_DUE = "state IN ('failed', 'expired') AND dsn_sent IS NULL"

    def pending_dsns(self, limit: int = 100) -> list[Bounce]:
        """Rows with failed or expired recipients whose DSN has not been sent (or skipped).

        Read only (claimed ones included); a housekeeper that sends uses claim_dsns().
        """
        with self._read() as db:
            keys = db.execute(
                f"SELECT DISTINCT queue_id, domain FROM recipients WHERE {self._DSN_DUE} LIMIT ?", (limit,)
            ).fetchall()
            bounces = [self._bounce(db, queue_id, domain, self._DSN_DUE) for queue_id, domain in keys]
        return [b for b in bounces if b is not None]

    def claim_dsns(self, limit: int = 20, lease_seconds: float = DSN_CLAIM_SECONDS) -> list[Bounce]:
        """Claim up to `limit` rows whose DSN is due and not claimed by another
        housekeeper (or whose claim is older than lease_seconds: that one died).

        One transaction, so two housekeepers never get the same recipient. End
        each claim with dsn_sent() (sent or deliberately skipped) or release_dsns()
        (could not send now: due again at the next round). A housekeeper that dies
        between sending and dsn_sent() makes the DSN go out twice: at least once.
        """
        now = self._now()
        stale = now - lease_seconds
        where = f"{self._DSN_DUE} AND (dsn_claimed IS NULL OR dsn_claimed <= ?)"
        with self._write() as db:
            keys = db.execute(
                f"SELECT DISTINCT queue_id, domain FROM recipients WHERE {where} LIMIT ?", (stale, limit)
            ).fetchall()
            bounces = []
            for queue_id, domain in keys:
                bounce = self._bounce(db, queue_id, domain, where, (stale,))
                if bounce is None or not bounce.recipients:
                    continue
                db.execute(
                    f"UPDATE recipients SET dsn_claimed = ? WHERE queue_id = ? AND domain = ? AND {where}",
                    (now, queue_id, domain, stale),
                )
                bounces.append(bounce)
        return bounces

    def release_dsns(self, queue_id: str, domain: str, addresses: Iterable[str], detail: str | None = None) -> None:
        """Give up the claim on these recipients' DSN: it is due again (bounce_relay
        down). `detail` (the error) goes into the message's history."""
        addresses = list(addresses)
        now = self._now()
        with self._write() as db:
            db.executemany(
                "UPDATE recipients SET dsn_claimed = NULL WHERE queue_id = ? AND domain = ? AND address = ?",
                [(queue_id, domain, a) for a in addresses],
            )
            if detail is not None:
                self._event(db, now, queue_id, domain, "dsn-failed",
                            f"to={','.join(f'<{a}>' for a in addresses)} {detail}")

    def dsn_sent(self, queue_id: str, domain: str, addresses: Iterable[str], detail: str = "sent") -> None:
        """The DSN for these recipients was sent, or deliberately skipped (say so in `detail`)."""
        addresses = list(addresses)
        now = self._now()
        with self._write() as db:
            db.executemany(
                "UPDATE recipients SET dsn_sent = ?, dsn_claimed = NULL WHERE queue_id = ? AND domain = ?"
                " AND address = ? AND state IN ('failed', 'expired')",
                [(now, queue_id, domain, a) for a in addresses],
            )
            self._event(db, now, queue_id, domain, "dsn", f"to={','.join(f'<{a}>' for a in addresses)} {detail}")

    def claim_delay_warnings(self, delay: float, limit: int = 20) -> list[Bounce]:
        """Claim up to `limit` queued rows received `delay` seconds ago or more that
        have had no delay warning: each gets delay_warned = now (one warning per row).

        The Bounce lists the row's recipients still queued. End each claim with
        delay_warning_done() or release_delay_warning(). A housekeeper that dies
        in between loses that warning: at most once (it is only a warning).
        """
        now = self._now()
        # The candidates are looked for in a read transaction: each domain's first `limit`
        # of the partial index queue_unwarned (its domains found in the index itself, one
        # seek each, not in queue_totals: a wrong total must not hide a domain's rows),
        # the oldest of them all kept. Each is claimed in the write transaction only if
        # it is still queued and unwarned, so the look never holds the write lock that
        # the SMTP workers' commits wait for.
        with self._read() as db:
            candidates, domain = [], ""
            while (row := db.execute(_NEXT_UNWARNED_DOMAIN, (domain,)).fetchone()) is not None:
                domain = row[0]
                candidates += db.execute(_OLDEST_UNWARNED, (domain, now - delay, limit)).fetchall()
        keys = [(queue_id, domain) for _, queue_id, domain in sorted(candidates)[:limit]]
        if not keys:
            return []
        with self._write() as db:
            bounces = []
            for queue_id, domain in keys:
                if not db.execute("UPDATE queue SET delay_warned = ? WHERE queue_id = ? AND domain = ?"
                                  " AND state = 'queued' AND delay_warned IS NULL", (now, queue_id, domain)).rowcount:
                    continue  # another housekeeper claimed it, or it left the queue meanwhile
                bounce = self._bounce(db, queue_id, domain, "state = 'queued'")
                if bounce is not None and bounce.recipients:
                    bounces.append(bounce)
        return bounces

    def delay_warning_done(self, queue_id: str, domain: str, addresses: Iterable[str], detail: str = "sent") -> None:
        """The delay warning of a claimed row was sent (or skipped: say why in `detail`)."""
        now = self._now()
        with self._write() as db:
            self._event(db, now, queue_id, domain, "delay-warning",
                        f"to={','.join(f'<{a}>' for a in addresses)} {detail}")

    def release_delay_warning(self, queue_id: str, domain: str, detail: str | None = None) -> None:
        """Give up the claim on a row's delay warning: it is due again next round."""
        now = self._now()
        with self._write() as db:
            db.execute("UPDATE queue SET delay_warned = NULL WHERE queue_id = ? AND domain = ?", (queue_id, domain))
            if detail is not None:
                self._event(db, now, queue_id, domain, "dsn-failed", f"delay warning: {detail}")

    def purge(self, retention: float) -> int:
        """Delete failed and expired rows older than `retention` seconds (expired_retention),
        and the history of messages gone that long. Returns the rows deleted."""
        return len(self.purge_rows(retention))

    def purge_rows(self, retention: float) -> list[PurgedRow]:
        """purge(), returning a PurgedRow per row deleted."""
        now = self._now()
        cutoff = now - retention
        with self._write() as db:
            rows = [PurgedRow(*r) for r in db.execute(
                "SELECT queue_id, domain, state, state_changed FROM queue"
                " WHERE state IN ('failed', 'expired') AND state_changed <= ?",
                (cutoff,),
            ).fetchall()]
            for row in rows:
                self._event(db, now, row.queue_id, row.domain, "deleted", f"retention over ({row.state})")
                db.execute("DELETE FROM queue WHERE queue_id = ? AND domain = ?", (row.queue_id, row.domain))
            db.execute(
                "DELETE FROM events WHERE at <= ? AND queue_id NOT IN (SELECT queue_id FROM messages)", (cutoff,)
            )
        return rows

    def reclaim_listed(self, limit: int) -> list[tuple[int, str]]:
        """Up to `limit` rows of `reclaim` (messages whose last queue row went: trigger
        queue_gone), listed first first: (id, queue_id)."""
        with self._read() as db:
            return db.execute("SELECT id, queue_id FROM reclaim ORDER BY id LIMIT ?", (limit,)).fetchall()

    def reclaim_span(self) -> int:
        """How far the newest row of `reclaim` is from the oldest (0: one or none): about
        how many messages wait, from the two ends of its rowid, not a count of the table."""
        with self._read() as db:
            first, last = db.execute("SELECT MIN(id), MAX(id) FROM reclaim").fetchone()
        return 0 if first is None else last - first

    def reclaim(self, queue_ids: list[str], max_bytes: int) -> tuple[int, int]:
        """Delete the first of these messages whose bodies add up to at most `max_bytes`
        (at least one), and with them their body's chunks (trigger message_chunks_gone),
        in ONE transaction; a message a queue row refers to again (INSERT INTO queue by
        hand) stays. Returns (messages deleted, how many of `queue_ids` were taken)."""
        if not queue_ids:
            return 0, 0
        # In the busy writers' turns (store_db._commit_turn), as the SMTP workers' commits
        # and a flush's outcome batches: one of them waiting is woken when this is done,
        # where SQLite's busy handler would nap 1, 2, 5, 10 ... ms, several times a round.
        with self._commit_turn(), self._write() as db:
            # The write lock is held, and the WAL written, in proportion to the bytes freed
            # (SQLite built with SECURE_DELETE, as Debian's, zeroes every freed page).
            sizes = dict(db.execute(f"SELECT queue_id, size FROM messages WHERE queue_id IN"
                                    f" ({','.join('?' * len(queue_ids))})", queue_ids))
            taken, total = 0, 0
            for queue_id in queue_ids:
                total += sizes.get(queue_id, 0)
                if taken and total > max_bytes:
                    break
                taken += 1
            deleted = db.execute(RECLAIM_SQL.format(marks=",".join("?" * taken)), queue_ids[:taken]).rowcount
        return deleted, taken

    def forget_reclaimed(self, listed: Iterable[tuple[int, str]]) -> None:
        """Take these rows (id, queue_id) of reclaim_listed off the list: their messages are
        deleted, or referred to again (a row the trigger lists anew when it goes). The
        queue id too: ids restart at the end of the table once it was emptied."""
        with self._write() as db:
            db.executemany("DELETE FROM reclaim WHERE id = ? AND queue_id = ?", sorted(listed))

    def free_pages(self) -> tuple[int, int]:
        """(free pages, all pages) of the file; (0, pages) when the queue was not created
        with auto_vacuum = INCREMENTAL (its free pages cannot be given back then)."""
        db = self.connection
        with sqlite_errors():
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                return 0, pages
            return db.execute("PRAGMA freelist_count").fetchone()[0], pages

    def incremental_vacuum(self, pages: int | None = None) -> int:
        """Give up to `pages` free pages (None: all) back to the file system, in one
        write transaction: the pages at the end of the file move into free ones, and
        the file is cut. Returns the pages freed (0 when the queue was not created with
        auto_vacuum = INCREMENTAL). lifecycle decides how much and how often."""
        before, _ = self.free_pages()
        if before == 0:
            return 0
        db = self.connection
        with sqlite_errors():
            # executescript steps the pragma to the end; execute() would free one page.
            step = "" if pages is None else f"({int(pages)})"
            db.executescript(f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum{step}; COMMIT;")
            return before - db.execute("PRAGMA freelist_count").fetchone()[0]

    def checkpoint(self, mode: str = "TRUNCATE", busy_timeout: float = 1.0) -> tuple[int, int, int]:
        """PRAGMA wal_checkpoint(mode): copy the WAL into the database (TRUNCATE:
        and empty the -wal file), so it does not grow without bound. Waits at most
        `busy_timeout` seconds for other connections. Returns SQLite's (busy,
        wal pages, pages checkpointed); busy = 1: not complete, try next round."""
        if mode.upper() not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        db = self.connection
        with sqlite_errors():
            old = db.execute("PRAGMA busy_timeout").fetchone()[0]
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            try:
                return tuple(db.execute(f"PRAGMA wal_checkpoint({mode.upper()})").fetchone())
            finally:
                db.execute(f"PRAGMA busy_timeout = {int(old)}")


# The wal-index header at the start of the -shm file (https://sqlite.org/walformat.html, 2.2),
# in the machine's byte order: two copies of WalIndexHdr (48 bytes: iVersion, unused, iChange,
# isInit, bigEndCksum, szPage, mxFrame, ...), then WalCkptInfo, whose first field is nBackfill.
_WAL_INDEX_HEADER = struct.Struct("=IIIBBHI")
_HEADER_COPY = 48
_BACKFILL = struct.Struct("=I")
_BACKFILL_AT = 96


def wal_left_bytes(path: str) -> int:
    """Bytes of pages the queue's WAL holds that no checkpoint copied into the database yet: the
    frames past the last checkpoint's (PRAGMA wal_checkpoint's log - checkpointed), read from the
    -shm's header as any process may (a read, no lock; the descriptor kept: _wal_index). 0 when there is no WAL index."""
    for _ in range(3):  # a writer may be changing the header: its two copies then differ
        try:
            header = os.pread(_wal_index(f"{path}-shm"), _BACKFILL_AT + _BACKFILL.size, 0)
        except OSError:
            return 0
        if len(header) < _BACKFILL_AT + _BACKFILL.size:
            return 0
        if header[:_HEADER_COPY] == header[_HEADER_COPY:2 * _HEADER_COPY]:
            break
    _, _, _, initialised, _, page_size, frames = _WAL_INDEX_HEADER.unpack_from(header)
    if not initialised:
        return 0
    copied = _BACKFILL.unpack_from(header, _BACKFILL_AT)[0]
    page_size = 65536 if page_size == 1 else page_size  # the format's way of writing 64 KB in 16 bits
    return max(0, frames - copied) * page_size


# The -shm files wal_left_bytes reads, each opened once and kept open by this process: closing a
# descriptor of a file drops every POSIX lock the process holds on it (fcntl(2)), and this
# process's own SQLite connections hold theirs on the -shm (a reader's snapshot, the dead-man
# switch): a checkpoint in another process would then copy past a snapshot still being read
# (the metrics process serves several scrapes at once).
_wal_indexes: dict[str, int] = {}
_wal_indexes_lock = threading.Lock()


def _forget_wal_indexes() -> None:
    """In a forked child: its own descriptors from now on (a child that closes what it inherited
    must not find their numbers here), and a lock no thread of the parent holds."""
    global _wal_indexes_lock
    _wal_indexes.clear()
    _wal_indexes_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_wal_indexes)


def _wal_index(shm_path: str) -> int:
    """A read-only descriptor of `shm_path`, the same while the file is (OSError: none now)."""
    with _wal_indexes_lock:
        now = os.stat(shm_path)
        fd = _wal_indexes.pop(shm_path, None)
        if fd is not None and not os.path.samestat(os.fstat(fd), now):
            os.close(fd)  # a file since removed (every connection closed): no lock of ours is on it
            fd = None
        _wal_indexes[shm_path] = fd if fd is not None else os.open(shm_path, os.O_RDONLY)
        return _wal_indexes[shm_path]
