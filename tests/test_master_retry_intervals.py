"""The master's timed jobs that fail are tried again an interval later, never at every turn.

The ticket-key rotation builds a new server TLS context every
BACKUPMX_TLS_TICKET_LIFETIME (master.TicketKeys). When that fails (the key
file unreadable or broken), the master logs it and tries an interval later
while the context in place goes on serving. A retry at every turn of the
loop instead would log a line (and read the key files) at every connection,
signal or child the master handles.

A real server; signals the master handles (SIGCHLD) turn its loop a hundred
times a second, so that a retry at every turn could not pass for one per
interval.
"""

import os
import signal
import smtplib
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CERTS, wait_for  # noqa: E402

INTERVAL = 0.1  # seconds: the ticket key's lifetime
WINDOW = 0.2  # seconds of a busy loop with every rotation failing


def turn_the_loop(pid, seconds):
    """SIGCHLD every 10 ms for `seconds` (bounded): each one is a turn of the master's loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGCHLD)
        time.sleep(0.01)


def busy_wait(pid, predicate):
    """wait_for(predicate), turning the master's loop meanwhile (idle, it turns every TICK = 0.25 s)."""
    return wait_for(lambda: os.kill(pid, signal.SIGCHLD) or predicate(), 5)


def test_a_failing_ticket_key_rotation_is_retried_an_interval_later_and_recovers(server_factory, certs):
    srv = server_factory(tls=True, certs=certs, workers=1, env={"BACKUPMX_TLS_TICKET_LIFETIME": str(INTERVAL)})
    key = Path(certs["server_key"])
    key.write_text("not a key\n")  # every rotation from now on fails
    assert busy_wait(srv.pid, lambda: "tls-keys-rotation-failed" in srv.log()), srv.log()
    start, started = len(srv.log()), time.monotonic()
    turn_the_loop(srv.pid, WINDOW)
    window, elapsed = srv.log()[start:], time.monotonic() - started  # (the log read last: nothing missed)
    failures = window.count("tls-keys-rotation-failed")
    assert 1 <= failures <= int(elapsed / INTERVAL) + 2, (elapsed, window)  # one per interval, one at either edge
    assert "tls-keys-rotated" not in window and srv.proc.poll() is None
    with smtplib.SMTP("localhost", srv.port, timeout=10) as client:  # the context in place serves on
        client.starttls(context=ssl.create_default_context(cafile=certs["ca"]))
        assert client.ehlo("client.test")[0] == 250
    key.write_bytes((CERTS / "server.key").read_bytes())  # mended: the next interval's rotation goes through
    start = len(srv.log())
    assert busy_wait(srv.pid, lambda: "tls-keys-rotated" in srv.log()[start:]), srv.log()[start:]
