"""The master's timed jobs that fail are tried again an interval later, never at every turn.

Two of the master's timed jobs start something that can fail in the master
itself: the ticket-key rotation builds a new server TLS context every
BACKUPMX_TLS_TICKET_LIFETIME (master.TicketKeys), and the look-up of
primaries that did not resolve at start-up runs in a child every
BACKUPMX_UNRESOLVED_RETRY (primary_lookups.UnresolvedPrimaries, RetryLookups). When
that fails, the master logs it and tries an interval later, the old context
(and pins) serving meanwhile. A retry at every turn of the loop instead would
log a line, read the key files or fork at every connection, signal or child
the master handles.

A real server (test_master's slow-DNS harness: a primary name that resolves
only once a file exists), with its key file broken and then its descriptor
limit lowered with prlimit(2), so that neither a file nor the lookups' pipe
can be opened. Signals the master handles (SIGCHLD) turn its loop a hundred
times a second, so that a retry at every turn could not pass for one per
interval.
"""

import os
import resource
import signal
import smtplib
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CERTS, banner_ready, end_process_group, wait_for  # noqa: E402
from test_master import start_slow_dns_server  # noqa: E402

INTERVAL = 0.1  # seconds: the ticket key's lifetime, and the unresolved primaries' retry
WINDOW = 0.2  # seconds of a busy loop with both failing


def turn_the_loop(pid, seconds):
    """SIGCHLD every 10 ms for `seconds` (bounded): each one is a turn of the master's loop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGCHLD)
        time.sleep(0.01)


def busy_wait(pid, predicate):
    """wait_for(predicate), turning the master's loop meanwhile (idle, it turns every TICK = 0.25 s)."""
    return wait_for(lambda: os.kill(pid, signal.SIGCHLD) or predicate(), 5)


def test_a_failing_key_rotation_and_unresolved_retry_wait_an_interval_and_recover(tmp_path, certs):
    proc, port, cfg, log_path = start_slow_dns_server(
        tmp_path, "mx.later.invalid:25", settings={"certs": certs, "workers": 1},
        BACKUPMX_UNRESOLVED_RETRY=str(INTERVAL), BACKUPMX_TLS_TICKET_LIFETIME=str(INTERVAL))

    def log():
        return log_path.read_text()

    try:
        assert wait_for(lambda: banner_ready(port), 8, 0.01), log()
        key = Path(certs["server_key"])
        key.write_text("not a key\n")  # every rotation from now on fails: no new SMTP worker is started
        assert busy_wait(proc.pid, lambda: "tls-keys-rotation-failed" in log()), log()
        # No descriptor left to open: the key files (the rotation) and the lookups' pipe fail alike.
        limits = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (3, limits[1]))
        try:
            start, started = len(log()), time.monotonic()
            turn_the_loop(proc.pid, WINDOW)
            # ... and on until each job failed once: a loaded machine may give the master too few
            # turns in WINDOW for either (then a fixed window saw none, and failed).
            failed = ("tls-keys-rotation-failed", "fork-failed")
            busy_wait(proc.pid, lambda: all(job in log()[start:] for job in failed))
            window, elapsed = log()[start:], time.monotonic() - started  # (the log read last: nothing missed)
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, limits)
        most = int(elapsed / INTERVAL) + 2  # one per interval, and one at either edge of the window
        rotations, lookups = window.count("tls-keys-rotation-failed"), window.count("fork-failed")
        assert 1 <= rotations <= most and 1 <= lookups <= most, (elapsed, window)
        assert 'fork-failed error="Too many open files"' in window, window
        assert proc.poll() is None
        with smtplib.SMTP("localhost", port, timeout=10) as client:  # the context in place serves on
            client.starttls(context=ssl.create_default_context(cafile=certs["ca"]))
            assert client.ehlo("client.test")[0] == 250
        # The key mended, DNS answering: both go through at their next interval.
        key.write_bytes((CERTS / "server.key").read_bytes())
        Path(str(cfg) + ".resolvable").touch()
        start = len(log())
        assert busy_wait(proc.pid, lambda: "primary-resolved domain=example.com" in log()[start:]), log()[start:]
        assert busy_wait(proc.pid, lambda: "tls-keys-rotated" in log()[start:]), log()[start:]
    finally:
        end_process_group(proc)
