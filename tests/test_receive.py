"""The receive path end to end: a real server process, real sockets, the queue read back with sqlite3."""

import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from backupmx import replies
from conftest import read_line, received_client, start_server, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests of the receive path that only add to its queue (each looks at
    what it added): a server start saved per test. A writer gives up on a lock after 0.5 s (5 s
    in production) for test_locked_database_answers_452_never_250."""
    server = start_server(tmp_path_factory.mktemp("receive"), env={"BACKUPMX_BUSY_TIMEOUT": "0.5"})
    yield server
    try:
        server.stop()
    finally:
        server.kill_group()


def connect(server, timeout=10):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    assert read_line(sock).startswith(b"220 mx2.test ESMTP")
    return sock


def greeted(server, timeout=10):
    """A connection past the banner and EHLO: from here on it may pipeline (RFC 2920)."""
    sock = connect(server, timeout)
    sock.sendall(b"EHLO c\r\n")
    assert read_replies(sock, 1, timeout)[0].startswith("250 ")
    return sock


def read_replies(sock, count, timeout=10):
    """`count` complete replies (multi-line replies count once), as their last lines."""
    sock.settimeout(timeout)
    data, done = b"", []
    while len(done) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        *lines, data = data.split(b"\r\n")
        done += [line.decode() for line in lines if line[3:4] == b" "]
        data = data  # partial line stays
    return done


def queue_rows(server):
    db = sqlite3.connect(server.queue_path)
    try:
        return db.execute("SELECT queue_id, domain, state FROM queue ORDER BY queue_id, domain").fetchall()
    finally:
        db.close()


def rows_added(server, before):
    """The queue's rows that were not in `before` (an earlier queue_rows): the shared server's
    queue holds the other tests' mail too."""
    return [row for row in queue_rows(server) if row not in before]


def summary(server):
    """The product contract's view, with the stock sqlite3 module: {domain: (messages, bytes, oldest)}."""
    db = sqlite3.connect(server.queue_path)
    try:
        rows = db.execute("SELECT domain, messages, bytes, oldest FROM queue_summary ORDER BY domain").fetchall()
    finally:
        db.close()
    return {domain: tuple(rest) for domain, *rest in rows}


def body_of(server, queue_id):
    db = sqlite3.connect(server.queue_path)
    try:
        return db.execute("SELECT body FROM message_bodies WHERE queue_id = ?", (queue_id,)).fetchone()[0]
    finally:
        db.close()


def test_message_is_queued_byte_for_byte_and_readable_with_sqlite3(server):
    body = b"Subject: test\r\nX-8bit: \xe9t\xe9\r\n\r\n.leading dot\r\nline\x01with \x7f controls\r\n"
    before, counted_before = queue_rows(server), summary(server)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("sender@origin.test", ["BODY=8BITMIME"])
        client.rcpt("bob@example.com")
        client.rcpt("carol@example.org")
        code, text = client.data(body)
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[1]
    assert text.decode() == replies.QUEUED.line_text(queue_id=queue_id)
    assert rows_added(server, before) == [(queue_id, "example.com", "queued"), (queue_id, "example.org", "queued")]
    stored = body_of(server, queue_id)
    received, rest = stored.split(b"\r\n\t; ", 1)[0], stored
    assert stored.startswith(f"Received: from client.test {received_client()}\r\n\tby mx2.test (backupmx) with ESMTP id ".encode()
                             + queue_id.encode())
    assert stored.endswith(b"\r\n" + body)  # only the Received header was added
    assert stored.count(body) == 1 and len(received) < len(rest)
    # the product contract's view, with the stock sqlite3 shell where it exists
    counted = summary(server)
    assert {d: m - counted_before.get(d, (0,))[0] for d, (m, _, _) in counted.items()} == {"example.com": 1,
                                                                                            "example.org": 1}
    assert all(isinstance(oldest, int) and abs(oldest - time.time()) < 60 for _, _, oldest in counted.values())
    assert f"queued id={queue_id} domain=example.com from=<sender@origin.test>" in server.log()


def test_journal_is_wal_and_the_250_follows_the_commit(server):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@origin.test")
        client.rcpt("bob@example.com")
        queue_id = client.data(b"x\r\n")[1].decode().rsplit(" ", 1)[1]
    db = sqlite3.connect(server.queue_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # A reader that opened after the 250 sees the message: it was committed before the reply.
    assert db.execute("SELECT COUNT(*) FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()[0] == 1
    db.close()


def test_pipelined_transaction_in_one_write_per_group(server):
    before = queue_rows(server)
    sock = greeted(server)
    got = []
    for group, replies_expected in (
            (b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<x@evil.test>\r\nDATA\r\n", 4),
            (b"Subject: p\r\n\r\nhi\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n", 4),
            (b"bye\r\n.\r\nQUIT\r\n", 2)):
        sock.sendall(group)
        got += read_replies(sock, replies_expected)
    assert [line[:3] for line in got] == ["250", "250", "554", "354", "250", "250", "250", "354", "250", "221"]
    assert len(rows_added(server, before)) == 2


@pytest.mark.parametrize("payload", [
    b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
    b"Subject: s\r\n\r\nhello\r\n.\nRCPT TO:<bob@example.com>\r\n.\r\n",
    b"Subject: s\r\n\r\nhello\n.\r\nRCPT TO:<bob@example.com>\r\n.\r\n",
    b"Subject: s\r\n\r\nhello\r.\r\nRCPT TO:<bob@example.com>\r\n.\r\n",
    b"Subject: s\r\n\r\nhello\r\n.\rRCPT TO:<bob@example.com>\r\n.\r\n",
])
def test_smuggling_is_refused_and_nothing_is_queued(server, payload):
    before = queue_rows(server)
    sock = greeted(server)
    sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert read_replies(sock, 3)[-1].startswith("354")
    sock.sendall(payload)
    got = read_replies(sock, 1)
    assert got[0].startswith("550 5.5.2")
    sock.sendall(b"QUIT\r\n")
    assert read_replies(sock, 1)[0].startswith("221")
    assert queue_rows(server) == before


def test_nul_in_data_is_refused_with_554_and_nothing_is_queued(server):
    before = queue_rows(server)
    sock = greeted(server)
    sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert read_replies(sock, 3)[-1].startswith("354")
    # A primary that drops NULs would see "\r\n.\r\n" here and run the rest as commands.
    sock.sendall(b"Subject: s\r\n\r\nhello\r\n\x00.\r\nMAIL FROM:<evil@x.test>\r\n.\r\n")
    assert read_replies(sock, 1) == ["554 " + replies.NUL_IN_DATA.line_text()]
    sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")  # still in step
    assert [line[:3] for line in read_replies(sock, 3)] == ["250", "250", "354"]
    sock.sendall(b"Subject: clean\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert [line[:3] for line in read_replies(sock, 2)] == ["250", "221"]
    [(queue_id, _, _)] = rows_added(server, before)
    assert body_of(server, queue_id).endswith(b"\r\nSubject: clean\r\n\r\nhello\r\n")
    [reject] = [line for line in server.log().splitlines() if " reject " in line and "reason=nul_in_data" in line]
    assert " command=DATA reason=nul_in_data " in reject
    assert reject.endswith(f' reply="554 {replies.NUL_IN_DATA.line_text()}"')


def test_relay_tricks_and_limits_over_the_wire(server):
    sock = greeted(server)
    sock.sendall(b"MAIL FROM:<a@origin.test>\r\n"
                 b"RCPT TO:<bob@[127.0.0.1]>\r\nRCPT TO:<bob%evil.test@example.com>\r\n"
                 b"RCPT TO:<@example.com:bob@evil.test>\r\nRCPT TO:<evil.test!bob@example.com>\r\n"
                 b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    got = read_replies(sock, 7)
    sock.sendall(b"GET / HTTP/1.1\r\n")
    got += read_replies(sock, 1)
    assert [line[:9] for line in got[1:]] == ["554 5.7.1"] * 4 + ["500 5.5.2", "250 2.0.0", "221 2.7.0"]
    assert sock.recv(10) == b""  # closed after the HTTP verb


def test_worker_killed_mid_data_queues_nothing_and_server_keeps_serving(server):
    before = queue_rows(server)
    sock = greeted(server)
    sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert read_replies(sock, 3)[-1].startswith("354")
    sock.sendall(b"Subject: half\r\n\r\n" + b"x" * 10000 + b"\r\n")
    # the worker holding this session is the one with an established TCP connection
    workers = wait_for(lambda: [pid for pid in server.children() if _has_peer(pid, sock.getsockname()[1])])
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    sock.settimeout(5)
    assert sock.recv(100) == b""
    assert queue_rows(server) == before
    ok = wait_for(lambda: _send_one(server), timeout=10, interval=0.2)
    assert ok
    assert len(rows_added(server, before)) == 1
    assert wait_for(lambda: "worker-died" in server.log() or "worker-exited" in server.log(), timeout=5)


def _send_one(server):
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            client.sendmail("a@origin.test", ["bob@example.com"], b"after\r\n")
        return True
    except (OSError, smtplib.SMTPException):
        return False


def _has_peer(pid, client_port):
    """True if process `pid` holds the server side of the connection from `client_port`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == client_port and fields[9] in inodes:
            return True
    return False


def test_locked_database_answers_452_never_250(server):
    # Every worker answers a banner first, so none is still opening the queue
    # (and waiting on our lock) when the test session is handed to it.
    warm = [connect(server) for _ in range(4)]
    for sock in warm:
        sock.close()
    before = queue_rows(server)
    holder = sqlite3.connect(server.queue_path, timeout=1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        sock = greeted(server, timeout=30)
        sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert read_replies(sock, 3)[-1].startswith("354")
        sock.sendall(b"Subject: locked\r\n\r\nx\r\n.\r\n")
        assert read_replies(sock, 1, timeout=30)[0] == "452 " + replies.QUEUE_UNAVAILABLE.line_text()
    finally:
        holder.rollback()
        holder.close()
    sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert read_replies(sock, 3)[-1].startswith("354")
    sock.sendall(b"Subject: unlocked\r\n\r\nx\r\n.\r\n")
    assert read_replies(sock, 1)[0].startswith("250 " + replies.QUEUED.line_text(queue_id=""))
    assert len(rows_added(server, before)) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a real full disk (needs root and mount; skipped otherwise)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_full_disk_answers_452_and_keeps_what_was_queued(server_factory, small_disk):
    server = server_factory(queue=small_disk / "queue.db", min_free_space=0)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail("a@origin.test", ["bob@example.com"], b"Subject: small\r\n\r\nfits\r\n")
        big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 3000  # 3 MB on a 2 MB disk
        client.mail("a@origin.test")  # no SIZE=: the disk fills up during DATA
        client.rcpt("bob@example.com")
        assert client.data(big)[0] == 452
        assert client.mail("a@origin.test", [f"SIZE={len(big)}"])[0] == 452  # with SIZE=: refused up front
        client.rset()
        client.sendmail("a@origin.test", ["bob@example.com"], b"Subject: small2\r\n\r\nstill fits\r\n")
    assert len(queue_rows(server)) == 2


def _vm_hwm_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_50_mb_message_is_streamed_not_held_in_memory(server_factory):
    server = server_factory(workers=1, max_workers=1)
    line = b"z" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (50 * 1024 * 1024 // len(line))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as client:
        client.sendmail("a@origin.test", ["bob@example.com"], b"warm up\r\n")
        port = client.sock.getsockname()[1]
        worker = [pid for pid in server.children() if _has_peer(pid, port)][0]
        before = _vm_hwm_kb(worker)
        client.sendmail("a@origin.test", ["bob@example.com"], body)
        grown_mb = (_vm_hwm_kb(worker) - before) / 1024
    print(f"worker peak RSS grew by {grown_mb:.1f} MB for a {len(body) / 2**20:.0f} MB message")
    assert grown_mb < 8
    db = sqlite3.connect(server.queue_path)
    stored = db.execute("SELECT b.body FROM message_bodies AS b JOIN messages AS m USING (queue_id)"
                        " WHERE m.size >= ?", (len(body),)).fetchone()[0]
    db.close()
    assert stored.startswith(b"Received: ") and stored.endswith(b"\r\n" + body)  # byte for byte, in 64 KB chunks
    assert len(stored) - len(body) < 400


def test_min_free_space_refuses_new_mail_at_rcpt_and_at_mail_size(server_factory):
    server = server_factory(min_free_space="1000000G")
    sock = greeted(server)
    sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nRSET\r\n"
                 b"MAIL FROM:<a@origin.test> SIZE=1000\r\n")
    got = read_replies(sock, 4)
    assert [line[:9] for line in got] == ["250 2.1.0", "452 4.3.1", "250 2.0.0", "452 4.3.1"]


def test_domain_quota_refuses_that_domain_only(server_factory):
    domains = {"example.com": {"primary": "127.0.0.1:9", "max_queue_messages": "2"},
               "example.org": {"primary": "127.0.0.1:9"}}
    server = server_factory(domains=domains)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        for _ in range(2):
            client.sendmail("a@origin.test", ["bob@example.com"], b"x\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("a@origin.test", ["bob@example.com"], b"x\r\n")
        code, text = refused.value.recipients["bob@example.com"]
        assert (code, text[:5]) == (452, b"4.3.1")
        client.sendmail("a@origin.test", ["carol@example.org"], b"other domain\r\n")
    assert sorted(d for _, d, _ in queue_rows(server)) == ["example.com", "example.com", "example.org"]


def test_domain_quota_holds_under_concurrent_senders(server_factory):
    import threading
    limit = 10
    domains = {"example.com": {"primary": "127.0.0.1:9", "max_queue_messages": str(limit)}}
    # The senders spread over both workers (no packing): the quota holds across processes.
    server = server_factory(domains=domains, workers=2, env={"BACKUPMX_PACK_SESSIONS": "1"})
    outcomes = []

    def sender():
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            for _ in range(8):
                try:
                    client.sendmail("a@origin.test", ["bob@example.com"], b"x" * 500 + b"\r\n")
                    outcomes.append(250)
                except (smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError):
                    outcomes.append(452)
                    client.rset()

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes.count(250) == limit == len(queue_rows(server))
    assert outcomes.count(452) == 32 - limit


@pytest.fixture(scope="module")
def impatient(tmp_path_factory):
    """A server whose per-command deadline is 0.5 s, with an implicit-TLS listener: the deadline tests'."""
    server = start_server(tmp_path_factory.mktemp("impatient"), timeout="0.5s", listen_tls=True)
    yield server
    try:
        server.stop()
    finally:
        server.kill_group()


def test_idle_client_gets_421_at_the_per_command_deadline(impatient):
    started = time.monotonic()  # before the banner, after which the deadline runs
    sock = connect(impatient)
    sock.settimeout(10)
    assert read_line(sock, timeout=10).startswith(b"421 4.4.2")
    assert sock.recv(10) == b""
    assert 0.4 < time.monotonic() - started < 5


def test_a_client_dripping_bytes_cannot_hold_its_session_past_the_deadline(impatient):
    sock = connect(impatient)
    started = time.monotonic()
    closed = False
    for byte in b"NOOP but very slowly" * 10:  # bounded: 200 bytes at most
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
        sock.setblocking(False)
        try:
            answer = sock.recv(100)
        except BlockingIOError:
            answer = None
        finally:
            sock.setblocking(True)
        if answer is not None:
            assert answer.startswith(b"421 4.4.2") or answer == b""
            closed = True
            break
    assert closed and time.monotonic() - started < 5


def test_stalled_tls_handshake_is_dropped_at_the_deadline(impatient):
    sock = socket.create_connection(("127.0.0.1", impatient.tls_port), timeout=10)
    started = time.monotonic()
    sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and then nothing
    assert sock.recv(100) == b""
    assert time.monotonic() - started < 5


def test_quota_reached_between_rcpt_and_data_is_refused_at_the_end_of_data(server_factory):
    domains = {"example.com": {"primary": "127.0.0.1:9", "max_queue_messages": "1"}}
    server = server_factory(domains=domains)
    first, second = greeted(server), greeted(server)
    for sock in (first, second):  # both pass RCPT: the domain's queue is still empty
        sock.sendall(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert [line[:3] for line in read_replies(sock, 3)] == ["250", "250", "354"]
    first.sendall(b"Subject: one\r\n\r\nx\r\n.\r\n")
    assert read_replies(first, 1)[0].startswith("250 " + replies.QUEUED.line_text(queue_id=""))
    second.sendall(b"Subject: two\r\n\r\nx\r\n.\r\n")
    assert read_replies(second, 1) == ["452 " + replies.QUEUE_FULL.line_text()]
    assert len(queue_rows(server)) == 1
