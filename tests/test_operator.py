"""Operator commands and automatic retries against a live server with a real sink as the primary."""

import smtplib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, flushes_in_progress, wait_for


@pytest.fixture
def mx(server_factory, sink):
    return server_factory(domains={
        "example.com": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"},
        "example.org": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"},
    })


def backupmx(server, *args):
    result = subprocess.run([sys.executable, str(REPO / "backupmx.py"), *args, "-c", server.config_path],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr
    return result


def send(server, rcpt="bob@example.com", subject="x"):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("c")
        client.mail("a@origin.test")
        client.rcpt(rcpt)
        code, text = client.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert code == 250
    return text.decode().rsplit(" ", 1)[1]


def states(server):
    db = sqlite3.connect(server.queue_path)
    try:
        return dict(((q, d), s) for q, d, s in db.execute("SELECT queue_id, domain, state FROM queue"))
    finally:
        db.close()


def test_queue_and_queue_list_show_what_is_waiting(mx):
    first = send(mx)
    send(mx, rcpt="carol@example.org")
    summary = backupmx(mx, "queue")
    assert summary.returncode == 0
    lines = summary.stdout.splitlines()
    assert lines[0].split()[:4] == ["domain", "messages", "bytes", "oldest"]
    assert any(line.split()[:2] == ["example.com", "1"] for line in lines[1:])
    listing = backupmx(mx, "queue", "list", "example.com")
    assert listing.returncode == 0 and first in listing.stdout and "example.org" not in listing.stdout


def test_hold_keeps_mail_from_flushing_until_release(mx, sink):
    queue_id = send(mx, subject="held")
    assert backupmx(mx, "hold", "example.com").returncode == 0
    assert states(mx)[(queue_id, "example.com")] == "held"
    send(mx, subject="queued")
    assert backupmx(mx, "flush", "example.com").returncode == 0
    sink.wait_for(1, timeout=15)
    # The flush has run to its end (nothing requested or leased) and left the held message alone.
    assert wait_for(lambda: states(mx) == {(queue_id, "example.com"): "held"}
                    and not flushes_in_progress(mx.queue_path), timeout=10)
    assert [m[2].count(b"Subject: queued") for m in sink.messages] == [1]
    assert backupmx(mx, "release", queue_id).returncode == 0
    assert backupmx(mx, "flush", "example.com").returncode == 0
    sink.wait_for(2, timeout=15)
    assert wait_for(lambda: states(mx) == {}, timeout=10)


def test_show_prints_envelope_history_and_message(mx):
    queue_id = send(mx, subject="shown")
    shown = backupmx(mx, "show", queue_id)
    assert shown.returncode == 0
    assert f"queue_id: {queue_id}" in shown.stdout and "sender: <a@origin.test>" in shown.stdout
    assert "recipient: <bob@example.com> state=queued" in shown.stdout
    assert "queued" in shown.stdout and "Subject: shown" in shown.stdout
    missing = backupmx(mx, "show", "ZZZZZZZZZZZZZZ")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_failed_mail_is_kept_and_requeue_sends_it_again(mx, sink):
    sink.behaviour = "rcpt_5xx"
    queue_id = send(mx)
    backupmx(mx, "flush", "example.com")
    assert wait_for(lambda: states(mx).get((queue_id, "example.com")) == "failed", timeout=15)
    sink.behaviour = "normal"
    assert backupmx(mx, "requeue", queue_id).returncode == 0
    assert states(mx)[(queue_id, "example.com")] == "queued"
    backupmx(mx, "flush", "example.com")
    sink.wait_for(1, timeout=15)


def test_delete_asks_unless_yes(mx):
    queue_id = send(mx)
    refused = backupmx(mx, "delete", queue_id)
    assert refused.returncode != 0 and states(mx)
    assert backupmx(mx, "delete", "--yes", queue_id).returncode == 0
    assert states(mx) == {}


def test_retry_interval_delivers_without_etrn(server_factory, sink):
    sink.behaviour = "rcpt_4xx"
    mx = server_factory(domains={"example.com": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none",
                                                 "retry_interval": "0.5s"}})
    queue_id = send(mx)
    # nobody sends ETRN: the flush workers try on their own, back off, and try again
    assert wait_for(lambda: any(s.commands for s in sink.sessions), timeout=15)
    sink.behaviour = "normal"
    sink.wait_for(1, timeout=30)
    assert wait_for(lambda: states(mx) == {}, timeout=10)
    assert f"deferred id={queue_id}" in mx.log()


def test_damaged_queue_is_refused_not_replaced(server_factory, tmp_path):
    queue = tmp_path / "damaged.db"
    queue.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4080)
    with pytest.raises(AssertionError, match="did not start"):
        server_factory(queue=queue)
    assert queue.read_bytes().startswith(b"SQLite format 3\x00\xff\xff")  # left for the operator
    check = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "check", "-c", str(tmp_path / "backupmx.ini")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "Traceback" not in check.stderr + check.stdout


def test_flush_from_the_shell_delivers_without_a_running_server(mx, sink):
    send(mx)
    assert mx.stop() == 0  # an inetd-only site: no `serve` and so no flush workers
    result = backupmx(mx, "flush", "example.com")
    assert result.returncode == 0 and result.stdout.startswith("253")
    sink.wait_for(1, timeout=20)
    assert wait_for(lambda: states(mx) == {}, timeout=10)


def test_queue_damaged_inside_is_refused_at_start(server_factory, tmp_path):
    mx = server_factory(sub="first")
    for n in range(30):
        send(mx, subject=f"m{n}" + "x" * 3000)
    assert mx.stop() == 0
    queue = Path(mx.queue_path)
    assert Path(f"{queue}-clean-stop").exists()  # the next start would not read it all: it changes below
    with sqlite3.connect(queue) as db:  # a page in use for sure (a free one is never read, so never found damaged)
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'queue'").fetchone()[0]
    db.close()
    data = bytearray(queue.read_bytes())
    page = int.from_bytes(data[16:18], "big")  # the header's page size
    assert len(data) // page >= 6
    data[(root - 1) * page: root * page] = b"\xa5" * page  # scribble over the queue table's root page
    queue.write_bytes(bytes(data))
    damaged = bytes(data)
    config = Path(mx.config_path)
    proc = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("backupmx: ") and last.endswith("; not starting") and "Traceback" not in proc.stderr
    assert queue.read_bytes() == damaged  # nothing replaced or repaired behind the operator's back


def test_a_queue_unchanged_since_a_clean_stop_is_not_read_all_again_at_start(tmp_path, caplog):
    """PRAGMA quick_check reads the whole file (seconds at a million messages): serve runs it when
    the queue may have changed since a serve stopped cleanly (a crash, a power loss, a restore, an
    operator's command), not after a clean stop with nothing in between."""
    import logging

    from backupmx.config import load_config
    from backupmx.startup import check_queue, record_clean_stop
    from backupmx.store import QueueStore
    from conftest import free_port, write_config

    queue = str(tmp_path / "queue.db")
    QueueStore(queue).close()
    config = load_config(write_config(tmp_path / "backupmx.ini", port=free_port(), queue=queue))

    def skipped():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="backupmx"):
            check_queue(config)
        return any("quick_check=" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)

    assert not skipped()  # no clean stop seen
    record_clean_stop(queue)
    assert skipped()
    assert not skipped()  # a start forgets the mark: a crash after it leaves none
    record_clean_stop(queue)
    with QueueStore(queue) as store:  # another program's write (an operator's hold, an inetd session)
        store.request_flush(["example.com"])
    assert not skipped()
