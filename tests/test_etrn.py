"""TLS, AUTH and ETRN end to end: a real server, a real sink as the primary, real TLS."""

import base64
import hashlib
import hmac
import shutil
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time

import pytest

from conftest import CERTS, REPO, flushes_in_progress, free_port, read_line, received_client, start_server, wait_for

PASSWORD = "s3cret%pass"


def mx_settings(primary_port):
    """A server with STARTTLS, implicit TLS and one ETRN user; every domain's primary is on `primary_port`.
    CRAM-MD5 is listed (it is not by default), after the default mechanisms.
    A failed AUTH waits 0.1 s per failure so far before its answer (1 s in production).
    """
    return dict(
        tls=True, listen_tls=True, auth_failure_delay="0.1s",
        auth_mechanisms="SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5",
        domains={
            "example.com": {"primary": f"127.0.0.1:{primary_port}", "primary_tls": "none"},
            "example.org": {"primary": f"127.0.0.1:{primary_port}", "primary_tls": "none"},
            "sub.example.com": {"primary": f"127.0.0.1:{primary_port}", "primary_tls": "none"},
        },
        users={"prim": ("{PLAIN}" + PASSWORD, "example.com, sub.example.com")})


@pytest.fixture
def mx(server_factory, sink):
    """mx_settings with the sink as the primary, a server of the test's own."""
    return server_factory(**mx_settings(sink.port))


@pytest.fixture(scope="module")
def quiet_mx(tmp_path_factory):
    """mx_settings (no primary listening), one server for the tests that send it no mail: each
    session stands alone (AUTH failures from this address stay far below the per-client limit)."""
    server = start_server(tmp_path_factory.mktemp("etrn"), **mx_settings(free_port()))
    yield server
    try:
        server.stop()
    finally:
        server.kill_group()


def client_context():
    return ssl.create_default_context(cafile=str(CERTS / "ca.pem"))


def starttls_client(server):
    client = smtplib.SMTP("localhost", server.port, timeout=10)
    client.ehlo("primary.test")
    client.starttls(context=client_context())
    client.ehlo("primary.test")
    return client


def queue_some(server, count, rcpt="bob@example.com"):
    bodies = []
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        for n in range(count):
            body = b"Subject: m%d\r\n\r\n.dot first\r\n\xe9 8bit\r\n" % n
            client.sendmail(f"s{n}@origin.test", [rcpt], body)
            bodies.append(body)
    return bodies


def queued_count(server, domain="example.com"):
    db = sqlite3.connect(server.queue_path)
    try:
        return db.execute("SELECT COUNT(*) FROM queue WHERE domain = ?", (domain,)).fetchone()[0]
    finally:
        db.close()


def test_ehlo_offers_auth_only_after_starttls(quiet_mx):
    with smtplib.SMTP("localhost", quiet_mx.port, timeout=10) as client:
        client.ehlo("p")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0prim\0" + PASSWORD.encode()).decode())
        assert code == 538
        assert client.docmd("ETRN", "example.com")[0] == 530
        client.starttls(context=client_context())
        client.ehlo("p")
        assert client.esmtp_features["auth"].split() == ["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"]
        assert not client.has_extn("starttls")


def test_etrn_delivers_byte_for_byte_to_the_primary_only(mx, sink):
    bodies = queue_some(mx, 3)
    queue_some(mx, 1, rcpt="carol@example.org")  # another domain: not flushed
    client = starttls_client(mx)
    client.login("prim", PASSWORD)
    code, text = client.docmd("ETRN", "example.com")
    assert (code, text) == (253, b"2.0.0 3 pending messages for node example.com started")
    client.quit()
    got = sink.wait_for(3, timeout=15)
    assert sorted(m[0] for m in got) == ["s0@origin.test", "s1@origin.test", "s2@origin.test"]
    for mail_from, rcpts, body, _ in got:
        n = int(mail_from[1:].split("@")[0])
        assert rcpts == ["bob@example.com"]
        # only the Received header was added in front
        assert body.endswith(bodies[n])
        added = body[: -len(bodies[n])].decode()
        assert added.startswith("Received: from ") and added.endswith("\r\n")
        assert all(line.startswith("\t") for line in added.split("\r\n")[1:-1])
    wait_for(lambda: queued_count(mx) == 0, timeout=10)
    assert queued_count(mx) == 0
    assert queued_count(mx, "example.org") == 1
    assert wait_for(lambda: "delivered id=" in mx.log())  # the flusher logs a batch right after its commit


@pytest.mark.parametrize("argument,code", [
    ("example.com", 251),  # nothing queued
    ("@example.com", 251),
    ("example.org", 459),  # configured, not this user's
    ("nowhere.test", 459),
    ("", 501),
    ("not_a_domain!", 501),
])
def test_etrn_reply_codes(quiet_mx, argument, code):
    client = starttls_client(quiet_mx)
    client.login("prim", PASSWORD)
    assert client.docmd("ETRN", argument)[0] == code
    client.quit()


def test_etrn_250_for_subdomain_form_and_many_etrns_make_one_flush(mx, sink):
    sink.data_delay = 0.2
    queue_some(mx, 2)
    client = starttls_client(mx)
    client.login("prim", PASSWORD)
    codes = {client.docmd("ETRN", "@example.com")[0] for _ in range(50)}
    client.quit()
    assert codes <= {250, 251}
    assert 250 in codes
    sink.wait_for(2, timeout=15)
    # Once nothing is queued, requested or leased, no flush can deliver anything more.
    assert wait_for(lambda: queued_count(mx) == 0 and not flushes_in_progress(mx.queue_path), timeout=10)
    assert len(sink.messages) == 2  # not delivered once per ETRN


def log_since(server, start):
    """What `server` logged after its log was `start` characters long (a shared server logs for others too)."""
    return server.log()[start:]


def test_auth_failures_are_logged_slowed_and_end_the_session(quiet_mx):
    logged = len(quiet_mx.log())
    client = starttls_client(quiet_mx)
    started = time.monotonic()
    attempts = [client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0prim\0" + wrong).decode())[0]
                for wrong in (b"wrong", b"nope", b"guess")]
    assert attempts == [535, 535, 421]
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.3  # each failure waits longer before its answer
    log = log_since(quiet_mx, logged)
    assert "auth-failed client=127.0.0.1 user=prim" in log
    assert "wrong" not in log and "nope" not in log and "guess" not in log


def test_plain_for_another_user_is_refused_and_logged(quiet_mx):
    logged = len(quiet_mx.log())
    client = starttls_client(quiet_mx)
    token = base64.b64encode(b"admin\0prim\0" + PASSWORD.encode()).decode()
    assert client.docmd("AUTH", "PLAIN " + token)[0] == 535
    token = base64.b64encode(b"prim\0prim\0" + PASSWORD.encode()).decode()
    assert client.docmd("AUTH", "PLAIN " + token)[0] == 235  # authzid = the user itself is fine
    client.quit()
    assert "auth-failed client=127.0.0.1 user=prim" in log_since(quiet_mx, logged)


def test_cram_md5_computed_independently(quiet_mx):
    client = starttls_client(quiet_mx)
    code, challenge_b64 = client.docmd("AUTH", "CRAM-MD5")
    assert code == 334
    challenge = base64.b64decode(challenge_b64)
    digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
    code, _ = client.docmd(base64.b64encode(f"prim {digest}".encode()).decode())
    assert code == 235
    # a second session gets a fresh challenge
    other = starttls_client(quiet_mx)
    assert other.docmd("AUTH", "CRAM-MD5")[1] != challenge_b64
    other.close()
    client.quit()


def test_implicit_tls_with_smtp_ssl(mx, sink):
    queue_some(mx, 1)
    with smtplib.SMTP_SSL("localhost", mx.tls_port, timeout=10, context=client_context()) as client:
        client.ehlo("p")
        assert not client.has_extn("starttls")
        client.login("prim", PASSWORD)
        assert client.docmd("ETRN", "example.com")[0] == 253
    sink.wait_for(1, timeout=15)


def test_starttls_injection_is_not_executed(quiet_mx):
    raw = socket.create_connection(("127.0.0.1", quiet_mx.port), timeout=10)
    assert read_line(raw).startswith(b"220")
    raw.sendall(b"EHLO p\r\n")
    while not read_line(raw).startswith(b"250 "):
        pass
    # RFC 3207 6 (CVE-2011-0411): plaintext sent behind STARTTLS is never
    # executed; under RFC 2920 3.1 the session ends at once (smtp rule 10).
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<inject@evil.test>\r\nRCPT TO:<bob@example.com>\r\n")
    assert read_line(raw).startswith(b"554 5.5.0")
    assert read_line(raw) == b""
    raw.close()


def test_tls_handshake_garbage_costs_nothing_else(quiet_mx):
    raw = socket.create_connection(("127.0.0.1", quiet_mx.tls_port), timeout=10)
    raw.sendall(b"EHLO not tls\r\n" * 10)
    raw.settimeout(5)
    answer = raw.recv(100)
    assert answer == b"" or answer[:1] == b"\x15"  # closed, or a TLS alert record, then closed
    raw.close()
    with smtplib.SMTP_SSL("localhost", quiet_mx.tls_port, timeout=10, context=client_context()) as client:
        assert client.ehlo("p")[0] == 250


def test_old_tls_versions_are_refused(quiet_mx):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPServerDisconnected)):
        with smtplib.SMTP_SSL("localhost", quiet_mx.tls_port, timeout=10, context=context) as client:
            client.ehlo("p")


def run_cli(*args, stdin=None, timeout=30):
    return subprocess.run([sys.executable, str(REPO / "backupmx.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_etrn_client_command(mx, sink, tmp_path):
    queue_some(mx, 2)
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    result = run_cli("etrn", f"localhost:{mx.port}", "example.com", "example.org", "--user", "prim",
                     "--password-file", str(password_file), "--cafile", str(CERTS / "ca.pem"))
    assert result.returncode == 77  # example.org is not prim's: 459, EX_NOPERM
    assert "253" in result.stdout and "459" in result.stdout
    result = run_cli("etrn", f"localhost:{mx.tls_port}", "sub.example.com", "--tls", "--user", "prim",
                     "--password-file", str(password_file), "--cafile", str(CERTS / "ca.pem"))
    assert result.returncode == 0, result.stderr
    assert "251" in result.stdout
    sink.wait_for(2, timeout=15)
    result = run_cli("etrn", f"localhost:{mx.port}", "example.com", "--user", "prim",
                     "--password-file", str(password_file))  # the test CA is not a system CA
    assert result.returncode == 78 and "Traceback" not in result.stderr  # EX_CONFIG: certificate trouble
    assert len(result.stderr.strip().splitlines()) == 1


def test_flush_command_from_the_shell(mx, sink):
    queue_some(mx, 2)
    result = run_cli("flush", "example.com", "-c", mx.config_path)
    assert result.returncode == 0, result.stderr
    sink.wait_for(2, timeout=15)
    result = run_cli("-c", mx.config_path, "flush", "nowhere.test")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def test_primary_answering_4xx_keeps_mail_queued(mx, sink):
    sink.behaviour = "rcpt_4xx"
    queue_some(mx, 1)
    run_cli("flush", "example.com", "-c", mx.config_path)
    db_value = wait_for(lambda: _attempts(mx), timeout=15)
    assert db_value and db_value[0] >= 1 and db_value[1].startswith("45")
    assert queued_count(mx) == 1
    sink.behaviour = "normal"
    run_cli("flush", "example.com", "-c", mx.config_path)
    sink.wait_for(1, timeout=15)
    assert wait_for(lambda: queued_count(mx) == 0, timeout=10)


def _attempts(server):
    db = sqlite3.connect(server.queue_path)
    try:
        row = db.execute("SELECT attempts, last_reply FROM queue WHERE domain = 'example.com'").fetchone()
        return row if row and row[0] else None
    finally:
        db.close()


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)")
def test_swaks_cram_md5_and_etrn(mx, sink):
    queue_some(mx, 1)
    result = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(mx.port), "--tls",
         "--auth", "CRAM-MD5", "--auth-user", "prim", "--auth-password", PASSWORD,
         "--quit-after", "AUTH"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed (apt-get install fetchmail)")
def test_contrib_fetchmailrc_asks_for_every_domain_for_scrypt_and_plain_users(server_factory, sink, tmp_path):
    """Issue 13 item 4: the shipped rc, run by the real fetchmail against a server with the
    default auth_mechanisms. example.com is empty (251) and example.org has mail: the second
    poll entry still asks. The {SCRYPT} user logs in although a {PLAIN} user exists
    (no CRAM-MD5 on offer, so fetchmail takes PLAIN)."""
    from backupmx.auth import hash_password

    mx = server_factory(tls=True, listen_tls=True, domains={
        "example.com": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"},
        "example.org": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"}},
        users={"prim": ("{PLAIN}" + PASSWORD, "example.com, example.org"),
               "scr": (hash_password("scrypt pw"), "example.com, example.org")})
    shipped = (REPO / "contrib" / "primary" / "fetchmailrc").read_text()
    assert shipped.count("\n    fetchdomains ") == shipped.count("\npoll ") == 2
    for user, password, delivered in (("scr", "scrypt pw", 1), ("prim", PASSWORD, 2)):
        queue_some(mx, 1, rcpt="carol@example.org")
        rc = tmp_path / f"fetchmailrc-{user}"
        rc.write_text(shipped.replace("set syslog", "set no syslog")
                      .replace("via mx2.example.net port 465", f"via 127.0.0.1 port {mx.tls_port}")
                      .replace('esmtpname primary-example esmtppassword "the password"',
                               f'esmtpname {user} esmtppassword "{password}"')
                      .replace("sslproto TLS1.2+", f"sslproto TLS1.2+ sslcertfile {CERTS / 'ca.pem'} "
                                                   "sslcommonname localhost"))
        rc.chmod(0o600)
        env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(tmp_path)}
        result = subprocess.run(["fetchmail", "-f", str(rc), "-v", "--nodetach"], capture_output=True,
                                text=True, timeout=60, env=env)
        output = result.stdout + result.stderr
        assert "ETRN< 251 2.0.0 No messages waiting for node example.com" in output, output
        assert "ETRN< 253 2.0.0 1 pending messages for node example.org" in output, output  # asked all the same
        assert f"auth client=127.0.0.1 user={user} mechanism=PLAIN" in mx.log()
        sink.wait_for(delivered, timeout=15)
    assert "auth-failed" not in mx.log()


def test_command_and_close_notify_in_one_write_end_the_session_quietly(quiet_mx):
    """A TLS client that pipelines a command and its close_notify gets no reply and no traceback."""
    logged = len(quiet_mx.log())
    context = client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    raw = socket.create_connection(("127.0.0.1", quiet_mx.tls_port), timeout=10)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            incoming.write(raw.recv(65536))
    raw.sendall(outgoing.read())
    greeting = b""
    while not greeting.endswith(b"\r\n"):
        try:
            greeting += tls.read(4096)
        except ssl.SSLWantReadError:
            incoming.write(raw.recv(65536))
    assert greeting.startswith(b"220 ")
    tls.write(b"NOOP\r\n")
    try:
        tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    raw.sendall(outgoing.read())  # the command and close_notify in one TCP write
    raw.settimeout(5)
    while raw.recv(65536):
        pass
    raw.close()
    assert wait_for(lambda: "disconnect client=127.0.0.1" in log_since(quiet_mx, logged), timeout=5)
    assert "session-error" not in quiet_mx.log() and "Traceback" not in quiet_mx.log()


def test_a_hostile_helo_name_reaches_the_primary_only_neutered(mx, sink):
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as client:
        assert client.ehlo('a;b(c)<d>@e"')[0] == 250
        client.sendmail("s@origin.test", ["bob@example.com"], b"Subject: helo\r\n\r\nbody\r\n")
    assert run_cli("flush", "example.com", "-c", mx.config_path).returncode == 0
    [(_, _, body, _)] = sink.wait_for(1, timeout=15)
    received = body.split(b"\r\nSubject: helo\r\n")[0].decode("ascii")
    assert received.startswith(f"Received: from a?b?c??d??e? {received_client()}\r\n"
                               "\tby mx2.test (backupmx) with ESMTP id ")
    clause = received.split("\r\n")[0]
    assert not set(clause[len("Received: from "):].split(" (")[0]) & set(';()<>"\r\n\0')
