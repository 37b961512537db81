"""Host-name primaries pinned at load (backupmx.primaries): the flusher connects to the
addresses resolved then, while TLS still names the host. Real sinks, real TLS, a real server."""

import dataclasses
import logging
import signal
import smtplib
import subprocess
import sys
import threading
import time

import pytest

from backupmx import primaries
from backupmx.config import DomainConfig, load_config
from backupmx.envelope import Envelope, Recipient
from backupmx.flusher import deliver_domain
from backupmx.store import QueueStore
from conftest import CERTS, REPO, free_port, queue_one, wait_for
from sink import Sink

DOMAIN = "example.com"
BODY = b"Subject: pinned\r\n\r\nx\r\n"


@pytest.fixture
def log(caplog):
    """A logger for pin(); log.messages() is what it wrote (pytest's caplog)."""
    logger = logging.getLogger("test.primaries")
    caplog.set_level(logging.INFO, logger=logger.name)
    logger.messages = lambda: [r.getMessage() for r in caplog.records if r.name == logger.name]
    logger.clear = caplog.clear
    return logger


@pytest.fixture
def store(tmp_path):
    s = QueueStore(str(tmp_path / "queue.db"))
    yield s
    s.close()


def domain(host, port, addresses, *, tls="none", ca=None):
    return DomainConfig(name=DOMAIN, primary=(host, port), primary_tls=tls, recipients=None, primary_ca=ca,
                        max_queue_messages=None, max_queue_bytes=None, queue_lifetime=86400.0, retry_interval=0.0,
                        primary_addresses=addresses)


def flush_one(store, config_domain):
    queue_id = store.new_queue_id()
    queue_one(store, queue_id, Envelope(sender="a@origin.test", recipients=[Recipient("bob@example.com", DOMAIN)]),
                  BODY, len(BODY), client="192.0.2.1", helo="c.test")
    store.request_flush([DOMAIN])
    assert store.claim_flush("t", 60) == DOMAIN
    try:
        counts = deliver_domain(store, config_domain, owner="t", hostname="mx2.test", timeout=5.0)
    finally:
        store.release_flush(DOMAIN, "t")
    rows = {m.queue_id: m for m in store.list_messages()}
    return counts, rows.get(queue_id)


# -- the flusher uses the pinned addresses ------------------------------------------


def test_a_pinned_name_is_never_looked_up_again(store, sink):
    # "primary.invalid" can never resolve (RFC 6761): only the pinned address can be used.
    counts, row = flush_one(store, domain("primary.invalid", sink.port, ("127.0.0.1",)))
    assert counts["delivered"] == 1 and row is None
    assert sink.sessions[0].peer[0] == "127.0.0.1"


def test_every_pinned_address_is_tried_in_order(store, sink):
    closed = free_port()  # nothing listens there: refused, then the next address
    counts, _ = flush_one(store, domain("primary.invalid", sink.port, ("127.0.0.2", "127.0.0.1")))
    assert counts["delivered"] == 1
    counts, row = flush_one(store, domain("primary.invalid", closed, ("127.0.0.1", "127.0.0.2")))
    assert counts["deferred"] == 1
    assert row.last_reply.startswith(f"connect to primary.invalid:{closed} failed: 127.0.0.1: ")
    assert "; 127.0.0.2: " in row.last_reply


def test_a_name_that_did_not_resolve_defers_without_connecting(store, sink):
    counts, row = flush_one(store, domain("primary.invalid", sink.port, ()))
    assert counts["deferred"] == 1 and sink.sessions == []
    assert row.state == "queued" and "did not resolve when the configuration was loaded" in row.last_reply


def test_tls_verifies_the_name_not_the_pinned_address(store):
    # The test certificate names localhost and 127.0.0.1, never "primary.invalid": a
    # client that checked the address it dialled would accept it for that name.
    with Sink(tls_cert=str(CERTS / "server.pem"), tls_key=str(CERTS / "server.key")) as tls_sink:
        ca = str(CERTS / "ca.pem")
        counts, _ = flush_one(store, domain("localhost", tls_sink.port, ("127.0.0.1",), tls="required", ca=ca))
        assert counts["delivered"] == 1 and tls_sink.deliveries[0].tls
        counts, row = flush_one(store, domain("primary.invalid", tls_sink.port, ("127.0.0.1",), tls="required",
                                              ca=ca))
        assert counts["deferred"] == 1 and len(tls_sink.deliveries) == 1
        assert "TLS handshake failed" in row.last_reply


# -- pin() ---------------------------------------------------------------------------


def config_file(tmp_path, primaries_by_domain):
    text = f"[backupmx]\nhostname = mx2.test\nlisten = 127.0.0.1:0\nqueue = {tmp_path}/q.db\n"
    for name, primary in primaries_by_domain.items():
        text += f"\n[domain:{name}]\nprimary = {primary}\n"
    path = tmp_path / "backupmx.ini"
    path.write_text(text)
    return load_config(str(path))


def test_pin_resolves_each_name_once_and_logs_one_line_per_domain(tmp_path, log):
    asked = []

    def resolver(host, port):
        asked.append((host, port))
        return ("192.0.2.10", "2001:db8::10")

    config = config_file(tmp_path, {"example.com": "mail.example.net:25", "example.org": "mail.example.net:25",
                                    "example.net": "192.0.2.99:2525"})
    assert all(d.primary_addresses is None for d in config.domains.values())
    pinned = primaries.pin(config, log, resolver=resolver)
    assert asked == [("mail.example.net", 25)]
    assert pinned.domains["example.com"].primary_addresses == ("192.0.2.10", "2001:db8::10")
    assert pinned.domains["example.org"].primary_addresses == ("192.0.2.10", "2001:db8::10")
    assert pinned.domains["example.net"].primary_addresses is None  # an IP literal is its own address
    assert primaries.addresses_for(pinned.domains["example.net"]) == ("192.0.2.99",)
    assert sorted(log.messages()) == [
        "primary-pinned domain=example.com primary=mail.example.net:25 addresses=192.0.2.10,2001:db8::10",
        "primary-pinned domain=example.org primary=mail.example.net:25 addresses=192.0.2.10,2001:db8::10",
    ]


def test_a_reload_that_cannot_resolve_keeps_the_previous_addresses(tmp_path, log):
    def broken(host, port):
        raise OSError("Temporary failure in name resolution")

    config = config_file(tmp_path, {"example.com": "mail.example.net:25", "example.org": "mail.example.org:25"})
    before = primaries.pin(config, log, resolver=lambda host, port: ("192.0.2.10",))
    moved = dataclasses.replace(config, domains={**config.domains, "example.org": dataclasses.replace(
        config.domains["example.org"], primary=("mail2.example.org", 25))})
    log.clear()
    after = primaries.pin(moved, log, previous=before, resolver=broken)
    assert after.domains["example.com"].primary_addresses == ("192.0.2.10",)  # same primary: kept
    assert after.domains["example.org"].primary_addresses == ()  # a new primary has nothing to keep
    kept, lost = sorted(log.messages())
    assert kept.startswith("primary-unresolved domain=example.com primary=mail.example.net:25 error=")
    assert 'kept=192.0.2.10 effect="previous addresses kept"' in kept
    assert lost.startswith("primary-unresolved domain=example.org primary=mail2.example.org:25 error=")
    assert "kept=" not in lost and "until the name resolves" in lost
    assert primaries.pin(moved, log, resolver=broken).domains["example.com"].primary_addresses == ()


def test_only_names_without_an_address_are_looked_up_again_and_pinned_once_they_answer(tmp_path, log):
    """The master's retry (primary_lookups.UnresolvedPrimaries): a pinned name, or one that kept its
    previous addresses, is never moved by a later answer; an unresolved one is, once."""
    def some(host, port):
        if host == "mail.example.org":
            raise OSError("Temporary failure in name resolution")
        return ("192.0.2.10",)

    config = config_file(tmp_path, {"example.com": "mail.example.net:25", "example.org": "mail.example.org:25",
                                    "example.net": "192.0.2.99:2525"})
    pinned = primaries.pin(config, log, resolver=some)
    assert primaries.unresolved(pinned) == [("mail.example.org", 25)]
    log.clear()
    later = {("mail.example.net", 25): ("198.51.100.1",), ("mail.example.org", 25): ("192.0.2.20",)}
    repinned, resolved = primaries.pin_resolved(pinned, later, log)
    assert [d.name for d in resolved] == ["example.org"]
    assert repinned.domains["example.org"].primary_addresses == ("192.0.2.20",)
    assert repinned.domains["example.com"].primary_addresses == ("192.0.2.10",)  # pinned: not moved
    assert log.messages() == ["primary-resolved domain=example.org primary=mail.example.org:25 addresses=192.0.2.20"]
    assert primaries.unresolved(repinned) == []
    assert primaries.pin_resolved(repinned, later, log) == (repinned, [])  # once
    still = {("mail.example.org", 25): "no answer in time"}
    assert primaries.pin_resolved(pinned, still, log) == (pinned, [])


def test_the_system_resolver_gives_localhost(tmp_path):
    assert "127.0.0.1" in primaries.resolve("localhost", 25)
    with pytest.raises(OSError):
        primaries.resolve("primary.invalid", 25)


# -- end to end: `serve` with primary = localhost --------------------------------------


def test_serve_pins_a_localhost_primary_logs_it_and_delivers_there(server_factory, sink):
    # example.org's primary can never resolve (RFC 6761 .invalid): the server starts all the
    # same, says so, and keeps that domain's mail (a backup MX is needed most when DNS is broken).
    server = server_factory(domains={DOMAIN: {"primary": f"localhost:{sink.port}", "primary_tls": "none"},
                                     "example.org": {"primary": "nowhere.invalid:25", "primary_tls": "none"}},
                            env={"BACKUPMX_LOOKUP_TIMEOUT": "5"})
    pinned = f"primary-pinned domain={DOMAIN} primary=localhost:{sink.port} addresses="
    [line] = [line for line in server.log().splitlines() if pinned in line]
    assert "127.0.0.1" in line.split("addresses=")[1].split(",")
    [line] = [line for line in server.log().splitlines() if "primary-unresolved domain=example.org" in line]
    assert 'primary=nowhere.invalid:25 error=' in line and 'effect="mail stays queued until the name resolves"' in line
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("a@origin.test", ["bob@example.com"], b"Subject: to localhost\r\n\r\nx\r\n")
        client.sendmail("a@origin.test", ["bob@example.org"], b"Subject: kept\r\n\r\nx\r\n")
    flush = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "flush", DOMAIN, "-c", server.config_path],
                           capture_output=True, text=True, timeout=30)
    assert flush.returncode == 0, flush.stderr
    assert sink.wait_for(1, timeout=15)[0][2].endswith(b"Subject: to localhost\r\n\r\nx\r\n")
    server.proc.send_signal(signal.SIGHUP)  # a reload resolves again, and says so
    assert wait_for(lambda: server.log().count(pinned) == 2, timeout=10)
    check = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "check", "-c", server.config_path],
                           capture_output=True, text=True, timeout=30)
    assert f"ok: primary localhost:{sink.port} resolves to " in check.stdout and "127.0.0.1" in check.stdout


def test_a_bounded_lookup_gives_up_on_a_resolver_that_never_answers():
    # `backupmx check` and the inetd flusher (which the ETRN session waits for)
    # look names up with resolve_within: a stuck resolver costs its bound, not a hang.
    never = threading.Event()

    def stuck(host, port):
        never.wait(30)
        return ("192.0.2.1",)

    bounded = primaries.resolve_within(0.2, resolver=stuck)
    started = time.monotonic()
    with pytest.raises(OSError, match="no answer within 0.2 s"):
        bounded("stuck.example", 25)
    assert time.monotonic() - started < 2
    never.set()
    assert primaries.resolve_within(5)("localhost", 25)  # an answer in time is passed on
    with pytest.raises(OSError, match="nothing here"):
        primaries.resolve_within(5, resolver=lambda h, p: (_ for _ in ()).throw(OSError("nothing here")))("x", 25)
