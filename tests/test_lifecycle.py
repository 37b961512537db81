"""Queue housekeeping (backupmx/lifecycle.py): expiry, DSNs through a real SMTP
sink as bounce relay, delay warnings, retry backoff, retention, WAL upkeep.

A clock the test moves by hand drives the store and the DSN dates: no sleeping.
Every DSN the sink receives is parsed back with the `email` package.
"""

import dataclasses
import email
import email.policy
import email.utils
import io
import logging
import multiprocessing
import os
import re
import smtplib
import socket
import sqlite3
import subprocess
import sys

import pytest

from backupmx import lifecycle
from backupmx import reclaim as reclaimer
from backupmx.config import load_config
from backupmx.envelope import Envelope, Recipient
from backupmx.lifecycle import BounceFailed, housekeeping, next_retry_delay, send_dsn
from backupmx.store import QueueStore
from conftest import (REPO, pending_flushes, queue_one, received_client, reclaim, record_deferred, record_delivered,
                      record_failed)


T0 = 1_800_000_000
HOUR, DAY = 3600, 86400
BODY = (b"From: Sender <sender@example.org>\r\nSubject: the report\r\nMessage-ID: <m1@example.org>\r\n"
        b"\r\nHello there.\r\n.a dotted line\r\n")


class Clock:
    def __init__(self, now=T0):
        self.now = float(now)

    def __call__(self):
        return self.now


class Lines(logging.Handler):
    """Collects the formatted log lines."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def find(self, event):
        return [line for line in self.lines if line.split(" ", 1)[0] == event]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = QueueStore(str(tmp_path / "queue.db"), clock=clock)
    yield s
    s.close()


@pytest.fixture
def log(request):
    logger = logging.getLogger(f"test.lifecycle.{request.node.name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    logger.lines = handler
    yield logger
    logger.removeHandler(handler)


def make_config(tmp_path, relay=None, extra="", domains=None):
    """A real Config from a real INI file (backupmx.config.load_config)."""
    domains = domains or """
[domain:short.test]
primary = mail.short.test:25
queue_lifetime = 1h
retry_interval = 10m

[domain:long.test]
primary = mail.long.test:25
"""
    text = f"""
[backupmx]
hostname = mx2.test
listen = 127.0.0.1:2525
queue = {tmp_path / 'queue.db'}
queue_lifetime = 5d
expired_retention = 7d
timeout = 10s
{f'bounce_relay = 127.0.0.1:{relay}' if relay else ''}
{extra}
{domains}
"""
    path = tmp_path / "backupmx.ini"
    path.write_text(text)
    return load_config(str(path))


def put(store, *rcpts, sender="sender@example.org", body=BODY, **kw):
    recipients = [r if isinstance(r, Recipient) else Recipient(r, r.rsplit("@", 1)[1]) for r in rcpts]
    qid = store.new_queue_id()
    queue_one(store, qid, Envelope(sender=sender, recipients=recipients, **kw), io.BytesIO(body), len(body),
                  client="192.0.2.1", helo="client.test")
    return qid


def run(store, config, log, clock, **kw):
    return housekeeping(store, config, logger=log, clock=clock, **kw)


def parse(body):
    message = email.message_from_bytes(body, policy=email.policy.default)
    text, status, original = message.iter_parts()
    per_message, *per_recipient = status.get_payload()
    return message, per_message, per_recipient, original


def rows(store, qid):
    detail = store.show(qid)
    return {r.domain: r for r in detail.rows} if detail else {}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- expiry -------------------------------------------------------------------------


def test_expiry_with_per_domain_override(store, clock, tmp_path, log):
    config = make_config(tmp_path)
    both = put(store, "a@short.test", "b@long.test")
    clock.now += HOUR - 1
    assert run(store, config, log, clock)["expired"] == 0
    clock.now += 1
    summary = run(store, config, log, clock)
    assert summary["expired"] == 1
    assert rows(store, both)["short.test"].state == "expired"
    assert rows(store, both)["long.test"].state == "queued"
    [line] = log.lines.find("expired")
    assert line == f"expired id={both} domain=short.test age=3600s lifetime=3600s"
    clock.now = T0 + 5 * DAY
    assert run(store, config, log, clock)["expired"] == 1
    assert rows(store, both)["long.test"].state == "expired"  # the global queue_lifetime


def test_held_mail_never_expires_and_requeued_mail_gets_a_fresh_lifetime(store, clock, tmp_path, log):
    config = make_config(tmp_path)
    held = put(store, "a@short.test")
    gone = put(store, "b@short.test")
    store.hold(queue_id=held)
    clock.now += 2 * HOUR
    run(store, config, log, clock)
    assert rows(store, held)["short.test"].state == "held"
    assert rows(store, gone)["short.test"].state == "expired"
    store.requeue(queue_id=gone)
    store.release(queue_id=held)
    clock.now += 60
    assert run(store, config, log, clock)["expired"] == 0
    clock.now += HOUR
    assert run(store, config, log, clock)["expired"] == 2


# --- bounces --------------------------------------------------------------------------


def test_expired_mail_gets_a_dsn_through_the_relay(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port)
    qid = put(store, Recipient("a@short.test", "short.test", None, "rfc822;a+2Bx@short.test"),
              Recipient("b@short.test", "short.test"), envid="ENV+3D1")
    clock.now += HOUR + 5
    summary = run(store, config, log, clock)
    assert summary["expired"] == 1 and summary["dsn_sent"] == 2
    [(mail_from, rcpts, body, params)] = sink.wait_for(1)
    assert mail_from == "" and rcpts == ["sender@example.org"]

    message, per_message, per_recipient, original = parse(body)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert [a.addr_spec for a in message["From"].addresses] == ["MAILER-DAEMON@mx2.test"]
    assert [a.addr_spec for a in message["To"].addresses] == ["sender@example.org"]
    assert message["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == clock.now
    assert message.get_param("report-type") == "delivery-status"
    assert per_message["Reporting-MTA"] == "dns; mx2.test"
    assert per_message["Original-Envelope-Id"] == "ENV=1"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == T0
    a, b = per_recipient
    assert a["Original-Recipient"] == "rfc822; a+x@short.test"
    assert a["Final-Recipient"] == "rfc822; a@short.test"
    assert b["Original-Recipient"] is None
    assert b["Final-Recipient"] == "rfc822; b@short.test"
    for r in per_recipient:
        assert r["Action"] == "failed"
        assert r["Status"] == "4.4.7"
    # No RET, small message: returned whole, byte for byte.
    assert original.get_content_type() == "message/rfc822"
    assert body.split(b"Content-Type: message/rfc822\r\n\r\n", 1)[1].startswith(BODY)

    [line] = log.lines.find("dsn-sent")
    assert f"id={qid}" in line and "to=<a@short.test>,<b@short.test>" in line
    # Sent once: the row stays expired (for retention), the DSN is not sent again.
    assert run(store, config, log, clock)["dsn_sent"] == 0
    assert rows(store, qid)["short.test"].state == "expired"
    assert all(r.dsn_sent == int(clock.now) for r in rows(store, qid)["short.test"].recipients)
    assert len(sink.messages) == 1


def test_ret_hdrs_full_and_big_mail(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port)
    assert config.bounce_size_limit == 50 * 1024  # the default, as Postfix's 50000
    big = BODY + (b"y" * 998 + b"\r\n") * 60  # > 50 KB
    hdrs = put(store, "a@short.test", ret="HDRS")
    full = put(store, "b@short.test", ret="FULL", body=big)
    plain_big = put(store, "c@short.test", body=big)
    full_small = put(store, "d@short.test", ret="FULL")
    clock.now += 2 * HOUR
    run(store, config, log, clock)
    got = {}
    for _, _, body, _ in sink.wait_for(4):
        message, per_message, [r], part = parse(body)
        got[r["Final-Recipient"]] = (part.get_content_type(), body)
    assert got["rfc822; a@short.test"][0] == "text/rfc822-headers"
    assert b"Hello there." not in got["rfc822; a@short.test"][1]
    assert b"Subject: the report" in got["rfc822; a@short.test"][1]
    for big_one in ("b", "c"):  # RET=FULL or not: over bounce_size_limit, the header only
        content_type, body = got[f"rfc822; {big_one}@short.test"]
        assert content_type == "text/rfc822-headers"
        assert b"Subject: the report" in body and b"yyyy" not in body and len(body) < 10 * 1024
    assert got["rfc822; d@short.test"][0] == "message/rfc822"
    assert BODY in got["rfc822; d@short.test"][1]
    assert all(e.what == "dsn" for q in (hdrs, full, plain_big, full_small) for e in store.history(q)[-1:])


def original_part(body):
    """The raw bytes of a DSN's third part (the original or its header)."""
    boundary = email.message_from_bytes(body).get_boundary().encode()
    third = body.split(b"--" + boundary)[3]
    return third.split(b"\r\n\r\n", 1)[1][:-2]  # after the part's header; its CRLF belongs to the delimiter


def test_bounce_size_limit_bounds_failure_expiry_and_delay_reports(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port, extra="bounce_size_limit = 1K\ndelay_warning = 30m")
    header = b"".join(b"X-Filler-%02d: %s\r\n" % (n, b"h" * 60) for n in range(30))  # ~2.3 KB of header
    body = header + b"Subject: long header\r\n\r\nbody\r\n"
    expired = put(store, "a@short.test", ret="FULL", body=body)  # short.test expires after 1h
    failed = put(store, "b@long.test", ret="FULL", body=body)
    small = put(store, "c@long.test", ret="FULL", body=b"Subject: small\r\n\r\nfits\r\n")
    clock.now += 40 * 60
    assert run(store, config, log, clock)["delay_warnings"] == 3
    clock.now += HOUR
    record_failed(store, failed, "long.test", ["b@long.test"], "550 5.7.1 refused")
    record_failed(store, small, "long.test", ["c@long.test"], "550 5.7.1 refused")
    summary = run(store, config, log, clock)
    assert summary["expired"] == 1 and summary["dsn_sent"] == 3
    reports = sink.wait_for(6)
    assert len(reports) == 6
    for _, _, report, _ in reports:
        message, _, [r], part = parse(report)
        attached = original_part(report)
        assert len(attached) <= 1024
        if r["Final-Recipient"] == "rfc822; c@long.test" and r["Action"] == "failed":
            assert part.get_content_type() == "message/rfc822" and attached.endswith(b"fits\r\n")
            continue
        assert part.get_content_type() == "text/rfc822-headers"
        if r["Final-Recipient"] == "rfc822; c@long.test":  # its delay warning: the whole (small) header
            assert attached == b"Subject: small\r\n"
        else:  # as many whole header lines as fit in 1K
            assert attached.startswith(b"X-Filler-00: ") and len(attached) > 1024 - len(header) // 30
            assert attached.endswith(b"\r\n") and header.startswith(attached)
    assert {r.state for q in (expired, failed) for r in rows(store, q).values()} == {"expired", "failed"}


def test_a_2_mb_ret_full_message_refused_by_the_primary_bounces_headers_only(server_factory, tmp_path):
    """End to end: smtplib -> serve -> queue; `backupmx flush` -> primary 554 -> DSN via the relay."""
    from sink import Sink

    with Sink() as primary, Sink() as relay:
        primary.behaviour = "data_5xx"
        mx = server_factory(bounce_relay=f"127.0.0.1:{relay.port}", domains={
            "example.com": {"primary": f"127.0.0.1:{primary.port}", "primary_tls": "none"}})
        big = b"Subject: big\r\nMessage-ID: <big@origin.test>\r\n\r\n" + (b"z" * 998 + b"\r\n") * 2100
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=30) as client:
            client.ehlo("client.test")
            client.sendmail("victim@origin.test", ["bob@example.com"], big, mail_options=["RET=FULL"])
        assert mx.stop() == 0  # the shell's flusher alone delivers: its housekeeping then sends the DSN
        flush = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "flush", "example.com", "-c",
                                mx.config_path], capture_output=True, text=True, timeout=30)
        assert flush.returncode == 0, flush.stderr
        [(mail_from, rcpts, report, _)] = relay.wait_for(1, timeout=20)
    assert primary.data_received == 1 and len(big) > 2 * 1024 * 1024
    assert (mail_from, rcpts) == ("", ["victim@origin.test"])
    _, _, [r], part = parse(report)
    assert r["Action"] == "failed" and r["Status"] == "5.7.1"
    assert part.get_content_type() == "text/rfc822-headers"
    attached = original_part(report)
    assert attached.startswith(f"Received: from client.test {received_client()}".encode())
    assert attached.endswith(b"Subject: big\r\nMessage-ID: <big@origin.test>\r\n")
    assert len(report) < 50 * 1024 and b"zzzz" not in report


def test_failed_5xx_gets_a_dsn_with_diagnostic(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port)
    qid = put(store, "a@long.test", "b@long.test")
    clock.now += 60
    record_failed(store, qid, "long.test", ["a@long.test"], "550 5.1.1 <a@long.test>: Recipient address rejected: User unknown")
    clock.now += 60
    summary = run(store, config, log, clock)
    assert summary["dsn_sent"] == 1
    [(_, _, body, _)] = sink.wait_for(1)
    _, _, [r], _ = parse(body)
    assert r["Final-Recipient"] == "rfc822; a@long.test"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; mail.long.test"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 <a@long.test>: Recipient address rejected: User unknown"
    assert email.utils.parsedate_to_datetime(r["Last-Attempt-Date"]).timestamp() == T0 + 60
    # b is still queued; the row is not failed yet.
    assert rows(store, qid)["long.test"].state == "queued"


def test_null_sender_gets_no_dsn(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port)
    qid = put(store, "a@short.test", sender="")
    clock.now += 2 * HOUR
    summary = run(store, config, log, clock)
    assert summary["dsn_sent"] == 0 and summary["dsn_skipped"] == 1
    assert sink.messages == []
    [line] = log.lines.find("dsn-skipped")
    assert f"id={qid}" in line and 'reason="null sender"' in line
    assert rows(store, qid)["short.test"].recipients[0].dsn_sent is not None
    assert any(e.what == "dsn" and "null sender" in e.detail for e in store.history(qid))


def test_notify_is_honoured(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port)
    put(store, Recipient("never@short.test", "short.test", "NEVER"),
        Recipient("success@short.test", "short.test", "SUCCESS"),
        Recipient("failure@short.test", "short.test", "SUCCESS,FAILURE"),
        Recipient("default@short.test", "short.test"))
    clock.now += 2 * HOUR
    summary = run(store, config, log, clock)
    assert summary["dsn_sent"] == 2 and summary["dsn_skipped"] == 2
    [(_, _, body, _)] = sink.wait_for(1)
    _, _, per_recipient, _ = parse(body)
    assert [r["Final-Recipient"] for r in per_recipient] == ["rfc822; failure@short.test", "rfc822; default@short.test"]


def test_no_bounce_relay_keeps_the_row_until_retention(store, clock, tmp_path, log):
    config = make_config(tmp_path)
    qid = put(store, "a@short.test")
    clock.now += 2 * HOUR
    summary = run(store, config, log, clock)
    assert summary["dsn_skipped"] == 1
    [line] = log.lines.find("dsn-skipped")
    assert 'reason="no bounce_relay"' in line
    clock.now += 7 * DAY - 1
    assert run(store, config, log, clock)["purged"] == 0
    assert rows(store, qid)["short.test"].state == "expired"
    assert [m.queue_id for m in store.list_messages(state="expired")] == [qid]
    clock.now += 1
    assert run(store, config, log, clock)["purged"] == 1
    assert store.show(qid) is None
    [line] = log.lines.find("purged")
    assert line == f"purged id={qid} domain=short.test state=expired retention=604800s"


def test_relay_down_is_retried_next_round(store, clock, tmp_path, log, sink):
    down = make_config(tmp_path, relay=free_port())  # nothing listens there: connection refused
    qid = put(store, "a@short.test")
    other = put(store, "b@short.test")
    clock.now += 2 * HOUR
    summary = run(store, down, log, clock)
    assert summary["dsn_sent"] == 0 and summary["dsn_failed"] == 1  # stops at the first: the relay is down
    [line] = log.lines.find("bounce-failed")
    assert "retry=yes" in line and "error=" in line
    assert all(r.dsn_sent is None for q in (qid, other) for r in rows(store, q)["short.test"].recipients)
    assert any(e.what == "dsn-failed" for e in store.history(qid) + store.history(other))

    # The relay answers 4xx: still retried.
    sink.behaviour = "rcpt_4xx"
    up = dataclasses.replace(down, bounce_relay=("127.0.0.1", sink.port))
    assert run(store, up, log, clock)["dsn_failed"] == 1
    assert "450" in log.lines.find("bounce-failed")[-1]
    # Back to normal: both go out.
    sink.behaviour = "normal"
    clock.now += 60
    assert run(store, up, log, clock)["dsn_sent"] == 2
    assert sorted(rcpts[0] for _, rcpts, _, _ in sink.wait_for(2)) == ["sender@example.org"] * 2


def test_relay_refusing_a_dsn_is_not_retried(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port)
    sink.behaviour = "rcpt_5xx"
    qid = put(store, "a@short.test")
    clock.now += 2 * HOUR
    summary = run(store, config, log, clock)
    assert summary["dsn_failed"] == 1
    assert "retry=no" in log.lines.find("bounce-failed")[0]
    sink.behaviour = "normal"
    assert run(store, config, log, clock)["dsn_sent"] == 0
    assert rows(store, qid)["short.test"].state == "expired"  # kept for retention all the same
    assert any(e.what == "dsn" and "undeliverable" in e.detail for e in store.history(qid))


def _housekeeper(path, config, now, results):
    store = QueueStore(path, clock=lambda: now)
    try:
        summary = housekeeping(store, config, logger=logging.getLogger("test.lifecycle.child"), clock=lambda: now)
        results.put(summary["dsn_sent"])
    finally:
        store.close()


def test_two_housekeepers_never_send_a_dsn_twice(store, clock, tmp_path, sink):
    for i in range(40):
        put(store, f"r{i}@short.test")
    now = clock.now + 2 * HOUR
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    config = make_config(tmp_path, relay=sink.port)  # once: three writers of one file would race
    procs = [ctx.Process(target=_housekeeper, args=(store.path, config, now, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    sent = [results.get(timeout=5) for _ in procs]
    assert sum(sent) == 40
    got = sink.wait_for(40)
    assert len(got) == 40
    finals = sorted(parse(body)[2][0]["Final-Recipient"] for _, _, body, _ in got)
    assert finals == sorted(f"rfc822; r{i}@short.test" for i in range(40))


def test_an_expired_claim_is_sent_again(store, clock):
    # A housekeeper died between claiming and recording: after the claim runs
    # out, another one takes it (at least once).
    qid = put(store, "a@short.test")
    clock.now += 2 * HOUR
    store.expire({"short.test": HOUR}, default=DAY)
    assert [b.queue_id for b in store.claim_dsns()] == [qid]
    assert store.claim_dsns() == []
    clock.now += lifecycle.DSN_CLAIM_SECONDS
    assert [b.queue_id for b in store.claim_dsns()] == [qid]


# --- delay warnings ---------------------------------------------------------------------


def test_delay_warning_once_per_row(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port, extra="delay_warning = 4h")
    qid = put(store, "a@long.test", Recipient("b@long.test", "long.test", "FAILURE"))
    quiet = put(store, Recipient("c@long.test", "long.test", "NEVER"))
    null = put(store, "d@long.test", sender="")
    clock.now += 4 * HOUR - 1
    assert run(store, config, log, clock)["delay_warnings"] == 0
    clock.now += 1
    assert run(store, config, log, clock)["delay_warnings"] == 1
    [(mail_from, rcpts, body, _)] = sink.wait_for(1)
    assert mail_from == "" and rcpts == ["sender@example.org"]
    message, per_message, [r], part = parse(body)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert r["Final-Recipient"] == "rfc822; a@long.test"
    assert r["Action"] == "delayed"
    assert r["Status"] == "4.4.1"
    assert email.utils.parsedate_to_datetime(r["Will-Retry-Until"]).timestamp() == T0 + 5 * DAY
    assert part.get_content_type() == "text/rfc822-headers"
    clock.now += DAY
    assert run(store, config, log, clock)["delay_warnings"] == 0
    assert len(sink.messages) == 1
    assert any(e.what == "delay-warning" for e in store.history(quiet))
    assert any(e.what == "delay-warning" and "null sender" in e.detail for e in store.history(null))
    assert rows(store, qid)["long.test"].state == "queued"


def test_no_delay_warning_when_off(store, clock, tmp_path, log, sink):
    config = make_config(tmp_path, relay=sink.port)  # no delay_warning attribute at all
    put(store, "a@long.test")
    clock.now += 4 * DAY
    assert run(store, config, log, clock)["delay_warnings"] == 0
    assert sink.messages == []


# --- retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("interval, attempts, delay", [
    (600, 1, 600), (600, 2, 1200), (600, 3, 2400), (600, 4, 4800), (600, 5, 4800), (600, 99, 4800),
    (3 * HOUR, 3, 12 * HOUR), (3 * HOUR, 4, DAY), (3 * HOUR, 9, DAY),
    (2 * DAY, 1, 2 * DAY), (2 * DAY, 5, 2 * DAY), (60, 0, 60),
])
def test_next_retry_delay(interval, attempts, delay):
    assert next_retry_delay(interval, attempts) == delay


def test_next_retry_delay_needs_an_interval():
    with pytest.raises(ValueError):
        next_retry_delay(0, 1)


def test_retry_asks_for_a_flush_only_when_due(store, clock, tmp_path, log):
    config = make_config(tmp_path, domains="""
[domain:short.test]
primary = mail.short.test:25
retry_interval = 10m

[domain:long.test]
primary = mail.long.test:25
""")  # short.test retries every 10m and up; long.test: only on ETRN
    qid = put(store, "a@short.test")
    put(store, "b@long.test")
    summary = run(store, config, log, clock)
    assert summary["retries"] == ["short.test"]  # new mail is due at once
    assert pending_flushes(store.path) == ["short.test"]
    assert log.lines.find("retry") == ["retry domain=short.test queued=1"]

    # The flusher takes it, the primary is down: deferred with the backoff.
    attempts = 0
    for wait in (600, 1200, 2400):
        assert store.claim_flush("flusher", 60) == "short.test"
        attempts += 1
        record_deferred(store, qid, "short.test", ["a@short.test"], "421 4.3.2 down",
                       retry_after=next_retry_delay(600, attempts))
        store.release_flush("short.test", "flusher")
        clock.now += wait - 1
        assert run(store, config, log, clock)["retries"] == []
        assert pending_flushes(store.path) == []
        clock.now += 1
        assert run(store, config, log, clock)["retries"] == ["short.test"]
    # long.test was never asked for: only ETRN flushes it.
    assert "long.test" not in pending_flushes(store.path)


# --- retention and the database --------------------------------------------------------


def test_failed_rows_are_purged_after_retention(store, clock, tmp_path, log):
    config = make_config(tmp_path)
    qid = put(store, "a@long.test")
    record_failed(store, qid, "long.test", ["a@long.test"], "550 no")
    run(store, config, log, clock)
    clock.now += 7 * DAY
    assert run(store, config, log, clock)["purged"] == 1
    assert store.show(qid) is None
    assert any(e.what == "deleted" for e in store.history(qid))


def test_freed_pages_go_back_and_the_wal_is_truncated(store, clock, tmp_path, log):
    config = make_config(tmp_path)
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 2000  # 2 MB
    ids = [put(store, "a@long.test", body=big) for _ in range(3)]
    for qid in ids:
        record_delivered(store, qid, "long.test", ["a@long.test"], "250 ok")
    size_before = os.path.getsize(store.path) + os.path.getsize(store.path + "-wal")
    summary = run(store, config, log, clock)
    assert summary["vacuumed_pages"] * store.connection.execute("PRAGMA page_size").fetchone()[0] > 5_000_000
    assert summary["checkpoint"][0] == 0  # not busy: done
    assert os.path.getsize(store.path + "-wal") == 0
    assert os.path.getsize(store.path) < size_before / 4
    assert log.lines.find("vacuum")
    free, pages = store.free_pages()
    assert free <= pages * reclaimer.VACUUM_KEEP + 1  # a tenth may stay, for new mail


def test_the_vacuum_goes_in_bounded_steps(store, clock, tmp_path, log, monkeypatch):
    """Each incremental_vacuum holds the write lock (the SMTP workers' commits wait): a
    large one is cut into steps of VACUUM_STEP bytes."""
    monkeypatch.setattr(reclaimer, "VACUUM_STEP", 256 * 1024)
    monkeypatch.setattr(reclaimer, "VACUUM_PAUSE", 0)
    config = make_config(tmp_path)
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 2000  # 2 MB
    qid = put(store, "a@long.test", body=big)
    record_delivered(store, qid, "long.test", ["a@long.test"], "250 ok")
    statements = []
    store.connection.set_trace_callback(statements.append)
    summary = run(store, config, log, clock)
    store.connection.set_trace_callback(None)
    steps = [int(n) for s in statements for n in re.findall(r"incremental_vacuum\((\d+)\)", s)]
    assert summary["vacuumed_pages"] * store.connection.execute("PRAGMA page_size").fetchone()[0] > 1_500_000
    page_size = store.connection.execute("PRAGMA page_size").fetchone()[0]
    assert len(steps) >= 6 and max(steps) == 256 * 1024 // page_size, steps


def test_the_vacuum_gives_way_to_a_flush_as_the_reclaim_does(store, clock, tmp_path, log, monkeypatch):
    """Nearly empty, the vacuum's steps landed in the flushes an ETRN asked for: while a
    flush is asked for and not taken yet, or delivers (a live lease), the vacuum waits
    for a later round, and stops between steps when one is asked for. Within the
    reclaim's bound: once it last ran RECLAIM_DEFER_SECONDS ago, it runs anyway."""
    monkeypatch.setattr(reclaimer, "VACUUM_STEP", 64 * 1024)
    monkeypatch.setattr(reclaimer, "VACUUM_PAUSE", 0)
    monkeypatch.setattr(reclaimer, "VACUUM_ROUND_SECONDS", 60.0)  # its deadline never decides here
    config = make_config(tmp_path)
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 500  # 0.5 MB

    def freed():
        """A big message delivered and deleted: its pages are free, well over a tenth of the file."""
        qid = put(store, "b@long.test", body=big)
        record_delivered(store, qid, "long.test", ["b@long.test"], "250 ok")
        assert reclaim(store) == 1  # by hand: the round's reclaim gives way too
        free, pages = store.free_pages()
        assert free > pages * reclaimer.VACUUM_KEEP + 64
        return free

    def vacuumed_all(summary):
        free, pages = store.free_pages()
        return summary["vacuumed_pages"] > 0 and not summary["vacuum_deferred"] and free <= pages * reclaimer.VACUUM_KEEP + 1

    put(store, "w@long.test")  # stays queued: long.test can be asked to flush
    freed()
    assert vacuumed_all(run(store, config, log, clock))  # no flush wanted
    free = freed()
    assert store.request_flush(["long.test"]) == {"long.test": 1}  # an ETRN no flush worker took yet
    summary = run(store, config, log, clock)
    assert summary["vacuumed_pages"] == 0 and summary["vacuum_deferred"] and store.free_pages()[0] == free
    assert store.claim_flush("flusher:1", 60) == "long.test"  # its flush delivers
    summary = run(store, config, log, clock)
    assert summary["vacuumed_pages"] == 0 and summary["vacuum_deferred"] and store.free_pages()[0] == free
    assert len(log.lines.find("vacuum")) == 1  # the first round's
    store.release_flush("long.test", "flusher:1")
    assert vacuumed_all(run(store, config, log, clock))  # the flush is over
    freed()
    store.request_flush(["long.test"])
    assert run(store, config, log, clock)["vacuum_deferred"]  # it ran just now
    reclaimer._vacuumed_at[store.path] -= reclaimer.RECLAIM_DEFER_SECONDS + 1  # it last ran 5 minutes ago
    assert vacuumed_all(run(store, config, log, clock))  # a queue that flushes all the time gets its pages back
    freed()
    monkeypatch.setattr(store, "flush_wanted", iter([False, True]).__next__)  # an ETRN comes after the first step
    assert reclaimer.vacuum_round(store) == (64 * 1024 // store.page_size(), True)


def table_counts(path):
    shell = sqlite3.connect(path)
    try:
        return tuple(shell.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("messages", "body_chunks", "reclaim"))
    finally:
        shell.close()


def test_a_round_reclaims_the_messages_whose_last_row_left_and_only_those(store, clock, tmp_path, log, monkeypatch):
    """Schema 14: the flush leaves a delivered message's row and body to housekeeping.
    A message for two domains stays while either has it; one deleted by hand in the
    sqlite3 shell (plain SQL, foreign_keys off) is reclaimed as well; a round whose
    time is up leaves the rest listed for the next."""
    config = make_config(tmp_path)
    body = b"Subject: r\r\n\r\n" + b"x" * 3000  # several chunks
    both = put(store, "a@short.test", "b@long.test", body=body)
    by_hand = put(store, "c@long.test", body=body)
    record_delivered(store, both, "short.test", ["a@short.test"], "250 ok")
    assert run(store, config, log, clock)["reclaimed"] == 0  # long.test still has it
    assert store.open_body(both).read() == body and table_counts(store.path)[0] == 2
    record_delivered(store, both, "long.test", ["b@long.test"], "250 ok")
    shell = sqlite3.connect(store.path, isolation_level=None)
    shell.execute("DELETE FROM queue WHERE queue_id = ?", (by_hand,))
    shell.close()
    assert store.show(both) is None and store.show(by_hand) is None  # out of the queue at once
    assert store.summary() == [] and table_counts(store.path)[0] == 2  # but not yet deleted
    monkeypatch.setattr(reclaimer, "RECLAIM_ROUND_SECONDS", 0)  # no time left this round
    assert run(store, config, log, clock)["reclaimed"] == 0 and table_counts(store.path)[2] == 2
    assert log.lines.find("reclaimed") == []  # a round that deleted nothing says nothing
    monkeypatch.undo()
    assert run(store, config, log, clock)["reclaimed"] == 2
    assert table_counts(store.path) == (0, 0, 0)
    assert log.lines.find("reclaimed") == ["reclaimed messages=2"]
    with pytest.raises(KeyError):
        store.open_body(both)
    assert [e.what for e in store.history(both)].count("delivered") == 2


def test_a_reclaim_transaction_deletes_a_bounded_size_of_bodies(store, clock, tmp_path, log, monkeypatch):
    """RECLAIM_BATCH messages of up to max_message_size (50 MB by default) in one transaction
    would hold the write lock for a minute and write as much WAL (Debian's SQLite zeroes each
    freed page: SECURE_DELETE; 6 s/GB measured), the SMTP workers' commits past their busy
    timeout: a transaction takes messages while their bodies add up to RECLAIM_BYTES, and
    at least one (as big as a flush's own outcome batch of one message deleted it)."""
    config = make_config(tmp_path)
    body = b"Subject: r\r\n\r\n" + b"x" * 3000
    for _ in range(5):
        qid = put(store, "c@long.test", body=body)
        record_delivered(store, qid, "long.test", ["c@long.test"], "250 ok")
    monkeypatch.setattr(reclaimer, "RECLAIM_BYTES", 2 * len(body))
    deletes = []
    store.connection.set_trace_callback(lambda sql: sql.startswith("DELETE FROM messages") and deletes.append(sql))
    try:
        assert run(store, config, log, clock)["reclaimed"] == 5
    finally:
        store.connection.set_trace_callback(None)
    # (traced again for each trigger it fires: each statement counted once)
    assert [sql.count("','") + 1 for sql in dict.fromkeys(deletes)] == [2, 2, 1], deletes
    assert table_counts(store.path) == (0, 0, 0)


def test_the_reclaim_waits_while_a_flush_delivers_for_a_few_minutes_at_most(store, clock, tmp_path, log, monkeypatch):
    """A live lease (a flusher's, an ATRN's), or a flush asked for and not taken yet,
    defers the reclaim: the drain gets the machine. Not for ever: after
    RECLAIM_DEFER_SECONDS, or with a long list, it runs."""
    config = make_config(tmp_path)
    mail = {put(store, f"{n}@long.test"): f"{n}@long.test" for n in "abcdefg"}
    a, b, c, d, e, f, g = mail

    def delivered(*qids):
        for qid in qids:
            record_delivered(store, qid, "long.test", [mail[qid]], "250 ok")

    delivered(a)
    assert run(store, config, log, clock)["reclaimed"] == 1  # no lease
    store.request_flush(["long.test"])
    assert store.claim_flush("flusher:1", 60) == "long.test"
    delivered(b, c)
    summary = run(store, config, log, clock)
    assert summary["reclaimed"] == 0 and summary["reclaim_deferred"] and table_counts(store.path)[2] == 2
    reclaimer._reclaimed_at[store.path] -= reclaimer.RECLAIM_DEFER_SECONDS + 1  # it last ran 5 minutes ago
    summary = run(store, config, log, clock)
    assert summary["reclaimed"] == 2 and not summary["reclaim_deferred"]
    delivered(d)
    assert run(store, config, log, clock)["reclaim_deferred"]  # it ran just now
    monkeypatch.setattr(reclaimer, "RECLAIM_DEFER_SPAN", 0)  # the list is long
    assert run(store, config, log, clock)["reclaimed"] == 1
    monkeypatch.undo()
    clock.now += 61  # the lease ran out (its flusher died): nobody delivers
    delivered(e)
    assert run(store, config, log, clock)["reclaimed"] == 1
    assert store.claim_domains(["long.test"], "atrn:2", 60) == {"long.test": 2}  # an ATRN session's lease
    delivered(f)
    assert run(store, config, log, clock)["reclaimed"] == 0 and table_counts(store.path)[2] == 1
    store.release_flush("long.test", "atrn:2")
    delivered(g)
    put(store, "h@long.test")
    assert store.request_flush(["long.test"]) == {"long.test": 1}  # an ETRN no flusher took yet (in their rounds)
    summary = run(store, config, log, clock)
    assert summary["reclaimed"] == 0 and summary["reclaim_deferred"] and table_counts(store.path)[2] == 2
    assert store.claim_flush("flusher:3", 60) == "long.test"
    store.release_flush("long.test", "flusher:3")
    monkeypatch.setattr(reclaimer, "RECLAIM_BATCH", 1)
    answers = iter([False])  # a flush starts after the first transaction (and the vacuum gives way to it too)
    monkeypatch.setattr(store, "flush_wanted", lambda: next(answers, True))
    summary = run(store, config, log, clock)
    assert summary["reclaimed"] == 1 and summary["reclaim_deferred"] and table_counts(store.path)[2] == 1




def test_a_locked_queue_is_logged_and_the_round_goes_on(tmp_path, clock, log, monkeypatch):
    monkeypatch.setattr(lifecycle, "CHECKPOINT_BUSY_TIMEOUT", 0.05)
    config = make_config(tmp_path)
    path = str(tmp_path / "queue.db")
    store = QueueStore(path, clock=clock, busy_timeout=0.05)
    try:
        put(store, "a@short.test")
        clock.now += 2 * HOUR
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            summary = run(store, config, log, clock)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert summary["errors"] >= 1
        assert any("step=expire" in line for line in log.lines.find("housekeeping-error"))
        assert run(store, config, log, clock)["expired"] == 1
    finally:
        store.close()


# --- send_dsn ------------------------------------------------------------------------------


def test_send_dsn_errors(sink):
    with pytest.raises(BounceFailed) as info:
        send_dsn(("127.0.0.1", free_port()), "s@example.org", b"Subject: x\r\n\r\ny\r\n", hostname="mx2.test",
                 timeout=5)
    assert not info.value.permanent
    sink.behaviour = "data_5xx"
    with pytest.raises(BounceFailed) as info:
        send_dsn(sink.address, "s@example.org", b"Subject: x\r\n\r\ny\r\n", hostname="mx2.test", timeout=5)
    assert info.value.permanent and str(info.value).startswith("554 ")
    sink.behaviour = "normal"
    send_dsn(sink.address, "s@example.org", "Subject: ü\r\n\r\ny\r\n".encode(), hostname="mx2.test", timeout=5)
    [delivery] = sink.deliveries
    assert delivery.mail_from == "" and delivery.mail_params["BODY"] == "8BITMIME"
    assert sink.sessions[-1].ehlo == "mx2.test"
