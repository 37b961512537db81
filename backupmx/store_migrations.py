"""The schema's one-time rebuilds of an older queue, inside the migration's transaction (QueueDatabase._migrate).

Most schema changes are schema.sql's own CREATE ... IF NOT EXISTS, run at
every open. Two are not: schema 13 made the mail's tables WITHOUT ROWID,
keyed domain first, and that means new tables and every row copied
(rebuild_clustered, a body still in messages.body moved into body_chunks
on the way); schema 15 added message_domains and took the queue's foreign
key to messages out (name_message_domains). Both run inside the
migration's one transaction: a crash half-way leaves the old queue as it
was, and the next start does it again.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Iterator

from backupmx.store_bodies import chunk_lengths


def statements(script: str) -> Iterator[str]:
    """The SQL statements of `script`, one at a time (executescript would commit first)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


def _without_comments(statement: str) -> str:
    return "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))


# The mail's tables, parents first: schema 13 made them WITHOUT ROWID, queue and
# recipients keyed domain first (schema.sql's header). Each with the rows copied
# (a row whose parent is missing, left by hand with foreign_keys off, was never
# delivered: it would fail the new table's foreign key and the start) and their order.
_CLUSTERED = (
    ("messages", "", "queue_id"),
    ("queue", " WHERE queue_id IN (SELECT queue_id FROM messages)", "domain, queue_id"),
    ("recipients", " WHERE EXISTS (SELECT 1 FROM queue AS q WHERE q.domain = old_recipients.domain"
                   " AND q.queue_id = old_recipients.queue_id)", "domain, queue_id, address"),
)


def rebuild_clustered(db: sqlite3.Connection, text: str) -> None:
    """Rebuild messages, queue and recipients as schema.sql makes them now (schema 13),
    inside the migration's transaction: a crash half-way leaves the old queue as it was.

    The old tables are renamed old_*, schema.sql's CREATE TABLE makes the new ones, every
    row is copied in key order (a body still in messages.body, from before schema 11,
    is moved into body_chunks) and the old tables are dropped. Their triggers and
    indexes are dropped first: schema.sql makes them anew, by the same names, once the
    rows are in, so no trigger fires during the copy (queue_history would write
    `queued` events, queue_totals count twice) and each index is built once, in order.
    """
    names = tuple(table for table, _, _ in _CLUSTERED)
    marks = ",".join("?" * len(names))
    for kind in ("trigger", "index"):
        for (name,) in db.execute(f"SELECT name FROM sqlite_master WHERE type = ? AND tbl_name IN ({marks})"
                                  " AND sql IS NOT NULL", (kind, *names)).fetchall():
            db.execute(f'DROP {kind.upper()} "{name}"')
    # Legacy: the rename leaves views alone (an operator's own view of `queue` then
    # reads the new table, as SQLite would refuse the rename of a table a view names);
    # with foreign_keys on, the old tables' references follow their new names, so that
    # dropping them cascades into nothing new.
    db.execute("PRAGMA legacy_alter_table = ON")
    try:
        for table in names:
            db.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
    finally:
        db.execute("PRAGMA legacy_alter_table = OFF")
    # (body_chunks too: a queue from before schema 11 has none yet, and its bodies move there.)
    creates = re.compile(rf"\s*CREATE TABLE IF NOT EXISTS ({'|'.join(names)}|body_chunks) \(", re.IGNORECASE)
    for statement in statements(text):
        if creates.match(_without_comments(statement)):
            db.execute(statement)
    for table, where, order in _CLUSTERED:
        new = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        old = {row[1] for row in db.execute(f"PRAGMA table_info(old_{table})")}
        columns = [c for c in new if c in old]
        source = list(columns)
        if table == "recipients" and "position" not in old:  # RCPT order was rowid order
            columns.append("position")
            source.append("rowid")
        legacy = table == "messages" and "body" in old
        if legacy:
            where = " WHERE first_chunk IS NOT NULL"
        db.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(source)} FROM old_{table}{where}"
                   f" ORDER BY {order}")
        if legacy:
            _bodies_into_chunks(db, [c for c in columns if c not in ("first_chunk", "last_chunk")])
    for table in reversed(names):  # children first: nothing cascades
        db.execute(f"DROP TABLE old_{table}")


# The queue's reference to its message, as schemas 3 to 14 wrote it (schema 15 has none).
_QUEUE_TO_MESSAGES = re.compile(r"\s*REFERENCES\s+messages\s*\(\s*queue_id\s*\)\s*ON\s+DELETE\s+CASCADE", re.IGNORECASE)


def name_message_domains(db: sqlite3.Connection, text: str) -> None:
    """Schema 15, inside the migration's transaction: table message_domains made and filled
    from the queue (in key order: at schema 14, read from index queue_message in that order,
    no sort; at 1,000,000 queued the whole migration took 0.9 s and 66 MB of WAL,
    bench/README.md "The flush at 1M without queue_message"), and the queue's foreign key
    to messages taken out of its table's SQL.

    With foreign_keys on (every connection of ours), each message deleted (the reclaim's
    hundreds a round) had SQLite look for its queue rows by queue id alone: without index
    queue_message, a scan of the queue. messages_gone deletes them (and did, for the sqlite3
    shell). The clause goes as sqlite.org documents for such a change (lang_altertable.html,
    "Making Other Kinds Of Table Schema Changes": the stored CREATE TABLE edited, the schema
    cookie moved on), not by a copy of every queue row: the table's b-tree is untouched,
    and tests/test_store.py runs PRAGMA integrity_check on a migrated queue.
    """
    for statement in statements(text):
        if re.match(r"\s*CREATE TABLE IF NOT EXISTS message_domains \(", _without_comments(statement), re.IGNORECASE):
            db.execute(statement)
    db.execute("INSERT OR IGNORE INTO message_domains (queue_id, domain)"
               " SELECT queue_id, domain FROM queue ORDER BY queue_id, domain")
    row = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'queue'").fetchone()
    if row is None or not _QUEUE_TO_MESSAGES.search(row[0]):
        return  # rebuilt just now from this schema.sql (schema 12 or older), or edited by hand
    cookie = db.execute("PRAGMA schema_version").fetchone()[0]
    db.execute("PRAGMA writable_schema = ON")
    try:
        db.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'queue'",
                   (_QUEUE_TO_MESSAGES.sub("", row[0], count=1),))
        db.execute(f"PRAGMA schema_version = {cookie + 1}")
    finally:
        db.execute("PRAGMA writable_schema = OFF")


def _bodies_into_chunks(db: sqlite3.Connection, columns: list[str]) -> None:
    """Copy the messages whose body is still in old_messages.body (queued before schema 11)
    into messages, their bodies into body_chunks (chunk_lengths), one chunk in memory at a time."""
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    next_chunk = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM body_chunks").fetchone()[0]
    insert = (f"INSERT INTO messages ({', '.join(columns)}, first_chunk, last_chunk)"
              f" VALUES ({', '.join('?' * (len(columns) + 2))})")
    rows = db.execute(f"SELECT rowid, {', '.join(columns)} FROM old_messages WHERE first_chunk IS NULL").fetchall()
    for rowid, *values in rows:
        with db.blobopen("old_messages", "body", rowid, readonly=True) as blob:
            lengths = chunk_lengths(len(blob), page_size)
            for length in lengths:
                db.execute("INSERT INTO body_chunks (id, data) VALUES (?, ?)", (next_chunk, blob.read(length)))
                next_chunk += 1
        db.execute(insert, (*values, next_chunk - len(lengths), next_chunk - 1))
