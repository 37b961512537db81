"""The SQLite queue (backupmx/store.py, schema.sql, backupmx/schema.py).

Real database files in tmp_path, real locks from a second connection, a real
SQLITE_FULL from PRAGMA max_page_count, real processes racing for leases.
"""

import io
import logging
import multiprocessing
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from backupmx import schema as schema_mod
from backupmx.envelope import Envelope, Recipient
from backupmx.outcome import Outcome, Verdict, classify
from backupmx.store import (
    QueueStore,
    QueueUnavailable,
    Submission,
    check_database,
    is_queue_id,
    new_queue_id,
)
from backupmx.store_bodies import CHUNK, DamagedBody, chunk_lengths
from backupmx.store_operator import Event
from conftest import free_port, pending_flushes, queue_one, reclaim, record_deferred, record_delivered, record_failed

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now=T0):
        self.now = float(now)

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "queue.db")


@pytest.fixture
def store(db_path, clock):
    s = QueueStore(db_path, clock=clock)
    yield s
    s.close()


def envelope(*addresses, sender="sender@example.org", **kw):
    rcpts = []
    for a in addresses:
        rcpts.append(a if isinstance(a, Recipient) else Recipient(a, a.rsplit("@", 1)[1].lower()))
    return Envelope(sender=sender, recipients=rcpts, **kw)


def put(store, *addresses, body=b"Subject: hi\r\n\r\nhello\r\n", **kw):
    qid = store.new_queue_id()
    queue_one(store, qid, envelope(*addresses, **kw), io.BytesIO(body), len(body), client="192.0.2.1", helo="client.test")
    return qid


def counts(path):
    db = sqlite3.connect(path)
    try:
        return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("messages", "queue", "recipients", "events", "body_chunks"))
    finally:
        db.close()


# --- opening ---------------------------------------------------------------------


def test_pragmas_are_set(store):
    db = store.connection
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema_mod.schema_version() >= 1
    # A second, independent connection sees WAL too: it is a property of the file.
    other = sqlite3.connect(store.path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_files_are_private(tmp_path, clock):
    old = os.umask(0o022)
    try:
        s = QueueStore(str(tmp_path / "q.db"), clock=clock)
        put(s, "a@example.com")
        for name in ("q.db", "q.db-wal", "q.db-shm"):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
        s.close()
        assert os.umask(0o022) == 0o022  # the store put the umask back
    finally:
        os.umask(old)


def test_reopen_is_harmless_and_keeps_mail(db_path, clock):
    with QueueStore(db_path, clock=clock) as s:
        qid = put(s, "a@example.com")
    with QueueStore(db_path, clock=clock) as s:
        assert [m.queue_id for m in s.messages_for_flush("example.com")] == [qid]


def stamp(path, version, oldest=None):
    """What a later backupmx leaves behind: its user_version and schema_compat row (None: no such table)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA user_version = {version}")
    if oldest is None:
        db.execute("DROP TABLE schema_compat")
    else:
        db.execute("UPDATE schema_compat SET oldest_version = ?", (oldest,))
    db.close()


def marks(path):
    db = sqlite3.connect(path)
    try:
        return (db.execute("PRAGMA user_version").fetchone()[0],
                db.execute("SELECT oldest_version FROM schema_compat").fetchone()[0])
    finally:
        db.close()


def test_a_new_queue_records_which_programs_may_open_it(store):
    ours = schema_mod.schema_version()
    version, oldest = marks(store.path)
    assert version == ours and 1 <= oldest <= ours


def test_newer_schema_is_refused_when_it_needs_a_newer_program(db_path, clock):
    ours = schema_mod.schema_version()
    QueueStore(db_path, clock=clock).close()
    stamp(db_path, ours + 1, oldest=ours + 1)
    for read_only in (False, True):
        with pytest.raises(QueueUnavailable, match=rf"newer than this backupmx \({ours}\) and needs schema {ours + 1}"):
            QueueStore(db_path, clock=clock, read_only=read_only)
    assert "needs schema" in check_database(db_path)[0]
    # A queue from before schema_compat existed: only its own version may open it.
    stamp(db_path, 999)
    with pytest.raises(QueueUnavailable, match="newer"):
        QueueStore(db_path, clock=clock)
    assert check_database(db_path)


def test_a_newer_additive_queue_opens_and_keeps_its_marks(db_path, clock):
    """A rollback: a later release added a table and a column and kept oldest_version;
    this release reads and writes the queue and applies nothing to it."""
    ours = schema_mod.schema_version()
    with QueueStore(db_path, clock=clock) as s:
        old = put(s, "a@example.com")
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("CREATE TABLE later_feature (x INTEGER)")
    db.execute("ALTER TABLE queue ADD COLUMN later_column TEXT")
    db.execute("DROP VIEW queue_list")  # a later definition of a view is not replaced by ours
    db.execute("CREATE VIEW queue_list AS SELECT queue_id, 'later' AS marker FROM queue")
    db.close()
    stamp(db_path, ours + 2, oldest=ours)
    with QueueStore(db_path, clock=clock) as s:
        new = put(s, "b@example.com")
        assert {m.queue_id for m in s.messages_for_flush("example.com")} == {old, new}
    with QueueStore(db_path, clock=clock, read_only=True) as s:
        assert len(s.list_messages()) == 2
    assert marks(db_path) == (ours + 2, ours)
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT DISTINCT marker FROM queue_list").fetchall() == [("later",)]
    db.close()
    assert check_database(db_path) == []


def test_only_a_migrating_open_migrates(tmp_path, clock):
    """The CLI opens read-only (reports) or with migrate=False (actions): an older queue is
    left as it is, with the line `metrics` and `health` give."""
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript((ROOT / "tests" / "data" / "schema-v3.sql").read_text())
    old.execute("CREATE VIEW my_report AS SELECT domain, COUNT(*) AS n FROM queue GROUP BY domain")
    old.close()
    for read_only in (True, False):
        with pytest.raises(QueueUnavailable, match=r"schema version 3, .*\(start the server once to migrate the queue\)"):
            QueueStore(path, clock=clock, read_only=read_only, migrate=False)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()
    QueueStore(path, clock=clock).close()  # what `serve` does
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_mod.schema_version()
        assert "last_etrn" in {r[1] for r in db.execute("PRAGMA table_info(queue_summary)")}  # made anew
        assert db.execute("SELECT * FROM my_report").fetchall() == []  # the operator's own view is kept
    finally:
        db.close()
    QueueStore(path, clock=clock, migrate=False).close()  # a migrated queue opens for the CLI's actions


def test_unopenable_path_is_unavailable(tmp_path, clock):
    with pytest.raises(QueueUnavailable):
        QueueStore(str(tmp_path / "no" / "such" / "dir" / "q.db"), clock=clock)


def test_check_database(tmp_path, clock):
    assert check_database(str(tmp_path / "new.db")) == []
    assert not os.path.exists(tmp_path / "new.db")  # check never creates it
    assert "does not exist" in check_database(str(tmp_path / "missing" / "q.db"))[0]
    QueueStore(str(tmp_path / "good.db"), clock=clock).close()
    assert check_database(str(tmp_path / "good.db")) == []
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    assert check_database(str(tmp_path / "junk.db"))


# --- ids ---------------------------------------------------------------------------


def test_queue_ids_are_short_unique_and_time_sortable(clock):
    ids = set()
    for _ in range(5000):
        ids.add(new_queue_id(clock))
    assert len(ids) == 5000
    assert all(re.fullmatch(r"[0-9A-Z]{14}", i) and is_queue_id(i) for i in ids)
    assert not is_queue_id("example.com") and not is_queue_id("EXAMPLE12345.") and not is_queue_id("abcdefghijkl")
    earlier = new_queue_id(clock)
    clock.now += 1
    assert new_queue_id(clock) > earlier


def test_queue_ids_of_forked_workers_do_not_repeat_each_other(clock):
    """Each process counts from its own random start (store_ids._IdSequence): workers forked from one
    master, taking ids in the same millisecond, must not walk the same sequence."""
    new_queue_id(clock)  # the parent's sequence exists before the forks, as the master's may
    readers = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.write(w, " ".join(new_queue_id(clock) for _ in range(200)).encode())
            finally:
                os._exit(0)
        os.close(w)
        readers.append((pid, r))
    ids = []
    for pid, r in readers:
        with os.fdopen(r, "rb") as f:
            ids += f.read().decode().split()
        os.waitpid(pid, 0)
    ids.append(new_queue_id(clock))
    assert len(ids) == 401 and len(set(ids)) == 401


# --- enqueue -------------------------------------------------------------------------


def test_queued_once_per_domain_with_one_body(store):
    qid = put(store, "z@one.test", "b@two.test", "c@one.test", "z@one.test")
    db = store.connection
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
    assert db.execute("SELECT domain FROM queue WHERE queue_id = ? ORDER BY domain", (qid,)).fetchall() == [
        ("one.test",), ("two.test",)]
    assert db.execute("SELECT domain, address FROM recipients ORDER BY position").fetchall() == [
        ("one.test", "z@one.test"), ("two.test", "b@two.test"), ("one.test", "c@one.test")]  # duplicate stored once
    # The RCPT order, not the key's (recipients.position): delivered, listed, shown and bounced in it.
    one = store.messages_for_flush("one.test")
    assert [(m.queue_id, [r.address for r in m.recipients]) for m in one] == [(qid, ["z@one.test", "c@one.test"])]
    assert [r.address for r in store.messages_for_flush("two.test")[0].recipients] == ["b@two.test"]
    assert [m.recipients for m in store.list_messages()] == [["z@one.test", "c@one.test"], ["b@two.test"]]
    assert store.list_messages("one.test")[0].recipients == ["z@one.test", "c@one.test"]
    assert [r.address for r in store.show(qid).rows[0].recipients] == ["z@one.test", "c@one.test"]
    assert db.execute("SELECT recipients FROM queue_list WHERE domain = 'one.test'").fetchone() == \
        ("z@one.test,c@one.test",)
    assert " to=<z@one.test>,<c@one.test> " in db.execute(
        "SELECT detail FROM queue_arrivals WHERE domain = 'one.test'").fetchone()[0]
    record_failed(store, qid, "one.test", ["c@one.test", "z@one.test"], "550 no")
    [bounce] = store.claim_dsns()
    assert [r.address for r in bounce.recipients] == ["z@one.test", "c@one.test"]


def test_envelope_parameters_are_kept(store):
    env = Envelope(
        sender="", recipients=[Recipient("Bob@Example.COM", "example.com", notify="SUCCESS,DELAY", orcpt="rfc822;bob@x")],
        body_type="8BITMIME", envid="ENV+2B1", ret="HDRS",
    )
    queue_one(store, "ABC123DEF456", env, io.BytesIO(b"x"), 1, client="::1", helo="h")
    [m] = store.messages_for_flush("example.com")
    assert (m.sender, m.envid, m.ret, m.body_type, m.size, m.attempts) == ("", "ENV+2B1", "HDRS", "8BITMIME", 1, 0)
    assert m.recipients == [Recipient("Bob@Example.COM", "example.com", "SUCCESS,DELAY", "rfc822;bob@x")]
    d = store.show("ABC123DEF456")
    assert (d.client, d.helo, d.received_at) == ("::1", "h", T0)


# Every size class of the body chunks with 4 KB pages (chunk_lengths): none, one byte, one
# small chunk exactly, one more, the last size in small chunks, one chunk with an overflow
# page exactly and one byte more, a 64 KB chunk exactly and one byte more, the copy step, a
# body read whole (BodyReader.READAHEAD) and one byte more (refills: where each chunk starts).
SIZE_CLASSES = [0, 1, 499, 500, 4575, 4576, 4577, 65956, 65957, CHUNK + 1, 3 * CHUNK + 17, 2**20, 2**20 + 1]


@pytest.mark.parametrize("size", SIZE_CLASSES)
def test_body_round_trip_is_byte_exact(store, size):
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    body = rng.randbytes(size)
    if size > 4:
        body = b"\x00\r\n\xff" + body[4:]  # NUL, CRLF and 8-bit for sure
    qid = put(store, "a@example.com", body=body)
    with store.open_body(qid) as f:
        assert len(f) == size
        pieces = []
        while chunk := f.read(rng.randrange(1, 70000)):
            pieces.append(chunk)
        assert b"".join(pieces) == body
        f.seek(0)
        assert f.read() == body
        for _ in range(3):  # anywhere, any length
            at, n = rng.randrange(size + 1), rng.randrange(1, 70000)
            f.seek(at)
            assert f.read(n) == body[at:at + n]
    shell = sqlite3.connect(store.path)
    assert shell.execute("SELECT body FROM message_bodies WHERE queue_id = ?", (qid,)).fetchone()[0] == body
    shell.close()


def test_chunks_pack_the_pages(store):
    """2 KB bodies (plus our Received: header) in small chunks fill 4 KB pages (in their own
    row each, they took a page each: 1.8x); a long body's chunks fill their overflow pages."""
    rng = random.Random(7)
    bodies = [rng.randbytes(2300 + rng.randrange(60)) for _ in range(300)] + [rng.randbytes(2**20)]
    store.enqueue_many([Submission(store.new_queue_id(), envelope("a@example.com"), body, len(body), "c", "h")
                        for body in bodies])
    db = store.connection
    assert store.page_size() == 4096
    pages, unused = db.execute("SELECT COUNT(*), SUM(unused) FROM dbstat WHERE name = 'body_chunks'"
                               " AND pagetype != 'overflow'").fetchone()
    assert pages * 4096 < 1.12 * sum(map(len, bodies[:-1])) + 16 * 4096, pages
    overflow, wasted = db.execute("SELECT COUNT(*), SUM(unused) FROM dbstat WHERE name = 'body_chunks'"
                                  " AND pagetype = 'overflow'").fetchone()
    assert overflow * 4092 > 0.98 * 2**20 and wasted == 0, (overflow, wasted)


def test_a_damaged_body_is_never_read_short(store):
    """A chunk deleted by hand: the reader refuses rather than hand out less than the size says."""
    qid = put(store, "a@example.com", body=b"x" * 3000)
    store.connection.execute("DELETE FROM body_chunks WHERE id = (SELECT first_chunk + 2 FROM messages)")
    with pytest.raises(DamagedBody):
        store.open_body(qid).read()
    reader = store.open_body(qid)
    reader.seek(10)
    with pytest.raises(DamagedBody):
        reader.read(5)


def test_body_as_bytes_is_accepted(store):
    qid = store.new_queue_id()
    queue_one(store, qid, envelope("a@example.com"), b"\x00\x01", 2, client=None, helo=None)
    assert store.open_body(qid).read() == b"\x00\x01"


def test_open_body_unknown_id(store):
    with pytest.raises(KeyError):
        store.open_body("NOSUCHID0000")


def _peak_during(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_large_message_memory_does_not_grow_with_size(store, tmp_path):
    size = 20 * 1024 * 1024
    src = tmp_path / "big.eml"
    with open(src, "wb") as f:
        block = bytes(range(256)) * 256  # 64 KiB
        for _ in range(size // len(block)):
            f.write(block)
    qid = store.new_queue_id()

    def write():
        with open(src, "rb") as f:
            queue_one(store, qid, envelope("a@example.com"), f, size, client="c", helo="h")

    assert _peak_during(write) < 5 * 1024 * 1024

    def read():
        with store.open_body(qid) as body, open(src, "rb") as f:
            while chunk := body.read(CHUNK):
                assert chunk == f.read(len(chunk))
            assert body.tell() == size

    assert _peak_during(read) < 5 * 1024 * 1024


_RSS_SCRIPT = r"""
import os, resource, sys
from backupmx.envelope import Envelope, Recipient
from backupmx.store import QueueStore, Submission
path, size = sys.argv[1], int(sys.argv[2])
store = QueueStore(os.path.join(path, "q.db"))
with open(os.path.join(path, "big"), "wb") as f:
    block = os.urandom(65536)
    for _ in range(size // len(block)):
        f.write(block)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
before = rss()
with open(os.path.join(path, "big"), "rb") as f:
    store.enqueue_many([Submission("BIG000000000", Envelope("s@x", [Recipient("a@example.com", "example.com")]), f,
                                   size, "c", "h")])
after_write = rss()
with store.open_body("BIG000000000") as body:
    while body.read(65536):
        pass
print(after_write - before, rss() - after_write)
"""


def test_large_message_rss_does_not_grow_with_size(tmp_path):
    # SQLite's own memory is invisible to tracemalloc: measure the process's peak RSS.
    # (This caught the body column not being last, which makes SQLite build the
    # zeroblob in memory: +2x the message.)
    size = 40 * 1024 * 1024
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), str(size)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    write_kib, read_kib = map(int, out.stdout.split())
    assert write_kib < 5 * 1024 and read_kib < 5 * 1024, (write_kib, read_kib)


def test_wrong_size_is_rejected_and_nothing_written(store):
    before = counts(store.path)
    with pytest.raises(ValueError):
        queue_one(store, "SHORT0000000", envelope("a@example.com"), io.BytesIO(b"abc"), 4, client="c", helo="h")
    with pytest.raises(ValueError):
        queue_one(store, "LONG00000000", envelope("a@example.com"), io.BytesIO(b"abcde"), 4, client="c", helo="h")
    with pytest.raises(ValueError):
        queue_one(store, "NORCPT000000", Envelope("s@x"), io.BytesIO(b""), 0, client="c", helo="h")
    assert counts(store.path) == before


def test_duplicate_queue_id_is_unavailable(store):
    queue_one(store, "SAME00000000", envelope("a@example.com"), b"1", 1, client="c", helo="h")
    with pytest.raises(QueueUnavailable):
        queue_one(store, "SAME00000000", envelope("b@example.com"), b"2", 1, client="c", helo="h")
    assert store.open_body("SAME00000000").read() == b"1"


def test_disk_full_is_unavailable_and_nothing_half_queued(store):
    put(store, "a@example.com")
    before = counts(store.path)
    db = store.connection
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 8}")  # real SQLITE_FULL past 8 more pages
    body = os.urandom(200_000)
    with pytest.raises(QueueUnavailable, match="full"):
        queue_one(store, "FULL00000000", envelope("a@example.com", "b@other.test"), io.BytesIO(body), len(body),
                      client="c", helo="h")
    assert not db.in_transaction
    assert counts(store.path) == before
    assert store.show("FULL00000000") is None
    put(store, "small@example.com", body=b"x")  # a small one still fits
    db.execute("PRAGMA max_page_count = 1073741823")
    qid = put(store, "a@example.com", body=body)
    assert store.open_body(qid).read() == body


def test_locked_database_is_unavailable_quickly(db_path, clock):
    store = QueueStore(db_path, clock=clock, busy_timeout=0.05)
    put(store, "a@example.com")
    before = counts(db_path)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="locked"):
            put(store, "b@example.com")
        with pytest.raises(QueueUnavailable):
            store.request_flush(["example.com"])
        assert time.monotonic() - started < 2
        assert len(store.list_messages()) == 1  # readers are not blocked (WAL)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert counts(db_path) == before
    put(store, "b@example.com")
    assert len(store.list_messages()) == 2
    store.close()


# --- flush requests and leases ---------------------------------------------------------


def test_flush_requests_coalesce(store, clock):
    put(store, "a@example.com")
    put(store, "b@example.com")
    for _ in range(1000):
        assert store.request_flush(["example.com", "empty.test"]) == {"example.com": 2, "empty.test": 0}
    assert pending_flushes(store.path) == ["example.com"]
    assert store.claim_flush("f1", 60) == "example.com"
    assert store.claim_flush("f2", 60) is None  # one pending flush, taken once
    assert pending_flushes(store.path) == []


def test_request_during_flush_runs_once_more(store, clock):
    put(store, "a@example.com")
    store.request_flush(["example.com"])
    assert store.claim_flush("f1", 60) == "example.com"
    store.request_flush(["example.com"])
    store.request_flush(["example.com"])
    assert store.claim_flush("f2", 60) is None  # leased: not twice at once
    store.release_flush("example.com", "f1")
    assert store.claim_flush("f2", 60) == "example.com"
    store.release_flush("example.com", "f2")
    assert store.claim_flush("f3", 60) is None


def test_oldest_request_is_claimed_first(store, clock):
    put(store, "a@late.test")
    put(store, "a@early.test")
    store.request_flush(["early.test"])
    clock.now += 5
    store.request_flush(["late.test"])
    assert store.claim_flush("f", 60) == "early.test"
    assert store.claim_flush("f", 60) == "late.test"


def test_lease_expiry_frees_a_crashed_flusher(store, clock):
    put(store, "a@example.com")
    store.request_flush(["example.com"])
    assert store.claim_flush("dead", 30) == "example.com"
    clock.now += 20
    assert store.renew_lease("example.com", "dead", 30)  # now until T0+50
    clock.now += 29
    assert store.claim_flush("other", 30) is None
    clock.now += 2
    # "dead" never released: its flush was interrupted and is redone without a new request.
    assert store.claim_flush("other", 30) == "example.com"
    assert not store.renew_lease("example.com", "dead", 30)
    store.release_flush("example.com", "dead")  # not the owner: no effect
    assert store.claim_flush("third", 30) is None
    store.release_flush("example.com", "other")
    assert store.claim_flush("third", 30) is None  # released and no request: nothing to do


def _claimer(path, owner, barrier, results):
    # Opened after the fork, as in the server.
    s = QueueStore(path, busy_timeout=10)
    barrier.wait(timeout=20)
    got = []
    for _ in range(1000):
        domain = s.claim_flush(owner, 600)
        if domain is None:
            break
        got.append(domain)
    s.close()
    results.put((owner, got))


def test_two_processes_never_claim_the_same_domain(db_path):
    domains = [f"d{i:02d}.test" for i in range(60)]
    with QueueStore(db_path) as s:
        for d in domains:
            put(s, f"x@{d}")
        assert set(s.request_flush(domains).values()) == {1}
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(db_path, f"p{i}", barrier, results)) for i in range(3)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    claimed = [d for lst in got.values() for d in lst]
    assert sorted(claimed) == domains  # every domain once, none twice


# --- delivery outcomes ----------------------------------------------------------------


def test_held_is_never_flushed(store):
    held = put(store, "a@example.com")
    free = put(store, "b@example.com")
    assert store.hold(queue_id=held) == 1
    assert [m.queue_id for m in store.messages_for_flush("example.com")] == [free]
    store.delete(queue_id=free)
    assert store.request_flush(["example.com"]) == {"example.com": 0}
    assert store.messages_for_flush("example.com") == []
    assert store.summary()[0].messages == 1  # held mail still counts as waiting
    assert store.release(queue_id=held) == 1
    assert [m.queue_id for m in store.messages_for_flush("example.com")] == [held]


def test_messages_for_flush_oldest_first_with_limit(store, clock):
    ids = []
    for i in range(5):
        ids.append(put(store, "a@example.com"))
        clock.now += 1
    assert [m.queue_id for m in store.messages_for_flush("example.com")] == ids
    assert [m.queue_id for m in store.messages_for_flush("example.com", limit=2)] == ids[:2]


def test_a_batch_of_outcomes_counts_each_delivered_message_once(store, clock):
    """record_attempts writes domain_status and the delivered counter once per batch: the
    count is still one per message the primary took (some or all of its recipients)."""
    two = put(store, "a@one.test", "b@one.test")
    one = put(store, "c@one.test")
    other = put(store, "d@two.test")
    later = put(store, "e@two.test")
    ok, later_reply = Verdict(Outcome.DELIVERED, "250 ok"), Verdict.deferred("451 later")
    clock.now += 60
    assert store.record_attempts([(two, "one.test", {"a@one.test": ok, "b@one.test": later_reply}, None),
                                  (one, "one.test", {"c@one.test": ok}, None),
                                  (other, "two.test", {"d@two.test": later_reply}, None),
                                  ("NOSUCHID", "one.test", {"x@one.test": ok}, None)]) == ["queued", None, "queued", None]
    assert store.counters()[("messages_delivered", "")] == 2
    reports = {r.domain: r for r in store.domain_reports()}
    assert reports["one.test"].last_delivery == int(clock.now) and reports["two.test"].last_delivery is None
    assert [(m.queue_id, [r.address for r in m.recipients]) for m in store.messages_for_flush("one.test")] == \
        [(two, ["b@one.test"])]
    assert [m.queue_id for m in store.messages_for_flush("two.test", limit=1)] == [other] and later


def test_delivered_deletes_recipient_row_and_message(store, clock):
    qid = put(store, "a@one.test", "b@one.test", "c@two.test")
    clock.now += 10
    assert record_delivered(store, qid, "one.test", ["a@one.test"], "250 2.0.0 ok") == "queued"
    [m] = store.messages_for_flush("one.test")
    assert [r.address for r in m.recipients] == ["b@one.test"] and m.attempts == 1
    assert record_delivered(store, qid, "one.test", ["b@one.test"], "250 2.0.0 ok") is None
    assert store.messages_for_flush("one.test") == []
    assert store.show(qid) is not None  # two.test still holds the message
    assert record_delivered(store, qid, "two.test", ["c@two.test"], "250 2.0.0 ok") is None
    assert store.show(qid) is None  # gone from the queue; the message waits for housekeeping's reclaim
    assert counts(store.path)[:3] == (1, 0, 0) and counts(store.path)[4] > 0
    assert reclaim(store) == 1
    assert counts(store.path)[:3] == (0, 0, 0) and counts(store.path)[4] == 0  # no chunk of its body either
    whats = [e.what for e in store.history(qid)]
    assert whats.count("delivered") == 3 and whats.count("queued") == 2
    assert record_delivered(store, qid, "two.test", ["c@two.test"], "250") is None  # gone already: harmless


def test_deferred_keeps_with_attempts_and_reply(store, clock):
    qid = put(store, "a@example.com")
    clock.now += 100
    assert record_deferred(store, qid, "example.com", ["a@example.com"], "451 4.3.0 try later") == "queued"
    clock.now += 100
    assert record_deferred(store, qid, "example.com", ["a@example.com"], "421 4.4.2 timeout", retry_after=300) == "queued"
    [row] = store.list_messages()
    assert (row.attempts, row.last_reply, row.last_attempt, row.next_attempt) == (
        2, "421 4.4.2 timeout", T0 + 200, T0 + 500)
    assert store.due_domains(["example.com", "example.org"]) == []
    clock.now += 300
    assert store.due_domains(["example.com", "example.org"]) == ["example.com"]
    assert store.due_domains(["example.org"]) == []
    [m] = store.messages_for_flush("example.com")
    assert m.attempts == 2


def test_failed_marks_and_keeps(store, clock):
    qid = put(store, "a@example.com", "b@example.com")
    assert record_failed(store, qid, "example.com", ["a@example.com"], "550 5.1.1 no such user") == "queued"
    [m] = store.messages_for_flush("example.com")
    assert [r.address for r in m.recipients] == ["b@example.com"]
    assert record_delivered(store, qid, "example.com", ["b@example.com"], "250 ok") == "failed"  # only the failed one left
    assert store.messages_for_flush("example.com") == []
    assert store.summary() == []
    [row] = store.list_messages(state="failed")
    assert row.recipients == ["a@example.com"]
    [bounce] = store.pending_dsns()
    assert (bounce.queue_id, bounce.sender) == (qid, "sender@example.org")
    assert [(r.address, r.state, r.last_reply) for r in bounce.recipients] == [
        ("a@example.com", "failed", "550 5.1.1 no such user")]
    store.dsn_sent(qid, "example.com", ["a@example.com"])
    assert store.pending_dsns() == []


def test_mixed_outcomes_are_one_attempt(store):
    qid = put(store, "a@example.com", "b@example.com", "c@example.com")
    [state] = store.record_attempts([(qid, "example.com", {
        "a@example.com": Verdict.of_reply(250, "250 ok"),
        "b@example.com": Verdict.of_reply(450, "450 4.2.1 busy"),
        "c@example.com": Verdict.of_reply(550, "550 5.1.1 unknown"),
    }, 60)])
    assert state == "queued"
    [row] = store.list_messages()
    assert (row.attempts, row.last_reply, row.recipients) == (1, "450 4.2.1 busy", ["b@example.com", "c@example.com"])
    detail = store.show(qid).rows[0].recipients
    assert [(r.address, r.state, r.last_reply) for r in detail] == [
        ("b@example.com", "queued", "450 4.2.1 busy"), ("c@example.com", "failed", "550 5.1.1 unknown")]
    with pytest.raises(ValueError):
        Verdict("bogus", "x")  # there is no fourth outcome
    with pytest.raises(TypeError):
        store.record_attempts([(qid, "example.com", {"b@example.com": ("deferred", "x")}, None)])


@pytest.mark.parametrize("code,outcome", [
    (250, Outcome.DELIVERED), (251, Outcome.DELIVERED), (421, Outcome.DEFERRED), (451, Outcome.DEFERRED),
    (452, Outcome.DEFERRED), (550, Outcome.FAILED), (554, Outcome.FAILED),
    (354, Outcome.DEFERRED), (199, Outcome.DEFERRED), (600, Outcome.DEFERRED),  # no final reply: never "failed"
])
def test_one_classification_of_reply_codes(code, outcome):
    assert classify(code) is outcome


# --- lifecycle ---------------------------------------------------------------------


def test_expiry_dsn_and_retention(store, clock):
    old = put(store, "a@short.test", "b@long.test")
    held = put(store, "c@short.test")
    store.hold(queue_id=held)
    clock.now += 3600
    young = put(store, "d@short.test")
    clock.now += 1
    expired = store.expire({"short.test": 3600}, default=86400)
    assert expired == [(old, "short.test")]  # long.test has a day; held never expires
    assert store.expire({"short.test": 3600}, default=86400) == []
    assert [m.queue_id for m in store.messages_for_flush("short.test")] == [young]
    assert [b.queue_id for b in store.pending_dsns()] == [old]
    assert store.pending_dsns()[0].recipients[0].state == "expired"
    store.dsn_sent(old, "short.test", ["a@short.test"], "skipped: no bounce_relay")
    # Retention: the expired row stays for the retention, then goes; the message with it
    # only once long.test is done too.
    assert store.purge(7 * 86400) == 0
    clock.now += 7 * 86400
    assert store.purge(7 * 86400) == 1
    assert store.show(old).rows[0].domain == "long.test"
    record_delivered(store, old, "long.test", ["b@long.test"], "250 ok")
    assert store.show(old) is None
    assert any(e.what == "dsn" for e in store.history(old))
    clock.now += 7 * 86400 + 1
    store.purge(7 * 86400)
    assert store.history(old) != []  # the message not reclaimed yet: its history stays
    reclaim(store)
    store.purge(7 * 86400)
    assert store.history(old) == []  # history of mail gone that long is dropped too


def test_requeue_failed_and_expired(store, clock):
    qid = put(store, "a@example.com")
    record_failed(store, qid, "example.com", ["a@example.com"], "550 no")
    assert store.requeue(domain="example.com") == 1
    [m] = store.messages_for_flush("example.com")
    assert m.recipients[0].address == "a@example.com"
    assert store.pending_dsns() == []
    with pytest.raises(ValueError):
        store.hold()  # neither id nor domain: never the whole queue by accident


def test_delete_by_domain(store):
    a = put(store, "a@one.test", "b@two.test")
    put(store, "c@one.test")
    assert store.delete(domain="one.test") == 2
    assert [s.domain for s in store.summary()] == ["two.test"]
    assert store.show(a).rows[0].domain == "two.test"


def test_deleting_by_hand_in_sqlite3_leaves_no_orphans(store):
    # The sqlite3 shell runs with foreign_keys off: the triggers still clean up.
    a = put(store, "a@one.test", "b@two.test")
    b = put(store, "c@one.test")
    shell = sqlite3.connect(store.path, isolation_level=None)
    assert shell.execute("PRAGMA foreign_keys").fetchone()[0] == 0
    shell.execute("DELETE FROM queue WHERE domain = 'one.test'")
    assert shell.execute("SELECT queue_id FROM reclaim").fetchall() == [(b,)]  # a's is still queued for two.test
    assert reclaim(store) == 1
    assert shell.execute("SELECT queue_id FROM messages").fetchall() == [(a,)]
    assert shell.execute("SELECT address FROM recipients").fetchall() == [("b@two.test",)]
    shell.execute("DELETE FROM messages WHERE queue_id = ?", (a,))
    assert [shell.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("queue", "recipients")] == [0, 0]
    assert shell.execute("SELECT COUNT(*) FROM body_chunks").fetchone()[0] == 0
    assert reclaim(store) == 0 and shell.execute("SELECT COUNT(*) FROM reclaim").fetchone()[0] == 0  # listed, gone
    shell.close()
    assert store.show(b) is None


def test_summary_view(store, clock):
    assert store.summary() == []
    put(store, "a@one.test", body=b"12345")
    clock.now += 10
    held = put(store, "b@one.test", "c@two.test", body=b"123")
    store.hold(queue_id=held, domain="two.test")
    store.connection.execute("UPDATE queue SET state = 'expired' WHERE domain = 'one.test' AND queue_id = ?", (held,))
    shell = sqlite3.connect(store.path)
    rows = shell.execute("SELECT domain, messages, bytes, oldest FROM queue_summary ORDER BY domain").fetchall()
    shell.close()
    assert rows == [("one.test", 1, 5, T0), ("two.test", 1, 3, T0 + 10)]
    assert all(isinstance(r[3], int) for r in rows)
    assert store.usage("one.test") == (1, 5) and store.usage("none.test") == (0, 0)


def test_a_flush_records_its_outcomes_in_the_writers_turns(store, db_path):
    """A big flush records from two processes (flush_sharing.share) beside the SMTP workers' group
    commits: record_attempts waits for its turn on <queue>-commit.lock, as those do, and is
    woken when the holder lets go, instead of napping in SQLite's busy handler (1, 2, 5, 10 ms...)."""
    import fcntl
    import threading

    qid = put(store, "a@example.com")
    done, states = threading.Event(), []

    def record():
        with QueueStore(db_path) as flusher:  # a connection of its own thread
            states.append(record_delivered(flusher, qid, "example.com", ["a@example.com"], "250 ok"))
        done.set()

    with open(db_path + "-commit.lock", "a") as turn:  # another writer's turn
        fcntl.flock(turn, fcntl.LOCK_EX)
        recording = threading.Thread(target=record)
        recording.start()
        assert not done.wait(0.2)  # waits for the turn (not SQLite's lock: nobody holds that)
        fcntl.flock(turn, fcntl.LOCK_UN)
        recording.join(5)
    assert done.is_set() and states == [None]  # recorded: the row is gone


def test_body_reader_does_not_block_writes(store, db_path, clock):
    # A slow delivery reads the body while other processes queue mail; recording
    # the outcome must still work (no pinned snapshot -> no SQLITE_BUSY_SNAPSHOT).
    body = os.urandom(3 * CHUNK)
    qid = put(store, "a@example.com", body=body)
    reader = store.open_body(qid)
    first = reader.read(CHUNK)
    with QueueStore(db_path, clock=clock) as other:
        put(other, "b@example.com")
    rest = reader.read()
    assert first + rest == body
    unread = store.open_body(qid)
    assert record_delivered(store, qid, "example.com", ["a@example.com"], "250 ok") is None
    reader.close()
    with pytest.raises(KeyError):  # before housekeeping's reclaim too: no queue row refers to it
        unread.read(1)  # the message is gone: an error, never another message's bytes
    with pytest.raises(KeyError):
        store.open_body(qid)


# --- schema.sql and schema.py ------------------------------------------------------------


def test_schema_comments_every_table_and_column(store):
    text = (ROOT / "schema.sql").read_text()
    lines = text.splitlines()
    tables = [r[0] for r in store.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert set(tables) >= {"messages", "queue", "recipients", "flushes", "events"}
    for table in tables:
        start = next(i for i, l in enumerate(lines) if re.match(rf"CREATE TABLE IF NOT EXISTS {table} \(", l))
        assert lines[start - 1].startswith("--"), f"table {table} has no comment above it"
        end = next(i for i in range(start, len(lines)) if lines[i].startswith(")"))  # ");" or ") WITHOUT ROWID;"
        defined = set()
        for line in lines[start + 1:end]:
            if not line.strip() or line.strip().startswith("--"):
                continue
            assert "--" in line, f"{table}: no comment on: {line.strip()}"
            defined.add(line.split()[0])
        columns = {r[1] for r in store.connection.execute(f"PRAGMA table_info({table})")}
        assert columns <= defined, f"{table}: columns not on their own commented line: {columns - defined}"
    for kind in ("VIEW", "INDEX", "TRIGGER"):
        for i, l in enumerate(lines):
            if l.startswith(f"CREATE {kind}"):
                assert lines[i - 1].startswith("--"), l


def test_schema_text_from_checkout():
    assert schema_mod.schema_text() == (ROOT / "schema.sql").read_text()


def test_schema_text_from_a_zipapp(tmp_path):
    bundle = tmp_path / "bundle.pyz"
    with zipfile.ZipFile(bundle, "w") as z:
        for name in ("__init__.py", "schema.py"):
            z.write(ROOT / "backupmx" / name, f"backupmx/{name}")
        z.write(ROOT / "schema.sql", "backupmx/schema.sql")
    code = f"import sys; sys.path.insert(0, {str(bundle)!r}); import backupmx.schema as s; " \
           "assert s.__file__.startswith(sys.path[0]), s.__file__; print(s.schema_version()); print(len(s.schema_text()))"
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(schema_mod.schema_version()), str(len((ROOT / "schema.sql").read_text()))]


# --- lifecycle additions (helper "lifecycle") ---------------------------------------


def test_new_queue_has_incremental_auto_vacuum(store):
    assert store.connection.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL


def test_version_1_queue_gets_the_new_columns(db_path, clock):
    # A queue written by schema version 1: without queue.delay_warned, recipients.dsn_claimed
    # (version 2) and messages.smtputf8 (version 3).
    text = (ROOT / "schema.sql").read_text()
    old = "\n".join(l for l in text.splitlines()
                    if not re.match(r"\s+(delay_warned|dsn_claimed|smtputf8)\s+INTEGER", l))
    old = re.sub(r"PRAGMA user_version = \d+;", "PRAGMA user_version = 1;", old)
    old = re.sub(r"CREATE INDEX IF NOT EXISTS queue_unwarned [^;]*;", "", old)  # on delay_warned
    shell = sqlite3.connect(db_path, isolation_level=None)
    shell.executescript(old)
    assert "dsn_claimed" not in {r[1] for r in shell.execute("PRAGMA table_info(recipients)")}
    shell.close()
    s = QueueStore(db_path, clock=clock)
    try:
        assert s.connection.execute("PRAGMA user_version").fetchone()[0] == schema_mod.schema_version() >= 2
        assert "delay_warned" in {r[1] for r in s.connection.execute("PRAGMA table_info(queue)")}
        assert "smtputf8" in {r[1] for r in s.connection.execute("PRAGMA table_info(messages)")}
        qid = put(s, "a@example.com")
        assert [m.smtputf8 for m in s.messages_for_flush("example.com")] == [0]
        record_failed(s, qid, "example.com", ["a@example.com"], "550 no")
        assert [b.queue_id for b in s.claim_dsns()] == [qid]
    finally:
        s.close()
    QueueStore(db_path, clock=clock).close()  # opening again changes nothing


def assert_totals_counted(db):
    """queue_totals says what the queue holds."""
    assert db.execute("SELECT domain, state, messages, bytes FROM queue_totals WHERE messages > 0"
                      " ORDER BY 1, 2").fetchall() == \
        db.execute("SELECT domain, state, COUNT(*), SUM(message_size) FROM queue GROUP BY 1, 2 ORDER BY 1, 2").fetchall()


def test_a_version_9_queue_is_counted_in_queue_totals(db_path, clock):
    """tests/data/schema-v9.sql is schema.sql before queue_totals and the queue's copies of
    size and arrival time (schema 10): the migration copies them and counts the totals, and
    a row an older backupmx writes afterwards (without the copies) is filled in and counted."""
    shell = sqlite3.connect(db_path, isolation_level=None)
    shell.executescript((ROOT / "tests" / "data" / "schema-v9.sql").read_text())
    rows = [("M1", "a.test", "queued", 10, T0 - 300), ("M1", "b.test", "queued", 10, T0 - 300),
            ("M2", "a.test", "held", 200, T0 - 100), ("M3", "a.test", "failed", 3000, T0 - 50),
            ("M4", "a.test", "queued", 40000, T0 - 400)]
    for qid, domain, state, size, at in rows:
        shell.execute("INSERT OR IGNORE INTO messages (queue_id, sender, received_at, size, body)"
                      " VALUES (?, 's@x.test', ?, ?, zeroblob(?))", (qid, at, size, size))
        shell.execute("INSERT INTO queue (queue_id, domain, state, state_changed) VALUES (?, ?, ?, ?)",
                      (qid, domain, state, at))
        shell.execute("INSERT INTO recipients (queue_id, domain, address, state) VALUES (?, ?, ?, ?)",
                      (qid, domain, f"u@{domain}", state if state != "held" else "queued"))
    shell.close()
    s = QueueStore(db_path, clock=clock)
    try:
        db = s.connection
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_mod.schema_version() >= 10
        assert db.execute("SELECT domain, state, messages, bytes FROM queue_totals WHERE messages > 0"
                          " ORDER BY 1, 2").fetchall() == [("a.test", "failed", 1, 3000), ("a.test", "held", 1, 200),
                                                           ("a.test", "queued", 2, 40010), ("b.test", "queued", 1, 10)]
        assert db.execute("SELECT domain, messages, bytes, oldest FROM queue_summary ORDER BY 1").fetchall() == \
            [("a.test", 3, 40210, T0 - 400), ("b.test", 1, 10, T0 - 300)]
        assert [m.queue_id for m in s.messages_for_flush("a.test")] == ["M4", "M1"]
        assert s.usage("a.test") == (3, 40210)
        # A row written by hand without the copies (as a backupmx of schema 9 wrote it) ...
        db.execute("INSERT INTO messages (queue_id, sender, received_at, size, first_chunk, last_chunk)"
                   " VALUES ('M5', 's@x.test', ?, 7, 1, 0)", (T0,))
        db.execute("INSERT INTO queue (queue_id, domain, state, state_changed) VALUES ('M5', 'b.test', 'queued', ?)",
                   (T0,))
        db.commit()
        assert db.execute("SELECT message_size, message_received_at FROM queue WHERE queue_id = 'M5'").fetchone() \
            == (7, T0)
        assert s.usage("b.test") == (2, 17)
        # ... and ours, delivered and deleted.
        record_delivered(s, "M1", "a.test", ["u@a.test"], "250 ok")
        assert s.delete(queue_id="M3") == 1 and s.release(queue_id="M2") == 1
        assert s.usage("a.test") == (2, 40200)
        assert_totals_counted(db)
    finally:
        s.close()


def test_a_version_10_queue_s_bodies_move_into_chunks(db_path, clock):
    """tests/data/schema-v10.sql is schema.sql before body_chunks (schema 11): schema 13's
    rebuild moves the bodies still in messages.body into body_chunks (a WITHOUT ROWID
    table has no blob to open), and deleting them leaves nothing behind."""
    shell = sqlite3.connect(db_path, isolation_level=None)
    shell.executescript((ROOT / "tests" / "data" / "schema-v10.sql").read_text())
    old_bodies = {"OLD1": b"", "OLD2": b"Subject: old\r\n\r\nhello\r\n", "OLD3": random.randbytes(300_000)}
    for qid, body in old_bodies.items():
        shell.execute("INSERT INTO messages (queue_id, sender, received_at, size, body) VALUES (?, 's@x.test', ?, ?, ?)",
                      (qid, T0, len(body), body))
        shell.execute("INSERT INTO queue (queue_id, domain, state, state_changed, message_size, message_received_at)"
                      " VALUES (?, 'example.com', 'queued', ?, ?, ?)", (qid, T0, len(body), T0))
        shell.execute("INSERT INTO recipients (queue_id, domain, address) VALUES (?, 'example.com', 'a@example.com')",
                      (qid,))
    shell.close()
    s = QueueStore(db_path, clock=clock)
    try:
        db = s.connection
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_mod.schema_version() >= 11
        assert db.execute("SELECT oldest_version FROM schema_compat").fetchone()[0] == 13
        assert "body" not in {r[1] for r in db.execute("PRAGMA table_info(messages)")}
        # OLD1 is empty: no chunk; OLD2 one; OLD3 several (chunk_lengths).
        ranges = dict((q, (f, l)) for q, f, l in db.execute("SELECT queue_id, first_chunk, last_chunk FROM messages"))
        assert ranges["OLD1"][1] == ranges["OLD1"][0] - 1 and ranges["OLD2"][0] == ranges["OLD2"][1]
        assert ranges["OLD3"][1] - ranges["OLD3"][0] + 1 == len(chunk_lengths(300_000, s.page_size())) > 1
        new = put(s, "b@example.com", body=b"new\r\n" * 1000)
        assert {qid: s.open_body(qid).read() for qid in old_bodies} == old_bodies
        with s.open_body("OLD3") as reader:  # refills after the first: from its chunks
            reader.seek(1000)
            assert reader.read(10) == old_bodies["OLD3"][1000:1010]
            reader.seek(5)
            assert reader.read(100) == old_bodies["OLD3"][5:105]
        assert s.open_body(new).read() == b"new\r\n" * 1000
        shell = sqlite3.connect(db_path)
        assert dict(shell.execute("SELECT queue_id, body FROM message_bodies")) == {**old_bodies, new: b"new\r\n" * 1000}
        shell.close()
        assert s.delete(queue_id="OLD3") == 1
        record_delivered(s, new, "example.com", ["b@example.com"], "250 ok")
        assert reclaim(s) == 2
        assert db.execute("SELECT id FROM body_chunks").fetchall() == [(ranges["OLD2"][0],)]  # OLD2's, waiting
        assert db.execute("SELECT domain, state, messages, bytes FROM queue_totals WHERE messages > 0").fetchall() == \
            [("example.com", "queued", 2, len(old_bodies["OLD2"]))]
    finally:
        s.close()


def test_a_version_11_queue_keeps_its_queued_events_and_gets_none_twice(db_path, clock):
    """tests/data/schema-v11.sql is schema.sql before the accept stopped writing `queued`
    events (schema 12): a message queued the schema 11 way keeps its event, one in its history
    however it leaves; a message queued since has none until its row leaves."""
    shell = sqlite3.connect(db_path, isolation_level=None)
    shell.executescript((ROOT / "tests" / "data" / "schema-v11.sql").read_text())
    body = b"Subject: old\r\n\r\nhello\r\n"
    for qid in ("OLD1", "OLD2"):  # as schema 11's Intake wrote them
        shell.execute("INSERT INTO body_chunks (data) VALUES (?)", (body,))
        chunk = shell.execute("SELECT MAX(id) FROM body_chunks").fetchone()[0]
        shell.execute("INSERT INTO messages (queue_id, sender, received_at, size, body, first_chunk, last_chunk,"
                      " client) VALUES (?, 's@x.test', ?, ?, 0, ?, ?, '192.0.2.9')", (qid, T0, len(body), chunk, chunk))
        shell.execute("INSERT INTO queue (queue_id, domain, state, state_changed, message_size, message_received_at)"
                      " VALUES (?, 'example.com', 'queued', ?, ?, ?)", (qid, T0, len(body), T0))
        shell.execute("INSERT INTO recipients (queue_id, domain, address) VALUES (?, 'example.com', 'a@example.com')",
                      (qid,))
        shell.execute("INSERT INTO events (at, queue_id, domain, what, detail) VALUES (?, ?, 'example.com', 'queued',"
                      " 'from=<s@x.test> to=<a@example.com> size=22 client=192.0.2.9')", (T0, qid))
    shell.close()
    s = QueueStore(db_path, clock=clock)
    try:
        db = s.connection
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_mod.schema_version() >= 12
        assert db.execute("SELECT oldest_version FROM schema_compat").fetchone()[0] == 13
        old_event = Event(T0, "example.com", "queued", "from=<s@x.test> to=<a@example.com> size=22 client=192.0.2.9")
        assert s.show("OLD1").events == [old_event]  # the recorded one, not a second from the row
        new = put(s, "b@example.com")
        assert db.execute("SELECT COUNT(*) FROM events WHERE queue_id = ?", (new,)).fetchone()[0] == 0
        clock.now += 5
        record_delivered(s, "OLD1", "example.com", ["a@example.com"], "250 ok")
        assert s.delete(queue_id="OLD2") == 1
        record_delivered(s, new, "example.com", ["b@example.com"], "250 ok")
        assert [e.what for e in s.history("OLD1")] == ["queued", "delivered"] and s.history("OLD1")[0] == old_event
        assert [e.what for e in s.history("OLD2")] == ["queued", "deleted"]
        assert [e.what for e in s.history(new)] == ["queued", "delivered"]
        assert reclaim(s) == 3
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    finally:
        s.close()


def test_the_history_shows_the_arrival_while_the_message_waits_and_after_it_left(store, clock):
    """The accept writes no `queued` event (schema 12): `show` reads a waiting row's arrival
    from the row, and the row leaves it in the history when it goes (trigger queue_history)."""
    qid = put(store, "a@one.test", "b@one.test", "c@two.test")
    size = store.show(qid).size
    assert counts(store.path)[3] == 0  # no events row for the accept
    arrival = {domain: Event(T0, domain, "queued", f"from=<sender@example.org> to={to} size={size} client=192.0.2.1")
               for domain, to in (("one.test", "<a@one.test>,<b@one.test>"), ("two.test", "<c@two.test>"))}
    assert store.show(qid).events == store.history(qid) == [arrival["one.test"], arrival["two.test"]]
    clock.now += 10
    record_deferred(store, qid, "one.test", ["a@one.test", "b@one.test"], "451 later")
    assert store.delete(queue_id=qid, domain="two.test") == 1  # its recipients still there: named as before
    whats = [(e.domain, e.what) for e in store.history(qid)]
    assert whats == [("one.test", "queued"), ("two.test", "queued"), ("one.test", "deferred"), ("two.test", "deleted")]
    assert store.history(qid)[1] == arrival["two.test"]
    clock.now += 10
    record_delivered(store, qid, "one.test", ["a@one.test", "b@one.test"], "250 ok")
    assert store.show(qid) is None
    history = store.history(qid)
    # The delivered recipients left with their `delivered` event, before the row.
    assert history[0] == Event(T0, "one.test", "queued", f"from=<sender@example.org> size={size} client=192.0.2.1")
    assert [e.what for e in history] == ["queued", "queued", "deferred", "deleted", "delivered"]
    assert "to=<a@one.test>,<b@one.test>" in history[-1].detail
    # A message deleted by hand in the sqlite3 shell leaves its arrival too.
    other = put(store, "d@one.test")
    store.connection.execute("DELETE FROM messages WHERE queue_id = ?", (other,))
    assert [e.what for e in store.history(other)] == ["queued"]


def test_the_group_commit_gives_a_rolled_back_message_s_chunks_and_queueing_back(store):
    """One group commit asks for the next chunk id once and sets a domain's queueing_since
    once: a message rolled back in the middle leaves neither a hole in the next one's body
    nor the next one's domain without its start of queueing."""
    from backupmx.store import Submission

    bodies = [b"a" * 3000, b"b" * 2500, b"c" * 7000, b"d" * 10]
    batch = [Submission(store.new_queue_id(), envelope(f"r{n}@{domain}"), body, len(body), "192.0.2.1", "c")
             for n, (domain, body) in enumerate(zip(["ok.test", "new.test", "new.test", "ok.test"], bodies))]
    batch[1].size += 1  # its body is one byte short: ValueError after some of its chunks are written
    problems = store.enqueue_many(batch)
    assert problems[0] is None and isinstance(problems[1], ValueError) and problems[2:] == [None, None]
    assert [s.started_queueing for s in batch] == [["ok.test"], [], ["new.test"], []]
    for submission, body in zip(batch, bodies):
        if submission is not batch[1]:
            assert store.open_body(submission.queue_id).read() == body
    db = store.connection
    assert db.execute("SELECT COUNT(*) FROM domain_status WHERE queueing_since IS NOT NULL").fetchone()[0] == 2
    ranges = db.execute("SELECT first_chunk, last_chunk FROM messages ORDER BY first_chunk").fetchall()
    assert [first for first, _ in ranges[1:]] == [last + 1 for _, last in ranges[:-1]]  # no hole
    assert db.execute("SELECT COUNT(*), MAX(id) FROM body_chunks").fetchone() == (ranges[-1][1], ranges[-1][1])
    another = Submission(store.new_queue_id(), envelope("e@new.test"), b"e", 1, "192.0.2.1", "c")
    assert store.enqueue_many([another]) == [None] and another.started_queueing == []  # already queueing


def test_auth_failures_are_counted_per_client_within_the_window(store, clock):
    for _ in range(3):
        store.record_auth_failure("192.0.2.7", 3600)
    store.record_auth_failure("2001:db8:1:2::/64", 3600)
    assert store.auth_failures("192.0.2.7", 3600) == 3
    assert store.auth_failures("192.0.2.8", 3600) == 0
    clock.now += 1800
    assert store.record_auth_failure("192.0.2.7", 3600) == 4
    clock.now += 1801  # the first three are older than the window now
    assert store.auth_failures("192.0.2.7", 3600) == 1
    assert store.record_auth_failure("192.0.2.7", 3600) == 2  # and they went with this write
    assert store.connection.execute("SELECT COUNT(*) FROM auth_failures WHERE client = '192.0.2.7'").fetchone()[0] == 2
    assert store.purge_auth_failures(3600) == 1  # the /64's, from the start
    assert store.auth_failures("2001:db8:1:2::/64", 3600) == 0


def test_an_older_queue_gets_the_auth_failures_table(db_path, clock):
    text = (ROOT / "schema.sql").read_text()
    old = re.sub(r"CREATE TABLE IF NOT EXISTS auth_failures \(.*?\);\n", "", text, flags=re.S)
    old = re.sub(r"CREATE INDEX IF NOT EXISTS auth_failures_client .*?;\n", "", old)
    old = re.sub(r"PRAGMA user_version = \d+;", f"PRAGMA user_version = {schema_mod.schema_version() - 1};", old)
    assert "CREATE TABLE IF NOT EXISTS auth_failures" not in old
    shell = sqlite3.connect(db_path, isolation_level=None)
    shell.executescript(old)
    shell.close()
    s = QueueStore(db_path, clock=clock)
    try:
        assert s.connection.execute("PRAGMA user_version").fetchone()[0] == schema_mod.schema_version() >= 6
        assert s.record_auth_failure("192.0.2.7", 60) == 1
    finally:
        s.close()


def test_dsn_claims(store, clock):
    a = put(store, "a@example.com", "b@example.com")
    record_failed(store, a, "example.com", ["a@example.com"], "550 no")
    [bounce] = store.claim_dsns()
    assert [r.address for r in bounce.recipients] == ["a@example.com"]
    assert (bounce.attempts, bounce.last_attempt, bounce.last_reply, bounce.size) == (1, T0, "550 no", 22)
    assert store.claim_dsns() == []  # claimed: nobody else gets it
    assert [b.queue_id for b in store.pending_dsns()] == [a]  # but it is still due
    store.release_dsns(a, "example.com", ["a@example.com"], "relay down")
    [again] = store.claim_dsns()
    store.dsn_sent(a, "example.com", ["a@example.com"])
    assert store.claim_dsns() == [] and store.pending_dsns() == []
    # A recipient that fails (again) after a requeue is due again.
    record_failed(store, a, "example.com", ["b@example.com"], "550 no")
    store.dsn_sent(a, "example.com", ["b@example.com"])
    assert store.requeue(queue_id=a) == 1
    record_failed(store, a, "example.com", ["a@example.com"], "550 still no")
    assert [r.last_reply for b in store.claim_dsns() for r in b.recipients] == ["550 still no"]


def test_delay_warning_claims(store, clock):
    a = put(store, "a@example.com")
    clock.now += 100
    b = put(store, "b@example.com")
    assert [x.queue_id for x in store.claim_delay_warnings(100)] == [a]
    assert store.claim_delay_warnings(100) == []  # once per row
    clock.now += 100
    assert [x.queue_id for x in store.claim_delay_warnings(100)] == [b]
    store.release_delay_warning(b, "example.com", "relay down")
    assert [x.queue_id for x in store.claim_delay_warnings(100)] == [b]
    store.delay_warning_done(b, "example.com", ["b@example.com"])
    assert [e.what for e in store.history(b)][-2:] == ["dsn-failed", "delay-warning"]


def test_delay_warning_claims_the_oldest_across_domains_one_range_each(store, clock):
    """The look asks each domain for its oldest unwarned rows (queue_unwarned, domain
    first: a flush's deletes stay side by side in it) and keeps the oldest of them all;
    the domains come from the index, so totals gone wrong hide none."""
    ages = {}
    for i, domain in enumerate(["one.test", "two.test", "three.test"] * 3):
        ages[put(store, f"u{i}@{domain}")] = i
        clock.now += 10
    oldest = sorted(ages, key=ages.get)
    clock.now += 1000
    assert [(x.queue_id, x.domain) for x in store.claim_delay_warnings(100, limit=4)] == \
        [(q, d) for q, d in zip(oldest[:4], ["one.test", "two.test", "three.test", "one.test"])]
    db = sqlite3.connect(store.path, isolation_level=None)
    try:
        db.execute("DELETE FROM queue_totals")  # totals gone wrong: the look finds the domains in the queue itself
        assert [x.queue_id for x in store.claim_delay_warnings(100, limit=10)] == oldest[4:]
        [(sql,)] = db.execute("SELECT sql FROM sqlite_master WHERE name = 'queue_unwarned'").fetchall()
        assert "(domain, message_received_at)" in sql
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'queue_delay_due'").fetchall() == []
    finally:
        db.close()


def test_group_commit_leaves_out_only_the_message_that_cannot_be_queued(store):
    from backupmx.store import QuotaExceeded, Submission

    put(store, "a@quota.test")
    body = b"Subject: x\r\n\r\nbody\r\n"
    batch = [Submission(store.new_queue_id(), envelope(f"r{n}@{domain}"), body, len(body), "192.0.2.1", "c")
             for n, domain in enumerate(["ok.test", "quota.test", "ok.test"])]
    problems = store.enqueue_many(batch, quotas={"quota.test": (1, None)})
    assert problems[0] is None and problems[2] is None
    assert isinstance(problems[1], QuotaExceeded)
    queued = {row.queue_id for row in store.list_messages()}
    assert batch[0].queue_id in queued and batch[2].queue_id in queued and batch[1].queue_id not in queued


def test_counts_ride_along_with_the_group_commit_and_never_wait_when_asked(store, db_path):
    """review-1 m3: a worker's refusal counts go in the mail's transaction; written on their
    own, they do not wait for another process's write lock (the event loop must not)."""
    from backupmx.store import Submission

    submission = Submission(store.new_queue_id(), envelope("a@example.com"), b"x\r\n", 3, "192.0.2.1", "c.test")
    assert store.enqueue_many([submission], counts={"rejects": {"relay_denied": 2}}) == [None]
    assert store.counters()[("rejects", "relay_denied")] == 2
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(QueueUnavailable):
            store.add_counts("rejects", {"relay_denied": 1}, wait=False)
        assert time.monotonic() - started < 1.0  # not the 5 s busy timeout
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.connection.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    store.add_counts("rejects", {"relay_denied": 1}, wait=False)
    assert store.counters()[("rejects", "relay_denied")] == 3


def test_a_wrong_total_never_holds_mail_back(store, clock):
    """queue_totals is what is shown and what the quotas count; whether a domain has mail to
    flush, claim or expire is asked of the queue. A total set wrong by hand (schema.sql's
    header: an OR REPLACE in the sqlite3 shell, a reset while the server ran) changes a number,
    never which mail moves: too low, the mail still flushes and expires; too high, an empty
    domain is not flushed."""
    qid = put(store, "bob@example.com")
    db = store.connection
    db.execute("UPDATE queue_totals SET messages = -1 WHERE domain = 'example.com' AND state = 'queued'")
    db.execute("UPDATE queue_totals SET messages = 5 WHERE domain = 'example.net' AND state = 'queued'")
    db.execute("INSERT OR IGNORE INTO queue_totals (domain, state, messages) VALUES ('example.net', 'queued', 5)")
    db.commit()
    assert store.request_flush(["example.com", "example.net"]) == {"example.com": 1, "example.net": 0}
    assert store.claim_domains(["example.com", "example.net"], "odmr-1", 60.0) == {"example.com": 1}
    store.release_flush("example.com", "odmr-1")
    clock.now += 10 * 86400
    assert [row.queue_id for row in store.expire_rows({}, 86400.0)] == [qid]


# --- schema 13: the mail's tables clustered by domain --------------------------------


def fill_schema_12(path):
    """A queue as schema 12 left it (tests/data/schema-v12.sql, its triggers at work): mail of
    two domains mixed, recipients in an RCPT order that is not the key's, a body still in
    messages.body (queued before schema 11), a failed row with its DSN due, history, totals."""
    shell = sqlite3.connect(path, isolation_level=None)
    shell.executescript((ROOT / "tests" / "data" / "schema-v12.sql").read_text())
    rng = random.Random(1312)
    bodies = {}
    for n in range(12):
        qid = f"M{n:02d}"
        bodies[qid] = body = rng.randbytes(rng.choice([0, 40, 3000, 70_000]))
        if n == 3:  # as schema 10 wrote it
            shell.execute("INSERT INTO messages (queue_id, sender, received_at, size, body, client)"
                          " VALUES (?, ?, ?, ?, ?, '192.0.2.3')", (qid, f"s{n}@x.test", T0 - 100 * n, len(body), body))
        else:  # as schema 11 and 12 did: body 0, the pieces in body_chunks
            first = shell.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM body_chunks").fetchone()[0]
            pieces = [body[i:i + 1000] for i in range(0, len(body), 1000)]
            shell.executemany("INSERT INTO body_chunks (id, data) VALUES (?, ?)", enumerate(pieces, first))
            shell.execute("INSERT INTO messages (queue_id, sender, received_at, size, body, first_chunk, last_chunk,"
                          " client, smtputf8, envid) VALUES (?, ?, ?, ?, 0, ?, ?, '192.0.2.9', ?, ?)",
                          (qid, f"s{n}@x.test", T0 - 100 * n, len(body), first, first + len(pieces) - 1, n % 3,
                           f"env{n}"))
        for domain in (["a.test", "b.test"] if n % 4 == 0 else ["ab"[n % 2] + ".test"]):
            state = "held" if n == 5 else "failed" if n == 6 else "queued"
            shell.execute("INSERT INTO queue (queue_id, domain, state, attempts, state_changed, message_received_at,"
                          " message_size) VALUES (?, ?, ?, ?, ?, ?, ?)", (qid, domain, state, n, T0, T0 - 100 * n,
                                                                           len(body)))
            for local in ("zed", "amy", f"m{n}"):  # RCPT order: z, a, m
                shell.execute("INSERT INTO recipients (queue_id, domain, address, state, last_reply, notify)"
                              " VALUES (?, ?, ?, ?, ?, 'FAILURE')",
                              (qid, domain, f"{local}@{domain}", "failed" if state == "failed" else "queued",
                               "550 no" if state == "failed" else None))
    shell.execute("INSERT INTO events (at, queue_id, domain, what, detail) VALUES (?, 'M01', 'b.test', 'deferred',"
                  " 'to=<zed@b.test> reply=\"451 later\"')", (T0,))
    shell.execute("DELETE FROM queue WHERE queue_id = 'M11'")  # left before the upgrade: its `queued` event
    shell.close()
    del bodies["M11"]
    return bodies


def dump(path, body_column):
    """Everything a queue holds of its mail, in comparable form (recipients in their RCPT order)."""
    shell = sqlite3.connect(path)
    try:
        columns = [r[1] for r in shell.execute("PRAGMA table_info(messages)")
                   if r[1] not in ("body", "first_chunk", "last_chunk")]
        return {
            "messages": shell.execute(f"SELECT {', '.join(columns)} FROM messages ORDER BY queue_id").fetchall(),
            "bodies": dict(shell.execute("SELECT queue_id, body FROM message_bodies")),
            "queue": shell.execute("SELECT queue_id, domain, state, attempts, last_attempt, last_reply, next_attempt,"
                                   " state_changed, delay_warned, message_received_at, message_size FROM queue"
                                   " ORDER BY queue_id, domain").fetchall(),
            "recipients": shell.execute("SELECT queue_id, domain, address, notify, orcpt, state, last_reply, dsn_sent,"
                                        f" dsn_claimed FROM recipients ORDER BY queue_id, domain, {body_column}"
                                        ).fetchall(),
            "totals": shell.execute("SELECT * FROM queue_totals WHERE messages > 0 ORDER BY 1, 2").fetchall(),
            "events": shell.execute("SELECT * FROM events ORDER BY id").fetchall(),
            "status": shell.execute("SELECT * FROM domain_status ORDER BY 1").fetchall(),
            "counters": shell.execute("SELECT * FROM counters ORDER BY 1, 2").fetchall(),
        }
    finally:
        shell.close()


def schema_objects(path):
    shell = sqlite3.connect(path)
    try:
        return shell.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    finally:
        shell.close()


def test_a_version_12_queue_is_rebuilt_clustered_by_domain_and_keeps_all_its_mail(tmp_path, clock, monkeypatch,
                                                                                   caplog):
    """Schema 13 rebuilds messages, queue and recipients (WITHOUT ROWID, domain first) at the
    first `serve`: every message, body, row, recipient (in its RCPT order), total and event is
    as it was, the schema is exactly a new queue's (tables, indexes, triggers, views), the
    triggers work, and a backupmx of schema 12 refuses the queue from then on."""
    from backupmx import store_db
    from backupmx.config import load_config
    from backupmx.startup import check_queue
    from conftest import write_config

    path = str(tmp_path / "old.db")
    bodies = fill_schema_12(path)
    before = dump(path, "rowid")
    assert before["bodies"] == bodies and len(before["recipients"]) == 3 * 14 and len(before["events"]) == 2
    shell = sqlite3.connect(path, isolation_level=None)
    shell.execute("CREATE VIEW my_report AS SELECT domain, COUNT(*) AS n FROM queue GROUP BY domain")  # the operator's
    shell.execute("INSERT INTO recipients (queue_id, domain, address) VALUES ('GONE', 'a.test', 'x@a.test')")  # orphan
    shell.close()
    config = load_config(write_config(tmp_path / "backupmx.ini", port=free_port(), queue=path))
    with caplog.at_level(logging.INFO, logger="backupmx"):
        check_queue(config)  # what `serve` does first
    assert [r.getMessage().split()[0] for r in caplog.records] == ["queue-rebuild", "queue-rebuilt"]
    assert dump(path, "position") == before  # but the orphan recipient: it was never delivered
    QueueStore(str(tmp_path / "new.db"), clock=clock).close()
    assert [o for o in schema_objects(path) if o[1] != "my_report"] == schema_objects(str(tmp_path / "new.db"))
    assert marks(path) == (15, 13) == (schema_mod.schema_version(), 13)
    shell = sqlite3.connect(path)
    assert shell.execute("SELECT * FROM my_report").fetchall() == [("a.test", 6), ("b.test", 8)]
    assert shell.execute("PRAGMA foreign_key_check").fetchall() == []
    assert shell.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    shell.close()
    s = QueueStore(path, clock=clock)
    try:
        assert [(m.queue_id, [r.address for r in m.recipients]) for m in s.messages_for_flush("a.test")][:3] == \
            [("M10", ["zed@a.test", "amy@a.test", "m10@a.test"]), ("M08", ["zed@a.test", "amy@a.test", "m8@a.test"]),
             ("M04", ["zed@a.test", "amy@a.test", "m4@a.test"])]
        assert {qid: s.open_body(qid).read() for qid in bodies} == bodies
        assert [b.queue_id for b in s.claim_dsns()] == ["M06"]
        # The triggers: a delivery, a deletion by hand (foreign_keys off, as in the shell).
        record_delivered(s, "M01", "b.test", ["zed@b.test", "amy@b.test", "m1@b.test"], "250 ok")
        shell = sqlite3.connect(path, isolation_level=None)
        shell.execute("DELETE FROM messages WHERE queue_id = 'M03'")
        shell.close()
        db = s.connection
        for qid in ("M01", "M03"):
            assert db.execute("SELECT COUNT(*) FROM queue WHERE queue_id = ?", (qid,)).fetchone()[0] == 0
            assert db.execute("SELECT COUNT(*) FROM recipients WHERE queue_id = ?", (qid,)).fetchone()[0] == 0
            assert "queued" in [e.what for e in s.history(qid)]
        assert db.execute("SELECT COUNT(*) FROM body_chunks").fetchone()[0] == \
            db.execute("SELECT COALESCE(SUM(last_chunk - first_chunk + 1), 0) FROM messages").fetchone()[0]
        assert_totals_counted(db)
    finally:
        s.close()
    # A backupmx of schema 12 (its open's rule, the same since schema 6) refuses the queue now.
    monkeypatch.setattr(store_db, "schema_version", lambda text=None: 12)
    with pytest.raises(QueueUnavailable, match="needs schema 13"):
        QueueStore(path, clock=clock, read_only=True)


def test_a_rebuild_killed_half_way_leaves_the_old_queue_as_it_was(tmp_path, clock):
    """kill -9 in the middle of schema 13's rebuild (the old tables renamed, the new ones
    half filled): the migration is one transaction, so the queue is schema 12's, whole,
    and the next start rebuilds it."""
    path = str(tmp_path / "old.db")
    bodies = fill_schema_12(path)
    before, objects = dump(path, "rowid"), schema_objects(path)
    killer = ("import os, signal, sys; from backupmx import store_db, store_migrations\n"
              "def kill(*args): os.kill(os.getpid(), signal.SIGKILL)\n"
              "store_migrations._bodies_into_chunks = kill\n"
              "store_db.QueueDatabase(sys.argv[1])\n")
    done = subprocess.run([sys.executable, "-c", killer, path], cwd=ROOT, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert dump(path, "rowid") == before and schema_objects(path) == objects
    assert marks(path) == (12, 11)
    with QueueStore(path, clock=clock) as s:
        assert {qid: s.open_body(qid).read() for qid in bodies} == bodies
    assert dump(path, "position") == before


# --- schema 14: a message's own deletion deferred to housekeeping's reclaim -------------


def queue_by_hand(shell, messages):
    """Messages queued in an old schema's file as its backupmx wrote them: {queue id: domains},
    a one-chunk body each, a recipient u@ each domain."""
    for qid, domains in messages.items():
        shell.execute("INSERT INTO body_chunks (data) VALUES (?)", (b"Subject: x\r\n\r\n" + qid.encode(),))
        chunk = shell.execute("SELECT MAX(id) FROM body_chunks").fetchone()[0]
        shell.execute("INSERT INTO messages (queue_id, sender, received_at, size, first_chunk, last_chunk)"
                      " VALUES (?, 's@x.test', ?, 15, ?, ?)", (qid, T0, chunk, chunk))
        for domain in domains:
            shell.execute("INSERT INTO queue (queue_id, domain, state_changed) VALUES (?, ?, ?)", (qid, domain, T0))
            shell.execute("INSERT INTO recipients (queue_id, domain, address) VALUES (?, ?, ?)",
                          (qid, domain, f"u@{domain}"))


def test_a_version_13_queue_gets_the_reclaim_and_a_delivered_message_waits_for_it(tmp_path, clock, monkeypatch):
    """tests/data/schema-v13.sql is schema.sql before the reclaim: the migration replaces
    trigger queue_gone (and view message_bodies) in its transaction and adds table reclaim,
    so that the schema is exactly a new queue's; a message delivered then waits to be
    reclaimed, a two-domain one until both delivered; a backupmx of schema 13 still opens it."""
    from backupmx import store_db

    path = str(tmp_path / "old.db")
    shell = sqlite3.connect(path, isolation_level=None)
    shell.executescript((ROOT / "tests" / "data" / "schema-v13.sql").read_text())
    queue_by_hand(shell, {"M1": ["a.test", "b.test"], "M2": ["a.test"]})
    shell.close()
    assert marks(path) == (13, 13)
    with QueueStore(path, clock=clock) as s:
        assert marks(path) == (15, 13) == (schema_mod.schema_version(), 13)
        record_delivered(s, "M1", "a.test", ["u@a.test"], "250 ok")
        record_delivered(s, "M2", "a.test", ["u@a.test"], "250 ok")
        db = s.connection
        assert db.execute("SELECT queue_id FROM reclaim").fetchall() == [("M2",)]
        assert dict(db.execute("SELECT queue_id, body FROM message_bodies")) == {"M1": b"Subject: x\r\n\r\nM1"}
        assert counts(path)[0] == 2 and counts(path)[4] == 2  # M2's row and chunk wait
        assert reclaim(s) == 1 and counts(path)[0] == 1 and counts(path)[4] == 1
        record_delivered(s, "M1", "b.test", ["u@b.test"], "250 ok")
        assert reclaim(s) == 1 and counts(path) == (0, 0, 0, 6, 0)  # the events: 3 delivered, 3 queued
    QueueStore(str(tmp_path / "new.db"), clock=clock).close()
    assert schema_objects(path) == schema_objects(str(tmp_path / "new.db"))
    monkeypatch.setattr(store_db, "schema_version", lambda text=None: 13)
    QueueStore(path, clock=clock, read_only=True).close()  # oldest_version 13: a rollback still opens it


def test_a_message_queued_again_by_hand_is_not_reclaimed_under_its_row(store):
    """The reclaim deletes a listed message only while no queue row refers to it: a row put
    back by hand in the sqlite3 shell keeps it, and the row's next departure lists it anew."""
    qid = put(store, "a@one.test")
    record_delivered(store, qid, "one.test", ["a@one.test"], "250 ok")
    shell = sqlite3.connect(store.path, isolation_level=None)
    shell.execute("INSERT INTO queue (queue_id, domain, state_changed) VALUES (?, 'one.test', 0)", (qid,))
    shell.execute("INSERT INTO recipients (queue_id, domain, address) VALUES (?, 'one.test', 'a@one.test')", (qid,))
    assert reclaim(store) == 0 and store.show(qid) is not None
    assert shell.execute("SELECT COUNT(*) FROM reclaim").fetchone()[0] == 0
    shell.execute("DELETE FROM queue WHERE queue_id = ?", (qid,))
    shell.close()
    assert reclaim(store) == 1 and counts(store.path)[0] == 0


# --- schema 15: a message's domains in message_domains, not an index of the queue ---------


def domains_of(path, qid):
    db = sqlite3.connect(path)
    try:
        return [d for d, in db.execute("SELECT domain FROM message_domains WHERE queue_id = ? ORDER BY domain", (qid,))]
    finally:
        db.close()


def test_a_two_domain_message_outlives_its_first_delivery_and_is_reclaimed_after_the_second(store):
    """The reclaim and the body reads find a message's other rows through message_domains and
    the queue's key: delivered for one domain it stays (its body still there for the other's
    flush, no longer for the delivered one's), and goes with its names after the second."""
    qid = put(store, "u@a.test", "v@b.test")
    assert domains_of(store.path, qid) == ["a.test", "b.test"]
    assert record_delivered(store, qid, "a.test", ["u@a.test"], "250 ok") is None
    assert reclaim(store) == 0 and counts(store.path)[0] == 1
    assert store.open_body(qid, "b.test").read() == store.open_body(qid).read() == b"Subject: hi\r\n\r\nhello\r\n"
    with pytest.raises(KeyError):
        store.open_body(qid, "a.test")  # a flush of a.test announced it, and the row went meanwhile
    assert [r.domain for r in store.show(qid).rows] == ["b.test"]
    assert domains_of(store.path, qid) == ["a.test", "b.test"]  # a name lives as long as the message
    assert record_delivered(store, qid, "b.test", ["v@b.test"], "250 ok") is None
    with pytest.raises(KeyError):
        store.open_body(qid)
    assert reclaim(store) == 1 and counts(store.path)[:3] == (0, 0, 0) and domains_of(store.path, qid) == []


def test_hand_deletes_with_foreign_keys_off_end_right(store):
    """The sqlite3 shell (foreign_keys off): a row deleted by its key takes its recipients and,
    the message's last, lists it for the reclaim; a message deleted takes its rows (found
    through message_domains), their recipients and its names; nothing else goes."""
    one, two, other = put(store, "u@a.test", "v@b.test"), put(store, "w@a.test", "x@b.test"), put(store, "y@a.test")
    shell = sqlite3.connect(store.path, isolation_level=None)
    assert shell.execute("PRAGMA foreign_keys").fetchone()[0] == 0
    shell.execute("DELETE FROM queue WHERE domain = 'a.test' AND queue_id = ?", (one,))
    assert shell.execute("SELECT queue_id FROM reclaim").fetchall() == []  # its b.test row waits
    shell.execute("DELETE FROM queue WHERE domain = 'b.test' AND queue_id = ?", (one,))
    assert shell.execute("SELECT queue_id FROM reclaim").fetchall() == [(one,)]
    shell.execute("DELETE FROM messages WHERE queue_id = ?", (two,))
    shell.close()
    db = store.connection
    assert db.execute("SELECT queue_id, domain FROM queue").fetchall() == [(other, "a.test")]
    assert db.execute("SELECT queue_id, address FROM recipients").fetchall() == [(other, "y@a.test")]
    assert domains_of(store.path, two) == [] and domains_of(store.path, other) == ["a.test"]
    assert reclaim(store) == 1 and counts(store.path)[0] == 1 and domains_of(store.path, one) == []
    assert db.execute("SELECT COUNT(*) FROM body_chunks").fetchone()[0] == \
        db.execute("SELECT SUM(last_chunk - first_chunk + 1) FROM messages").fetchone()[0]
    assert_totals_counted(db)


def test_a_row_moved_to_another_domain_by_hand_keeps_its_message(store):
    """UPDATE queue SET domain = ... in the shell: the new domain is named too (trigger
    message_domains_moved), or the reclaim would take the message from under the row."""
    qid = put(store, "u@a.test", "v@b.test")
    shell = sqlite3.connect(store.path, isolation_level=None)
    shell.execute("UPDATE recipients SET domain = 'c.test' WHERE domain = 'b.test' AND queue_id = ?", (qid,))
    shell.execute("UPDATE queue SET domain = 'c.test' WHERE domain = 'b.test' AND queue_id = ?", (qid,))
    shell.close()
    assert record_delivered(store, qid, "a.test", ["u@a.test"], "250 ok") is None
    assert reclaim(store) == 0 and store.open_body(qid, "c.test").read()
    assert [r.domain for r in store.show(qid).rows] == ["c.test"]


def test_a_waiting_row_s_name_cannot_be_deleted_or_changed_by_hand(store):
    """A hand DELETE (or UPDATE) of message_domains that would leave a waiting queue row
    unnamed fails whole: the reclaim, not seeing the row, would delete its message under
    it once the message's other row went. A name whose row went may go."""
    qid = put(store, "u@a.test", "v@b.test")
    shell = sqlite3.connect(store.path, isolation_level=None)
    for statement in ("DELETE FROM message_domains WHERE domain = 'b.test'",
                      "DELETE FROM message_domains",
                      "UPDATE message_domains SET domain = 'c.test' WHERE domain = 'b.test'"):
        with pytest.raises(sqlite3.IntegrityError, match="its queue row waits"):
            shell.execute(statement)
    assert record_delivered(store, qid, "a.test", ["u@a.test"], "250 ok") is None
    assert reclaim(store) == 0 and store.open_body(qid, "b.test").read()
    shell.execute("DELETE FROM message_domains WHERE domain = 'a.test'")  # its row was delivered
    shell.close()
    assert domains_of(store.path, qid) == ["b.test"]
    assert record_delivered(store, qid, "b.test", ["v@b.test"], "250 ok") is None
    assert reclaim(store) == 1 and domains_of(store.path, qid) == [] and counts(store.path)[0] == 0


def test_show_hold_and_delete_of_a_message_find_its_rows_by_its_domains(store):
    """`backupmx show|hold|release|delete ID` (the queue's key starts with the domain): every
    row of the message, and only its."""
    qid, other = put(store, "u@a.test", "v@b.test", "w@b.test"), put(store, "x@a.test")
    detail = store.show(qid)
    assert [(r.domain, [x.address for x in r.recipients]) for r in detail.rows] == \
        [("a.test", ["u@a.test"]), ("b.test", ["v@b.test", "w@b.test"])]
    assert sorted(e.domain for e in detail.events if e.what == "queued") == ["a.test", "b.test"]
    assert store.hold(queue_id=qid) == 2 and store.release(queue_id=qid, domain="b.test") == 1
    assert store.connection.execute("SELECT domain, state FROM queue WHERE queue_id = ? AND domain IN"
                                    " ('a.test', 'b.test')", (qid,)).fetchall() == [("a.test", "held"),
                                                                                   ("b.test", "queued")]
    assert store.delete(queue_id=qid) == 2 and store.show(qid) is None and store.show(other) is not None
    assert reclaim(store) == 1 and domains_of(store.path, qid) == []


def test_a_version_14_queue_gets_message_domains_and_loses_the_index_and_the_foreign_key(tmp_path, clock,
                                                                                         monkeypatch):
    """tests/data/schema-v14.sql is schema.sql before message_domains: the migration fills it
    from the queue, replaces queue_gone and messages_gone, drops index queue_message and takes
    the queue's foreign key to messages out of its table (sqlite.org's procedure), so that the
    schema is exactly a new queue's and the file passes integrity_check; the mail is delivered
    and reclaimed right; a backupmx of schema 14 still opens it."""
    from backupmx import store_db

    path = str(tmp_path / "old.db")
    shell = sqlite3.connect(path, isolation_level=None)
    shell.executescript((ROOT / "tests" / "data" / "schema-v14.sql").read_text())
    queue_by_hand(shell, {"M1": ["a.test", "b.test"], "M2": ["a.test"], "M3": ["b.test"]})
    assert [r[2] for r in shell.execute("PRAGMA foreign_key_list(queue)")] == ["messages"]
    shell.close()
    assert marks(path) == (14, 13)
    with QueueStore(path, clock=clock) as s:
        assert marks(path) == (15, 13) == (schema_mod.schema_version(), 13)
        db = s.connection
        assert db.execute("SELECT queue_id, domain FROM message_domains").fetchall() == \
            [("M1", "a.test"), ("M1", "b.test"), ("M2", "a.test"), ("M3", "b.test")]
        assert db.execute("PRAGMA foreign_key_list(queue)").fetchall() == []
        assert db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'queue'"
                          " AND name = 'queue_message'").fetchall() == []
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        record_delivered(s, "M1", "a.test", ["u@a.test"], "250 ok")
        record_delivered(s, "M2", "a.test", ["u@a.test"], "250 ok")
        assert reclaim(s) == 1 and counts(path)[0] == 2  # M2; M1 waits for b.test
        s.delete(queue_id="M3")
        record_delivered(s, "M1", "b.test", ["u@b.test"], "250 ok")
        assert reclaim(s) == 2 and counts(path)[:3] == (0, 0, 0)
        assert db.execute("SELECT COUNT(*) FROM message_domains").fetchone()[0] == 0
    QueueStore(str(tmp_path / "new.db"), clock=clock).close()
    assert schema_objects(path) == schema_objects(str(tmp_path / "new.db"))
    monkeypatch.setattr(store_db, "schema_version", lambda text=None: 14)
    QueueStore(path, clock=clock, read_only=True).close()  # oldest_version 13: a rollback still opens it


def test_a_helper_forked_by_a_flush_does_not_keep_its_parent_s_turn_to_commit(db_path):
    """A flush worker takes the writers' turn (<queue>-commit.lock, a flock) for its outcome
    batches, then forks a helper for its next big flush (flush_sharing.share, inside closed_for_fork).
    A flock belongs to the open file: had the helper inherited that descriptor, the flush
    worker killed (-9, OOM) while it held the turn would leave it held by the helper, every
    SMTP worker's group commit waiting on it, and the helper itself at its own next batch."""
    import fcntl

    from conftest import wait_for

    script = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from backupmx.store import QueueStore\n"
        "store = QueueStore(sys.argv[1])\n"
        "store.record_attempts([])  # an earlier batch: its turn taken, the lock file open\n"
        "with store.closed_for_fork():  # as flush_sharing.share forks its helper\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "print(pid, flush=True)\n"
        "sys.stdin.readline()\n"
        "store.record_attempts([])  # the next batch: the turn, then SQLite's lock (the test's)\n")
    flusher = subprocess.Popen([sys.executable, "-c", script, db_path], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    helper = int(flusher.stdout.readline())
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the flush worker will wait for it, holding its turn
    flusher.stdin.write("go\n")
    flusher.stdin.flush()
    turn = os.open(db_path + "-commit.lock", os.O_RDWR)

    def free():
        try:
            fcntl.flock(turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(turn, fcntl.LOCK_UN)
        return True

    try:
        assert wait_for(lambda: not free(), 5)  # it holds the turn and waits for SQLite's lock
        flusher.kill()
        flusher.wait()
        holder.execute("ROLLBACK")
        assert wait_for(free, 2), "the helper kept its dead parent's turn to commit"
    finally:
        os.close(turn)
        holder.close()
        flusher.stdout.close()
        flusher.stdin.close()
        os.kill(helper, signal.SIGKILL)
        try:
            os.waitpid(helper, 0)
        except ChildProcessError:  # not ours: the flusher's, reaped by init
            pass
