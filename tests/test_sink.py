"""The test sink itself (tests/sink.py), driven by plain smtplib: other tests trust it."""

import os
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from sink import Sink  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CERTS = REPO / "tests" / "certs"


@pytest.fixture
def sink():
    s = Sink(tls_cert=str(CERTS / "server.pem"), tls_key=str(CERTS / "server.key")).start()
    yield s
    s.stop()


def test_records_byte_exact_with_envelope_and_tls(sink):
    client = smtplib.SMTP("127.0.0.1", sink.port, timeout=5)
    client.starttls(context=ssl.create_default_context(cafile=str(CERTS / "ca.pem")))
    body = b"Subject: x\r\n\r\n.leading dot\r\n\xff\x00\r\n"
    client.sendmail("a@b.test", ["c@example.com", "d@example.com"], body,
                    mail_options=["BODY=8BITMIME"], rcpt_options=["NOTIFY=NEVER"])
    client.quit()
    (d,) = sink.deliveries
    assert (d.mail_from, d.rcpts, d.body, d.tls) == ("a@b.test", ["c@example.com", "d@example.com"], body, True)
    assert d.mail_params == {"SIZE": str(len(body)), "BODY": "8BITMIME"}
    assert d.rcpt_params == [{"NOTIFY": "NEVER"}] * 2
    assert sink.messages == [("a@b.test", ["c@example.com", "d@example.com"], body, d.mail_params)]
    sink.wait_idle()


def test_rcpt_errors_for_given_addresses(sink):
    sink.behaviour = "rcpt_5xx"
    sink.behaviour_addresses = {"Bad@example.com"}
    client = smtplib.SMTP("127.0.0.1", sink.port, timeout=5)
    refused = client.sendmail("a@b.test", ["good@example.com", "bad@example.com"], b"x\r\n")
    client.quit()
    assert refused == {"bad@example.com": (550, b"5.1.1 <bad@example.com>: Recipient address rejected: User unknown")}
    assert sink.messages[0][1] == ["good@example.com"]


def test_no_starttls_and_ehlo_extensions(sink):
    sink.behaviour = "no_starttls"
    client = smtplib.SMTP("127.0.0.1", sink.port, timeout=5)
    client.ehlo("me.test")
    assert not client.has_extn("starttls")
    assert all(client.has_extn(e) for e in ("pipelining", "8bitmime", "size", "dsn"))
    client.quit()
    assert sink.sessions[0].ehlo == "me.test"


def test_runs_as_a_process(tmp_path):
    spool = tmp_path / "spool"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "sink.py"), "--port", "0", "--spool", str(spool)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        client = smtplib.SMTP("127.0.0.1", port, timeout=5)
        client.sendmail("a@b.test", ["c@example.com"], b"hello\r\n.dot\r\n")
        client.quit()
        assert (spool / "000001.eml").read_bytes() == b"hello\r\n.dot\r\n"
        assert '"rcpts": ["c@example.com"]' in (spool / "000001.json").read_text()
    finally:
        proc.terminate()
        proc.wait(5)
    assert proc.returncode == 0
