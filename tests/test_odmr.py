"""ODMR (RFC 2645), the provider's side: the session up to ATRN without sockets, then a real
server whose ODMR port reverses real TLS connections into deliveries to a real sink."""

import base64
import io
import logging
import os
import re
import signal
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time

import pytest

from backupmx import replies
from backupmx.config import load_config
from backupmx.odmr import AtrnRequest, OdmrSession, parse_atrn
from backupmx.smtp import AuthRequest, Refused, Session, SessionSettings, StartTLS
from conftest import CERTS, REPO, free_port, start_server, wait_for
from sink import Sink

PASSWORD = "odmr-secret"

# --- the session, no sockets --------------------------------------------------------------

CONFIG = """\
[backupmx]
hostname = mx2.test
queue = {tmp}/queue.db

[domain:example.com]
primary = 127.0.0.1:2526

[domain:sub.example.com]
primary = 127.0.0.1:2526

[domain:other.org]
primary = 127.0.0.1:2526

[user:prim]
password = {{PLAIN}}secret
domains = sub.example.com, example.com

[user:someone]
password = {{PLAIN}}secret
domains = other.org
"""


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("odmr")
    path = tmp / "backupmx.ini"
    path.write_text(CONFIG.format(tmp=tmp))
    return SessionSettings.from_config(load_config(str(path)), tls_available=True)


def talk(session, data: bytes, refused=None):
    """Feed `data`; answer STARTTLS and AUTH (as user "prim") the simplest way; the reply lines
    and the events left unanswered (Refused events go to the list `refused`, if given)."""
    session.receive_data(data)
    out, left = session.data_to_send(), []
    while (event := session.next_event()) is not None:
        if isinstance(event, StartTLS):
            session.tls_started()
        elif isinstance(event, AuthRequest):
            session.auth_result("prim")
        elif isinstance(event, Refused):
            (refused if refused is not None else []).append(event)
        else:
            left.append(event)
        out += session.data_to_send()
    return out.decode().splitlines(), left


def authenticated(settings):
    session = OdmrSession(settings)
    session.data_to_send()
    for command in (b"EHLO customer.test", b"STARTTLS", b"EHLO customer.test"):
        talk(session, command + b"\r\n")
    lines, _ = talk(session, b"AUTH PLAIN AHByaW0Ac2VjcmV0\r\n")
    assert lines == ["235 2.7.0 Authentication successful"]
    return session


def test_the_odmr_port_offers_starttls_then_auth_and_atrn_and_takes_no_mail(settings):
    session = OdmrSession(settings)
    assert session.data_to_send() == replies.GREETING.render(hostname="mx2.test")
    assert talk(session, b"ATRN\r\n")[0] == ["503 5.5.1 Error: send HELO/EHLO first"]
    lines, _ = talk(session, b"EHLO customer.test\r\n")
    assert lines == ["250-mx2.test", "250-ENHANCEDSTATUSCODES", "250 STARTTLS"]
    for command in (b"MAIL FROM:<a@b.test>", b"RCPT TO:<x@example.com>", b"DATA", b"ETRN example.com",
                    b"VRFY x"):
        assert talk(session, command + b"\r\n")[0] == [replies.ODMR_ONLY.render().decode().strip()]
    assert talk(session, b"ATRN\r\n")[0] == ["530 5.7.0 Authentication required"]
    talk(session, b"STARTTLS\r\n")
    lines, _ = talk(session, b"EHLO customer.test\r\n")
    assert lines == ["250-mx2.test", "250-ENHANCEDSTATUSCODES", "250-AUTH SCRAM-SHA-256 PLAIN LOGIN", "250 ATRN"]
    assert talk(session, b"ATRN example.com\r\n")[0] == ["530 5.7.0 Authentication required"]
    lines, _ = talk(session, b"BDAT 5\r\nATRN\r\n")  # its octets can no longer be told from commands
    assert lines == [replies.ODMR_ONLY.render().decode().strip()] and session.closed


def test_atrn_is_not_a_command_of_the_smtp_port(settings):
    session = Session(settings)
    session.data_to_send()
    lines, _ = talk(session, b"EHLO c.test\r\n")
    assert "250-ETRN" in lines and not any("ATRN" in line for line in lines)
    assert talk(session, b"ATRN\r\n")[0] == ["502 5.5.1 Error: command not implemented"]


@pytest.mark.parametrize("argument, asked", [
    ("", ("example.com", "sub.example.com")),  # none named: all of the user's domains
    (" example.com", ("example.com",)),
    (" EXAMPLE.com.,sub.example.com,example.com", ("example.com", "sub.example.com")),
    (" other.org", "450 4.7.0 ATRN request refused"),  # someone else's domain
    (" example.com,other.org", "450 4.7.0 ATRN request refused"),  # one of them is enough
    (" nowhere.test", "450 4.7.0 ATRN request refused"),
    (" example.com, sub.example.com", "501 5.5.4 Syntax: ATRN [domain[,domain...]]"),
    (" example.com,", "501 5.5.4 Syntax: ATRN [domain[,domain...]]"),
    (" @example.com", "501 5.5.4 Syntax: ATRN [domain[,domain...]]"),
    (" [127.0.0.1]", "501 5.5.4 Syntax: ATRN [domain[,domain...]]"),
])
def test_atrn_names_only_the_users_domains(settings, argument, asked):
    session, refused = authenticated(settings), []
    lines, events = talk(session, b"ATRN" + argument.encode() + b"\r\n", refused)
    if isinstance(asked, tuple):
        assert lines == [] and events == [AtrnRequest(asked, "prim")] and refused == []
    else:
        assert lines == [asked] and events == []
        assert [(r.command, r.text) for r in refused] == [("ATRN", asked)]  # the driver logs a `reject` line


def test_atrn_answers(settings):
    session = authenticated(settings)
    talk(session, b"ATRN\r\n")
    session.atrn_refused(replies.ATRN_NO_MAIL)
    assert session.data_to_send() == b"453 4.3.0 You have no mail\r\n" and not session.reversed
    talk(session, b"ATRN\r\n")
    session.atrn_started()
    assert session.data_to_send() == b"250 2.0.0 OK now reversing the connection\r\n"
    assert session.reversed and not session.closed
    assert talk(session, b"MAIL FROM:<a@b.test>\r\n") == ([], [])  # the session reads nothing more


def test_what_the_peer_sends_before_our_250_is_never_its_greeting(settings):
    session = authenticated(settings)  # sent with ATRN: ATRN must end a pipelined group (RFC 2920 3.1)
    lines, events = talk(session, b"ATRN\r\n220 customer.test ESMTP\r\n")
    assert lines == ["554 5.5.0 Error: SMTP protocol synchronization"] and session.closed
    assert not any(isinstance(e, AtrnRequest) for e in events)
    session = authenticated(settings)  # sent while the leases were taken, before our 250
    talk(session, b"ATRN\r\n")
    talk(session, b"220 customer.test ESMTP\r\n")
    session.atrn_started()
    assert session.data_to_send() == b"554 5.5.0 Error: SMTP protocol synchronization\r\n"
    assert session.closed and not session.reversed


def test_parse_atrn():
    assert parse_atrn("") == ()
    assert parse_atrn("Example.COM") == ("example.com",)
    assert parse_atrn("a.test,b.test,a.test") == ("a.test", "b.test")
    assert parse_atrn("a.test b.test") is None and parse_atrn(",") is None


# --- a real server ----------------------------------------------------------------------------

USERS = {  # each test has its own user and domains: they share one server
    "alice": ("a1.test", "a2.test"),
    "bob": ("b1.test",),
    "carol": ("c1.test",),
    "dave": ("d1.test",),
    "erin": ("e1.test",),
    "frank": ("f1.test",),
    "gina": ("g1.test",),
    "hank": ("h1.test",),
    "ivan": ("i1.test",),
    "judy": ("j1.test",),
    "kate": ("k1.test",),
    "lena": ("l1.test",),
}


@pytest.fixture(scope="module")
def primaries():
    """The configured primaries (where a flush goes): d1.test's, whose banner drips, and every
    other domain's."""
    with Sink() as slow, Sink() as sink:
        slow.behaviour, slow.hostile_at, slow.drip_interval = "drip", "banner", 0.5
        yield {"d1.test": slow, None: sink}


@pytest.fixture(scope="module")
def mx(tmp_path_factory, primaries):
    tmp = tmp_path_factory.mktemp("mx")
    odmr_port = free_port()
    domains = {d: {"primary": f"127.0.0.1:{primaries.get(d, primaries[None]).port}", "primary_tls": "none"}
               for ds in USERS.values() for d in ds}
    server = start_server(tmp, tls=True, listen_odmr=f"127.0.0.1:{odmr_port}", domains=domains,
                          users={u: ("{PLAIN}" + PASSWORD, ", ".join(ds)) for u, ds in USERS.items()})
    server.odmr_port = odmr_port
    yield server
    server.stop()
    server.kill_group()


@pytest.fixture
def customer():
    """The customer's MTA (a sink) for the reversed sessions of one test."""
    with Sink() as sink:
        sink.hostname = "customer.test"
        yield sink


def tls_context():
    return ssl.create_default_context(cafile=str(CERTS / "ca.pem"))


def atrn(server, user, argument="", reversed_to=None):
    """STARTTLS, AUTH and ATRN on the ODMR port: the reply; on 250 `reversed_to` (a Sink)
    serves the reversed session, and this returns once the server closed it."""
    client = smtplib.SMTP("localhost", server.odmr_port, timeout=10)
    client.ehlo("customer.test")
    client.starttls(context=tls_context())
    client.ehlo("customer.test")
    client.login(user, PASSWORD)
    code, text = client.docmd("ATRN", argument)
    if code == 250 and reversed_to is not None:
        reversed_to.reverse(client.sock).join(20)
    client.close()
    return code, text.decode()


def queue(server, recipients_by_message):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        for n, recipients in enumerate(recipients_by_message):
            client.sendmail(f"s{n}@origin.test", recipients, b"Subject: m%d\r\n\r\nbody %d\r\n" % (n, n))


def queued(server, domain):
    """[(queue_id, last_reply)] of the domain's rows still in the queue."""
    db = sqlite3.connect(server.queue_path)
    try:
        return db.execute("SELECT queue_id, last_reply FROM queue WHERE domain = ? AND state = 'queued'"
                          " ORDER BY queue_id", (domain,)).fetchall()
    finally:
        db.close()


def lease(server, domain):
    db = sqlite3.connect(server.queue_path)
    try:
        row = db.execute("SELECT lease_owner FROM flushes WHERE domain = ?", (domain,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


def released(server, *domains):
    """Wait until nobody holds a lease on `domains` (True), or 5 s."""
    return wait_for(lambda: all(lease(server, d) is None for d in domains), 5)


def test_atrn_delivers_the_users_domains_over_the_connection_it_reversed(mx, customer):
    queue(mx, [["x@a1.test"], ["y@a2.test", "z@a1.test"], ["w@a1.test"], ["v@b1.test"]])
    assert atrn(mx, "alice", reversed_to=customer) == (250, "2.0.0 OK now reversing the connection")
    got = sorted((m[0], tuple(m[1])) for m in customer.messages)
    assert got == [("s0@origin.test", ("x@a1.test",)), ("s1@origin.test", ("y@a2.test",)),
                   ("s1@origin.test", ("z@a1.test",)), ("s2@origin.test", ("w@a1.test",))]
    session, = customer.sessions  # one connection, ours: EHLO ... QUIT, and TLS all along
    assert session.commands[0].upper() == "EHLO MX2.TEST" and session.commands[-1].upper() == "QUIT"
    assert all(d.tls for d in customer.deliveries)
    assert all(b"Subject: m" in d.body for d in customer.deliveries)
    assert queued(mx, "a1.test") == [] == queued(mx, "a2.test")
    assert len(queued(mx, "b1.test")) == 1  # bob's mail never goes to alice
    assert released(mx, "a1.test", "a2.test")
    # bob may not take alice's domain, and gets his own only
    assert atrn(mx, "bob", "a1.test") == (450, "4.7.0 ATRN request refused")
    assert atrn(mx, "alice") == (453, "4.3.0 You have no mail")
    with Sink() as bobs:
        assert atrn(mx, "bob", "b1.test", reversed_to=bobs)[0] == 250
        assert [m[1] for m in bobs.messages] == [["v@b1.test"]]


def test_a_451_leaves_just_that_message_queued(mx, customer):
    queue(mx, [["one@c1.test"], ["victim@c1.test"], ["three@c1.test"]])
    customer.behaviour, customer.behaviour_addresses = "data_4xx", ["victim@c1.test"]
    assert atrn(mx, "carol", "c1.test", reversed_to=customer)[0] == 250
    assert sorted(m[1][0] for m in customer.messages) == ["one@c1.test", "three@c1.test"]
    (queue_id, last_reply), = queued(mx, "c1.test")
    assert last_reply == "451 4.3.0 Error: queue file write error"
    assert released(mx, "c1.test")


def test_atrn_while_an_etrn_flush_of_the_domain_runs(mx, primaries, customer):
    queue(mx, [["x@d1.test"]])
    slow = primaries["d1.test"]
    with smtplib.SMTP("localhost", mx.port, timeout=10) as client:
        client.starttls(context=tls_context())
        client.login("dave", PASSWORD)
        assert client.docmd("ETRN", "d1.test")[0] == 253
    assert wait_for(lambda: slow.sessions and not slow.sessions[-1].closed, 5)  # the flush runs: its banner drips
    assert atrn(mx, "dave", "d1.test", reversed_to=customer) == (451, "4.3.0 Unable to process ATRN request now")
    slow.stop()  # the flush ends: its connection is cut
    assert released(mx, "d1.test")
    assert atrn(mx, "dave", reversed_to=customer)[0] == 250
    assert [m[1] for m in customer.messages] == [["x@d1.test"]] and queued(mx, "d1.test") == []


def test_kill_9_of_the_session_process_mid_transfer_loses_nothing(mx, primaries, customer):
    queue(mx, [["first@e1.test"], ["second@e1.test"]])
    ids = {queue_id for queue_id, _ in queued(mx, "e1.test")}
    customer.data_delay = 0.5  # each message waits for its 250: the kill comes meanwhile (at once)
    done = threading.Thread(target=atrn, args=(mx, "erin", "e1.test", customer))
    done.start()
    customer.wait(lambda: customer.data_received >= 1)
    pid = int(re.search(r"backupmx\[(\d+)\]: atrn client=\S+ user=erin", mx.log()).group(1))
    os.kill(pid, signal.SIGKILL)
    done.join(10)
    # The master releases its leases at once (not when they run out) and asks for the flush
    # again, as for a flush worker that died: the configured primary gets what is left.
    assert wait_for(lambda: 'domain=e1.test owner=' in mx.log() and 'reason="odmr session died"' in mx.log(), 5)
    assert wait_for(lambda: queued(mx, "e1.test") == [], 5)
    received = {re.search(rb"id (\w+)", m[2]).group(1).decode()
                for sink in (customer, primaries[None]) for m in sink.messages}
    assert received == ids  # each one delivered, to the customer or the primary (or both): never neither
    assert mx.proc.poll() is None  # the master goes on


def reversed_by_hand(server, user):
    """ATRN accepted; the TLS socket we now answer on as the customer."""
    client = smtplib.SMTP("localhost", server.odmr_port, timeout=10)
    client.starttls(context=tls_context())
    client.login(user, PASSWORD)
    assert client.docmd("ATRN")[0] == 250
    client.sock.settimeout(10)
    return client.sock


def rest_of(sock):
    seen = b""
    while chunk := sock.recv(4096):
        seen += chunk
    return seen


@pytest.mark.parametrize("after_greeting", [
    b"MAIL FROM:<evil@attacker.test>\r\n",  # a command where the answer to EHLO belongs
    b"250-customer.test\r\n250-" + b"x" * 9000 + b"\r\n",  # an over-long reply line
], ids=["command", "long-line"])
def test_a_customer_that_does_not_answer_as_a_server_is_cut_off(mx, after_greeting):
    queue(mx, [["x@f1.test"]])
    before = [(queue_id, None) for queue_id, _ in queued(mx, "f1.test")]
    sock = reversed_by_hand(mx, "frank")
    sock.sendall(b"220 customer.test ESMTP\r\n")
    assert sock.recv(4096).upper() == b"EHLO MX2.TEST\r\n"
    sock.sendall(after_greeting)
    assert rest_of(sock) == b""  # closed at once: no MAIL, no QUIT
    assert queued(mx, "f1.test") == before  # untouched: not even deferred
    assert released(mx, "f1.test")
    assert wait_for(lambda: "atrn-failed client=" in mx.log())


def test_a_customer_that_speaks_unasked_is_cut_off(mx):
    sock = reversed_by_hand(mx, "frank")
    sock.sendall(b"220 customer.test ESMTP\r\nMAIL FROM:<evil@attacker.test>\r\n")
    assert rest_of(sock) == b""  # not even our EHLO: what it sent ahead would have been its answer
    assert released(mx, "f1.test")



# --- the primary's side: backupmx atrn against backupmx serve ---------------------------------


def atrn_command(mx, tmp_path, user, mta, *domains, timeout=10):
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    return [sys.executable, str(REPO / "backupmx.py"), "atrn", f"localhost:{mx.odmr_port}", *domains, "--user", user,
            "--password-file", str(password_file), "--cafile", str(CERTS / "ca.pem"),
            "--deliver-to", mta, "--timeout", str(timeout)]


def states(server, domain):
    """{(recipient, state)} of the domain's recipients still in the queue."""
    db = sqlite3.connect(server.queue_path)
    try:
        return set(db.execute("SELECT address, state FROM recipients WHERE domain = ?", (domain,)).fetchall())
    finally:
        db.close()


def test_backupmx_atrn_fetches_into_the_local_mta(mx, customer, tmp_path):
    queue(mx, [["a@g1.test"], ["b@g1.test", "refused@g1.test"], ["c@g1.test"], ["x@k1.test"]])
    customer.behaviour, customer.behaviour_addresses = "rcpt_5xx", ["refused@g1.test"]
    done = subprocess.run(atrn_command(mx, tmp_path, "gina", f"127.0.0.1:{customer.port}", "g1.test"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ATRN g1.test: 250 2.0.0 OK now reversing the connection"
    assert "refused to=<refused@g1.test>: 550 5.1.1 <refused@g1.test>: Recipient address rejected: User unknown" in lines
    assert lines[-1] == "3 relayed, 0 refused"
    got = sorted((m[0], m[1]) for m in customer.messages)
    assert got == [("s0@origin.test", ["a@g1.test"]), ("s1@origin.test", ["b@g1.test"]), ("s2@origin.test", ["c@g1.test"])]
    for delivery in customer.deliveries:  # our Received: line, the backup's, then the message as it was sent
        assert delivery.body.startswith(b"Received: from mx2.test ([127.0.0.1])\r\n")
        assert re.search(rb"\r\nReceived: from .*?\r\nSubject: m\d\r\n\r\nbody \d\r\n$", delivery.body, re.S)
    # The backup: delivered rows gone, the refused recipient failed with the MTA's words; kate's untouched.
    assert states(mx, "g1.test") == {("refused@g1.test", "failed")}
    assert released(mx, "g1.test") and len(queued(mx, "k1.test")) == 1


def test_atrn_into_lmtp_answers_per_recipient(mx, tmp_path):
    from backupmx import atrnclient
    from backupmx.atrn_relay import Destination

    queue(mx, [["one@h1.test"], ["two@h1.test", "full@h1.test"]])
    with Sink(lmtp=True, path=str(tmp_path / "lmtp")) as lmtp:
        lmtp.behaviour, lmtp.behaviour_addresses = "data_5xx", ["full@h1.test"]
        out = io.StringIO()
        status = atrnclient.run("localhost", mx.odmr_port, ["h1.test"], user="hank", password=PASSWORD,
                                deliver_to=Destination.parse(str(tmp_path / "lmtp")), cafile=str(CERTS / "ca.pem"),
                                timeout=10, out=out, err=out)
    assert status == 0, out.getvalue()
    assert sorted(m[1] for m in lmtp.messages) == [["one@h1.test"], ["two@h1.test"]]
    # LMTP took one of the second message's two recipients: that message is answered 451, so the backup
    # keeps both (the one taken comes again: a duplicate, never a loss).
    (queue_id, last_reply), = queued(mx, "h1.test")
    assert last_reply.startswith("451 4.3.0 local MTA took the message for some recipients only; refused: 552")
    assert states(mx, "h1.test") == {("two@h1.test", "queued"), ("full@h1.test", "queued")}


def test_kill_9_of_backupmx_atrn_mid_transfer_loses_nothing(mx, customer, tmp_path):
    queue(mx, [["first@i1.test"], ["second@i1.test"]])
    ids = {queue_id for queue_id, _ in queued(mx, "i1.test")}
    customer.data_delay = 0.5  # the MTA takes its time to answer: the kill comes meanwhile (at once)
    proc = subprocess.Popen(atrn_command(mx, tmp_path, "ivan", f"127.0.0.1:{customer.port}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        customer.wait(lambda: customer.data_received >= 1)
        proc.kill()
    finally:
        proc.wait()
    assert released(mx, "i1.test")  # the backup saw the connection go and gave the domain back
    left = {queue_id for queue_id, _ in queued(mx, "i1.test")}
    customer.wait_idle()
    received = {re.search(rb"with ESMTP id (\w+)", m[2]).group(1).decode() for m in customer.messages}
    assert ids <= left | received and left  # queued on the backup, or in the MTA (or both): never neither


def test_dsn_parameters_pass_both_hops_and_utf8_needs_smtputf8(mx, customer):
    """The flusher's rules on the backup, the relay's on the primary: DSN parameters reach an MTA
    that offers DSN; a message that needs SMTPUTF8 fails with 5.6.7 where it is not offered."""
    from backupmx import atrnclient
    from backupmx.atrn_relay import Destination

    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
        client.ehlo("sender.test")
        client.sendmail("s@origin.test", ["dsn@l1.test"], b"Subject: dsn\r\n\r\nx\r\n",
                        mail_options=["ENVID=QQ314", "RET=HDRS"], rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
        client.sendmail("s@origin.test", ["j\u00f6rg@l1.test"], "Subject: utf8\r\n\r\nx\r\n".encode(),
                        mail_options=["SMTPUTF8"])
    out = io.StringIO()
    assert atrnclient.run("localhost", mx.odmr_port, ["l1.test"], user="lena", password=PASSWORD,
                          deliver_to=Destination.parse(f"127.0.0.1:{customer.port}"), cafile=str(CERTS / "ca.pem"),
                          timeout=10, out=out, err=out) == 0, out.getvalue()
    delivery, = customer.deliveries  # the sink offers DSN, not SMTPUTF8 (nor do we, then)
    assert delivery.mail_params["ENVID"] == "QQ314" and delivery.mail_params["RET"] == "HDRS"
    assert delivery.rcpt_params == [{"NOTIFY": "SUCCESS,FAILURE"}]
    db = sqlite3.connect(mx.queue_path)
    try:
        (reply,), = db.execute("SELECT last_reply FROM queue WHERE domain = 'l1.test' AND state = 'failed'")
    finally:
        db.close()
    assert reply.startswith("5.6.7 SMTPUTF8 is required")


def test_the_reversed_session_takes_the_named_domains_only_and_mirrors_the_mta(customer):
    """What a backup could send that the local MTA (perhaps trusting 127.0.0.1) must never see."""
    from backupmx.atrn_relay import Destination, LocalMTA, Relay

    mta = LocalMTA(Destination.parse(f"127.0.0.1:{customer.port}"), timeout=5, local_hostname="primary.test")
    mta.open()
    ours, theirs = socket.socketpair()
    relay = Relay(ours, mta, domains=["g1.test"], hostname="primary.test", peer="192.0.2.2")
    served = threading.Thread(target=relay.serve, daemon=True)
    served.start()
    backup = smtplib.SMTP()
    backup.sock = theirs
    assert backup.getreply() == (220, b"primary.test ESMTP")
    code, lines = backup.ehlo("mx2.test")  # the sink offers 8BITMIME and DSN, not SMTPUTF8
    assert lines.split(b"\n")[1:] == [b"PIPELINING", b"SIZE 104857600", b"ENHANCEDSTATUSCODES", b"8BITMIME", b"DSN"]
    assert backup.docmd("MAIL", "FROM:<s@origin.test>")[0] == 250
    assert backup.docmd("RCPT", "TO:<victim@elsewhere.test>") == (554, b"5.7.1 <victim@elsewhere.test>: Relay access denied")
    assert backup.docmd("RCPT", "TO:<someone@g1.test>")[0] == 250
    assert backup.docmd("ETRN", "g1.test")[0] == 500 and backup.docmd("AUTH", "PLAIN x")[0] == 500
    assert backup.docmd("QUIT")[0] == 221
    served.join(5)
    assert [record.commands[-2:] for record in customer.sessions] == [["MAIL FROM:<s@origin.test>", "RCPT TO:<someone@g1.test>"]]
    mta.close()
    theirs.close()


def test_the_reversed_session_passes_on_every_deferral_of_the_mta(customer, monkeypatch):
    """The backup may hand over more messages than MAX_TEMPORARY_ERRORS that the local MTA
    defers (an over-quota mailbox after days of backlog, oldest first), each followed by
    the flusher's RSET: each gets the MTA's 4xx, and the mail after them still goes
    through in the same session. The limits on a client's refusals and junk commands are
    for strangers; here the refusals are the MTA's, and the peer is the backup."""
    from backupmx import smtp_counts
    from backupmx.atrn_relay import Destination, LocalMTA, Relay

    monkeypatch.setattr(smtp_counts, "MAX_TEMPORARY_ERRORS", 2)  # the same path as 100, in less time
    customer.behaviour, customer.behaviour_addresses = "data_4xx", ["full@g1.test"]
    mta = LocalMTA(Destination.parse(f"127.0.0.1:{customer.port}"), timeout=5, local_hostname="primary.test")
    mta.open()
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    relay = Relay(ours, mta, domains=["g1.test"], hostname="primary.test", peer="192.0.2.2")
    served = threading.Thread(target=relay.serve, daemon=True)
    served.start()
    backup = smtplib.SMTP()
    backup.sock = theirs
    try:
        assert backup.getreply()[0] == 220 and backup.ehlo("mx2.test")[0] == 250
        for _ in range(smtp_counts.MAX_TEMPORARY_ERRORS + 1):
            with pytest.raises(smtplib.SMTPDataError) as deferred:  # (and smtplib's RSET)
                backup.sendmail("s@origin.test", ["full@g1.test"], b"Subject: full\r\n\r\nx\r\n")
            assert deferred.value.smtp_code == 451
        for _ in range(101):  # beyond max_junk_commands' default
            assert backup.docmd("RSET")[0] == 250
        backup.sendmail("s@origin.test", ["ok@g1.test"], b"Subject: ok\r\n\r\nx\r\n")
        assert backup.docmd("QUIT")[0] == 221
    finally:
        theirs.close()
        served.join(5)
        mta.close()
    assert [m[1] for m in customer.messages] == [["ok@g1.test"]]


def test_the_relay_writes_to_a_tcp_mta_without_waiting_for_its_acks(customer):
    """A relayed message is several small writes to the MTA before its reply is read; with
    Nagle's algorithm on, the last one waited for the MTA's delayed ACK: ~44 ms a message
    against ~1.5 ms without (40 messages of 2 KB into a sink, 127.0.0.1)."""
    from backupmx.atrn_relay import Destination, LocalMTA

    mta = LocalMTA(Destination.parse(f"127.0.0.1:{customer.port}"), timeout=5, local_hostname="primary.test")
    mta.open()
    try:
        assert mta.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        mta.close()


def test_atrn_exit_statuses(mx, customer):
    from backupmx import atrnclient
    from backupmx.atrn_relay import Destination

    def status(user, domains, mta=f"127.0.0.1:{customer.port}", port=mx.odmr_port):
        out = io.StringIO()
        return atrnclient.run("localhost", port, domains, user=user, password=PASSWORD, deliver_to=Destination.parse(mta),
                              cafile=str(CERTS / "ca.pem"), timeout=10, out=out, err=out), out.getvalue()

    queue(mx, [["x@j1.test"]])
    code, said = status("judy", ["j1.test"], mta=f"127.0.0.1:{free_port()}")
    assert code == 75 and "local MTA" in said and "atrn client=127.0.0.1 user=judy" not in mx.log()
    assert status("judy", ["a1.test"]) == (77, "ATRN a1.test: 450 4.7.0 ATRN request refused\n")
    assert status("alice", []) == (0, "ATRN (all of the user`s domains): 453 4.3.0 You have no mail\n")
    code, said = status("judy", ["j1.test"], port=mx.port)  # an SMTP port: no ATRN there
    assert code == 69 and said.startswith("ATRN j1.test: 502 5.5.1")
    assert len(queued(mx, "j1.test")) == 1

# --- the reversed connection's bounds, on a socketpair with real TLS ------------------------


@pytest.fixture
def reversed_pair():
    """(ReversedPeer with a 0.3 s timeout, the customer's TLS socket): as after an accepted ATRN."""
    from backupmx import tls
    from backupmx.odmr_connection import Reversal, ReversedPeer

    ours, theirs = socket.socketpair()
    layer = tls.TLSLayer(tls.server_context(str(CERTS / "server.pem"), str(CERTS / "server.key")))
    wrapped = {}
    handshake = threading.Thread(target=lambda: wrapped.setdefault(
        "sock", tls_context().wrap_socket(theirs, server_hostname="localhost")))
    handshake.start()
    while not layer.handshake_complete:
        ours.sendall(layer.outgoing())
        layer.receive(ours.recv(65536))
    ours.sendall(layer.outgoing())
    handshake.join(5)
    reversal = Reversal(ours, layer, bytearray(), "127.0.0.1:1", "u", {}, "o")
    peer = ReversedPeer(reversal, hostname="mx2.test", timeout=0.3, log=logging.getLogger("test"))
    yield peer, wrapped["sock"]
    peer.quit()
    wrapped["sock"].close()


def elapsed(action):
    started = time.monotonic()
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_a_customer_that_never_greets_costs_one_timeout(reversed_pair):
    from backupmx.smtpclient import PrimaryUnavailable

    peer, customer = reversed_pair
    took, exc = elapsed(peer.start)
    assert isinstance(exc, PrimaryUnavailable) and "timeout" in exc.reason and took < 2


def test_a_dripping_greeting_is_bounded_as_a_whole(reversed_pair):
    from backupmx.smtpclient import PrimaryUnavailable

    peer, customer = reversed_pair

    def drip():
        for byte in b"220 customer.test ESMTP\r\n":
            try:
                customer.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.1)  # 2.5 s for the line: each byte in time, the whole reply not

    threading.Thread(target=drip, daemon=True).start()
    took, exc = elapsed(peer.start)
    assert isinstance(exc, PrimaryUnavailable) and "timeout" in exc.reason and took < 2  # not 2.5 s


def test_an_endless_reply_is_cut_at_its_line_bound(reversed_pair):
    from backupmx.smtpclient import PrimaryUnavailable

    peer, customer = reversed_pair
    threading.Thread(target=lambda: customer.sendall(b"220-customer.test\r\n" * 200), daemon=True).start()
    took, exc = elapsed(peer.start)
    assert isinstance(exc, PrimaryUnavailable) and "100 lines" in exc.reason


def test_a_customer_that_stops_reading_costs_one_timeout(reversed_pair):
    peer, customer = reversed_pair
    customer.sendall(b"220 customer.test ESMTP\r\n")
    threading.Thread(target=lambda: (customer.recv(100), customer.sendall(b"250 customer.test\r\n")),
                     daemon=True).start()
    peer.start()
    client, _ = peer.open()
    took, exc = elapsed(lambda: client.send(b"x" * 2_000_000))  # more than any socket buffer
    assert isinstance(exc, smtplib.SMTPServerDisconnected) and "timeout" in str(exc) and took < 2


def test_what_of_our_250_the_socket_had_not_taken_goes_out_as_it_was_encrypted(reversed_pair):
    """handoff() passes on what of the 250 the session loop could not write: TLS records
    already (the connection's unsent output). start() writes them to the socket as they are,
    before it reads the greeting; encrypting them again would send the customer garbage."""
    peer, customer = reversed_pair
    layer = peer.reversal.tls
    layer.send(replies.ATRN_STARTED.render())
    peer.reversal.unsent = bytearray(layer.outgoing())
    got = {}

    def the_customer():
        got["250"] = customer.recv(200)
        customer.sendall(b"220 customer.test ESMTP\r\n")
        got["ehlo"] = customer.recv(200)
        customer.sendall(b"250 customer.test\r\n")
        if customer.recv(200):  # QUIT, from the fixture's end
            customer.sendall(b"221 bye\r\n")

    threading.Thread(target=the_customer, daemon=True).start()
    peer.start()
    assert got["250"] == replies.ATRN_STARTED.render() and got["ehlo"] == b"ehlo mx2.test\r\n"


# --- the other way to run it: inetd (socket activation: test_deploy.py) ------------------------------


def test_inetd_odmr_session_delivers_in_its_own_process(tmp_path, customer):
    from test_deploy import PASSWORD as DEPLOY_PASSWORD
    from test_deploy import LineClient, ca_context, inetd_config, inetd_session

    cfg = inetd_config(tmp_path, free_port())
    command = [sys.executable, str(REPO / "backupmx.py")]
    with inetd_session(command, cfg, cwd=tmp_path) as (proc, ours):  # plain SMTP: one message queued
        client = LineClient(ours)
        client.line()
        client.cmd("EHLO sender.test")
        client.send_message("s@origin.test", "bob@example.com")
    argv = command + ["serve", "--inetd", "--odmr", "-c", str(cfg)]
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=theirs, cwd=str(tmp_path))
    theirs.close()
    try:
        client = LineClient(ours)
        assert client.line().startswith(b"220 ")
        assert client.cmd("EHLO customer.test")[1].endswith(b"STARTTLS")
        client.starttls(ca_context())
        assert client.cmd("EHLO customer.test")[1].endswith(b"250 ATRN")
        assert client.cmd("AUTH PLAIN " + base64.b64encode(b"\0prim\0" + DEPLOY_PASSWORD.encode()).decode())[0] == 235
        assert client.cmd("ATRN example.com")[0] == 250
        customer.reverse(client.sock).join(10)
        assert [m[1] for m in customer.messages] == [["bob@example.com"]]
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ours.close()


