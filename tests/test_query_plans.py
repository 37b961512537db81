"""The queue's hot statements read what they need, not the whole queue (SQLite's EXPLAIN QUERY PLAN).

A small real queue (QueueStore, a file in tmp_path) is driven through what
the SMTP workers, the flushers, housekeeping, ETRN, `backupmx queue`,
`metrics` and `health` do; every statement SQLite runs for them is recorded
(set_trace_callback) and its plan asked for, and so is every statement in
schema.sql's triggers. None may scan one of the tables that grow with the
queue (messages, queue, recipients, events), whole or through a full index:
at a million messages such a scan takes seconds, and inside a write
transaction it stops every SMTP worker's commit for as long (bench/backlog.py).

Left out on purpose, because they read every row by nature: the operator's
listing of the whole queue and `backupmx queue`'s age histogram (one pass over
an index), selections by sender or age. (The retry scan, retry_interval's due
domains, reads the retrying domains' rows on the queue's key: it is here.)
"""

import re
import sqlite3

import pytest

from backupmx.envelope import Envelope, Recipient
from backupmx.outcome import Outcome, Verdict
from backupmx.store import QueueStore
from backupmx.store_operator import Selection
from backupmx.store_housekeeping import RECLAIM_SQL, UNNAMED_ROWS_SQL
from conftest import REPO, queue_one, reclaim

T0 = 1_800_000_000
GROWING = {"messages", "body_chunks", "queue", "recipients", "events", "message_domains"}
ALIASES = {"m": "messages", "q": "queue", "r": "recipients", "d": "message_domains"}  # as the store's joins name them
SMALL_BY_CONSTRUCTION = {"recipients_dsn_due", "queue_kept"}  # partial indexes of the few rows a step acts on


class Clock:
    def __init__(self):
        self.now = float(T0)

    def __call__(self):
        return self.now


def growing_scans(db, statement, args=()):
    """The plan's lines that read a growing table whole."""
    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement, args)]
    bad = []
    for line in plan:
        scan = re.match(r"SCAN (\w+)", line)
        if scan is None:
            continue
        table = ALIASES.get(scan.group(1), scan.group(1))
        index = re.search(r"USING (?:COVERING )?INDEX (\w+)", line)
        if table in GROWING and not (index and index.group(1) in SMALL_BY_CONSTRUCTION):
            bad.append(line)
    return bad


def put(store, *addresses, received_at=None, body=b"Subject: x\r\n\r\nbody\r\n"):
    qid = store.new_queue_id()
    envelope = Envelope("sender@example.org", [Recipient(a, a.rsplit("@", 1)[1]) for a in addresses])
    queue_one(store, qid, envelope, body, len(body), client="192.0.2.1", helo="client.test",
              received_at=received_at, quotas={"one.test": (1000, 10**9)})
    return qid


@pytest.fixture
def queue(tmp_path):
    clock = Clock()
    store = QueueStore(str(tmp_path / "queue.db"), clock=clock)
    for n in range(40):
        put(store, f"u{n}@one.test", f"v{n}@two.test", received_at=T0 - 86400 * (n % 3))
    yield store, clock
    store.close()


def test_the_hot_statements_never_read_a_growing_table_whole(queue):
    store, clock = queue
    statements = []
    store.connection.set_trace_callback(statements.append)
    # An SMTP worker: admission (quota usage) and the group commit with quotas.
    store.usage("one.test")
    put(store, "new@one.test")
    long_one = put(store, "long@one.test", body=b"x" * 20000)  # in several chunks
    # ETRN and a flush: the request, the lease, the work list, outcomes of every kind.
    store.request_flush(["one.test"], etrn=True)
    assert store.claim_flush("flusher", 60) == "one.test"
    work = store.messages_for_flush("one.test")
    outcomes = [Verdict(Outcome.DELIVERED, "250 ok"), Verdict.deferred("451 later"), Verdict(Outcome.FAILED, "550 no")]
    store.record_attempts([(m.queue_id, "one.test", {r.address: outcomes[i % 3] for r in m.recipients}, None)
                           for i, m in enumerate(work[:9])])
    with store.open_body(work[10].queue_id) as body:
        body.read()
    with store.open_body(work[10].queue_id, "one.test") as body:  # the flusher's: that domain's row
        body.read()
    with store.open_body(long_one) as body:  # a part of a body: where each chunk starts, then those chunks
        body.seek(9000)
        body.read(10)
    store.release_flush("one.test", "flusher")
    store.claim_domains(["two.test"], "atrn", 60)
    store.release_leases_of("atrn")
    # Housekeeping: expiry, DSNs, retention, the domains' changes and notices.
    clock.now += 2 * 86400
    store.expire_rows({"two.test": 86400}, 5 * 86400)
    for bounce in store.claim_dsns():
        store.dsn_sent(bounce.queue_id, bounce.domain, [r.address for r in bounce.recipients])
    store.pending_dsns()
    clock.now += 30 * 86400
    store.purge_rows(7 * 86400)
    store.reconcile_domains()
    store.reconcile_domains("one.test")
    store.claim_notices({"one.test": 3600, "two.test": None})
    store.due_domains(["one.test", "two.test"])  # retry_interval's scan: each domain's rows on the key
    for bounce in store.claim_delay_warnings(3600):  # delay_warning: the oldest unwarned rows only
        store.delay_warning_done(bounce.queue_id, bounce.domain, [r.address for r in bounce.recipients])
    # backupmx queue (but its histogram), queue list DOMAIN, show, metrics, health.
    store.domain_reports()
    store.summary()
    store.counters()
    store.list_messages(domain="two.test")
    store.list_messages(selection=Selection(domain="two.test", everything=True))  # `queue list DOMAIN`
    store.show(work[10].queue_id)
    # backupmx hold|release|requeue|delete ID or DOMAIN: the rows named, by the queue's keys.
    store.hold(queue_id=work[11].queue_id)
    store.release(queue_id=work[11].queue_id)
    store.requeue(domain="two.test")
    store.delete(queue_id=work[12].queue_id)
    # Housekeeping's reclaim of the messages that left (delivered, purged, deleted).
    assert reclaim(store) > 0
    store.connection.set_trace_callback(None)

    db = sqlite3.connect(store.path)
    try:
        checked, scans = 0, {}
        for statement in dict.fromkeys(statements):
            if statement.split()[0].upper() in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "PRAGMA"):
                continue
            checked += 1
            if bad := growing_scans(db, statement):
                scans[statement[:160]] = bad
        assert checked > 40
        assert scans == {}
    finally:
        db.close()


def test_a_delivered_body_is_read_in_two_statements_on_the_keys(queue):
    """A flush reads every body whole: its size, then the message's row and its chunks in one
    statement (a snapshot of its own), each a search of a key; not BEGIN, two SELECTs, COMMIT."""
    store, _ = queue
    qid = put(store, "body@one.test", body=b"x" * 3000)  # in several chunks
    db = sqlite3.connect(store.path)
    try:
        for domain in (None, "one.test"):  # `show --body`, a DSN; a flush (it knows the domain)
            statements = []
            store.connection.set_trace_callback(statements.append)
            with store.open_body(qid, domain) as body:
                assert body.read(64 * 1024) == b"x" * 3000
            store.connection.set_trace_callback(None)
            assert len(statements) == 2, statements
            for statement in statements:
                plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement)]
                assert plan and all(line.startswith(("SEARCH", "CORRELATED SCALAR SUBQUERY")) for line in plan), \
                    (statement, plan)
                # (and whether a queue row still refers to the message: its domains, then the queue's key;
                # a flush's, that domain's row by the key alone)
                assert any("SEARCH q USING PRIMARY KEY (domain=? AND queue_id=?)" in line for line in plan), plan
                assert any("SEARCH d USING PRIMARY KEY (queue_id=?)" in line for line in plan) == (domain is None), plan
    finally:
        db.close()


def test_the_reclaim_searches_each_message_by_its_key(queue):
    """Housekeeping's reclaim (schema 14) deletes a few hundred listed messages a
    transaction: each is found by its key, and whether a queue row still refers to it
    through message_domains and the queue's key (schema 15); neither table is read further
    (a scan at a million messages would hold the write lock for seconds, every SMTP
    worker's commit waiting)."""
    store, _ = queue
    db = sqlite3.connect(store.path)
    try:
        statement = RECLAIM_SQL.format(marks=",".join("?" * 250))
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + statement, ["X"] * 250)]
        assert any(re.match(r"SEARCH messages USING PRIMARY KEY \(queue_id=\?\)", line) for line in plan), plan
        assert any("SEARCH d USING PRIMARY KEY (queue_id=?)" in line for line in plan), plan
        assert any("SEARCH q USING PRIMARY KEY (domain=? AND queue_id=?)" in line for line in plan), plan
        assert not [line for line in plan if line.startswith("SCAN")], plan
    finally:
        db.close()


def test_check_reads_the_queue_once_and_each_row_s_name_by_its_key(queue):
    """`backupmx check` counts the queue rows missing from message_domains (what the reclaim
    rests on): every row is read, once, and its name searched by message_domains' key -- not
    a read of message_domains per row (a million rows times a million)."""
    store, _ = queue
    db = sqlite3.connect(store.path)
    try:
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + UNNAMED_ROWS_SQL)]
        assert any("SEARCH d USING PRIMARY KEY (queue_id=? AND domain=?)" in line for line in plan), plan
        assert len([line for line in plan if line.startswith("SCAN")]) == 1, plan
        assert [line for line in plan if line.startswith("SCAN")][0].startswith("SCAN q"), plan
        assert db.execute(UNNAMED_ROWS_SQL).fetchone()[0] == 0
    finally:
        db.close()


def test_deleting_a_message_looks_for_no_queue_row_by_its_queue_id_alone(queue):
    """With foreign_keys on (every connection of ours), a DELETE FROM messages -- the reclaim's
    hundreds a round -- had SQLite look for the queue rows referring to the message (the
    queue's foreign key), by queue id alone: without index queue_message (schema 15) a scan
    of the queue per message. The key is gone: the statement's own program (its triggers
    are programs of their own, checked above) checks no foreign key, and a hand delete's
    opens no b-tree of the queue's at all (the reclaim's searches its key: above)."""
    store, _ = queue
    db = sqlite3.connect(store.path)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        assert [row[2] for row in db.execute("PRAGMA foreign_key_list(queue)")] == []
        roots = {root for root, in db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'queue'"
                                              " AND rootpage > 0")}
        for statement in ("DELETE FROM messages WHERE queue_id = ?", RECLAIM_SQL.format(marks="?,?")):
            listed = db.execute("EXPLAIN " + statement, ["X"] * statement.count("?")).fetchall()
            # EXPLAIN lists the statement's program, then its triggers' (each from address 0 again).
            program = listed[:next(i for i, row in enumerate(listed) if i and row[0] == 0)]
            assert not [row for row in program if row[1].startswith("Fk")], (statement, program)
            if statement.startswith("DELETE FROM messages WHERE queue_id = ?"):  # (the reclaim's reads the key)
                opened = [(op, p2) for _, op, _, p2, *_ in program if op.startswith("Open")]
                assert opened and not [o for o in opened if o[1] in roots], (statement, opened)
    finally:
        db.close()


def test_the_triggers_statements_never_read_a_growing_table_whole(queue):
    """A trigger runs inside the statement that fires it (a delete of a delivered recipient,
    an operator's state change): EXPLAIN QUERY PLAN of that statement does not show it."""
    store, _ = queue
    db = sqlite3.connect(store.path)
    try:
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
        assert len(triggers) >= 7
        scans = {}
        for name, sql in triggers:
            body = sql[sql.upper().index("BEGIN") + len("BEGIN"):sql.upper().rindex("END")]
            when = re.search(r"\bWHEN\b(.*?)\bBEGIN\b", sql, re.S | re.I)  # runs for every row too
            for statement in [s.strip() for s in body.split(";") if s.strip()] + \
                    ([f"SELECT {when.group(1).strip()}"] if when else []):
                if re.match(r"SELECT RAISE\(", statement, re.I):
                    continue  # reads nothing (and has no plan outside a trigger); its WHEN is checked
                statement = re.sub(r"\b(?:NEW|OLD)\.\w+", "?", statement)
                if bad := growing_scans(db, statement, [None] * statement.count("?")):
                    scans[f"{name}: {statement[:120]}"] = bad
        assert scans == {}
    finally:
        db.close()


def test_a_selection_by_ids_and_domains_names_the_rows_it_did_when_it_read_them_all(queue):
    """The operator's selections go by the queue's keys (above); what they name stays the same,
    also past the ids one statement names (`-`: ids on stdin), which read every row again."""
    store, _ = queue
    every = store.select(Selection(everything=True))
    ids = {row.queue_id for row in every[::7]}
    many = ids | {f"0000000000NONE{n:04d}" for n in range(600)}
    for selection, expected in [
        (Selection(queue_ids=frozenset(ids)), [r for r in every if r.queue_id in ids]),
        (Selection(domains=frozenset({"two.test"})), [r for r in every if r.domain == "two.test"]),
        (Selection(queue_ids=frozenset(ids), domains=frozenset({"one.test"})),
         [r for r in every if r.queue_id in ids or r.domain == "one.test"]),
        (Selection(queue_ids=frozenset(ids), domain="two.test"),
         [r for r in every if r.queue_id in ids and r.domain == "two.test"]),
        (Selection(queue_ids=frozenset(many)), [r for r in every if r.queue_id in ids]),
    ]:
        assert store.select(selection) == expected and expected


def hand_statements():
    """The statements schema.sql's header gives operators for the sqlite3 shell, with their
    `-- ...` comments taken away (a statement may go on over several indented lines)."""
    header = (REPO / "schema.sql").read_text().split("\nCREATE ", 1)[0].split("-- Answering questions", 1)[1]
    text = " ".join(re.sub(r"\s+-- .*$", "", line[len("--   "):])
                    for line in header.splitlines() if line.startswith("--   "))
    return [s.strip() for s in text.split(";") if re.match(r"\s*(SELECT|UPDATE|DELETE)\b", s)]


def test_the_hand_statements_for_one_message_read_it_by_its_keys(queue):
    """An operator at a million messages types what schema.sql's header shows: each statement
    about one message ('ID') -- its body (view message_bodies), its arrival (view queue_arrivals),
    its history, its domains, deleting it -- must find it by a key, not read the queue whole."""
    store, _ = queue
    qid = store.select(Selection(everything=True))[0].queue_id
    db = sqlite3.connect(store.path)
    try:
        about_one = [s for s in hand_statements() if "'ID'" in s and "writefile(" not in s]
        assert len(about_one) >= 6, about_one
        scans = {s: bad for s in about_one
                 if (bad := growing_scans(db, s.replace("'ID'", "?").replace("unixepoch()", "0"),
                                          [qid] * s.count("'ID'")))}
        assert scans == {}
        body = db.execute(next(s for s in about_one if "message_bodies" in s).replace("'ID'", "?"), [qid])
        assert body.fetchone()[0].endswith(b"body\r\n")  # the view runs, and shows the message
    finally:
        db.close()
