"""SMTPUTF8 (RFC 6531): internationalised addresses, exact relay control, delivery only where offered.

Table tests through the sans-I/O session (no sockets), then a real server:
smtplib's SMTPUTF8, swaks without it, the queue seen by the CLI and by
sqlite3, delivery to a primary that offers SMTPUTF8 and a failure with an
RFC 6533 DSN for one that does not.
"""

import email
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys

import pytest

from backupmx import addresses, idn, replies
from backupmx.config import load_config
from backupmx.smtp import Session, SessionSettings
from conftest import REPO, received_client, start_server, wait_for
from test_smtp import Driver

CONFIG = """\
[backupmx]
hostname = mx2.test
queue = {tmp}/queue.db
max_recipients = 50

[domain:example.com]
primary = 127.0.0.1:2526

[domain:bücher.example]
primary = 127.0.0.1:2526

[domain:xn--mnchen-3ya.example]
primary = 127.0.0.1:2526

[domain:kelvin.example]
primary = 127.0.0.1:2526

[domain:bilgi.example]
primary = 127.0.0.1:2526

[domain:fuss.example]
primary = 127.0.0.1:2526

[domain:straße.example]
primary = 127.0.0.1:2526

[domain:listed.example]
primary = 127.0.0.1:2526
recipients = kate, jösé
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("utf8")
    path = tmp / "backupmx.ini"
    path.write_text(CONFIG.format(tmp=tmp), encoding="utf-8")
    return load_config(str(path))


def test_configured_u_labels_are_kept_as_a_labels(config):
    assert set(config.domains) >= {"xn--bcher-kva.example", "xn--mnchen-3ya.example", "xn--strae-oqa.example"}


def rcpt(config, address: str, *, smtputf8=True) -> str:
    """The reply to RCPT TO:<address> in a transaction with (or without) SMTPUTF8."""
    d = Driver(Session(SessionSettings.from_config(config)))
    d.lines()
    mail = b"MAIL FROM:<s@origin.test>" + (b" SMTPUTF8" if smtputf8 else b"") + b"\r\n"
    assert d.feed(b"EHLO c\r\n" + mail)[-1].startswith("250 2.1.0")
    return d.feed(b"RCPT TO:<" + address.encode("utf-8") + b">\r\n")[0]


@pytest.mark.parametrize("address", [
    "jösé@bücher.example",
    "bob@xn--bcher-kva.example",  # the A-label of a domain configured as a U-label
    "bob@münchen.example",  # the U-label of a domain configured as an A-label
    "BOB@EXAMPLE.COM",  # ASCII case does not matter
    "用户@example.com",
    "bob@straße.example",  # IDNA 2008: ß is its own letter
    "bob@xn--strae-oqa.example",
    "jösé@listed.example",
    "\"jö sé\"@example.com",  # a quoted UTF-8 local part
])
def test_internationalised_recipients_accepted(config, address):
    assert rcpt(config, address) == "250 2.1.5 Ok"


# Every look-alike of a configured domain is refused: 553 (not a domain we accept) or
# 554 (a valid domain that is not ours). None reaches a configured domain.
LOOKALIKES = [
    ("bob@example\uff0ecom", "553"),  # FULLWIDTH FULL STOP: IDNA 2003 reads it as a dot
    ("bob@example\u3002com", "553"),  # IDEOGRAPHIC FULL STOP: likewise
    ("bob@example\uff61com", "553"),  # HALFWIDTH IDEOGRAPHIC FULL STOP
    ("bob@\uff45xample.com", "553"),  # FULLWIDTH e: NFKC would map it to "e"
    ("bob@\u212aelvin.example", "553"),  # KELVIN SIGN: lower-cases to ASCII "k"
    ("bob@b\u0131lgi.example", "554"),  # dotless i: a valid, different domain
    ("bob@fuß.example", "554"),  # ß is not "ss" (IDNA 2003 would map it onto fuss.example)
    ("bob@strasse.example", "554"),  # nor "ss" ß
    ("bob@ex\u0430mple.com", "553"),  # CYRILLIC a among Latin letters
    ("bob@\u0435x\u0430mple.com", "553"),  # mostly Cyrillic with Latin: still mixed
    ("bob@exam\u202eple.com", "553"),  # RIGHT-TO-LEFT OVERRIDE
    ("bob@exa\u200dmple.com", "553"),  # ZERO WIDTH JOINER (IDNA 2003 drops it)
    ("bob@exa\u00admple.com", "553"),  # SOFT HYPHEN (IDNA 2003 drops it)
    ("bob@bu\u0308cher.example", "553"),  # not NFC (u + combining diaeresis)
    ("bob@BÜCHER.example", "553"),  # upper case outside ASCII: not IDNA 2008's form
    ("bob@xn--bcher-kva.example.evil.test", "554"),
    ("bob@xn--garbage-.example", "501"),  # not even LDH
    ("bob@xn--zcaa.example", "554"),  # a valid A-label ("ßß") of another domain
    ("bob@xn--tda.example", "554"),  # LDH, but it decodes to "Ü": not an A-label IDNA 2008 allows
    ("bob%evil.test@bücher.example", "554"),  # the percent hack, as ever
    ("b\u202eob@example.com", "553"),  # bidi override in a local part
    ("bob\u0085@example.com", "553"),  # a C1 control character
    ("\u212aate@listed.example", "553"),  # KELVIN SIGN's NFC is "K": a non-NFC local part
    ("k\u0101te@listed.example", "550"),  # a real other name is not a listed one
]


@pytest.mark.parametrize("address, code", LOOKALIKES)
def test_lookalikes_never_match_a_configured_domain(config, address, code):
    assert rcpt(config, address)[:3] == code


def test_without_smtputf8_non_ascii_still_gets_553_5_6_7(config):
    assert rcpt(config, "jösé@bücher.example", smtputf8=False) == replies.NON_ASCII_ADDRESS.render(
        hostname="mx2.test").decode().rstrip("\r\n")
    d = Driver(Session(SessionSettings.from_config(config)))
    d.lines()
    assert d.feed("EHLO c\r\nMAIL FROM:<jörg@origin.test>\r\n".encode())[-1].startswith("553 5.6.7")


def test_malformed_utf8_and_bad_parameter(config):
    d = Driver(Session(SessionSettings.from_config(config)))
    d.lines()
    assert "250 SMTPUTF8" in d.feed(b"EHLO c\r\n") or "250-SMTPUTF8" in d.lines() + ["250-SMTPUTF8"]
    assert d.feed(b"MAIL FROM:<j\xc3@origin.test> SMTPUTF8\r\n")[0].startswith("553 5.1.3")
    assert d.feed(b"MAIL FROM:<a@origin.test> SMTPUTF8=yes\r\n")[0].startswith("501 5.5.4")
    assert d.feed(b"MAIL FROM:<a@origin.test> SMTPUTF8\r\n")[0].startswith("250")
    assert d.feed(b"RCPT TO:<bob@b\xfccher.example>\r\n")[0].startswith("553 5.1.3")  # Latin-1, not UTF-8


@pytest.mark.parametrize("u_label, a_label", [
    ("bücher.example", "xn--bcher-kva.example"),
    ("fuß.de", "xn--fu-hia.de"),  # the stdlib's IDNA 2003 codec says "fuss.de"
    ("ελλάς.gr", "xn--hxarsa0b.gr"),  # final sigma kept (IDNA 2003 maps it to σ: xn--hxarsa5b)
    ("مثال.example", "xn--mgbh0fb.example"),  # right-to-left
    ("例え.jp", "xn--r8jz45g.jp"),  # CJK and Hiragana may mix
])
def test_a_labels_are_idna_2008(u_label, a_label):
    assert addresses.normalize_domain(u_label) == a_label
    assert addresses.normalize_domain(a_label) == a_label


def test_why_not_the_stdlib_codec():
    """What the stdlib's IDNA 2003 codec would do, and idn.py refuses or keeps apart."""
    assert "fuß.de".encode("idna") == b"fuss.de"
    assert "\u212aelvin.example".encode("idna") == b"kelvin.example"
    assert "example\u3002com".encode("idna") == b"example.com"
    assert "exa\u200dmple.com".encode("idna") == b"example.com"
    assert "ελλάς".encode("idna") == b"xn--hxarsa5b"
    for name in ("\u212aelvin.example", "example\u3002com", "exa\u200dmple.com"):
        with pytest.raises(idn.IDNError):
            idn.to_a_domain(name)


# --- a real server --------------------------------------------------------------------------


UTF8_MESSAGE = "Subject: Grüße aus Köln\r\nFrom: Jörg <jörg@absender.example>\r\n\r\nÄrger? Nein.\r\n".encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server whose bücher.example primary offers SMTPUTF8 and whose example.com
    primary does not; a bounce relay that offers it."""
    from sink import DEFAULT_EXTENSIONS, Sink

    with Sink(extensions=DEFAULT_EXTENSIONS + ("SMTPUTF8",)) as modern, Sink() as old, \
            Sink(extensions=DEFAULT_EXTENSIONS + ("SMTPUTF8",)) as relay:
        server = start_server(tmp_path_factory.mktemp("utf8srv"), bounce_relay=f"127.0.0.1:{relay.port}", domains={
            "bücher.example": {"primary": f"127.0.0.1:{modern.port}", "primary_tls": "none"},
            "example.com": {"primary": f"127.0.0.1:{old.port}", "primary_tls": "none"}})
        try:
            yield server, modern, old, relay
        finally:
            server.stop(signal.SIGTERM)
            server.kill_group()


def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "backupmx.py"), *args], capture_output=True, text=True,
                          timeout=30)


def test_smtplib_smtputf8_is_queued_shown_and_delivered_byte_exact(world):
    server, modern, _, _ = world
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("smtputf8")
        client.sendmail("jörg@absender.example", ["jösé@bücher.example"], UTF8_MESSAGE, mail_options=["SMTPUTF8"])
    listing = cli("queue", "list", "-c", server.config_path)
    assert "<jörg@absender.example> jösé@bücher.example" in listing.stdout, listing.stdout + listing.stderr
    db = sqlite3.connect(server.queue_path)
    try:
        assert db.execute("SELECT sender, recipients FROM queue_list WHERE domain = 'xn--bcher-kva.example'"
                          ).fetchall() == [("jörg@absender.example", "jösé@bücher.example")]
        assert db.execute("SELECT smtputf8 FROM messages").fetchall() == [(2,)]
    finally:
        db.close()
    log = server.log()
    queued = [line for line in log.splitlines() if " queued id=" in line]
    assert len(queued) == 1 and "from=<jörg@absender.example>" in queued[0]
    assert cli("flush", "xn--bcher-kva.example", "-c", server.config_path).returncode == 0
    [delivery] = [d for d in [modern.wait_for(1, timeout=15)][0]]
    sender, rcpts, body, params = delivery
    assert (sender, rcpts) == ("jörg@absender.example", ["jösé@bücher.example"])
    assert "SMTPUTF8" in params
    assert body.endswith(UTF8_MESSAGE) and body.startswith(f"Received: from client.test {received_client()}".encode())
    received = body.split(b"\r\nSubject: ")[0].decode("utf-8")
    assert " with UTF8SMTP id " in received and "\tfor <jösé@bücher.example>; " in received  # RFC 6531 4.3


def test_a_primary_without_smtputf8_fails_the_recipient_with_a_rfc6533_dsn(world):
    from backupmx.lifecycle import housekeeping
    from backupmx.store import QueueStore

    server, _, old, relay = world
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("jörg@absender.example", ["josé@example.com"], UTF8_MESSAGE, mail_options=["SMTPUTF8"])
    assert cli("flush", "example.com", "-c", server.config_path).returncode == 0

    def failed():
        db = sqlite3.connect(server.queue_path)
        try:
            return db.execute("SELECT last_reply FROM recipients WHERE domain = 'example.com' AND state = 'failed'"
                              ).fetchall()
        finally:
            db.close()

    [(reply,)] = wait_for(failed, timeout=15)
    assert reply == f"5.6.7 SMTPUTF8 is required, but was not offered by host 127.0.0.1:{old.port}"
    assert old.messages == []  # never sent there
    with QueueStore(server.queue_path) as store:  # now, rather than at the flusher's next round
        housekeeping(store, load_config(server.config_path))  # (which may have sent it already)
    [(mail_from, rcpts, report, params)] = relay.wait_for(1, timeout=10)
    assert (mail_from, rcpts) == ("", ["jörg@absender.example"]) and "SMTPUTF8" in params
    message = email.message_from_bytes(report)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "global-delivery-status"
    parts = [part.get_content_type() for part in message.get_payload()]
    assert parts == ["text/plain", "message/global-delivery-status", "message/global"]
    status = report.split(b"Content-Type: message/global-delivery-status", 1)[1]
    assert "Final-Recipient: utf-8; josé@example.com".encode() in status
    assert b"Status: 5.6.7" in status and b"Action: failed" in status


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_without_smtputf8_gets_553(world):
    """swaks 20201014 (Debian 12) speaks neither SMTPUTF8 nor BDAT: a UTF-8 address from it
    goes without the parameter, and is refused as the SPEC says."""
    server = world[0]
    result = subprocess.run(["swaks", "--server", f"127.0.0.1:{server.port}", "--from", "jörg@absender.example",
                             "--to", "bob@example.com", "--quit-after", "MAIL"],
                            capture_output=True, timeout=30)
    assert b"553 5.6.7" in result.stdout, result.stdout
