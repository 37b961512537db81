"""Delivery to the primary: backupmx.flusher against a real store and a real SMTP sink.

No mocks: QueueStore on a file in tmp_path, the Sink (tests/sink.py) on
127.0.0.1 with real TLS from tests/certs, and a real process for the
kill -9 test. Timeouts are small so that the hostile-primary cases prove
their bound quickly.
"""

import contextlib
import json
import logging
import os
import random
import re
import select
import signal
import smtplib
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backupmx import flusher
from backupmx.config import DomainConfig, load_config
from backupmx.envelope import Envelope, Recipient
from backupmx.flush_session import OUTCOME_BATCH
from backupmx.flush_sharing import EXTRA_CONNECTIONS
from backupmx.flusher import deliver_domain, run_flush_worker
from backupmx.smtpclient import MAX_REPLY_LINES, DataEncoder, PrimaryClient, ReplyError
from backupmx.store import QueueStore
from backupmx.store_bodies import DamagedBody

sys.path.insert(0, os.path.dirname(__file__))
from conftest import children_of, flushes_in_progress, pending_flushes, queue_one, reclaim, wait_for  # noqa: E402
from sink import Sink  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CERTS = REPO / "tests" / "certs"
DOMAIN = "example.com"


# -- helpers ------------------------------------------------------------------------


def domain_config(sink_or_port, *, tls="none", ca=None, host="127.0.0.1", retry_interval=0.0):
    port = sink_or_port if isinstance(sink_or_port, int) else sink_or_port.port
    return DomainConfig(
        name=DOMAIN,
        primary=(host, port),
        primary_tls=tls,
        recipients=None,
        primary_ca=ca,
        max_queue_messages=None,
        max_queue_bytes=None,
        queue_lifetime=5 * 86400.0,
        retry_interval=retry_interval,
    )


def enqueue(store, body, *, sender="alice@sender.test", rcpts=("bob@example.com",), body_type="7BIT",
            envid=None, ret=None, notify=None, orcpt=None):
    queue_id = store.new_queue_id()
    envelope = Envelope(
        sender=sender,
        recipients=[Recipient(a, DOMAIN, notify, orcpt) for a in rcpts],
        body_type=body_type,
        envid=envid,
        ret=ret,
    )
    queue_one(store, queue_id, envelope, body, len(body), client="192.0.2.1", helo="client.test")
    return queue_id


def flush(store, domain, timeout=5.0, **kwargs):
    store.request_flush([domain.name])
    owner = kwargs.pop("owner", "test-flusher")
    assert store.claim_flush(owner, 60) == domain.name
    try:
        return deliver_domain(store, domain, owner=owner, hostname="mx2.test", timeout=timeout, **kwargs)
    finally:
        store.release_flush(domain.name, owner)


def rows(store):
    return {m.queue_id: m for m in store.list_messages()}


def mail_commands(sink):
    return [c for s in sink.sessions for c in s.commands if c.upper().startswith("MAIL")]


@pytest.fixture
def store(tmp_path):
    s = QueueStore(str(tmp_path / "queue.db"))
    yield s
    s.close()


@pytest.fixture
def tls_sink():
    s = Sink(tls_cert=str(CERTS / "server.pem"), tls_key=str(CERTS / "server.key")).start()
    yield s
    s.stop()


# -- the DATA encoder (no sockets) -----------------------------------------------------


def reference_data(body: bytes) -> bytes:
    """What smtplib.SMTP.data() would send for `body`: the independent oracle."""
    data = smtplib.quotedata(body.decode("latin-1")).encode("latin-1")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def encode(body: bytes, cuts) -> bytes:
    encoder = DataEncoder()
    out, start = [], 0
    for cut in sorted(cuts) + [len(body)]:
        out.append(encoder.feed(body[start:cut]))
        start = cut
    return b"".join(out) + encoder.end()


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"x\r\n.\r\n..y\r\n", b"x\r\n..\r\n...y\r\n.\r\n"),
        (b"bare\nlf\rcr\r\n", b"bare\r\nlf\r\ncr\r\n.\r\n"),
        (b"\xff\x00\x80\r\n", b"\xff\x00\x80\r\n.\r\n"),
        (b"end with cr\r", b"end with cr\r\n.\r\n"),
    ],
)
def test_data_encoder_table(body, expected):
    assert encode(body, []) == expected
    # Every single split point gives the same stream.
    for cut in range(len(body) + 1):
        assert encode(body, [cut]) == expected, cut


def test_data_encoder_random_chunking():
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"a", b"\xff", b"\x00", b"\r\n.", b".."]
    for _ in range(500):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        cuts = [rng.randrange(0, len(body) + 1) for _ in range(rng.randrange(0, 6))]
        assert encode(body, cuts) == reference_data(body), (seed, body, cuts)


# -- delivery -----------------------------------------------------------------------------


def test_byte_exact_delivery_and_envelope(store, sink):
    # Lines starting with ".", 8-bit and NUL bytes, a line of dots, and a
    # "\r\n." exactly across the 64 KiB chunk boundary of the body reader.
    head = b"Received: from client.test\r\nSubject: dots\r\n\r\n.\r\n..\r\n.hidden\r\n\xe9t\xe9 \x00 \xff\r\n"
    filler = b"x" * (65536 - len(head) - 2 - 2) + b"\r\n"
    body = head + filler + b"\r\n.boundary\r\n" + b"tail\r\n"
    assert body[65536 - 2 : 65536 + 1] == b"\r\n."
    qid = enqueue(
        store, body, rcpts=("bob@example.com", "Carol@Example.COM"), body_type="8BITMIME",
        envid="QQ+2B314", ret="HDRS", notify="SUCCESS,DELAY", orcpt="rfc822;bob@example.com",
    )
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": 1, "delivered": 2, "deferred": 0, "failed": 0}
    (got,) = sink.deliveries
    assert got.body == body
    assert got.mail_from == "alice@sender.test"
    assert got.rcpts == ["bob@example.com", "Carol@Example.COM"]
    assert got.mail_params == {"SIZE": str(len(body)), "BODY": "8BITMIME", "ENVID": "QQ+2B314", "RET": "HDRS"}
    assert got.rcpt_params == [{"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;bob@example.com"}] * 2
    assert sink.sessions[0].ehlo == "mx2.test"
    assert qid not in rows(store)
    assert store.summary() == []


def test_every_size_class_of_stored_body_is_delivered_byte_for_byte(store, sink):
    """Bodies stored in no chunk, one byte, one small chunk exactly and one byte more, the
    first long chunk, and 1 MB (test_store.SIZE_CLASSES) reach the primary unchanged."""
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)

    alphabet = bytes.maketrans(bytes(range(256)), b"ab\x00\xe9. ." * 36 + b"abcd")

    def lines(size):  # CRLF-ended lines of 8-bit text, some starting with a dot, `size` bytes in all
        text = rng.randbytes(size).translate(alphabet)
        body = b"\r\n".join(text[i:i + 80] for i in range(0, size, 82))
        return (body + b"x" * size)[:size - 2] + b"\r\n" if size >= 2 else b"x" * size

    sizes = (0, 1, 499, 500, 4575, 4576, 2**20)
    bodies = {enqueue(store, body): body for body in map(lines, sizes)}
    assert sorted(map(len, bodies.values())) == list(sizes)
    counts = flush(store, domain_config(sink))
    assert counts["delivered"] == len(bodies)
    expected = sorted(b if b.endswith(b"\r\n") or not b else b + b"\r\n" for b in bodies.values())
    assert sorted(d.body for d in sink.deliveries) == expected
    assert rows(store) == {} and reclaim(store) == len(bodies)  # housekeeping's, after the flush
    assert store.connection.execute("SELECT COUNT(*) FROM body_chunks").fetchone()[0] == 0


def test_a_damaged_body_is_never_delivered_short(store, sink):
    """A chunk deleted by hand: the flush stops mid-DATA (the primary discards it) and says
    so; the message stays queued."""
    qid = enqueue(store, b"line\r\n" * 1000)
    store.connection.execute("DELETE FROM body_chunks WHERE id = (SELECT first_chunk + 3 FROM messages)")
    with pytest.raises(DamagedBody):
        flush(store, domain_config(sink))
    assert sink.deliveries == []
    assert rows(store)[qid].state == "queued"


def test_null_sender_and_no_dsn_params_without_dsn(store):
    sink = Sink(extensions=("PIPELINING", "SIZE 1000000")).start()  # no DSN, no 8BITMIME
    try:
        enqueue(store, b"bounce\r\n", sender="", body_type="8BITMIME", envid="X", ret="FULL", notify="NEVER")
        flush(store, domain_config(sink))
        (got,) = sink.deliveries
        assert got.mail_from == ""
        assert mail_commands(sink) == ["MAIL FROM:<> SIZE=8"]
        assert got.rcpt_params == [{}]
    finally:
        sink.stop()


def test_many_messages_few_connections(store, sink, caplog):
    ids = [enqueue(store, b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)) for i in range(25)]
    with caplog.at_level(logging.INFO, logger="backupmx.flusher"):
        counts = flush(store, domain_config(sink))
    assert counts["delivered"] == 25
    assert len(sink.sessions) == 1 + EXTRA_CONNECTIONS
    assert sorted(d.body for d in sink.deliveries) == sorted(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(25))
    assert len({d.body for d in sink.deliveries}) == 25  # none twice
    assert rows(store) == {}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivered ")]
    assert len(lines) == 25
    first = next(line for line in lines if f"id={ids[0]} " in line)
    assert re.fullmatch(
        rf'delivered id={ids[0]} domain=example.com from=<alice@sender.test> to=<bob@example.com> '
        rf'relay=127.0.0.1:{sink.port} delay=\d+\.\d size=22 reply="250 2.0.0 Ok: queued as SINK\d+"',
        first,
    ), first


def test_a_primary_taking_one_connection_still_gets_everything(store, sink):
    # The extra connection meets a 421 greeting: it never takes a message,
    # and the first connection delivers them all, none deferred.
    sink.max_sessions = 1
    for i in range(30):
        enqueue(store, b"Subject: %d\r\n\r\nx\r\n" % i)
    counts = flush(store, domain_config(sink))
    assert counts["delivered"] == 30 and counts["deferred"] == 0
    assert len(sink.deliveries) == 30
    assert len(sink.sessions) == 2 and sum(1 for session in sink.sessions if session.commands) == 1
    assert rows(store) == {}


def test_ipv6_primary(store):
    try:
        sink = Sink("::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        enqueue(store, b"v6\r\n")
        counts = flush(store, domain_config(sink, host="::1"))
        assert counts["delivered"] == 1 and sink.messages[0][2] == b"v6\r\n"
    finally:
        sink.stop()


def test_rcpt_4xx_keeps_with_attempts_and_reply(store, sink):
    sink.behaviour = "rcpt_4xx"
    sink.behaviour_addresses = {"later@example.com"}
    qid = enqueue(store, b"hi\r\n", rcpts=("now@example.com", "later@example.com"))
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": 1, "delivered": 1, "deferred": 1, "failed": 0}
    assert sink.messages[0][1] == ["now@example.com"]
    row = rows(store)[qid]
    assert row.state == "queued" and row.attempts == 1
    assert row.last_reply.startswith("450 4.2.0 <later@example.com>")
    (message,) = store.messages_for_flush(DOMAIN)
    assert [r.address for r in message.recipients] == ["later@example.com"]
    # The next flush delivers the rest, to a now well-behaved primary.
    sink.behaviour = "normal"
    flush(store, domain_config(sink))
    assert sink.messages[1][1] == ["later@example.com"]
    assert rows(store) == {}


def test_all_rcpt_4xx_sends_no_data(store, sink):
    sink.behaviour = "rcpt_4xx"
    qid = enqueue(store, b"hi\r\n", rcpts=("a@example.com", "b@example.com"))
    enqueue(store, b"second\r\n")
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": 2, "delivered": 0, "deferred": 3, "failed": 0}
    assert sink.data_received == 0
    assert len(sink.sessions) == 1  # RSET between, same connection
    assert rows(store)[qid].attempts == 1


def test_rcpt_5xx_fails_and_keeps_row(store, sink):
    sink.behaviour = "rcpt_5xx"
    qid = enqueue(store, b"hi\r\n")
    counts = flush(store, domain_config(sink))
    assert counts["failed"] == 1
    row = rows(store)[qid]
    assert row.state == "failed"
    assert row.last_reply.startswith("550 5.1.1")
    assert store.messages_for_flush(DOMAIN) == []


@pytest.mark.parametrize("behaviour, state, reply", [("data_4xx", "queued", "451 4.3.0"),
                                                     ("data_5xx", "failed", "554 5.7.1")])
def test_data_reply_decides(store, sink, behaviour, state, reply):
    sink.behaviour = behaviour
    qid = enqueue(store, b"content\r\n", rcpts=("a@example.com", "b@example.com"))
    flush(store, domain_config(sink))
    assert sink.data_received == 1
    row = rows(store)[qid]
    assert (row.state, row.attempts) == (state, 1)
    assert row.last_reply.startswith(reply)


def test_drop_mid_data_keeps_the_mail(store, sink):
    sink.behaviour = "drop_mid_data"
    body = b"line\r\n" * 50000  # 300 KB: we are still sending when the primary hangs up
    ids = [enqueue(store, body), enqueue(store, body)]
    started = time.monotonic()
    counts = flush(store, domain_config(sink, ), timeout=2.0)
    assert time.monotonic() - started < 5
    assert counts["delivered"] == 0 and counts["deferred"] == 2
    assert sink.deliveries == []
    for qid in ids:
        row = rows(store)[qid]
        assert row.state == "queued" and row.attempts == 1
        assert "connection" in row.last_reply, row.last_reply


def test_connection_refused_defers_everything(store):
    probe = Sink()  # bind a port, then close it: nothing listens there
    port = probe.port
    probe._server.server_close()
    ids = [enqueue(store, b"x\r\n") for _ in range(3)]
    counts = flush(store, domain_config(port))
    assert counts == {"messages": 3, "delivered": 0, "deferred": 3, "failed": 0}
    for qid in ids:
        assert rows(store)[qid].last_reply.startswith(f"connect to 127.0.0.1:{port} failed")


# -- pipelining: the next message's commands ride with the end of data (RFC 2920 3.1) ---------


def recipient_rows(store):
    """(queue_id, address) -> (state, last_reply) of every recipient still in the queue."""
    with sqlite3.connect(store.path) as db:
        return {(q, a): (st, r) for q, a, st, r in db.execute("SELECT queue_id, address, state, last_reply FROM recipients")}


def numbered(i):
    return b"Subject: %d\r\n\r\nmessage %d\r\n" % (i, i)


def number_of(delivery):
    return int(delivery.body.split(b"message ")[1])


def test_pipelined_delivery_of_many_messages(store, sink):
    for i in range(40):
        enqueue(store, numbered(i))
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": 40, "delivered": 40, "deferred": 0, "failed": 0}
    assert sorted(number_of(d) for d in sink.deliveries) == list(range(40))  # each once
    assert len(mail_commands(sink)) == 40  # nothing sent twice
    assert rows(store) == {}
    for session in sink.sessions:
        taken = sum(1 for d in sink.deliveries if d.session == session.number)
        # Every end of data but a connection's last had the next MAIL, RCPT and DATA behind it,
        assert session.pipelined == max(0, taken - 1), (session.number, taken)  # (the extra one may come late)
        # and every MAIL its RCPT and DATA.
        assert session.grouped == taken


def test_a_primary_without_pipelining_gets_one_command_at_a_time(store):
    sink = Sink(extensions=("8BITMIME", "SIZE 104857600", "DSN")).start()
    try:
        for i in range(25):
            enqueue(store, numbered(i), rcpts=("a@example.com", "b@example.com"))
        counts = flush(store, domain_config(sink))
        assert counts == {"messages": 25, "delivered": 50, "deferred": 0, "failed": 0}
        assert sorted(number_of(d) for d in sink.deliveries) == list(range(25))
        assert [(s.pipelined, s.grouped) for s in sink.sessions] == [(0, 0)] * len(sink.sessions)
    finally:
        sink.stop()


def test_rejections_mid_pipeline_belong_to_their_message_and_recipient(store, sink):
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    # 550 for bad@ (not a user), 450 for later@, 250 for a@ and b@; messages of 1-3 of them.
    sink.valid_users = {"a@example.com", "b@example.com", "later@example.com"}
    sink.behaviour, sink.behaviour_addresses = "rcpt_4xx", {"later@example.com"}
    pool = ["a@example.com", "b@example.com", "bad@example.com", "later@example.com"]
    envelopes = [rng.sample(pool, rng.randint(1, 3)) for _ in range(18)]  # one connection: < 20
    envelopes[5] = ["bad@example.com", "later@example.com"]  # no recipient taken: no content
    envelopes[6] = ["a@example.com"]
    ids = [enqueue(store, numbered(i), rcpts=tuple(rcpts)) for i, rcpts in enumerate(envelopes)]
    flush(store, domain_config(sink))
    taken = {i: [a for a in rcpts if a in ("a@example.com", "b@example.com")] for i, rcpts in enumerate(envelopes)}
    assert {number_of(d): d.rcpts for d in sink.deliveries} == {i: t for i, t in taken.items() if t}, seed
    expected = {}
    for qid, rcpts in zip(ids, envelopes):
        for address in rcpts:
            if address == "bad@example.com":
                expected[qid, address] = ("failed", "550 5.1.1 <bad@example.com>")
            elif address == "later@example.com":
                expected[qid, address] = ("queued", "450 4.2.0 <later@example.com>")
    got = {key: (state, reply[:len(expected.get(key, ("", ""))[1])]) for key, (state, reply) in recipient_rows(store).items()}
    assert got == expected, seed
    (session,) = sink.sessions
    assert session.pipelined == sum(1 for i in range(len(envelopes) - 1) if taken[i]), seed


def test_a_refused_content_mid_pipeline_fails_only_its_message(store, sink):
    sink.behaviour, sink.behaviour_addresses = "data_5xx", {"refused@example.com"}
    rcpts = [("refused@example.com",) if i % 3 == 1 else ("a@example.com",) for i in range(9)]
    ids = [enqueue(store, numbered(i), rcpts=r) for i, r in enumerate(rcpts)]
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": 9, "delivered": 6, "deferred": 0, "failed": 3}
    assert sorted(number_of(d) for d in sink.deliveries) == [i for i in range(9) if i % 3 != 1]
    assert {qid: (row.state, row.last_reply[:9]) for qid, row in rows(store).items()} == {
        ids[i]: ("failed", "554 5.7.1") for i in range(9) if i % 3 == 1}
    assert sink.sessions[0].pipelined == 8


def test_a_connection_dropped_mid_pipeline_keeps_every_message_without_its_own_250(store, sink):
    # The primary hangs up right after its 3rd final reply in each session: the message
    # announced behind that end of data (its commands sent, its content not) stays queued.
    sink.behaviour, sink.drop_after = "drop_after_eod", 3
    ids = [enqueue(store, numbered(i)) for i in range(10)]  # one connection at a time: < 20
    counts = flush(store, domain_config(sink))
    assert counts == {"messages": 10, "delivered": 8, "deferred": 2, "failed": 0}
    assert [(number_of(d), d.session) for d in sink.deliveries] == [
        (0, 1), (1, 1), (2, 1), (4, 2), (5, 2), (6, 2), (8, 3), (9, 3)]
    left = rows(store)
    assert sorted(left) == sorted([ids[3], ids[7]])
    for row in left.values():
        assert (row.state, row.attempts) == ("queued", 1)
        assert row.last_reply.startswith("connection lost"), row.last_reply
    assert [s.pipelined for s in sink.sessions] == [3, 3, 1]


@pytest.mark.parametrize("stage, reason", [("eod", "reply out of sequence: 250 "), ("data", "reply to no command")])
def test_a_primary_answering_twice_is_not_believed(store, sink, stage, reason):
    # One reply too many: after the first message's 250 (eod), the next message's replies
    # are one behind (MAIL gets the extra 250, DATA a 250); after a 354 (data), the content
    # would take the extra 354 for its final reply.
    sink.behaviour, sink.hostile_at = "extra_reply", stage
    ids = [enqueue(store, numbered(i)) for i in range(6)]
    flush(store, domain_config(sink))
    delivered = {number_of(d) for d in sink.deliveries}
    left = rows(store)
    assert {i for i, qid in enumerate(ids) if qid not in left} == delivered  # marked delivered only with its own 250
    assert delivered == ({0, 2, 4} if stage == "eod" else set())
    for row in left.values():
        assert (row.state, row.attempts) == ("queued", 1) and row.last_reply.startswith(reason), row.last_reply


def test_an_outcome_write_that_fails_ends_the_flush_and_loses_nothing(store, sink):
    # The queue refuses the outcomes (disk trouble) while the next message is announced:
    # the flush ends with the error, every message stays queued (delivered again:
    # duplicates, never loss), and the announced one never got its content.
    sink.max_sessions = 1  # one connection: its first batch of outcomes is written mid-flush
    ids = [enqueue(store, numbered(i)) for i in range(OUTCOME_BATCH + 6)]
    store.request_flush([DOMAIN])
    assert store.claim_flush("test-flusher", 60) == DOMAIN
    store.connection.execute("CREATE TRIGGER test_fault BEFORE INSERT ON events"
                             " BEGIN SELECT RAISE(ABORT, 'injected fault'); END")
    try:
        with pytest.raises(Exception, match="injected fault"):
            deliver_domain(store, domain_config(sink), owner="test-flusher", hostname="mx2.test", timeout=5)
    finally:
        store.connection.execute("DROP TRIGGER test_fault")
        store.release_flush(DOMAIN, "test-flusher")
    assert sorted(rows(store)) == sorted(ids)
    assert 1 <= len(sink.deliveries) <= OUTCOME_BATCH  # stopped at its first write (64, or 0.25 s)
    assert flush(store, domain_config(sink))["delivered"] == OUTCOME_BATCH + 6
    assert rows(store) == {}


# -- a hostile primary: bounded time, mail kept ---------------------------------------------


@pytest.mark.parametrize("stage", ["banner", "ehlo", "mail", "rcpt", "data", "eod"])
@pytest.mark.parametrize("behaviour", ["endless_continuation", "drip", "long_line", "bad_code"])
def test_hostile_primary_costs_bounded_time(store, sink, behaviour, stage):
    sink.behaviour = behaviour
    sink.hostile_at = stage
    sink.drip_interval = 0.1  # a byte every 0.1 s never trips a per-recv timeout of 0.25 s
    ids = [enqueue(store, b"keep me\r\n") for _ in range(2)]
    started = time.monotonic()
    counts = flush(store, domain_config(sink), timeout=0.25)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed  # a whole dripped reply takes 2.6 s
    assert counts["delivered"] == 0 and counts["deferred"] == 2 and counts["failed"] == 0
    for qid in ids:
        row = rows(store)[qid]
        assert row.state == "queued" and row.attempts == 1
        assert row.last_reply and not row.last_reply.startswith("5"), row.last_reply


def test_reply_limits_directly(sink):
    """PrimaryClient alone: the limits raise ReplyError, and close the socket."""
    sink.hostile_at = "banner"
    for behaviour, match in [("endless_continuation", f"{MAX_REPLY_LINES} lines"),
                             ("long_line", "8192 bytes"),
                             ("bad_code", "malformed")]:
        sink.behaviour = behaviour
        client = PrimaryClient(timeout=2, local_hostname="mx2.test")
        with pytest.raises(ReplyError, match=match):
            client.connect("127.0.0.1", sink.port)
        assert client.sock is None
    sink.behaviour = "normal"
    client = PrimaryClient(timeout=2, local_hostname="mx2.test")
    assert client.connect("127.0.0.1", sink.port)[0] == 220
    code, text = client.ehlo()
    assert code == 250 and b"PIPELINING" in text and client.has_extn("dsn")
    client.quit()


# -- TLS to the primary --------------------------------------------------------------------------


def test_required_tls_without_starttls_sends_nothing(store, sink):
    qid = enqueue(store, b"secret\r\n")
    counts = flush(store, domain_config(sink, tls="required", ca=str(CERTS / "ca.pem")))
    assert counts["deferred"] == 1 and counts["delivered"] == 0
    assert mail_commands(sink) == []
    assert sink.deliveries == []
    assert "does not offer STARTTLS" in rows(store)[qid].last_reply


def test_required_tls_with_no_starttls_behaviour(store, tls_sink):
    tls_sink.behaviour = "no_starttls"
    enqueue(store, b"secret\r\n")
    flush(store, domain_config(tls_sink, tls="required", ca=str(CERTS / "ca.pem")))
    assert mail_commands(tls_sink) == []


def test_required_tls_verified_delivers_over_tls(store, tls_sink, caplog):
    qid = enqueue(store, b"secret\r\n")
    with caplog.at_level(logging.INFO, logger="backupmx.flusher"):
        counts = flush(store, domain_config(tls_sink, tls="required", ca=str(CERTS / "ca.pem")))
    assert counts["delivered"] == 1
    (got,) = tls_sink.deliveries
    assert got.tls and got.body == b"secret\r\n"
    assert [c.split()[0].upper() for c in tls_sink.sessions[0].commands[:3]] == ["EHLO", "STARTTLS", "EHLO"]
    assert any(f"delivered id={qid}" in r.getMessage() and "tls=TLSv1." in r.getMessage() for r in caplog.records)


def test_required_tls_wrong_certificate_sends_nothing(store):
    sink = Sink(tls_cert=str(CERTS / "other.pem"), tls_key=str(CERTS / "other.key")).start()
    try:
        qid = enqueue(store, b"secret\r\n")
        counts = flush(store, domain_config(sink, tls="required", ca=str(CERTS / "ca.pem")))
        assert counts["deferred"] == 1
        assert mail_commands(sink) == []
        assert "TLS handshake failed" in rows(store)[qid].last_reply
    finally:
        sink.stop()


def test_opportunistic_tls(store, tls_sink):
    enqueue(store, b"one\r\n")
    flush(store, domain_config(tls_sink, tls="opportunistic"))
    assert tls_sink.deliveries[-1].tls
    tls_sink.behaviour = "no_starttls"
    enqueue(store, b"two\r\n")
    flush(store, domain_config(tls_sink, tls="opportunistic"))
    assert not tls_sink.deliveries[-1].tls and tls_sink.deliveries[-1].body == b"two\r\n"
    assert rows(store) == {}


def test_tls_none_never_starts_tls(store, tls_sink):
    enqueue(store, b"plain\r\n")
    flush(store, domain_config(tls_sink, tls="none"))
    assert not tls_sink.deliveries[0].tls
    assert not any(c.upper() == "STARTTLS" for c in tls_sink.sessions[0].commands)


# -- leases, stopping, the worker loop -----------------------------------------------------------


def test_without_the_lease_nothing_is_sent(store, sink):
    """A flusher whose lease is gone (renewal refused) stops before sending."""
    qid = enqueue(store, b"x\r\n")
    counts = deliver_domain(store, domain_config(sink), owner="nobody", hostname="mx2.test",
                            timeout=2, lease_seconds=0.000001)
    assert counts["delivered"] == 0
    assert sink.deliveries == []
    assert rows(store)[qid].attempts == 0


def lease_expires(path):
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT lease_expires FROM flushes WHERE domain = 'example.com'").fetchone()[0]
    finally:
        db.close()


def lease_stopped(lease):
    """True once the flush holding `lease` must stop (its check() raises)."""
    from backupmx.flush_lease import LeaseLost

    try:
        lease.check()
    except LeaseLost:
        return True
    return False


def test_a_lease_that_cannot_be_renewed_stops_the_flush_before_it_runs_out(store):
    """review-1 m7: renewals that fail (another process holds the write lock) for most of
    the lease stop the flush while the lease still holds, so a second flusher never
    delivers the same mail beside this one."""
    import sqlite3

    from backupmx.flush_lease import Lease

    enqueue(store, b"x\r\n")
    store.request_flush(["example.com"])
    assert store.claim_flush("A", 1.2) == "example.com"
    holder = sqlite3.connect(store.path, isolation_level=None)
    with Lease(store, "example.com", "A", 1.2) as lease:
        lease.check()
        holder.execute("BEGIN IMMEDIATE")  # the renewals wait for it, then give up
        try:
            # When it stopped, taken at once: the test's own look at the queue afterwards may come
            # later than the interval of margin on a loaded machine.
            stopped_at = wait_for(lambda: lease_stopped(lease) and time.time(), 3, 0.01)
            assert stopped_at and lease.ran_out
            assert stopped_at < lease_expires(store.path)  # nobody else could claim it yet
        finally:
            holder.execute("ROLLBACK")
            holder.close()


def test_a_renewal_thread_that_fails_is_logged_and_the_lease_counts_as_lost(store, caplog):
    import sqlite3

    from backupmx.flush_lease import Lease

    enqueue(store, b"x\r\n")
    store.request_flush(["example.com"])
    assert store.claim_flush("A", 3) == "example.com"
    with Lease(store, "example.com", "A", 3) as lease:
        first = lease.valid_until
        assert wait_for(lambda: lease.valid_until > first, 2, 0.01)  # the thread renews on its own connection
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("ALTER TABLE flushes RENAME TO flushes_elsewhere")  # renew_lease: no such table
        other.close()

        with caplog.at_level(logging.ERROR, logger="backupmx"):
            assert wait_for(lambda: lease_stopped(lease), 1.5, 0.01)  # within an interval (0.5 s), not at the 2.5 s mark
        assert lease.ran_out
    assert any("lease renewal" in r.getMessage() and "no such table" in r.getMessage() for r in caplog.records)


def test_should_stop_between_messages_requests_again(store, sink):
    for _ in range(5):
        enqueue(store, b"x\r\n")
    calls = []

    def should_stop():
        calls.append(1)
        return len(sink.deliveries) >= 2

    counts = flush(store, domain_config(sink), should_stop=should_stop)
    assert counts["delivered"] == 2
    assert len(rows(store)) == 3
    assert pending_flushes(store.path) == [DOMAIN]  # resumes after a restart


def test_run_flush_worker(tmp_path, sink):
    queue = tmp_path / "queue.db"
    cfg = tmp_path / "backupmx.ini"
    cfg.write_text(textwrap.dedent(f"""\
        [backupmx]
        hostname = mx2.test
        listen = 127.0.0.1:0
        queue = {queue}
        timeout = 5s
        [domain:example.com]
        primary = 127.0.0.1:{sink.port}
        primary_tls = none
        [domain:example.org]
        primary = 127.0.0.1:{sink.port}
        """))
    config = load_config(str(cfg))
    with QueueStore(str(queue)) as store:
        ids = [enqueue(store, b"via worker %d\r\n" % i) for i in range(3)]
        store.request_flush([DOMAIN])
    stop = threading.Event()
    worker = threading.Thread(target=run_flush_worker, args=(config, "worker-1", stop.is_set))
    worker.start()
    try:
        sink.wait_for(3, timeout=10)
        deadline = time.monotonic() + 10
        with QueueStore(str(queue)) as store:
            while rows(store) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert rows(store) == {}
            # A second request is picked up by the same, polling worker.
            enqueue(store, b"later\r\n")
            store.request_flush([DOMAIN])
        sink.wait_for(4, timeout=10)
    finally:
        started = time.monotonic()
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - started < 1.0
    assert len(ids) == 3


def test_run_flush_worker_survives_a_bad_primary(tmp_path):
    probe = Sink()
    port = probe.port
    probe._server.server_close()
    queue = tmp_path / "queue.db"
    cfg = tmp_path / "backupmx.ini"
    cfg.write_text(f"[backupmx]\nqueue = {queue}\ntimeout = 2s\n[domain:example.com]\nprimary = 127.0.0.1:{port}\n")
    config = load_config(str(cfg))
    with QueueStore(str(queue)) as store:
        qid = enqueue(store, b"x\r\n")
        store.request_flush([DOMAIN])
        stop = threading.Event()
        worker = threading.Thread(target=run_flush_worker, args=(config, "worker-1", stop.is_set))
        worker.start()
        deadline = time.monotonic() + 10
        while rows(store)[qid].attempts == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        worker.join(5)
        assert not worker.is_alive()
        assert rows(store)[qid].attempts == 1
        assert store.claim_flush("other", 10) is None  # the lease was released, no request left


# -- a flusher killed mid-delivery loses nothing ------------------------------------------------


FLUSHER_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from backupmx.config import DomainConfig
from backupmx.flusher import deliver_domain
from backupmx.store import QueueStore
store = QueueStore({db!r})
store.request_flush(["example.com"])
assert store.claim_flush("victim", 600) == "example.com"
domain = DomainConfig(name="example.com", primary=("127.0.0.1", {port}), primary_tls="none", recipients=None,
                      primary_ca=None, max_queue_messages=None, max_queue_bytes=None,
                      queue_lifetime=86400.0, retry_interval=0.0)
print("claimed", flush=True)
deliver_domain(store, domain, owner="victim", hostname="mx2.test", timeout=30, lease_seconds=600)
"""


def test_flusher_killed_mid_delivery_loses_nothing(tmp_path, sink):
    db = str(tmp_path / "queue.db")
    with QueueStore(db) as store:
        ids = [enqueue(store, b"X-Test-Id: %d\r\n\r\nbody\r\n" % i) for i in range(6)]
    # The primary answers the first two at once, then sits on the third's end of data.
    stall = threading.Event()
    sink.on_delivery = lambda number, delivery: number >= 3 and stall.wait(30)
    proc = subprocess.Popen([sys.executable, "-c", FLUSHER_SCRIPT.format(repo=str(REPO), db=db, port=sink.port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        sink.wait(lambda: len(sink.deliveries) >= 3, timeout=10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stall.set()
    assert proc.returncode == -signal.SIGKILL
    got = {d.body.split(b"\r\n")[0] for d in sink.deliveries}
    with QueueStore(db) as store:
        assert store.connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        left = rows(store)
        # Every message is still queued, or the primary has it (or both: sent again at worst).
        for i, qid in enumerate(ids):
            assert qid in left or b"X-Test-Id: %d" % i in got
        # The one the primary had not confirmed is still queued, and so is everything after it.
        assert all(qid in left for qid in ids[2:])
        # The lease of the dead flusher runs out; then another flusher delivers the rest.
        store.connection.execute("UPDATE flushes SET lease_expires = 0")
        sink.on_delivery = None
        assert store.claim_flush("rescuer", 60) == DOMAIN
        deliver_domain(store, domain_config(sink), owner="rescuer", hostname="mx2.test", timeout=5)
        assert rows(store) == {}
    got = {d.body.split(b"\r\n")[0] for d in sink.deliveries}
    assert got == {b"X-Test-Id: %d" % i for i in range(6)}


def test_deferral_schedules_a_retry_when_retry_interval_is_set(tmp_path):
    clock = [1_000_000.0]
    store = QueueStore(str(tmp_path / "q.db"), clock=lambda: clock[0])
    try:
        probe = Sink()
        port = probe.port
        probe._server.server_close()
        qid = enqueue(store, b"x\r\n")
        flush(store, domain_config(port, retry_interval=60.0))
        assert rows(store)[qid].next_attempt == 1_000_060
        flush(store, domain_config(port, retry_interval=0.0))
        assert rows(store)[qid].next_attempt is None  # ETRN only
    finally:
        store.close()


def test_run_flush_worker_retries_only_retry_domains(tmp_path, sink):
    queue = tmp_path / "queue.db"
    cfg = tmp_path / "backupmx.ini"
    cfg.write_text(textwrap.dedent(f"""\
        [backupmx]
        queue = {queue}
        timeout = 5s
        [domain:example.com]
        primary = 127.0.0.1:{sink.port}
        retry_interval = 1m
        [domain:example.org]
        primary = 127.0.0.1:{sink.port}
        """))
    config = load_config(str(cfg))
    with QueueStore(str(queue)) as store:
        enqueue(store, b"retry on\r\n")
        envelope = Envelope("a@sender.test", [Recipient("x@example.org", "example.org")])
        queue_one(store, "ORGMESSAGE01", envelope, b"etrn only\r\n", 11, client=None, helo=None)
    stop = threading.Event()
    worker = threading.Thread(target=run_flush_worker, args=(config, "worker-1", stop.is_set))
    worker.start()
    try:
        sink.wait_for(1, timeout=10)
        # The retry scan that asked for example.com has run, and so has the flush it
        # started: had it asked for example.org too, that would be pending or delivered.
        with QueueStore(str(queue)) as store:
            assert wait_for(lambda: set(rows(store)) == {"ORGMESSAGE01"} and not flushes_in_progress(queue), 10)
    finally:
        stop.set()
        worker.join(5)
    assert [m[2] for m in sink.messages] == [b"retry on\r\n"]


def test_a_slow_retry_scan_spaces_the_next_one(tmp_path, monkeypatch):
    """A retry scan reads the retrying domains' queued rows (130-230 ms at 1,000,000): the next one waits
    RETRY_SCAN_SPACING times as long as the last took, not retry_interval / 2 (0.5 s here),
    so a flush worker's scans take at most a fiftieth of a core from the flush beside them."""
    cfg = tmp_path / "backupmx.ini"
    cfg.write_text(f"[backupmx]\nqueue = {tmp_path / 'queue.db'}\n[domain:example.com]\n"
                   "primary = 127.0.0.1:25\nretry_interval = 1s\n")
    config = load_config(str(cfg))
    scans = []

    def slow_scan(store, config, logger=None):  # the first as slow as a big queue's
        started = time.monotonic()
        if not scans:
            time.sleep(0.02)
        scans.append((started, time.monotonic()))
        return []

    monkeypatch.setattr(flusher, "request_due_retries", slow_scan)
    stop = threading.Event()
    worker = threading.Thread(target=run_flush_worker, args=(config, "worker-1", stop.is_set))
    worker.start()
    try:
        assert wait_for(lambda: len(scans) >= 2, 10)
    finally:
        stop.set()
        worker.join(5)
    (first_start, first_end), (second_start, _) = scans[:2]
    assert second_start - first_end >= flusher.RETRY_SCAN_SPACING * (first_end - first_start) >= 0.9


@pytest.mark.parametrize("took, interval, wait", [
    (0.01, 2.0, 2.0),    # nearly empty: retry_interval / 2 (or 2 s) after it started, as before
    (0.2, 2.0, 10.2),    # 1M queued: fifty times as long as it took, after it ended
    (10.0, 2.0, 70.0),   # a scan that took long for another reason: at most a minute after it
])
def test_the_next_retry_scan_is_spaced_by_the_last_one_s_time_but_within_a_minute(took, interval, wait):
    assert flusher.next_retry_scan_at(100.0, 100.0 + took, interval) == pytest.approx(100.0 + wait)


def test_lease_is_renewed_while_a_slow_primary_drips_its_reply(store, sink, tmp_path):
    # 26 bytes at 0.04 s each: over 1 s for the final reply, well past a 0.6 s lease
    # (which the loop below would take at once), but the lease is renewed meanwhile.
    sink.behaviour, sink.hostile_at, sink.drip_interval = "drip", "eod", 0.04
    queue_id = enqueue(store, b"slow\r\n")
    domain = domain_config(sink)
    store.request_flush([domain.name])
    assert store.claim_flush("first", 0.6) == domain.name
    outcome = {}

    def first_flusher():
        own = QueueStore(store.path)
        try:
            outcome.update(deliver_domain(own, domain, owner="first", hostname="mx2.test", timeout=5,
                                          lease_seconds=0.6))
        finally:
            own.release_flush(domain.name, "first")
            own.close()

    thread = threading.Thread(target=first_flusher)
    thread.start()
    stolen = []
    while thread.is_alive():
        store.request_flush([domain.name])  # someone keeps sending ETRN meanwhile
        claimed = store.claim_flush("second", 60)
        if claimed:
            stolen.append(time.monotonic())
            store.release_flush(claimed, "second")
        time.sleep(0.1)
    thread.join()
    assert outcome["delivered"] == 1
    assert stolen == []  # nobody else could start delivering the same mail
    assert queue_id not in rows(store)


def test_an_extra_connection_that_left_a_message_unrecorded_has_the_flush_asked_for_again(store, sink):
    """The second connection as a thread (a flush too small for a helper, or a process with the
    queue open elsewhere): when it ends with a message it took unrecorded (here its outcome
    write fails), the flush is asked for again, as a helper's report's "again" has it, rather
    than that message waiting for the next ETRN."""
    from backupmx.flush_sharing import EXTRA_CONNECTION_MIN_MESSAGES
    from backupmx.smtpclient import Primary

    ids = [enqueue(store, numbered(i)) for i in range(EXTRA_CONNECTION_MIN_MESSAGES + 10)]
    threads = {}  # the local port of each connection to the sink -> the thread that opened it

    class Watched(Primary):
        def open(self):
            client, tls_version = super().open()
            threads[client.sock.getsockname()[1]] = threading.current_thread()
            return client, tls_version

    faulted, extra_sent = [], threading.Event()

    def on_delivery(number, delivery):  # the first message the extra connection sends: its write fails
        if threads[sink.sessions[delivery.session - 1].peer[1]] is threading.main_thread():
            extra_sent.wait(5)  # the main connection waits for the extra one to be under way
            return
        if not faulted:
            faulted.append(ids[number_of(delivery)])
            with contextlib.closing(sqlite3.connect(store.path)) as db:
                db.execute("CREATE TRIGGER test_fault BEFORE DELETE ON recipients WHEN OLD.queue_id = '%s'"
                           " BEGIN SELECT RAISE(ABORT, 'injected fault'); END" % faulted[0])
        extra_sent.set()

    sink.on_delivery = on_delivery
    domain = domain_config(sink)
    counts = flush(store, domain, primary=Watched(domain, hostname="mx2.test", timeout=5,
                                                  log=logging.getLogger("backupmx.test")))
    store.connection.execute("DROP TRIGGER test_fault")
    assert len({number_of(d) for d in sink.deliveries}) == len(ids) and faulted
    assert faulted[0] in rows(store) and counts["delivered"] < len(ids)  # sent, its 250 not recorded
    assert pending_flushes(store.path) == [DOMAIN]  # delivered again now, not at the next ETRN


# -- a big flush shared with a helper process ---------------------------------------------------


# A QueueStore whose connection, closed across the fork of a flush's helper (closed_for_fork),
# meets a real EMFILE when the flush opens it again, the first time.
REOPEN_FAILS_ONCE = """
class ReopenFailsOnce(QueueStore):
    failed = False
    @contextlib.contextmanager
    def closed_for_fork(self):
        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            with super().closed_for_fork():
                yield  # the helper leaves with os._exit: only the parent goes on
                if not ReopenFailsOnce.failed:
                    ReopenFailsOnce.failed = True
                    lowest = os.dup(0)
                    os.close(lowest)
                    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, limits[1]))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
"""
SPLIT_FLUSH_SCRIPT = """
import contextlib, json, os, resource, sys
sys.path.insert(0, {repo!r})
from backupmx.children import StopFlag
from backupmx.config import DomainConfig
from backupmx.flusher import deliver_domain
from backupmx.log import setup_logging
from backupmx.smtpclient import Primary
from backupmx.store import QueueStore, QueueUnavailable
log = setup_logging("stderr")
stop = StopFlag().install()
{reopen_fails_once}
if {helper_fails}:  # the helper fails right after the fork, before its own work starts
    import backupmx.flush_sharing
    class FailsInTheHelper(backupmx.flush_sharing.SharedWork):
        def __init__(self, *args, return_fd=None, **kwargs):
            if return_fd is not None:  # only the helper's side holds the pipe's write end
                raise OSError(24, "Too many open files")
            super().__init__(*args, return_fd=return_fd, **kwargs)
    backupmx.flush_sharing.SharedWork = FailsInTheHelper
    os.setpgid(0, 0)  # a group of its own: a signal to "every process of the group" stays in it
store = (ReopenFailsOnce if {reopen_fails} else QueueStore)({db!r})
other = QueueStore({db!r}) if {other} else None  # a second connection open in the process
store.request_flush(["example.com"])
assert store.claim_flush("split", 60) == "example.com"
domain = DomainConfig(name="example.com", primary=("127.0.0.1", {port}), primary_tls="none", recipients=None,
                      primary_ca=None, max_queue_messages=None, max_queue_bytes=None,
                      queue_lifetime=86400.0, retry_interval=0.0)
class OneSession(Primary):
    single_session = True  # as an ODMR session the peer reversed
primary = OneSession(domain, hostname="mx2.test", timeout=5, log=log) if {single} else None
print("claimed", flush=True)
try:
    counts = deliver_domain(store, domain, owner="split", hostname="mx2.test", timeout=5, lease_seconds={lease},
                            should_stop=stop.should_stop, primary=primary)
except QueueUnavailable as e:
    try:
        unreaped = os.waitpid(-1, os.WNOHANG)  # (0, 0) while one runs, (pid, status) once it ended
    except ChildProcessError:
        unreaped = None
    print(json.dumps({{"error": str(e), "unreaped": unreaped}}), flush=True)
    sys.exit(0)
store.release_flush("example.com", "split")
print(json.dumps(counts), flush=True)
"""
SPLIT_MESSAGES = 240  # above flush_sharing.HELPER_MIN_MESSAGES


def start_split_flush(tmp_path, sink, *, single=False, lease=60, other=False, reopen_fails=False, helper_fails=False):
    """A flush of SPLIT_MESSAGES messages in a process of its own (one thread: it may fork a
    helper); returns (the process, the queue's path, the messages' queue ids in order)."""
    from backupmx.flush_sharing import HELPER_MIN_MESSAGES

    assert SPLIT_MESSAGES >= HELPER_MIN_MESSAGES
    db = str(tmp_path / "queue.db")
    with QueueStore(db) as store:
        ids = [enqueue(store, b"X-Test-Id: %d\r\n\r\nbody\r\n" % i) for i in range(SPLIT_MESSAGES)]
    script = SPLIT_FLUSH_SCRIPT.format(repo=str(REPO), db=db, port=sink.port, single=single, lease=lease, other=other,
                                      reopen_fails=reopen_fails, helper_fails=helper_fails,
                                      reopen_fails_once=REOPEN_FAILS_ONCE)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"claimed\n"
    return proc, db, ids


def finish(proc, timeout=20):
    """The flush process's counts (its last stdout line) and its log (stderr); it must exit 0."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().splitlines()[-1]), err.decode()


def test_a_big_flush_is_shared_with_a_helper_process_and_delivers_each_message_once(tmp_path, sink):
    proc, db, ids = start_split_flush(tmp_path, sink)
    counts, log = finish(proc)
    assert counts == {"messages": SPLIT_MESSAGES, "delivered": SPLIT_MESSAGES, "deferred": 0, "failed": 0}
    got = [d.body.split(b"\r\n")[0] for d in sink.deliveries]
    assert sorted(got) == sorted(b"X-Test-Id: %d" % i for i in range(SPLIT_MESSAGES))  # each once
    # Two connections, from two processes: the delivered lines carry two pids.
    assert sum(1 for s in sink.sessions if s.commands) == 2
    pids = set(re.findall(r"backupmx\[(\d+)\]: delivered ", log))
    assert len(pids) == 2 and str(proc.pid) in pids, pids
    assert f"flush-done domain=example.com relay=127.0.0.1:{sink.port} messages={SPLIT_MESSAGES}" in log
    with QueueStore(db) as store:
        assert rows(store) == {}
    assert pending_flushes(db) == []


def helper_of(proc):
    """The pid of the helper process `proc` forked for its flush."""
    helpers = wait_for(lambda: children_of(proc.pid), 5)
    assert len(helpers) == 1, helpers
    return helpers[0]


def stalled_at(sink, n):
    """From the n-th delivery on, the sink keeps its 250 until the returned Event is set: each of
    the two connections then waits with one message in flight."""
    release = threading.Event()
    sink.on_delivery = lambda number, delivery: number >= n and release.wait(30)
    return release


@contextlib.contextmanager
def stalled_split_flush(tmp_path, sink, n, **kwargs):
    """A split flush (start_split_flush) whose two connections each wait for the 250 of a
    message in flight (stalled_at n) for the block: yields (the process, the queue's path, the
    helper's pid)."""
    release = stalled_at(sink, n)
    proc, db, _ = start_split_flush(tmp_path, sink, **kwargs)
    try:
        helper = helper_of(proc)
        sink.wait(lambda: len(sink.deliveries) >= n + 1, timeout=10)
        yield proc, db, helper
    finally:
        release.set()


def test_a_helper_killed_mid_flush_leaves_its_messages_queued_for_the_next_flush(tmp_path, sink):
    with stalled_split_flush(tmp_path, sink, 60) as (proc, db, helper):
        os.kill(helper, signal.SIGKILL)
    counts, log = finish(proc)  # the parent's connection delivers the rest of the work list
    assert "flush-helper-lost domain=example.com" in log and "status=signal-9" in log
    assert pending_flushes(db) == [DOMAIN]  # the next flush delivers what the helper held
    with QueueStore(db) as store:
        left = rows(store)
        assert left and len(left) < SPLIT_MESSAGES - 60
        sink.on_delivery = None
        flush(store, domain_config(sink))
        assert rows(store) == {}
    got = [d.body.split(b"\r\n")[0] for d in sink.deliveries]
    assert set(got) == {b"X-Test-Id: %d" % i for i in range(SPLIT_MESSAGES)}  # none lost
    # Again at worst: what the helper delivered and had not recorded yet (its batch, OUTCOME_BATCH).
    assert len(got) - len(set(got)) <= OUTCOME_BATCH + 1


def queue_files_locked(db, pids):
    """{pid: the queue files ("db", "shm") on which /proc/locks shows that process holding a lock}."""
    files = {os.stat(db).st_ino: "db", os.stat(db + "-shm").st_ino: "shm"}
    held = {pid: set() for pid in pids}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "->":  # a lock waited for
            fields = fields[:1] + fields[2:]
        pid, inode = int(fields[4]), int(fields[5].split(":")[2])
        if pid in held and inode in files:
            held[pid].add(files[inode])
    return held


def test_the_helper_holds_its_own_sqlite_locks(tmp_path, sink):
    """In WAL mode each process with the queue open holds a read lock on the database file and
    on the -shm's DMS byte: how the last one to close knows it may checkpoint and delete the WAL.
    A helper forked with the parent's connection open would believe it holds the parent's."""
    with stalled_split_flush(tmp_path, sink, 60) as (proc, db, helper):
        held = queue_files_locked(db, (proc.pid, helper))
    finish(proc)
    assert held == {proc.pid: {"db", "shm"}, helper: {"db", "shm"}}


def ended(pid):
    """Whether process `pid` is gone or a zombie."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_a_helper_whose_flush_worker_was_killed_ends_with_a_log_line_not_a_traceback(tmp_path, sink):
    with stalled_split_flush(tmp_path, sink, 60) as (proc, db, helper):
        proc.kill()  # the master's stop timeout: the helper is orphaned mid-message
        proc.wait()
    out, err = proc.communicate(timeout=20)  # EOF once the orphaned helper is gone too
    log = err.decode()
    assert wait_for(lambda: ended(helper), 5)  # init reaps it, in its own time
    assert "Traceback" not in log and "flush-helper-crashed" not in log
    assert "flush-helper-orphaned domain=example.com" in log


def test_a_helper_stopped_alone_hands_back_the_message_it_had_announced(tmp_path, sink):
    """With PIPELINING the helper nearly always has the next message announced when it stops:
    that message was taken from the work list and never sent, so it goes back to the parent."""
    with stalled_split_flush(tmp_path, sink, 60) as (proc, db, helper):
        os.kill(helper, signal.SIGTERM)  # the helper alone (an operator, a supervisor's group kill)
    counts, log = finish(proc)
    assert "flush-done domain=example.com" in log and "flush-helper-lost" not in log
    assert counts == {"messages": SPLIT_MESSAGES, "delivered": SPLIT_MESSAGES, "deferred": 0, "failed": 0}
    got = [d.body.split(b"\r\n")[0] for d in sink.deliveries]
    assert sorted(got) == sorted(b"X-Test-Id: %d" % i for i in range(SPLIT_MESSAGES))  # each once
    with QueueStore(db) as store:
        assert rows(store) == {}


@pytest.mark.parametrize("stop", ["lease-stolen", "sigterm"])
def test_a_split_flush_that_must_stop_stops_both_processes(tmp_path, sink, stop):
    with stalled_split_flush(tmp_path, sink, 40, lease=1.2) as (proc, db, helper):  # renewed every 0.2 s
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            threads = [len(os.listdir(f"/proc/{pid}/task")) for pid in (proc.pid, helper)]
            db_ = sqlite3.connect(db, isolation_level=None)
            db_.execute("UPDATE flushes SET lease_owner = 'another', lease_expires = lease_expires + 60")
            db_.close()
            # Both processes' renewals have found the lease gone: each one's renewal thread has ended
            # (a fixed 0.5 s, two intervals, raced a loaded machine's thread wake-ups).
            assert wait_for(lambda: [len(os.listdir(f"/proc/{pid}/task")) for pid in (proc.pid, helper)]
                            == [n - 1 for n in threads], 5), threads
        sent = len(sink.deliveries)
    counts, log = finish(proc)
    if stop == "lease-stolen":
        assert len(sink.deliveries) == sent  # neither process started another message
    else:  # the helper stops between messages once the parent passes the stop on, at its next step
        assert len(sink.deliveries) < sent + (SPLIT_MESSAGES - sent) // 2
    assert wait_for(lambda: not os.path.exists(f"/proc/{helper}"), 5)  # reaped, not orphaned
    assert ("flush-aborted" if stop == "lease-stolen" else "flush-interrupted") in log
    assert "flush-helper-lost" not in log
    with QueueStore(db) as store:  # what either process delivered is recorded, the rest is queued
        assert len(rows(store)) == SPLIT_MESSAGES - len(sink.deliveries)
    if stop == "sigterm":
        assert pending_flushes(db) == [DOMAIN]


def test_a_single_session_primary_gets_no_helper(tmp_path, sink):
    proc, db, ids = start_split_flush(tmp_path, sink, single=True)
    counts, log = finish(proc)
    assert counts["delivered"] == SPLIT_MESSAGES
    assert len(sink.sessions) == 1
    assert len(set(re.findall(r"backupmx\[(\d+)\]: delivered ", log))) == 1


def test_a_flush_with_another_queue_connection_open_keeps_its_second_connection_in_a_thread(tmp_path, sink):
    """A fork would hand the helper that connection's SQLite state (flush_sharing.share): the flush
    says why in one line and shares its work with a thread instead, each message once."""
    proc, db, ids = start_split_flush(tmp_path, sink, other=True)
    counts, log = finish(proc)
    assert counts["delivered"] == SPLIT_MESSAGES
    assert "helper: another connection to the queue is open in this process" in log
    assert sum(1 for s in sink.sessions if s.commands) == 2  # the extra connection, as a thread
    assert len(set(re.findall(r"backupmx\[(\d+)\]: delivered ", log))) == 1
    assert sorted(d.body.split(b"\r\n")[0] for d in sink.deliveries) == sorted(
        b"X-Test-Id: %d" % i for i in range(SPLIT_MESSAGES))


def test_a_helper_forked_by_a_flush_whose_queue_connection_cannot_reopen_is_stopped_and_reaped(tmp_path, sink):
    """The flush's own connection, closed across the fork, fails to reopen (EMFILE): the flush
    fails, and the helper it had just forked is stopped and reaped before it does, not left
    delivering beside the flush that takes over, nor a zombie."""
    proc, db, ids = start_split_flush(tmp_path, sink, reopen_fails=True)
    result, log = finish(proc)
    assert "queue database" in result["error"] and result["unreaped"] is None, result
    got = {d.body.split(b"\r\n")[0] for d in sink.deliveries}
    assert len(got) < SPLIT_MESSAGES // 2  # it stopped at once: the rest waits for the next flush
    with QueueStore(db) as store:  # what it delivered is recorded; every other message is still queued
        left = rows(store)
    assert len(left) == SPLIT_MESSAGES - len(got) and len(got) == len(sink.deliveries), log


FLUSH_WORKER_SCRIPT = """
import contextlib, os, resource, sys
sys.path.insert(0, {repo!r})
import backupmx.flusher
from backupmx.children import StopFlag
from backupmx.config import load_config
from backupmx.log import setup_logging
from backupmx.store import QueueStore, QueueUnavailable
setup_logging("stderr")
stop = StopFlag().install()
{reopen_fails_once}
backupmx.flusher.QueueStore = ReopenFailsOnce  # the worker's queue connections, its first and the next
worker_pause = backupmx.flusher._pause
def said_and_shortened_pause(seconds, should_stop):
    if seconds >= 1:  # a pause after a failure (not the idle poll): said, and taken a tenth as long
        print(f"pause {{seconds:g}}", flush=True)
        seconds /= 10
    worker_pause(seconds, should_stop)
backupmx.flusher._pause = said_and_shortened_pause
backupmx.flusher.run_flush_worker(load_config({cfg!r}), "worker-1", stop.should_stop,
                                  ready=lambda: print("ready", flush=True))
print("survived", flush=True)
"""


# Every fork of a helper meets it: the cause persists (the pipes to the helper take the last
# descriptors), and each time says so.
REOPEN_ALWAYS_FAILS = """
class ReopenFailsOnce(ReopenFailsOnce):
    @contextlib.contextmanager
    def closed_for_fork(self):
        ReopenFailsOnce.failed = False
        with super().closed_for_fork():
            yield
            print("reopen-failed", flush=True)
"""
# The worker's next connections after the lost one meet the same real EMFILE, `times` times.
OPENS_FAIL = """
class ReopenFailsOnce(ReopenFailsOnce):
    opens_failed = 0
    def __init__(self, *args, **kwargs):
        if ReopenFailsOnce.failed and ReopenFailsOnce.opens_failed < {times}:
            ReopenFailsOnce.opens_failed += 1
            limits = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest = os.dup(0)
            os.close(lowest)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, limits[1]))
            try:
                super().__init__(*args, **kwargs)
            except QueueUnavailable:
                print("open-failed", flush=True)  # (only a real failure says so)
                raise
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        else:
            super().__init__(*args, **kwargs)
"""


def queue_for_a_helper(tmp_path, sink, settings: str = "") -> tuple[Path, Path]:
    """A queue with a flush requested of HELPER_MIN_MESSAGES messages (enough for a helper process)
    for the sink, and a config for it with `settings` in [backupmx]: (queue, config)."""
    from backupmx.flush_sharing import HELPER_MIN_MESSAGES

    queue = tmp_path / "queue.db"
    cfg = tmp_path / "backupmx.ini"
    cfg.write_text(f"[backupmx]\nhostname = mx2.test\nqueue = {queue}\ntimeout = 5s\n{settings}"
                   f"[domain:{DOMAIN}]\nprimary = 127.0.0.1:{sink.port}\nprimary_tls = none\n")
    with QueueStore(str(queue)) as store:
        for i in range(HELPER_MIN_MESSAGES):
            enqueue(store, b"X-Test-Id: %d\r\n\r\nbody\r\n" % i)
        store.request_flush([DOMAIN])
    return queue, cfg


def run_flush_worker_losing_its_queue(tmp_path, sink, opens_fail: int = 0, persistent: bool = False
                                      ) -> tuple[bytes, str]:
    """A flush worker in its own process whose flush loses its queue connection at the helper's
    fork (a real EMFILE; at every such fork when `persistent`), and whose next `opens_fail`
    connections fail so too; its flush of HELPER_MIN_MESSAGES delivered, or the worker died.
    (stdout, the log)."""
    queue, cfg = queue_for_a_helper(tmp_path, sink)
    reopen_fails = REOPEN_FAILS_ONCE + (REOPEN_ALWAYS_FAILS if persistent else "")
    script = FLUSH_WORKER_SCRIPT.format(repo=str(REPO), cfg=str(cfg),
                                        reopen_fails_once=reopen_fails + OPENS_FAIL.format(times=opens_fail))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        with QueueStore(str(queue)) as store:
            # Delivered and the flush ended (its lease released after its flush-done line: a SIGTERM
            # between its last delivery and that line makes it flush-interrupted), or the worker died.
            wait_for(lambda: (not rows(store) and not flushes_in_progress(queue)) or proc.poll() is not None, 15)
            assert not rows(store)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    return out, err.decode()


def test_a_flush_worker_whose_queue_connection_cannot_reopen_gives_the_flush_back_and_goes_on(tmp_path, sink):
    """The flush's connection, closed across its helper's fork, meets a real EMFILE when it is
    opened again, and would at every such fork: the flush worker says so in one line, opens
    another connection, gives the flush back (its lease released, the flush requested again)
    and delivers it then without a helper, each message once. It does not die (a traceback,
    the master's respawn), nor fork, fail and log again each second while the cause lasts."""
    from backupmx.flush_sharing import HELPER_MIN_MESSAGES

    out, log = run_flush_worker_losing_its_queue(tmp_path, sink, persistent=True)
    assert out == b"reopen-failed\npause 1\nsurvived\n", log  # one fork of a helper, not one a retry
    [error] = [line for line in log.splitlines() if "flush-error" in line]
    assert f"flush-error domain={DOMAIN} owner=worker-1 error=" in error and "unable to open database file" in error, log
    assert f"flush-lease-released domain={DOMAIN} owner=worker-1" in log
    assert f"flush-done domain={DOMAIN}" in log and "Traceback" not in log, log
    got = sorted(d.body.split(b"\r\n")[0] for d in sink.deliveries)
    assert got == sorted(b"X-Test-Id: %d" % i for i in range(HELPER_MIN_MESSAGES))  # each once
    assert pending_flushes(str(tmp_path / "queue.db")) == []


def test_a_flush_worker_tries_its_queue_again_each_second_while_it_cannot_open_it(tmp_path, sink):
    """After the lost connection, its next ones fail too (EMFILE, twice): the worker tries again
    a second later each time, saying nothing more than the flush's one error line, and once the
    queue opens it gives the flush back and delivers it, each message once."""
    from backupmx.flush_sharing import HELPER_MIN_MESSAGES

    out, log = run_flush_worker_losing_its_queue(tmp_path, sink, opens_fail=2)
    assert out == b"open-failed\npause 1\nopen-failed\npause 1\npause 1\nsurvived\n", log  # each a second
    assert len([line for line in log.splitlines() if "flush-error" in line]) == 1, log
    assert f"flush-lease-released domain={DOMAIN} owner=worker-1" in log
    assert f"flush-done domain={DOMAIN}" in log and "Traceback" not in log, log
    got = sorted(d.body.split(b"\r\n")[0] for d in sink.deliveries)
    assert got == sorted(b"X-Test-Id: %d" % i for i in range(HELPER_MIN_MESSAGES))  # each once
    assert pending_flushes(str(tmp_path / "queue.db")) == []


def test_a_flush_worker_that_lost_its_connection_at_a_helper_s_fork_tries_a_helper_again_later(tmp_path, sink):
    """Without a helper after the lost connection (a real EMFILE at every helper fork), but not for
    the rest of its life: once HELPER_RETRY_MIN (here 0.3 s) is over, its next big flush forks a
    helper again (and, the cause still there, loses its connection once more and delivers alone)."""
    from backupmx.flush_sharing import HELPER_MIN_MESSAGES

    queue, cfg = queue_for_a_helper(tmp_path, sink)
    script = FLUSH_WORKER_SCRIPT.format(
        repo=str(REPO), cfg=str(cfg),
        reopen_fails_once=REOPEN_FAILS_ONCE + REOPEN_ALWAYS_FAILS + "backupmx.flusher.HELPER_RETRY_MIN = 0.3\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def said(line, timeout=10):
        assert select.select([proc.stdout], [], [], timeout)[0], f"no {line!r}"
        assert proc.stdout.readline() == line

    try:
        said(b"ready\n")
        said(b"reopen-failed\n")
        lost = time.monotonic()
        said(b"pause 1\n")
        with QueueStore(str(queue)) as store:
            assert wait_for(lambda: not rows(store) and not flushes_in_progress(queue), 15)
            time.sleep(max(0.0, lost + 0.3 - time.monotonic()))
            for i in range(HELPER_MIN_MESSAGES):
                enqueue(store, b"X-Test-Id: again %d\r\n\r\nbody\r\n" % i)
            store.request_flush([DOMAIN])
            said(b"reopen-failed\n")  # a helper forked again
            said(b"pause 1\n")
            assert wait_for(lambda: not rows(store) and not flushes_in_progress(queue), 15)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and out == b"survived\n", err.decode()
    assert len(sink.deliveries) == 2 * HELPER_MIN_MESSAGES  # each once


def test_the_helper_back_off_doubles_up_to_its_bound():
    from backupmx import flusher

    now = [1000.0]
    helpers = flusher._HelperBackoff(clock=lambda: now[0])
    waits = []
    for _ in range(9):
        assert helpers.allowed()
        helpers.lost()
        waits.append(helpers.until - now[0])
        assert not helpers.allowed()
        now[0] = helpers.until
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


DETACHED_FLUSH_SCRIPT = """
import contextlib, os, resource, sys
sys.path.insert(0, {repo!r})
import backupmx.inetd
from backupmx.store import QueueStore, QueueUnavailable
{reopen_fails_once}
backupmx.inetd.QueueStore = ReopenFailsOnce  # the flusher's queue connection
sys.exit(backupmx.inetd.detached_flush_main({cfg!r}))
"""


def test_the_one_shot_flusher_gives_back_a_flush_that_lost_its_queue_connection_and_delivers_it(tmp_path, sink):
    """The detached flusher (`serve --inetd`'s, `backupmx flush`'s) whose flush loses its queue
    connection at its helper's fork (a real EMFILE, at every such fork) releases the lease and
    requests the flush again on a new connection, as a flush worker does, and then delivers it
    there without a helper, each message once: in an inetd-only setup nothing else would before
    the next ETRN. One error line (the flush's), status 0."""
    from backupmx.flush_sharing import HELPER_MIN_MESSAGES

    log = tmp_path / "flush.log"
    queue, cfg = queue_for_a_helper(tmp_path, sink, f"log = {log}\n")
    script = DETACHED_FLUSH_SCRIPT.format(repo=str(REPO), cfg=str(cfg),
                                          reopen_fails_once=REOPEN_FAILS_ONCE + REOPEN_ALWAYS_FAILS)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    text = log.read_text()
    assert done.returncode == 0 and done.stdout == b"ready\n", (done, text)
    [error] = [line for line in text.splitlines() if "flush-error" in line]
    assert "flush-process-failed" not in text, text
    assert f"flush-error domain={DOMAIN}" in error and "unable to open database file" in error, text
    assert f"flush-lease-released domain={DOMAIN}" in text and "Traceback" not in text, text
    assert f"flush-done domain={DOMAIN}" in text, text
    got = sorted(d.body.split(b"\r\n")[0] for d in sink.deliveries)
    assert got == sorted(b"X-Test-Id: %d" % i for i in range(HELPER_MIN_MESSAGES))  # each once
    assert pending_flushes(str(queue)) == [] and flushes_in_progress(str(queue)) == 0


def test_a_helper_that_fails_right_after_the_fork_ends_there_and_the_flush_delivers_alone(tmp_path, sink):
    """What the forked helper does before its work starts (its end of the pipes) runs inside
    children.run_child: a failure there ends the helper with os._exit, never unwinds into the
    flush's code as a second flusher, nor takes the parent's error path, whose "stop the
    helper" would be a SIGTERM to pid 0: the whole process group, the master with it."""
    proc, db, ids = start_split_flush(tmp_path, sink, helper_fails=True)
    counts, log = finish(proc)
    assert "flush-helper-crashed" in log and "flush-interrupted" not in log, log
    assert counts == {"messages": SPLIT_MESSAGES, "delivered": SPLIT_MESSAGES, "deferred": 0, "failed": 0}, log
    assert len(sink.deliveries) == SPLIT_MESSAGES
    with QueueStore(db) as store:
        assert rows(store) == {}


def test_a_primary_gone_mid_split_flush_is_suspended_once_for_both_processes(tmp_path, sink):
    with stalled_split_flush(tmp_path, sink, 40) as (proc, db, helper):
        sink.stop()  # both connections are cut, and the parent's next one is refused
    counts, log = finish(proc)
    # Decided once, by the parent's connection; the last line counts both processes' outcomes.
    assert len(re.findall(r"flush-suspended domain=example.com \S+ reason=", log)) == 1
    assert counts["messages"] == SPLIT_MESSAGES and counts["delivered"] == len(sink.deliveries) - 2
    assert "flush-helper-lost" not in log
    with QueueStore(db) as store:
        left = rows(store)
    # Nothing delivered twice or lost; every message left was tried and says why it waits,
    # the helper's handed-back run too.
    assert len(left) == SPLIT_MESSAGES - len(sink.deliveries) + 2  # the two in flight had no 250
    assert all(m.attempts >= 1 and m.last_reply for m in left.values()), [
        (m.queue_id, m.attempts, m.last_reply) for m in left.values() if not m.attempts]


def test_shared_work_runs_are_each_taken_once_and_a_helper_s_rest_comes_back():
    """The pipe of runs (SharedWork) with no processes: what the parent and a helper take."""
    from backupmx.flush_sharing import _RUN, SharedWork

    messages = list(range(10))
    runs_r, runs_w = os.pipe()
    os.set_blocking(runs_r, False)
    os.write(runs_w, b"".join(_RUN.pack(first, count) for first, count in ((0, 3), (3, 3), (6, 3), (9, 1))))
    helper = SharedWork(messages, runs_r, return_fd=runs_w)
    parent = SharedWork(messages, runs_r)
    assert helper.popleft() == 0  # the helper takes the run 0-2
    assert parent.popleft() == 3  # the parent the next
    helper.give_back()  # it stops early: 1 and 2 go back, as one run
    os.close(runs_w)  # and it is gone
    taken = []
    while True:
        try:
            taken.append(parent.popleft())
        except IndexError:
            break
    assert taken == [4, 5, 6, 7, 8, 9, 1, 2]
    assert parent.ended and not parent.wait(lambda: False, None)
    os.close(runs_r)


def test_a_helper_s_announced_message_goes_back_with_the_rest_of_its_run():
    """What the helper took last and announced (Flush.quit) is the message just before its
    rest: the last of the run before when the rest is empty, the one before it otherwise."""
    from backupmx.flush_sharing import _RUN, SharedWork

    messages = [object() for _ in range(6)]
    runs_r, runs_w = os.pipe()
    os.set_blocking(runs_r, False)
    os.write(runs_w, _RUN.pack(0, 3) + _RUN.pack(3, 3))
    helper = SharedWork(messages, runs_r, return_fd=runs_w)
    taken = [helper.popleft() for _ in range(3)]  # the whole run 0-2; the last one announced
    assert helper.give_back(announced=taken[-1])
    assert helper.popleft() is messages[3]  # then run 3-5; 3 announced, 4 and 5 its rest
    assert helper.give_back(announced=messages[3])
    assert not helper.give_back(announced=messages[0])  # not the one taken last: the parent asks again
    got = []
    while True:
        try:
            data = os.read(runs_r, _RUN.size)
        except BlockingIOError:
            break
        got.append(_RUN.unpack(data))
    assert got == [(2, 1), (3, 3)]
    os.close(runs_r)
    os.close(runs_w)


@pytest.mark.parametrize("again", [0, 1])
def test_a_helper_that_left_a_message_unrecorded_has_the_flush_asked_for_again(store, sink, again):
    """A helper's report ends with "again" when it stopped with a message it took neither recorded
    nor handed back (its lease ran out alone, its outcome write failed): the flush is asked for again."""
    from backupmx.flush_session import Flush
    from backupmx.flush_sharing import SharedWork
    from backupmx.flusher import _join_helper

    enqueue(store, b"still queued\r\n")  # what it left unrecorded
    domain = domain_config(sink)
    flush = Flush(store, domain, owner="split", hostname="mx2.test", timeout=5, lease=None,
                   log=logging.getLogger("test"))
    runs_r, runs_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper's end: its report, then gone
        os.write(result_w, b"3 2 1 0 %d" % again)
        os._exit(0)
    os.close(runs_w)
    os.close(result_w)
    _join_helper(flush, SharedWork([], runs_r, helper_pid=pid, result_fd=result_r))
    assert flush.counts == {"messages": 3, "delivered": 2, "deferred": 1, "failed": 0}
    assert pending_flushes(store.path) == ([DOMAIN] if again else [])
