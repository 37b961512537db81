"""CHUNKING (RFC 3030): BDAT framing in the sans-I/O session, then through a real server.

Table tests feed bytes to smtp.Session through test_smtp's Driver (no
sockets); the random-split tests cut a conversation and its chunk sizes
anywhere, as the DATA framing tests do; the end-to-end tests use a real
server, a real queue and the sink as the primary.
"""

import random
import socket
import sqlite3

import pytest

from backupmx import replies, smtp_body
from conftest import read_line, received_client
from test_smtp import (Driver, assert_random_splits, config, new, reply_line,  # noqa: F401 - config is a fixture
                       turns_after)

HEAD = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.com>\r\n"


def bdat(*chunks: bytes, last=True) -> bytes:
    """BDAT commands carrying `chunks`, the last one with LAST."""
    out = b""
    for index, chunk in enumerate(chunks):
        marker = b" LAST" if last and index == len(chunks) - 1 else b""
        out += b"BDAT %d%s\r\n" % (len(chunk), marker) + chunk
    return out


def session(config, **kwargs) -> Driver:
    d = new(config, **kwargs)
    d.lines()
    return d


def test_ehlo_offers_chunking(config):
    assert "250 CHUNKING" in session(config).feed(b"EHLO c\r\n")


def test_chunks_make_one_message_and_last_is_answered_after_the_commit(config):
    d = session(config, commit="Q7")
    got = d.feed(HEAD + bdat(b"Subject: x\r", b"\n\r\nbody\r\n.\r\n", b"MAIL FROM:<evil@x>\r\n"))
    assert got[-3:] == [reply_line(replies.CHUNK_RECEIVED, octets=11), reply_line(replies.CHUNK_RECEIVED, octets=12),
                        reply_line(replies.QUEUED, queue_id="Q7")]
    # Octets are data: a "." line and a command inside a chunk are content, nothing else.
    assert bytes(d.body) == b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<evil@x>\r\n"
    assert d.session.envelope is None  # a new transaction may start


def test_last_waits_for_the_commit(config):
    """Rule 6: the 250 for BDAT LAST comes from message_queued, never before."""
    d = session(config, commit="Q1")
    d.feed(HEAD)
    d.session.receive_data(bdat(b"x\r\n"))
    events = []
    while (event := d.session.next_event()) is not None:
        events.append(type(event).__name__)
    assert events[-1] == "MessageReceived"
    assert not any(line.startswith(b"250 2.0.0 Ok: queued") for line in d.session.data_to_send().split(b"\r\n"))
    d.session.message_queued("Q1")
    assert d.session.data_to_send().startswith(b"250 2.0.0 Ok: queued as Q1")


@pytest.mark.parametrize("script, expected", [
    # No transaction: the chunk is read through and refused; the octets are not commands.
    (b"EHLO c\r\nBDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n", ["503 5.5.1", "250 2.0.0"]),
    (b"BDAT 6\r\nQUIT\r\nNOOP\r\n", ["503 5.5.1", "250 2.0.0"]),  # before EHLO
    (b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nBDAT 3 LAST\r\nabc", ["250 2.1.0", "503 5.5.1"]),  # no RCPT
    # DATA after BDAT in one transaction: 503; the BDAT transaction goes on.
    (HEAD + b"BDAT 3\r\nabcDATA\r\nBDAT 2 LAST\r\n\r\n", ["250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1",
                                                          "250 2.0.0"]),
    # RCPT after the first chunk: 503 (review-1 m1: Received: is written then); the chunks go on.
    (HEAD + b"BDAT 3\r\nabcRCPT TO:<y@example.com>\r\nBDAT 2 LAST\r\n\r\n",
     ["250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "250 2.0.0"]),
    # BDAT after LAST: the transaction is over.
    (HEAD + bdat(b"a\r\n") + b"BDAT 1 LAST\r\nx", ["250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1"]),
    # Syntax: the size cannot be read, so the chunk cannot be skipped: answered, then closed.
    (b"EHLO c\r\nBDAT\r\nNOOP\r\n", ["501 5.5.4"]),
    (b"EHLO c\r\nBDAT x1 LAST\r\nNOOP\r\n", ["501 5.5.4"]),
    (b"EHLO c\r\nBDAT 1 FIRST\r\nNOOP\r\n", ["501 5.5.4"]),
    (b"EHLO c\r\nBDAT -1\r\nNOOP\r\n", ["501 5.5.4"]),
    (b"EHLO c\r\nBDAT 1 LAST extra\r\nNOOP\r\n", ["501 5.5.4"]),
    (HEAD + b"BDAT 0 LAST\r\n", ["250 2.1.0", "250 2.1.5", "250 2.0.0"]),  # an empty message
    (HEAD + b"BDAT 0\r\nBDAT 0\r\nBDAT 2 last\r\nx\n", ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0",
                                                        "550 5.5.2"]),
])
def test_replies(config, script, expected):
    d = session(config)
    got = [line[:9].strip() for line in d.feed(script) if line[3:4] == " " and not line.startswith("250 CHUNK")]
    assert got[-len(expected):] == expected, got
    if expected[0] == "501 5.5.4":
        assert d.session.closed


@pytest.mark.parametrize("content, reply", [
    (b"Subject: x\r\n\r\nbare\nlf\r\n", replies.BARE_LINE_ENDING),
    (b"Subject: x\r\n\r\nbare\rcr\r\n", replies.BARE_LINE_ENDING),
    (b"Subject: x\r\n\r\nends in cr\r", replies.BARE_LINE_ENDING),
    (b"Subject: x\r\n\r\nnul\0\r\n", replies.NUL_IN_DATA),
    (b"x" * (smtp_body.MAX_DATA_LINE + 1) + b"\r\n", replies.LINE_TOO_LONG),
    (b"Received: x\r\n" * (smtp_body.MAX_RECEIVED_HEADERS + 1) + b"\r\n", replies.MAIL_LOOP),
])
def test_content_is_refused_as_data_would_refuse_it(config, content, reply):
    """A body a line-based peer would read differently never reaches the queue (and so the primary)."""
    d = session(config)
    half = len(content) // 2
    got = d.feed(HEAD + bdat(content[:half], content[half:]))
    assert got[-1] == reply_line(reply)
    assert not any(type(e).__name__ == "MessageReceived" for e in d.events)
    assert any(type(e).__name__ == "MessageAborted" for e in d.events)
    assert d.feed(b"NOOP\r\n") == [reply_line(replies.OK)]  # in step


def test_size_is_enforced_as_chunks_arrive_and_read_through(config):
    d = session(config)
    limit = d.session.settings.max_message_size
    content = (b"y" * 98 + b"\r\n") * (limit // 100 + 1)
    got = d.feed(HEAD + b"BDAT %d\r\n" % len(content) + content)
    assert got[-1] == reply_line(replies.MESSAGE_TOO_BIG)  # refused on the chunk that crossed the limit
    assert d.feed(bdat(b"more\r\n") + b"NOOP\r\n") == [reply_line(replies.MESSAGE_TOO_BIG), reply_line(replies.OK)]
    assert len(d.body) <= limit and d.session.envelope is None


def test_chunks_after_a_failure_count_as_one_error(config):
    """A client that pipelines a big message in small chunks gets the refusal for each,
    not a 421 for too many errors: the failure stays permanent for it."""
    d = session(config)
    chunks = [b"ok\r\n", b"bad\nline\r\n"] + [b"more\r\n"] * 40
    got = d.feed(HEAD + bdat(*chunks) + b"NOOP\r\n")
    assert got[-2:] == [reply_line(replies.BARE_LINE_ENDING), reply_line(replies.OK)]
    assert got.count(reply_line(replies.BARE_LINE_ENDING)) == 41 and not d.session.closed


def test_recipients_all_come_before_the_first_chunk(config):
    """review-1 m1: the Received: header, built when the content starts, names the one
    recipient of a single-recipient message: a RCPT after that would be queued under
    another recipient's name (a Bcc shown to the others)."""
    d = session(config, commit="Q1")
    got = d.feed(HEAD + b"BDAT 9\r\nSubj: x\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.com>\r\n"
                 + bdat(b"hi\r\n"))
    assert got[-4:] == [reply_line(replies.CHUNK_RECEIVED, octets=9), reply_line(replies.RCPT_AFTER_BDAT),
                        reply_line(replies.RCPT_AFTER_BDAT), reply_line(replies.QUEUED, queue_id="Q1")]
    [message] = [e for e in d.events if type(e).__name__ == "MessageReceived"]
    assert [r.address for r in message.envelope.recipients] == ["x@example.com"]
    # RSET (or a new MAIL) starts a transaction that takes recipients again.
    assert d.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<y@example.com>\r\n")[-1].startswith("250 2.1.5")


def test_a_last_header_line_without_crlf_is_scanned_for_utf8(config):
    """review-1 m2: with SMTPUTF8, a message ending in a UTF-8 header line that BDAT LAST
    left without its CRLF needs a primary that offers SMTPUTF8 (RFC 6531 3.2)."""
    for content in ("Subject: caf\u00e9".encode(), "Subject: caf\u00e9\r\n".encode(), b"Subject: cafe"):
        d = session(config)
        d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<x@example.com>\r\n" + bdat(content))
        [message] = [e for e in d.events if type(e).__name__ == "MessageReceived"]
        assert message.envelope.needs_smtputf8 == (not content.isascii()), content


def test_a_message_without_a_final_crlf_gets_one(config):
    d = session(config)
    d.feed(HEAD + bdat(b"Subject: x\r\n\r\nno end"))
    assert bytes(d.body) == b"Subject: x\r\n\r\nno end\r\n"


def test_rset_ends_a_chunked_transaction(config):
    d = session(config)
    got = d.feed(HEAD + b"BDAT 2\r\nabRSET\r\n" + HEAD[8:] + b"DATA\r\n")
    assert got[-1].startswith("354")  # a new transaction: DATA is fine again


SCRIPT = (b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@example.com>\r\n"
          + bdat(b"Subject: hi\r", b"\n\r\n.dot\r\n\xc3", b"\xa9t\xc3\xa9\r\n.\r\nQUIT\r\n")
          + b"MAIL FROM:<>\r\nRCPT TO:<y@example.com>\r\n" + bdat(b"bare\nlf\r\n")
          + b"NOOP\r\nQUIT\r\n")


def test_random_splits_of_the_bytes_give_the_same_conversation(config):
    turns = turns_after(SCRIPT, b"client.test\r\n", b"NOOP\r\n")  # EHLO and NOOP end a group (smtp rule 10)
    replies_seen, bodies = assert_random_splits(config, SCRIPT, turns=turns, max_cuts=40)
    assert replies_seen[-3:] == [reply_line(replies.BARE_LINE_ENDING), reply_line(replies.OK),
                                 reply_line(replies.CLOSING)]
    assert bodies == [b"Subject: hi\r\n\r\n.dot\r\n\xc3\xa9t\xc3\xa9\r\n.\r\nQUIT\r\n"]


def test_random_chunk_sizes_give_the_same_message(config):
    """Chunk boundaries anywhere (inside a CRLF, inside a UTF-8 sequence): the same content."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    content = (b"Subject: caf\xc3\xa9\r\nReceived: a\r\n\r\n.line\r\n\r\n.\r\nt\xc3\xa9\r\n" * 5)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(content)), rng.randint(0, 12)))
        chunks = [content[a:b] for a, b in zip([0] + cuts, cuts + [len(content)])]
        if rng.random() < 0.3:
            chunks.append(b"")  # BDAT 0 LAST
        d = new(config, commit="R1")
        d.lines()
        got = d.feed(HEAD + bdat(*chunks))
        assert got[-1] == reply_line(replies.QUEUED, queue_id="R1") and bytes(d.body) == content, \
            f"seed {seed} cuts {cuts}"
        bad = bytearray(content)
        bad[rng.randrange(len(bad))] = rng.choice(b"\r\n\0")
        bad = bytes(bad)
        if b"\r\n".join(p.replace(b"\r", b"").replace(b"\n", b"") for p in bad.split(b"\r\n")) == bad \
                and b"\0" not in bad:
            continue  # the change made another CRLF, no bare line end
        d = new(config, commit="R1")
        d.lines()
        got = d.feed(HEAD + bdat(*[bad[a:b] for a, b in zip([0] + cuts, cuts + [len(bad)])]))
        assert got[-1] in (reply_line(replies.BARE_LINE_ENDING), reply_line(replies.NUL_IN_DATA)), \
            f"seed {seed} cuts {cuts} {bad!r}"


def test_header_scan_keeps_line_starts_across_any_split():
    text = b"Subject: " + b"x" * 200 + b"\r\nReceived: a\r\nreceived: b\r\n\r\nReceived: body\r\n"
    for cut in range(1, len(text)):
        scan = smtp_body.HeaderScan()
        scan.feed(text[:cut])
        scan.feed(text[cut:])
        assert (scan.received, scan.done) == (2, True), cut


# --- a real server: replies over a socket, the queue, delivery to the primary ------------


class Wire:
    """A raw SMTP client: send bytes, read whole replies (the last line of each)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert read_line(self.sock).startswith(b"220 ")

    def replies(self, data: bytes, count: int) -> list[str]:
        if data:
            self.sock.sendall(data)
        got = []
        while len(got) < count:
            line = read_line(self.sock)
            assert line, f"connection closed after {got}"
            if line[3:4] == b" ":
                got.append(line.decode("utf-8").rstrip("\r\n"))
        return got

    def close(self):
        self.sock.close()


def queued_ids(server):
    db = sqlite3.connect(server.queue_path)
    try:
        return {row[0] for row in db.execute("SELECT queue_id FROM messages")}
    finally:
        db.close()


@pytest.fixture
def mx(server_factory, sink):
    return server_factory(max_message_size=4000, domains={
        "example.com": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"}})


def test_bdat_over_a_socket_each_reply_and_byte_exact_delivery(mx, sink):
    from test_etrn import run_cli

    content = (b"Subject: chunks\r\n\r\n.leading dot\r\n\r\n.\r\nMAIL FROM:<evil@x.test>\r\n"
               b"caf\xc3\xa9\r\n" + b"z" * 1000 + b"\r\n")
    wire = Wire(mx.port)
    wire.replies(b"EHLO c\r\n", 1)
    # MAIL, RCPT and three chunks in one write (RFC 2920 and RFC 3030 pipelining), cut
    # inside a CRLF and inside a UTF-8 sequence.
    cut1, cut2 = content.index(b"\r\n.\r\n") + 1, content.index(b"\xa9")
    got = wire.replies(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\n"
                       + bdat(content[:cut1], content[cut1:cut2], content[cut2:]), 5)
    assert got[:4] == ["250 2.1.0 Ok", "250 2.1.5 Ok", reply_line(replies.CHUNK_RECEIVED, octets=cut1),
                       reply_line(replies.CHUNK_RECEIVED, octets=cut2 - cut1)]
    assert got[4].startswith("250 2.0.0 Ok: queued as ")
    queue_id = got[4].rsplit(" ", 1)[1]
    assert queue_id in queued_ids(mx)  # committed before the 250
    # Each refusal of the SPEC, in step after it.
    assert wire.replies(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nBDAT 4\r\nab\r\nDATA\r\n",
                        4)[2:] == [reply_line(replies.CHUNK_RECEIVED, octets=4), reply_line(replies.DATA_AFTER_BDAT)]
    assert wire.replies(b"RSET\r\n", 1) == ["250 2.0.0 Ok"]  # DATA ends a group (RFC 2920 3.1): RSET waits
    assert wire.replies(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\n" + bdat(b"bare\nlf\r\n")
                        + b"NOOP\r\n", 4)[2:] == [reply_line(replies.BARE_LINE_ENDING), "250 2.0.0 Ok"]
    big = (b"y" * 98 + b"\r\n") * 50
    assert wire.replies(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\n" + bdat(big)
                        + b"NOOP\r\n", 4)[2:] == [reply_line(replies.MESSAGE_TOO_BIG), "250 2.0.0 Ok"]
    assert wire.replies(b"BDAT 6 LAST\r\nQUIT\r\n", 1) == [reply_line(replies.NEED_MAIL)]
    assert wire.replies(b"BDAT 1x\r\n", 1) == [reply_line(replies.BDAT_SYNTAX)]
    assert wire.sock.recv(1) == b""  # closed after a BDAT it cannot skip
    wire.close()
    # BDAT 0 without LAST moves nothing and costs a reply: junk, max_junk_commands (100) of them at most.
    wire = Wire(mx.port)
    wire.replies(b"EHLO c\r\n", 1)
    wire.replies(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\n", 2)
    got = wire.replies(b"BDAT 0\r\n" * 101, 101)
    assert got == [reply_line(replies.CHUNK_RECEIVED, octets=0)] * 100 + [reply_line(replies.TOO_MANY_JUNK_COMMANDS)]
    assert wire.sock.recv(1) == b""
    wire.close()
    assert queued_ids(mx) == {queue_id}
    assert run_cli("flush", "example.com", "-c", mx.config_path).returncode == 0
    [(sender, rcpts, body, _)] = sink.wait_for(1, timeout=15)
    assert (sender, rcpts) == ("a@origin.test", ["bob@example.com"])
    received, rest = body.split(b"\r\n", 1)[0], body[body.index(b"Subject: chunks"):]
    assert received.startswith(f"Received: from c {received_client()}".encode())
    assert rest == content  # byte for byte, though it held "\r\n.\r\n" and a command
