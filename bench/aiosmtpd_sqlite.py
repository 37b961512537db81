#!/usr/bin/env python3
"""aiosmtpd + SQLite: the backup MX a Python user would write instead of backupmx.

The third peer of bench/peers.py. Two commands:

    PYTHON bench/aiosmtpd_sqlite.py serve --db FILE --port PORT [--domain example.com]
        An aiosmtpd server (run it with a Python that has aiosmtpd, e.g. a
        throwaway venv) whose handler commits each message to SQLite before
        the 250: WAL, synchronous=FULL, one autocommit INSERT per message,
        straight from the event loop (no executor: the obvious code).
        Recipients outside --domain get 554 5.7.1 (no open relay).
        SIGTERM / SIGINT stop it.

    python3 bench/aiosmtpd_sqlite.py flush --db FILE --primary HOST:PORT
        aiosmtpd has no ETRN; this is the loop one would write for the
        hand-over (stdlib only): read the stored messages in id order,
        deliver them with smtplib over ONE connection, delete each row (its
        own durable commit) after the primary's 250. Prints
        "delivered=N elapsed=S".
"""

import argparse
import asyncio
import signal
import smtplib
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,  -- the queue id in the 250 reply
    sender      TEXT NOT NULL,        -- MAIL FROM, '' for <>
    recipients  TEXT NOT NULL,        -- RCPT TO addresses, comma separated
    received_at REAL NOT NULL,        -- unix time of the 250
    body        BLOB NOT NULL         -- the message as received (CRLF, not dot-stuffed)
)
"""
BATCH = 500


def open_db(path):
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: one statement = one transaction
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(SCHEMA)
    return db


class SQLiteHandler:
    """aiosmtpd handler: accept RCPT for one domain, commit DATA before the 250."""

    def __init__(self, db, domain):
        self.db = db
        self.domain = domain.lower()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if not address.lower().endswith("@" + self.domain):
            return f"554 5.7.1 <{address}>: Relay access denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        cursor = self.db.execute(
            "INSERT INTO messages (sender, recipients, received_at, body) VALUES (?, ?, ?, ?)",
            (envelope.mail_from or "", ",".join(envelope.rcpt_tos), time.time(), envelope.original_content),
        )
        return f"250 2.0.0 Ok: queued as {cursor.lastrowid}"


async def serve(args):
    from aiosmtpd.smtp import SMTP  # only the serve side needs aiosmtpd

    handler = SQLiteHandler(open_db(args.db), args.domain)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mx2-aiosmtpd.bench", data_size_limit=args.max_size, decode_data=False),
        args.host,
        args.port,
        backlog=1024,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {args.host}:{args.port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def flush(args):
    host, _, port = args.primary.rpartition(":")
    db = open_db(args.db)
    total = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    delivered = 0
    started = time.perf_counter()
    with smtplib.SMTP(host, int(port), local_hostname="mx2-aiosmtpd.bench", timeout=60) as smtp:
        for _ in range(total // BATCH + 2):  # bounded: every batch empties BATCH rows or fails
            rows = db.execute(
                "SELECT id, sender, recipients, body FROM messages ORDER BY id LIMIT ?", (BATCH,)
            ).fetchall()
            if not rows:
                break
            for rowid, sender, recipients, body in rows:
                smtp.sendmail(sender, recipients.split(","), body)  # raises unless accepted
                db.execute("DELETE FROM messages WHERE id = ?", (rowid,))
                delivered += 1
    print(f"delivered={delivered} elapsed={time.perf_counter() - started:.3f}", flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--db", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--domain", default="example.com")
    s.add_argument("--max-size", type=int, default=52428800)
    f = sub.add_parser("flush")
    f.add_argument("--db", required=True)
    f.add_argument("--primary", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(serve(args))
        return 0
    return flush(args)


if __name__ == "__main__":
    sys.exit(main())
