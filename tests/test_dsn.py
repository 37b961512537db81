"""RFC 3464 delivery status notifications (backupmx/dsn.py): built, then parsed
back with the `email` package and checked field by field. No sockets, no SQLite."""

import email
import email.policy
import email.utils
import random
import re

import pytest

from backupmx import dsn
from backupmx.store import Bounce, RecipientStatus

T0 = 1_800_000_000
ORIGINAL = (
    b"Received: from client.test ([192.0.2.1]) by mx2.test with ESMTP id ABC; Fri, 15 Jan 2027 08:00:00 +0000\r\n"
    b"From: Sender <sender@example.org>\r\n"
    b"To: <a@example.com>\r\n"
    b"Subject: the report\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".leading dot and -- dashes\r\n"
    b"bye\r\n"
)


def rcpt(address, state="failed", reply=None, notify=None, orcpt=None):
    return RecipientStatus(address, notify, orcpt, state, reply, None)


def bounce(*recipients, sender="sender@example.org", envid=None, ret=None, size=len(ORIGINAL), last_attempt=None,
           queue_id="0ABCDEF1234567"):
    return Bounce(queue_id, "example.com", sender, envid, ret, T0, "192.0.2.1", "client.test", list(recipients),
                  size=size, last_attempt=last_attempt)


def build(b, *, action=dsn.FAILED, original=ORIGINAL, full=True, **kw):
    headers, body = dsn.split_headers(original)
    kw.setdefault("remote_mta", "mail.example.com")
    return dsn.build_dsn(b, reporting_mta="mx2.test", original_headers=headers,
                         original_body=body if full else None, action=action,
                         arrival_date=T0, now=T0 + 3600, **kw)


def parse(data):
    message = email.message_from_bytes(data, policy=email.policy.default)
    text, status, original = message.iter_parts()
    per_message, *per_recipient = status.get_payload()
    return message, text, status, per_message, per_recipient, original


def date(ts):
    return email.utils.parsedate_to_datetime(ts).timestamp()


# --- the whole message ----------------------------------------------------------


def test_failed_dsn_field_by_field():
    data = build(bounce(
        rcpt("a@example.com", reply="550 5.1.1 <a@example.com>: Recipient address rejected: User unknown",
             orcpt="rfc822;a+2Balias@example.com"),
        rcpt("b@example.com", reply="554 no such thing"),
        envid="QQ+2B314", ret="FULL", last_attempt=T0 + 1800,
    ))
    message, text, status, per_message, per_recipient, original = parse(data)

    assert [a.addr_spec for a in message["From"].addresses] == ["MAILER-DAEMON@mx2.test"]
    assert [a.addr_spec for a in message["To"].addresses] == ["sender@example.org"]
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert date(message["Date"]) == T0 + 3600
    assert re.fullmatch(r"<[^<>@\s]+@mx2\.test>", message["Message-ID"])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"

    assert text.get_content_type() == "text/plain"
    assert "<a@example.com>: the domain's mail server said: 550 5.1.1" in text.get_content()
    assert "mx2.test" in text.get_content()

    assert status.get_content_type() == "message/delivery-status"
    assert per_message["Reporting-MTA"] == "dns; mx2.test"
    assert per_message["Original-Envelope-Id"] == "QQ+314"  # xtext decoded (RFC 3464 2.2.1)
    assert date(per_message["Arrival-Date"]) == T0
    assert per_message["X-Backupmx-Queue-ID"] == "0ABCDEF1234567"

    a, b = per_recipient
    assert a["Original-Recipient"] == "rfc822; a+alias@example.com"
    assert a["Final-Recipient"] == "rfc822; a@example.com"
    assert a["Action"] == "failed"
    assert a["Status"] == "5.1.1"
    assert a["Remote-MTA"] == "dns; mail.example.com"
    assert a["Diagnostic-Code"] == "smtp; 550 5.1.1 <a@example.com>: Recipient address rejected: User unknown"
    assert date(a["Last-Attempt-Date"]) == T0 + 1800
    assert a["Will-Retry-Until"] is None
    assert b["Original-Recipient"] is None
    assert b["Status"] == "5.0.0"  # no enhanced code in the reply
    assert b["Diagnostic-Code"] == "smtp; 554 no such thing"

    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Transfer-Encoding"] is None  # 7-bit original
    inner = original.get_payload()[0]
    assert inner["Subject"] == "the report"
    assert inner["Message-ID"] == "<orig-1@example.org>"


def test_expired_recipient_is_failed_with_4_4_7():
    data = build(bounce(rcpt("a@example.com", state="expired"),
                        rcpt("b@example.com", state="expired", reply="421 4.4.2 timeout")))
    *_, per_recipient, _ = parse(data)
    for r in per_recipient:
        assert r["Action"] == "failed"
        assert r["Status"] == "4.4.7"
    assert per_recipient[0]["Diagnostic-Code"] is None  # never tried: no reply, no Remote-MTA
    assert per_recipient[0]["Remote-MTA"] is None
    assert per_recipient[0]["Last-Attempt-Date"] is None
    assert per_recipient[1]["Diagnostic-Code"] == "smtp; 421 4.4.2 timeout"


def test_connection_error_is_not_an_smtp_diagnostic():
    data = build(bounce(rcpt("a@example.com", state="expired", reply="ConnectionRefusedError: [Errno 111]")))
    *_, [r], _ = parse(data)
    assert r["Diagnostic-Code"] == "X-Backupmx; ConnectionRefusedError: [Errno 111]"
    assert r["Remote-MTA"] is None


def test_delay_warning():
    data = build(bounce(rcpt("a@example.com", state="queued", reply="451 4.3.0 try later"),
                        rcpt("b@example.com", state="queued")),
                 action=dsn.DELAYED, full=False, will_retry_until=T0 + 5 * 86400)
    message, text, _, _, per_recipient, headers = parse(data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert "WARNING ONLY" in text.get_content()
    assert [r["Action"] for r in per_recipient] == ["delayed", "delayed"]
    assert [r["Status"] for r in per_recipient] == ["4.3.0", "4.4.1"]
    assert [date(r["Will-Retry-Until"]) for r in per_recipient] == [T0 + 5 * 86400] * 2
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Hello," not in data


def test_headers_only():
    data = build(bounce(rcpt("a@example.com")), full=False)
    *_, part = parse(data)
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Description"] == "Undelivered Message Headers"
    assert "Subject: the report" in part.get_content()
    assert b"Hello," not in data


def test_8bit_original_is_marked():
    original = ORIGINAL.replace(b"bye", "Grüße".encode())
    data = build(bounce(rcpt("a@example.com")), original=original)
    *_, part = parse(data)
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert "Grüße".encode() in data


def test_refused_without_sender_or_recipients():
    with pytest.raises(ValueError):
        build(bounce(rcpt("a@example.com"), sender=""))
    with pytest.raises(ValueError):
        build(bounce())
    with pytest.raises(ValueError):
        build(bounce(rcpt("a@example.com")), action="relayed")


def test_peer_text_cannot_add_header_lines():
    evil = "550 5.1.1 no\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; x@evil"
    data = build(bounce(rcpt("a@example.com", reply=evil), envid="x+0D+0AAction:+20delivered"))
    _, _, _, per_message, per_recipient, _ = parse(data)
    assert len(per_recipient) == 1
    assert per_recipient[0]["Action"] == "failed"
    assert "\n" not in per_recipient[0]["Diagnostic-Code"]
    assert per_message["Original-Envelope-Id"] == "x??Action: delivered"


def _attachment(data: bytes) -> bytes:
    """The third part's content, taken from the raw bytes (not re-serialised)."""
    boundary = re.search(rb'boundary="([^"]+)"', data).group(1)
    third = data.split(b"\r\n--" + boundary)[3]
    return third.split(b"\r\n\r\n", 1)[1]


def test_every_line_is_crlf_and_short_and_original_is_byte_exact():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(50):
        lines = [b"Subject: r"] + [bytes(rng.choice(b"abc .-=\t") for _ in range(rng.randrange(0, 80)))
                                   for _ in range(rng.randrange(0, 6))]
        body = [bytes(rng.choice(b"xyz .-\t") for _ in range(rng.randrange(0, 200)))
                for _ in range(rng.randrange(0, 20))]
        original = b"\r\n".join(lines) + b"\r\n\r\n" + b"".join(l + b"\r\n" for l in body)
        data = build(bounce(rcpt("a@example.com", reply="550 5.0.0 " + "x" * rng.randrange(0, 3000))),
                     original=original)
        assert b"\n" not in data.replace(b"\r\n", b"")
        assert b"\r" not in data.replace(b"\r\n", b"")
        assert max(len(l) for l in data.split(b"\r\n")) <= 998
        assert _attachment(data) == original


def test_boundary_never_in_content():
    original = ORIGINAL + b"--0ABCDEF1234567.fixed\r\n"
    with pytest.raises(ValueError):
        build(bounce(rcpt("a@example.com")), original=original, boundary="0ABCDEF1234567.fixed")
    data = build(bounce(rcpt("a@example.com")), original=original)
    assert _attachment(data) == original


# --- the rules ------------------------------------------------------------------


@pytest.mark.parametrize("notify, failed, delayed", [
    (None, True, True),
    ("", True, True),
    ("NEVER", False, False),
    ("never", False, False),
    ("SUCCESS", False, False),
    ("FAILURE", True, False),
    ("DELAY", False, True),
    ("SUCCESS,FAILURE,DELAY", True, True),
    ("success, delay", False, True),
])
def test_notify_wants(notify, failed, delayed):
    assert dsn.notify_wants(notify, dsn.FAILED) is failed
    assert dsn.notify_wants(notify, dsn.DELAYED) is delayed


LIMIT = 50 * 1024


@pytest.mark.parametrize("ret, size, action, full", [
    ("HDRS", 10, dsn.FAILED, False),
    ("hdrs", 10, dsn.FAILED, False),
    ("FULL", 10, dsn.FAILED, True),
    ("FULL", LIMIT, dsn.FAILED, True),
    ("FULL", LIMIT + 1, dsn.FAILED, False),  # RET=FULL does not lift bounce_size_limit
    ("FULL", 2 * 1024 * 1024, dsn.FAILED, False),
    (None, LIMIT, dsn.FAILED, True),
    (None, LIMIT + 1, dsn.FAILED, False),
    ("FULL", 10, dsn.DELAYED, False),
])
def test_returns_full(ret, size, action, full):
    assert dsn.returns_full(ret, size, action, LIMIT) is full


@pytest.mark.parametrize("headers, limit, cut", [
    (b"A: 1\r\nB: 2\r\n", 100, b"A: 1\r\nB: 2\r\n"),
    (b"A: 1\r\nB: 2\r\n", 12, b"A: 1\r\nB: 2\r\n"),
    (b"A: 1\r\nB: 2\r\n", 11, b"A: 1\r\n"),
    (b"A: 1\r\nB: 2\r\n", 6, b"A: 1\r\n"),
    (b"A: 1\r\nB: 2\r\n", 5, b""),  # never half a header line
    (b"A: 1\r\n\tfolded\r\nB: 2\r\n", 16, b"A: 1\r\n\tfolded\r\n"),
])
def test_cut_headers(headers, limit, cut):
    assert dsn.cut_headers(headers, limit) == cut
    assert len(cut) <= limit


@pytest.mark.parametrize("reply, state, action, status", [
    ("550 5.7.1 relaying denied", "failed", dsn.FAILED, "5.7.1"),
    ("550 4.2.0 odd class", "failed", dsn.FAILED, "5.0.0"),
    ("552 5.3.4", "failed", dsn.FAILED, "5.3.4"),
    ("550 Sorry", "failed", dsn.FAILED, "5.0.0"),
    (None, "failed", dsn.FAILED, "5.0.0"),
    ("451 4.7.1 greylisted", "expired", dsn.FAILED, "4.4.7"),
    ("451 4.7.1 greylisted", "queued", dsn.DELAYED, "4.7.1"),
    ("timed out", "queued", dsn.DELAYED, "4.4.1"),
])
def test_status_for(reply, state, action, status):
    assert dsn.status_for(rcpt("a@b", state=state, reply=reply), action) == status


@pytest.mark.parametrize("text, decoded", [
    ("plain", "plain"),
    ("a+2Bb", "a+b"),
    ("a+3Db+20c", "a=b c"),
    ("a+0Ab", "a?b"),
    ("+", "+"),
])
def test_xtext_decode(text, decoded):
    assert dsn.xtext_decode(text) == decoded


@pytest.mark.parametrize("message, headers, body", [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", b"body\r\n"),
    (b"A: 1\r\n\r\n", b"A: 1\r\n", b""),
    (b"A: 1\r\n", b"A: 1\r\n", b""),
    (b"\r\nbody\r\n", b"", b"body\r\n"),
    (b"A: 1\r\n\r\nx\r\n\r\ny\r\n", b"A: 1\r\n", b"x\r\n\r\ny\r\n"),
])
def test_split_headers(message, headers, body):
    assert dsn.split_headers(message) == (headers, body)
