"""The operator's view (SPEC Part 2): what an admin reads, scrapes and pipes.

One real server for the module (STARTTLS, a user, a sink as the primary,
metrics_listen, stderr into a file that JOURNAL_STREAM names, so it logs as
under systemd); its log is read back line by line. The JSON, bulk-action and
health tests work on a queue written directly, through the CLI in-process.
"""

import base64
import http.client
import io
import json
import os
import pty
import re
import shutil
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backupmx import replies
from backupmx.cli import main as cli
from backupmx.envelope import Envelope, Recipient
from backupmx.schema import schema_version
from backupmx.smtp_counts import MAX_ERRORS
from backupmx.store import QueueStore
from conftest import CERTS, REPO, free_port, queue_one, read_line, record_delivered, record_failed, start_server, wait_for
from sink import Sink
from test_log import parse_line

CONTRIB = REPO / "contrib"
PASSWORD = "s3cret pw"


# --- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def primary():
    with Sink() as sink:
        yield sink


@pytest.fixture(scope="module")
def mx(tmp_path_factory, primary):
    tmp = tmp_path_factory.mktemp("observe")
    log = tmp / "server.log"
    log.touch()
    journal = os.stat(log)  # the server's stderr is this file: "the journal", as systemd would say
    server = start_server(
        tmp, tls=True, users={"prim": ("{PLAIN}" + PASSWORD, "example.com")},
        domains={"example.com": {"primary": f"127.0.0.1:{primary.port}", "primary_tls": "none"},
                 "listed.org": {"primary": f"127.0.0.1:{primary.port}", "primary_tls": "none",
                                "recipients": "alice"}},
        metrics_listen=f"127.0.0.1:{free_port()}", auth_failure_delay="0.05s", max_auth_failures_per_client=3,
        env={"JOURNAL_STREAM": f"{journal.st_dev}:{journal.st_ino}", "BACKUPMX_COUNTS_INTERVAL": "0.2",
             "BACKUPMX_METRICS_DEADLINE": "1", "BACKUPMX_LOOKUP_TIMEOUT": "soon"})
    server.metrics_port = int(re.search(r"metrics_listen = 127\.0\.0\.1:(\d+)",
                                        Path(server.config_path).read_text()).group(1))
    yield server
    try:
        assert server.stop() == 0
    finally:
        server.kill_group()


class LogTail:
    """The log lines written from now on, parsed: (priority, event, fields)."""

    def __init__(self, server):
        self.server, self.start = server, len(server.log())

    def lines(self):
        return self.server.log()[self.start:].splitlines()

    def events(self, name=None):
        found = []
        for line in self.lines():
            m = re.match(r"<(\d)>(.*)", line)
            assert m, f"not journal-form: {line!r}"
            event, fields = parse_line(m.group(2))
            if name is None or event == name:
                found.append((int(m.group(1)), event, fields))
        return found

    def wait(self, name, count=1, **match):
        def found():
            hits = [f for _, e, f in self.events(name) if all(f.get(k) == v for k, v in match.items())]
            return hits if len(hits) >= count else None
        hits = wait_for(found, 10)
        assert hits, f"no {name} {match} in:\n" + "\n".join(self.lines())
        return hits


def tls_context():
    return ssl.create_default_context(cafile=str(CERTS / "ca.pem"))


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(REPO / "backupmx.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=60, stdin=stdin if stdin is not None else subprocess.DEVNULL)


def send(server, rcpt="bob@example.com", sender="a@origin.test"):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail(sender)
        c.rcpt(rcpt)
        code, text = c.data(b"Subject: observed\r\n\r\nbody\r\n")
    assert code == 250
    return text.decode().rsplit(" ", 1)[1]


def test_a_held_write_lock_never_freezes_a_worker_for_its_counts(mx):
    """review-1 m3: while another process holds the queue's write lock (a purge, `delete
    ALL`, an operator's sqlite3), the worker keeps answering; the refusal it counted is
    written once the lock is free."""
    def relay_denied():
        db = sqlite3.connect(mx.queue_path)
        try:
            row = db.execute("SELECT value FROM counters WHERE name = 'rejects' AND label = 'relay_denied'").fetchone()
            return row[0] if row else 0
        finally:
            db.close()

    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("a@origin.test")
        before = relay_denied()
        assert c.rcpt("x@elsewhere.test")[0] == 554
        holder = sqlite3.connect(mx.queue_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        worst, until = 0.0, time.monotonic() + 1.0  # the counts are tried every 0.2 s meanwhile
        try:
            while time.monotonic() < until:
                started = time.monotonic()
                assert c.noop()[0] == 250
                worst = max(worst, time.monotonic() - started)
                time.sleep(0.05)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert worst < 0.5, worst  # had it waited for the lock: 0.8 s or more
    assert wait_for(lambda: relay_denied() >= before + 1, 5)


def test_tuning_from_the_environment_is_never_silent(mx):
    """review-1 m9: each BACKUPMX_* knob set is one line at start; one that is no usable
    number is ignored, with a warning. The AUTH failure delay is a config key instead."""
    tail = LogTail(mx)
    tail.start = 0  # from the server's start
    events = [(priority, fields) for priority, event, fields in tail.events() if event.startswith("tuning")]
    assert (6, {"variable": "BACKUPMX_COUNTS_INTERVAL", "value": "0.2", "default": "5.0"}) in events
    assert any(priority == 4 and fields["variable"] == "BACKUPMX_LOOKUP_TIMEOUT" for priority, fields in events)
    assert not any(fields["variable"] == "BACKUPMX_AUTH_FAILURE_DELAY" for _, fields in events)


# --- log lines read back --------------------------------------------------------------------


def test_every_refusal_is_a_reject_line_and_disconnect_counts_commands(mx):
    tail = LogTail(mx)
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as c:
        c.ehlo("client.test")
        assert c.docmd("AUTH", "PLAIN AGZvbwBiYXI=")[0] == 538
        assert c.docmd("ETRN", "example.com")[0] == 530
        assert c.docmd("MAIL", "FROM:<a@origin.test>")[0] == 250
        assert c.docmd("RCPT", "TO:<x@nowhere.test>")[0] == 554
        assert c.docmd("RCPT", "TO:<bob@listed.org>")[0] == 550
        assert c.docmd("DATA")[0] == 554
        assert c.docmd("STARTTLS", "now")[0] == 501
    rejects = tail.wait("reject", 6)
    assert [(f["command"], f["reason"]) for f in rejects] == [
        ("AUTH", "encryption_required"), ("ETRN", "auth_required"), ("RCPT", "relay_denied"),
        ("RCPT", "unknown_user"), ("DATA", "no_valid_recipients"), ("STARTTLS", "syntax_error")]
    relay = rejects[2]
    assert relay == {"client": "127.0.0.1", "command": "RCPT", "reason": "relay_denied", "helo": "client.test",
                     "from": "<a@origin.test>", "to": "<x@nowhere.test>",
                     "reply": replies.RELAY_DENIED.render(hostname="mx2.test", address="x@nowhere.test")
                     .decode().rstrip("\r\n")}
    assert rejects[3]["to"] == "<bob@listed.org>" and rejects[3]["reply"].startswith("550 5.1.1 ")
    line = next(line for line in tail.lines() if " reason=relay_denied " in line)
    assert line.startswith("<6>reject client=127.0.0.1 command=RCPT reason=relay_denied helo=client.test ")
    assert {"client": "127.0.0.1"} in [f for _, _, f in tail.events("connect")]
    [disconnect] = tail.wait("disconnect", auth="0/1")  # (not the start-up probe's, which may end now)
    assert disconnect == {"client": "127.0.0.1", "ehlo": "1", "auth": "0/1", "etrn": "0/1", "mail": "1",
                          "rcpt": "0/2", "data": "0/1", "starttls": "0/1", "quit": "1", "commands": "3/9"}


def test_tls_auth_failure_and_etrn_lines(mx):
    tail = LogTail(mx)
    with smtplib.SMTP("localhost", mx.port, timeout=10) as c:
        c.starttls(context=tls_context())
        c.ehlo("primary.test")
        # A user name that tries to plant another client= for fail2ban.
        assert c.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0x client=10.9.9.9\0wrong").decode())[0] == 535
        assert c.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0prim\0{PASSWORD}".encode()).decode())[0] == 235
        assert c.docmd("ETRN", "example.com")[0] == 251
    [tls] = tail.wait("tls")
    assert tls["client"] == "127.0.0.1" and tls["version"].startswith("TLSv1.") and tls["cipher"]
    [(priority, _, failed)] = tail.events("auth-failed")
    assert priority == 4 and failed["client"] == "127.0.0.1"  # a warning: journalctl -p warning shows it
    [reject] = tail.wait("reject", command="AUTH")
    assert reject["reason"] == "auth_failed" and reject["reply"].startswith("535 5.7.8")
    [etrn] = tail.wait("etrn")
    assert etrn["user"] == "prim" and etrn["domains"] == "example.com"
    assert all(re.match(r"<[0-7]>[a-z]", line) for line in tail.lines())  # no time, no tag of our own


def test_queueing_delivery_and_drain_lines(mx, primary, tmp_path):
    tail = LogTail(mx)
    queue_id = send(mx)
    [queueing] = tail.wait("domain-queueing", domain="example.com")
    assert abs(int(queueing["since"]) - time.time()) < 60
    password = tmp_path / "pw"
    password.write_text(PASSWORD + "\n")
    etrn = run_cli("etrn", f"localhost:{mx.port}", "example.com", "--user", "prim", "--password-file", password,
                   "--cafile", CERTS / "ca.pem")
    assert etrn.returncode == 0 and " 253 " in etrn.stdout, etrn.stdout + etrn.stderr
    [delivered] = tail.wait("delivered", id=queue_id)
    assert float(delivered["delay"]) >= 0 and int(delivered["size"]) > len(b"Subject: observed\r\n\r\nbody\r\n")
    [drained] = tail.wait("domain-drained", domain="example.com")
    assert drained["since"] == queueing["since"]
    assert len(tail.events("domain-queueing")) == 1  # once

    shown = run_cli("show", "--json", queue_id, "-c", mx.config_path)
    history = json.loads(shown.stdout)
    assert history["queue_id"] == queue_id and history["in_queue"] is False
    assert [e["what"] for e in history["events"]] == ["queued", "delivered"]
    assert all(isinstance(e["at"], int) for e in history["events"])

    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    refused = run_cli("etrn", f"localhost:{mx.port}", "example.com", "--user", "prim", "--password-file", wrong,
                      "--cafile", CERTS / "ca.pem")
    assert refused.returncode == 77 and "535" in refused.stderr  # EX_NOPERM
    closed = run_cli("etrn", f"localhost:{free_port()}", "example.com", "--user", "prim", "--password-file",
                     password)
    assert closed.returncode == 75  # EX_TEMPFAIL


# --- metrics: a strict parser of the text exposition format 0.0.4 -------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf'({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)(?: (-?\d+))?')
_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|Inf)|NaN")


def parse_exposition(text):
    """{name: {"type", "help", "samples": {frozenset(labels): value}}}, or AssertionError at the first
    line that is not the format: one HELP and one TYPE per family, before its samples; samples of a
    family together; label names unique per sample; no duplicate series; a newline at the end."""
    assert text.endswith("\n"), "the last line must end in a newline"
    families, current, seen = {}, None, set()
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            m = re.fullmatch(rf"# (HELP|TYPE) ({_NAME}) (.*)", line)
            assert m, where
            kind, name, rest = m.groups()
            family = families.setdefault(name, {"samples": {}})
            assert name not in seen or current == name, f"{where}: {name} interleaved with another family"
            assert kind.lower() not in family, f"{where}: second {kind}"
            assert not family["samples"], f"{where}: {kind} after the samples"
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), where
            else:
                assert "\n" not in rest and not re.search(r"\\[^\\n]", rest), where
            family[kind.lower()] = rest
            current = name
            seen.add(name)
            continue
        assert line, f"{where}: empty line"
        m = _SAMPLE.fullmatch(line)
        assert m, where
        name, labels, value, _ = m.groups()
        assert name == current, f"{where}: a sample outside its family's block"
        assert _VALUE.fullmatch(value), f"{where}: value"
        pairs = re.findall(rf'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"', labels or "")
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"{where}: a label twice"
        series = frozenset(pairs)
        assert series not in families[name]["samples"], f"{where}: the same series twice"
        families[name]["samples"][series] = float(value)
    for name, family in families.items():
        assert "type" in family and "help" in family, f"{name}: no TYPE or HELP"
        if family["type"] == "counter":
            assert name.endswith("_total"), f"{name}: a counter's name ends in _total"
    return families


def sample(families, name, **labels):
    return families[name]["samples"].get(frozenset(labels.items()))


SPEC_METRICS = ["backupmx_queue_messages", "backupmx_queue_bytes", "backupmx_queue_oldest_seconds",
                "backupmx_last_etrn_timestamp_seconds", "backupmx_last_delivery_timestamp_seconds",
                "backupmx_messages_received_total", "backupmx_messages_delivered_total", "backupmx_rejects_total"]


def test_the_parser_refuses_what_is_not_the_format():
    good = "# HELP a_total x\n# TYPE a_total counter\na_total 1\n"
    assert sample(parse_exposition(good), "a_total") == 1
    for bad in [good[:-1], good + "a_total 2\n", good.replace("a_total 1", 'a_total{x="1",x="2"} 1'),
                good.replace("a_total", "a"), good + "b 1\n",
                good.replace("a_total 1", "a_total one"), good.replace("a_total 1", 'a_total{x="a"b"} 1')]:
        with pytest.raises(AssertionError):
            parse_exposition(bad)


def scrape(server, method="GET", path="/metrics"):
    conn = http.client.HTTPConnection("127.0.0.1", server.metrics_port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def test_metrics_from_the_command_and_the_endpoint(mx, primary):
    tail = LogTail(mx)
    # A delivery after an ETRN of its own (the counters and timestamps below), not an earlier
    # test's, so that it also passes alone (-k); from 127.0.0.3, whose AUTH no failure blocks.
    delivered = send(mx)
    with smtplib.SMTP("localhost", mx.port, timeout=10, source_address=("127.0.0.3", 0)) as c:
        c.starttls(context=tls_context())
        c.login("prim", PASSWORD)
        assert c.docmd("ETRN", "example.com")[0] == 253  # RFC 1985: the one just sent is waiting
    tail.wait("delivered", id=delivered)
    send(mx, rcpt="held@example.com")
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as c:
        c.ehlo("client.test")
        c.mail("a@origin.test")
        for relay in ("x@elsewhere.test", "y@elsewhere.test"):  # the two relay_denied counted below
            assert c.docmd("RCPT", f"TO:<{relay}>")[0] == 554
    tail.wait("disconnect", 2)
    status, content_type, text = scrape(mx)
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    served = parse_exposition(text)
    assert set(SPEC_METRICS) <= set(served)
    assert sample(served, "backupmx_queue_messages", domain="example.com", state="queued") == 1
    assert sample(served, "backupmx_queue_messages", domain="listed.org", state="held") == 0
    assert sample(served, "backupmx_queue_bytes", domain="example.com") > 0
    assert 0 <= sample(served, "backupmx_queue_oldest_seconds", domain="example.com") < 60
    assert sample(served, "backupmx_messages_received_total") >= 2
    assert sample(served, "backupmx_messages_delivered_total") >= 1
    assert sample(served, "backupmx_last_delivery_timestamp_seconds", domain="example.com") <= time.time()
    assert sample(served, "backupmx_last_etrn_timestamp_seconds", domain="example.com") <= time.time()
    assert sample(served, "backupmx_last_etrn_timestamp_seconds", domain="listed.org") is None  # never
    assert 0 <= sample(served, "backupmx_queue_wal_bytes") <= 64 * 1024 * 1024  # store_db.JOURNAL_SIZE_LIMIT

    def relay_rejects():
        return sample(parse_exposition(scrape(mx)[2]), "backupmx_rejects_total", reason="relay_denied")
    assert wait_for(lambda: (relay_rejects() or 0) >= 2, 10)  # counted by the workers, written every 0.2 s

    printed = run_cli("metrics", "-c", mx.config_path)
    assert printed.returncode == 0, printed.stderr
    command = parse_exposition(printed.stdout)
    assert set(command) == set(served)
    assert sample(command, "backupmx_queue_messages", domain="example.com", state="queued") == 1


def test_metrics_endpoint_is_bounded_against_hostile_clients(mx):
    assert scrape(mx, "POST")[0] == 501
    assert scrape(mx, path="/")[0] == 404
    idle = [socket.create_connection(("127.0.0.1", mx.metrics_port), timeout=5) for _ in range(8)]
    try:
        extra = socket.create_connection(("127.0.0.1", mx.metrics_port), timeout=5)
        assert extra.recv(100) == b""  # every slot is taken: closed unanswered
        extra.close()
        started = time.monotonic()
        assert idle[0].recv(100) == b""  # an idle client is cut off at the deadline (1 s here)
        assert time.monotonic() - started < 4
    finally:
        for s in idle:
            s.close()

    def answered():
        try:
            return scrape(mx)[0] == 200
        except (OSError, http.client.HTTPException):  # the slots are freed as their threads end
            return False
    assert wait_for(answered, 5)


# --- fail2ban --------------------------------------------------------------------------------


def test_protocol_abuse_and_blocked_auth_are_reject_lines(mx):
    """What the protocol jail and the AUTH jail read besides the lines above (issue 9's refusals):
    commands pipelined after EHLO, junk commands past max_junk_commands (100 here), a session's
    MAX_ERRORS refused commands, and AUTH from
    an address over max_auth_failures_per_client (3 here; from 127.0.0.2, so that 127.0.0.1 may
    still authenticate in the other tests)."""
    tail = LogTail(mx)
    with socket.create_connection(("127.0.0.1", mx.port), timeout=10) as s:
        assert read_line(s).startswith(b"220")
        s.sendall(b"EHLO client.test\r\nNOOP\r\n")  # EHLO must end a group (RFC 2920 3.1)
        while (line := read_line(s)).startswith(b"250"):
            pass
        assert line.startswith(b"554 5.5.0")
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as c:
        for _ in range(100):
            assert c.noop()[0] == 250
        assert c.noop()[0] == 421
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as c:  # a scanner's unknown commands
        assert [c.docmd("FOO")[0] for _ in range(MAX_ERRORS)] == [500] * MAX_ERRORS
        assert c.getreply()[0] == 421  # after the last one's 500, as Postfix does
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=10) as c:  # a mailing list's stale subscribers: no abuse
        c.ehlo("lists.test")
        assert c.docmd("MAIL", "FROM:<list-bounces@lists.test>")[0] == 250
        assert [c.docmd("RCPT", f"TO:<gone{n}@listed.org>")[0] for n in range(MAX_ERRORS)] == [550] * MAX_ERRORS
        assert c.getreply()[0] == 421
    guess = "PLAIN " + base64.b64encode(b"\0prim\0guess").decode()
    blocked = replies.CLIENT_AUTH_BLOCKED.render(hostname="mx2.test").decode().rstrip()
    replied = []
    for _ in range(2):  # 3 guesses a session (max_auth_failures), 3 in all: the 4th is refused unchecked
        with smtplib.SMTP("127.0.0.1", mx.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
            c.starttls(context=tls_context())
            c.ehlo("client.test")
            while (reply := c.docmd("AUTH", guess))[0] == 535:
                replied.append(reply[0])
            replied.append(f"{reply[0]} {reply[1].decode()}")
    assert replied[-1] == blocked and replied.count(535) == 2, replied
    tail.wait("reject", reason="protocol_synchronization", command="EHLO")
    tail.wait("reject", reason="too_many_junk_commands", command="NOOP")
    tail.wait("reject", reason="too_many_errors", command="UNKNOWN")
    tail.wait("reject", reason="too_many_errors", command="RCPT")
    tail.wait("reject", reason="client_auth_blocked", command="AUTH", client="127.0.0.2")


def failregexes(mode="normal"):
    """The filter's failregex lines for `mode` as Python regexes, %(...)s and fail2ban's
    <mdre-<mode>> resolved (fail2ban's <HOST>: an address or a name, captured)."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(CONTRIB / "fail2ban" / "filter.d" / "backupmx.conf")
    definition = parser["Definition"]
    assert definition["failregex"].strip() == "<mdre-<mode>>"
    lines = definition[f"mdre-{mode}"].strip().splitlines()
    return [re.compile(line.strip().replace("<HOST>", r"(?P<host>\S+)")) for line in lines]


# What each mode of the filter (each jail) bans: review-1 m4 gave recipient sweeps a jail of their own.
# Issue 9's refusals: AUTH past max_auth_failures_per_client with the AUTH rule, protocol abuse in a jail of its own.
BANNED = {"normal": r"<\d>(auth-failed |reject .* reason=(relay_denied|client_auth_blocked) )",
          "recipients": r"<\d>reject .* reason=unknown_user ",
          "protocol": r"<\d>reject .* (reason=(protocol_synchronization|too_many_junk_commands)"
                      r"|command=UNKNOWN reason=too_many_errors) "}
AT_LEAST = {"normal": 4, "recipients": 1, "protocol": 3}  # what the tests above made


def client_of(line):
    return re.search(r" client=(\S+)", line).group(1)


@pytest.mark.parametrize("mode", sorted(BANNED))
def test_fail2ban_filter_as_fail2ban_reads_it(mx, mode):
    """Without fail2ban itself: its regexes applied the way it applies them, to this server's lines."""
    lines = mx.log().splitlines()
    wanted = [line for line in lines if re.match(BANNED[mode], line)]
    assert len(wanted) >= AT_LEAST[mode]
    regexes = failregexes(mode)
    for line in lines:
        for form in (journal_view(line), f"backupmx[77]: {line[3:]}"):  # date already taken away
            hosts = [m.group("host") for m in (r.search(form) for r in regexes) if m]
            assert hosts == ([client_of(line)] if line in wanted else []), form


def journal_view(line, pid=4242):
    """A journal-form line as fail2ban's systemd backend shows it: host, identifier[pid], message."""
    return f"mx2 backupmx[{pid}]: " + re.sub(r"^<\d>", "", line)


@pytest.mark.parametrize("mode", sorted(BANNED))
def test_fail2ban_filter_matches_the_journal_and_the_file_form(mx, tmp_path, mode):
    if not shutil.which("fail2ban-regex"):
        pytest.skip("fail2ban-regex is not installed (apt-get install fail2ban; .ci/run installs it)")
    wanted = [line for line in mx.log().splitlines() if re.match(BANNED[mode], line)]
    assert len(wanted) >= AT_LEAST[mode]  # the tests above: AUTH guesses, relay probes, an unknown user, ...
    others = [line for line in mx.log().splitlines() if line not in wanted]
    # What fail2ban sees: the journal's entries (the time beside the line, taken away
    # first like a file's), a syslog file, and a log file of ours.
    dated = [f"2026-12-04T10:00:{n % 60:02d} {journal_view(line)}" for n, line in enumerate(wanted)]
    dated += [f"Dec  4 10:00:{n % 60:02d} {journal_view(line)}" for n, line in enumerate(wanted)]
    dated += [f"2026-12-04 10:00:{n % 60:02d},123 backupmx[77]: {line[3:]}" for n, line in enumerate(wanted)]
    log = tmp_path / "mail.log"
    log.write_text("\n".join(dated) + "\n")
    assert fail2ban_ips(log, mode) == [client_of(line) for line in wanted] * 3  # never the 10.9.9.9 planted
    quiet = tmp_path / "other.log"
    quiet.write_text("\n".join(f"2026-12-04 10:00:00,000 backupmx[77]: {line[3:]}" for line in others) + "\n")
    assert fail2ban_ips(quiet, mode) == []


def fail2ban_ips(log, mode="normal"):
    """The address of every line the real fail2ban-regex matches with our filter in `mode`."""
    result = subprocess.run(["fail2ban-regex", "-o", "ip", str(log),
                             f"{CONTRIB / 'fail2ban' / 'filter.d' / 'backupmx.conf'}[mode={mode}]"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


def test_fail2ban_jail_works_without_a_log_file(tmp_path):
    """The jail reads the journal: `fail2ban-client -t` passes with no /var/log/mail.log."""
    if not shutil.which("fail2ban-client") or not Path("/etc/fail2ban/jail.conf").exists():
        pytest.skip("fail2ban is not installed (apt-get install fail2ban; .ci/run installs it)")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf, ignore=shutil.ignore_patterns("jail.d", "*.local"))
    (conf / "jail.d").mkdir()
    shutil.copy(CONTRIB / "fail2ban" / "jail.d" / "backupmx.local", conf / "jail.d")
    shutil.copy(CONTRIB / "fail2ban" / "filter.d" / "backupmx.conf", conf / "filter.d")
    result = subprocess.run(["fail2ban-client", "-c", str(conf), "-t"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, result.stdout + result.stderr


# --- JSON, bulk actions and filters, on a queue written directly ---------------------------------

NOW = 1_800_000_000


@pytest.fixture
def queue(tmp_path):
    """A config and a queue: a, b (spam.test senders), c (old, from a friend), d (the null sender,
    two domains). Returns (config path, {name: queue id})."""
    config = tmp_path / "backupmx.ini"
    config.write_text(f"[backupmx]\nhostname = mx2.test\nlisten = 127.0.0.1:0\nqueue = {tmp_path}/queue.db\n"
                      "[domain:example.com]\nprimary = 127.0.0.1:2526\n"
                      "[domain:example.org]\nprimary = 127.0.0.1:2526\n")
    ids = {}
    with QueueStore(str(tmp_path / "queue.db")) as store:
        for name, sender, domains, age in [("a", "x@spam.test", ["example.com"], 60),
                                           ("b", "Y@SPAM.test", ["example.com"], 120),
                                           ("c", "friend@origin.test", ["example.org"], 3 * 86400),
                                           ("d", "", ["example.com", "example.org"], 30)]:
            ids[name] = store.new_queue_id()
            envelope = Envelope(sender=sender, recipients=[Recipient(f"{name}@{d}", d) for d in domains])
            body = f"Subject: {name}\r\n\r\nbody\r\n".encode()
            queue_one(store, ids[name], envelope, body, len(body), client="192.0.2.1", helo="c.test",
                          received_at=time.time() - age)
    return str(config), ids


def cli_out(capsys, *args, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = cli([*args])
    out, err = capsys.readouterr()
    return status, out, err


def test_queue_list_and_queue_as_json(queue, capsys):
    config, ids = queue
    status, out, _ = cli_out(capsys, "queue", "list", "--json", "-c", config)
    rows = json.loads(out)
    assert status == 0 and len(rows) == 5  # d is one row per domain
    assert [r["queue_id"] for r in rows][:1] == [ids["c"]]  # oldest first
    row = next(r for r in rows if r["queue_id"] == ids["a"])
    assert row == {"queue_id": ids["a"], "domain": "example.com", "state": "queued",
                   "received_at": row["received_at"], "size": row["size"], "sender": "x@spam.test",
                   "recipients": ["a@example.com"], "attempts": 0, "last_attempt": None,
                   "next_attempt": row["next_attempt"], "last_reply": None}
    assert isinstance(row["received_at"], int) and abs(row["received_at"] - (time.time() - 60)) < 5
    status, out, _ = cli_out(capsys, "queue", "--json", "-c", config)
    summary = {d["domain"]: d for d in json.loads(out)}
    assert summary["example.com"]["messages"] == 3 and summary["example.org"]["messages"] == 2
    assert summary["example.org"]["states"] == {"queued": 2, "held": 0, "failed": 0, "expired": 0}
    assert summary["example.org"]["ages"]["<1h"] == 1 and summary["example.org"]["ages"]["3d+"] == 1
    assert summary["example.com"]["last_etrn"] is None and isinstance(summary["example.com"]["oldest"], int)
    status, out, _ = cli_out(capsys, "show", "--json", ids["d"], "-c", config)
    shown = json.loads(out)
    assert shown["in_queue"] is True and shown["sender"] == "" and [r["domain"] for r in shown["rows"]] == \
        ["example.com", "example.org"]
    assert [e["what"] for e in shown["events"]] == ["queued", "queued"]


def test_filters_ids_and_bulk_actions(queue, capsys, monkeypatch):
    config, ids = queue
    status, out, _ = cli_out(capsys, "queue", "list", "--sender", "*@spam.test", "--ids", "-c", config)
    assert status == 0 and out.split() == [ids["b"], ids["a"]] or out.split() == [ids["a"], ids["b"]]
    status, out, _ = cli_out(capsys, "hold", "-", "-c", config, stdin=out, monkeypatch=monkeypatch)
    assert status == 0 and out == "hold: held 2 queue row(s) of 2 message(s)\n"
    status, out, _ = cli_out(capsys, "queue", "list", "--state", "held", "--ids", "-c", config)
    assert sorted(out.split()) == sorted([ids["a"], ids["b"]])
    status, out, _ = cli_out(capsys, "queue", "list", "--sender", "<>", "--domain", "example.org", "--ids",
                             "-c", config)
    assert out.split() == [ids["d"]]
    status, out, _ = cli_out(capsys, "queue", "list", "--older-than", "1d", "--ids", "-c", config)
    assert out.split() == [ids["c"]]
    status, out, _ = cli_out(capsys, "release", "ALL", "-c", config)
    assert out == "release: released 2 queue row(s) of 2 message(s)\n"
    status, out, _ = cli_out(capsys, "hold", ids["a"], ids["c"].lower(), "example.org", "-c", config)
    assert out == "hold: held 3 queue row(s) of 3 message(s)\n"  # a, c, and d's example.org row
    status, out, _ = cli_out(capsys, "requeue", "--domain", "example.org", "-c", config)
    assert out == "requeue: requeued 2 queue row(s) of 2 message(s)\n"
    status, out, err = cli_out(capsys, "delete", "--older-than", "2d", "-c", config, stdin="",
                               monkeypatch=monkeypatch)
    assert status == 1 and "refusing to delete 1 message(s) (1 queue row(s)) without --yes" in err
    status, out, _ = cli_out(capsys, "delete", "--older-than", "2d", "--yes", "-c", config)
    assert out == "delete: deleted 1 queue row(s) of 1 message(s)\n"
    status, out, err = cli_out(capsys, "hold", "-c", config)
    assert status == 1 and "name the mail" in err and out == ""
    status, out, err = cli_out(capsys, "hold", "--sender", "nobody@nowhere.test", "-c", config)
    assert status == 1 and "nothing matched" in err


def test_delete_asks_with_the_count_on_a_terminal(queue, tmp_path):
    config, ids = queue
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(REPO / "backupmx.py"), "delete", "--sender", "*@SPAM.TEST",
                             "-c", config], stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    try:
        seen = b""
        while b"[y/N]" not in seen:
            chunk = os.read(controller, 1024)
            assert chunk, seen
            seen += chunk
        assert b"delete 2 message(s) (2 queue row(s)) from the queue, with no bounce? [y/N]" in seen
        os.write(controller, b"n\n")
        assert proc.wait(30) == 1
    finally:
        proc.kill()
        os.close(controller)
    with QueueStore(str(tmp_path / "queue.db")) as store:
        assert len(store.list_messages()) == 5  # nothing deleted


def test_queue_table_shows_held_failed_and_the_primary_s_last_visits(queue, capsys):
    config, ids = queue
    with QueueStore(str(Path(config).parent / "queue.db")) as store:
        store.hold(queue_id=ids["a"])
        store.request_flush(["example.com"], etrn=True)
        record_failed(store, ids["d"], "example.org", ["d@example.org"], "550 5.1.1 no such user")
    status, out, _ = cli_out(capsys, "queue", "-c", config)
    header, com, org = out.splitlines()
    assert header.split() == ["domain", "messages", "bytes", "oldest", "<1h", "<6h", "<1d", "<3d", "3d+", "held",
                              "failed", "expired", "last-etrn", "last-delivery"]
    assert com.split()[0:2] == ["example.com", "3"] and com.split()[9:11] == ["1", "0"]
    assert com.split()[12].endswith("-ago") and com.split()[13] == "never"
    assert org.split()[0:2] == ["example.org", "1"] and org.split()[10] == "1"  # the failed row is not waiting


# --- health: a Nagios/Icinga plugin ------------------------------------------------------------


def health(capsys, config, *options):
    status, out, err = cli_out(capsys, "health", "-c", config, *options)
    assert err == "" and out.count("\n") == 1, (out, err)
    return status, out.strip()


_PLUGIN = re.compile(r"BACKUPMX (OK|WARNING|CRITICAL|UNKNOWN) - [^|\n]+"
                     r"(?: \| (?:'?[a-z]+'?=\d+(?:s|B)?;\d*;\d*;0 ?)+)?")


def test_health_exit_codes_and_perfdata(queue, capsys, tmp_path):
    config, ids = queue
    status, line = health(capsys, config)
    assert status == 2 and line.startswith("BACKUPMX CRITICAL - 5 message(s) waiting"), line  # c is 3 days old
    assert _PLUGIN.fullmatch(line), line
    assert "oldest=259" in line and ";14400;86400;0" in line and "(example.org, no ETRN yet)" in line
    status, line = health(capsys, config, "--warn-age", "1d", "--max-age", "4d")
    assert status == 1 and line.startswith("BACKUPMX WARNING"), line
    status, line = health(capsys, config, "--warn-age", "4d", "--max-age", "5d")
    assert status == 0 and line.startswith("BACKUPMX OK"), line
    status, line = health(capsys, config, "--warn-age", "4d", "--max-age", "5d", "--warn-messages", "4")
    assert status == 1 and "messages=5;4;;0" in line, line
    status, line = health(capsys, config, "--warn-age", "4d", "--max-age", "5d", "--max-messages", "4")
    assert status == 2, line
    for bad in (["--warn-messages", "-1"], ["--max-messages=-5"], ["--warn-messages", "x"]):  # review-1 m9
        with pytest.raises(SystemExit) as exit:
            cli(["health", "-c", config, *bad])
        out, err = capsys.readouterr()
        assert exit.value.code == 3 and out.startswith("BACKUPMX UNKNOWN - usage: ") and out.count("\n") == 1, out
        assert "is not a number of messages" in out and err.count("\n") == 1
    Path(config).write_text(Path(config).read_text().replace(f"{Path(config).parent}/queue.db",
                                                             f"{tmp_path}/none.db"))
    status, line = health(capsys, config)
    assert status == 3 and line.startswith("BACKUPMX UNKNOWN - ") and "none.db" in line, line
    (tmp_path / "none.db").write_bytes(b"not a database at all" * 200)
    status, line = health(capsys, config)
    assert status == 3 and line.startswith("BACKUPMX UNKNOWN - "), line
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "b.ini").write_text(Path(config).read_text().replace(f"{tmp_path}/none.db", f"{empty}/q.db"))
    QueueStore(str(empty / "q.db")).close()
    status, line = health(capsys, str(empty / "b.ini"))
    assert status == 0 and line.startswith("BACKUPMX OK - no mail waiting |"), line


def test_metrics_command_without_a_queue(tmp_path, capsys):
    config = tmp_path / "c.ini"
    config.write_text(f"[backupmx]\nqueue = {tmp_path}/q.db\n[domain:example.com]\nprimary = 127.0.0.1:25\n")
    status, out, _ = cli_out(capsys, "metrics", "-c", str(config))
    families = parse_exposition(out)
    assert status == 0 and sample(families, "backupmx_queue_messages", domain="example.com", state="queued") == 0
    assert sample(families, "backupmx_messages_received_total") == 0
    assert not (tmp_path / "q.db").exists()  # a report creates nothing


# --- the schema: a queue of the previous version is migrated -----------------------------------


def test_a_version_3_queue_is_migrated_and_keeps_its_mail(tmp_path):
    """tests/data/schema-v3.sql is schema.sql as it was before domain_status and counters."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript((REPO / "tests" / "data" / "schema-v3.sql").read_text())
    old.executescript("""
        INSERT INTO messages (queue_id, sender, received_at, size, body) VALUES ('OLD0000000000A', 'a@b.test',
            1700000000, 4, CAST('body' AS BLOB));
        INSERT INTO queue (queue_id, domain, state_changed) VALUES ('OLD0000000000A', 'example.com', 1700000000);
        INSERT INTO recipients (queue_id, domain, address) VALUES ('OLD0000000000A', 'example.com', 'x@example.com');
    """)
    assert [c[1] for c in old.execute("PRAGMA table_info(queue_summary)")] == ["domain", "messages", "bytes",
                                                                               "oldest"]
    old.close()
    with QueueStore(str(path)) as store:
        db = store.connection
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version() >= 4
        assert db.execute("SELECT * FROM queue_summary").fetchall() == \
            [("example.com", 1, 4, 1700000000, None, None)]
        started, drained = store.reconcile_domains()  # the mail it held starts "queueing" now
        assert started == [("example.com", 1700000000)] and drained == []
        [message] = store.messages_for_flush("example.com")
        assert message.queue_id == "OLD0000000000A"
    with QueueStore(str(path)) as again:  # opening it again changes nothing
        assert again.connection.execute("SELECT count(*) FROM queue").fetchone()[0] == 1


def test_no_command_but_serve_migrates_the_queue(tmp_path, capsys):
    """An older server may still serve from the queue: a report or an action from the
    new command line must leave its schema alone (the old server's next fork would
    refuse a newer one), and says what to do in one line."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript((REPO / "tests" / "data" / "schema-v3.sql").read_text())
    old.close()
    config = tmp_path / "b.ini"
    config.write_text(f"[backupmx]\nqueue = {path}\n[domain:example.com]\nprimary = 127.0.0.1:25\n")
    for command in (["queue"], ["queue", "list"], ["queue", "list", "--json"], ["show", "OLD0000000000A"],
                    ["show", "example.com"], ["verify", "list"], ["hold", "ALL"], ["release", "ALL"],
                    ["requeue", "ALL"], ["delete", "--yes", "ALL"], ["flush", "example.com"],
                    ["verify", "flush", "ALL"], ["metrics"]):
        status, out, err = cli_out(capsys, *command, "-c", str(config))
        assert status == 1 and out == "", command
        assert err.endswith("(start the server once to migrate the queue)\n") and err.count("\n") == 1, (command, err)
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3, command
        db.close()


# --- serve --inetd: its stdin, its stderr -------------------------------------------------------


def inetd_config(tmp_path, log):
    config = tmp_path / "inetd.ini"
    config.write_text(f"[backupmx]\nhostname = mx2.test\nqueue = {tmp_path}/q.db\nlog = {log}\n"
                      "[domain:example.com]\nprimary = 127.0.0.1:2526\n")
    return config


def test_inetd_with_a_stdin_that_is_no_socket_says_so_on_stderr_and_in_the_log(tmp_path):
    log = tmp_path / "inetd.log"
    proc = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "serve", "--inetd", "-c",
                           inetd_config(tmp_path, log)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 64, proc  # EX_USAGE
    assert proc.stdout == "" and proc.stderr.startswith("backupmx: serve --inetd: standard input is not a socket")
    assert proc.stderr.count("\n") == 1
    assert "inetd-failed" in log.read_text() and "standard input is not a socket" in log.read_text()


def test_inetd_logs_to_stderr_when_it_is_not_the_socket(tmp_path):
    """tcpserver: stdin and stdout are the client, stderr is svlogd's pipe."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, str(REPO / "backupmx.py"), "serve", "--inetd", "-c",
                             inetd_config(tmp_path, "stderr")], stdin=theirs, stdout=theirs,
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        assert read_line(ours).startswith(b"220 mx2.test")
        ours.sendall(b"EHLO c\r\n")  # EHLO ends a group (RFC 2920 3.1): the rest waits for its reply
        while not read_line(ours).startswith(b"250 "):
            pass
        ours.sendall(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@elsewhere.test>\r\nQUIT\r\n")
        replies_seen = b""
        while not replies_seen.endswith(b"closing connection\r\n"):
            chunk = ours.recv(4096)
            assert chunk, replies_seen
            replies_seen += chunk
        assert b"554 5.7.1" in replies_seen and b"reject" not in replies_seen  # only SMTP on the socket
        assert proc.wait(10) == 0
        err = proc.stderr.read()
    finally:
        proc.kill()
        ours.close()
    assert "reject client=" in err and "command=RCPT reason=relay_denied" in err, err
    assert re.search(r"disconnect client=\S+ ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4", err), err


# --- notify: one short mail per queueing period ---------------------------------------------------


def test_notify_is_told_once_when_a_domain_starts_queueing_and_once_when_its_mail_is_old(tmp_path):
    from backupmx.config import load_config
    from backupmx.lifecycle import BounceFailed, housekeeping

    path = tmp_path / "n.ini"
    path.write_text(f"[backupmx]\nhostname = mx2.test\nqueue = {tmp_path}/q.db\nbounce_relay = 127.0.0.1:10025\n"
                    "[domain:example.com]\nprimary = 127.0.0.1:2526\nnotify = postmaster@example.com\n"
                    "notify_age = 1h\n[domain:example.org]\nprimary = 127.0.0.1:2526\n")
    config = load_config(str(path))
    now = [float(NOW)]
    sent, failing = [], []

    def send(relay, to, message, *, hostname, timeout):
        if failing:
            raise BounceFailed("451 4.3.0 try later")
        sent.append((relay, to, message.decode()))

    def kinds():
        found = [re.search(r"Subject: backupmx: (.*)\r\n", m).group(1) for _, _, m in sent]
        sent.clear()
        return found

    with QueueStore(str(tmp_path / "q.db"), clock=lambda: now[0]) as store:
        def enqueue(domain):
            queue_id = store.new_queue_id()
            queue_one(store, queue_id, Envelope("a@b.test", [Recipient(f"x@{domain}", domain)]), b"x\r\n", 3,
                          client="192.0.2.1", helo="c")
            return queue_id

        first = enqueue("example.com")
        enqueue("example.org")  # no notify there
        failing.append(True)
        assert housekeeping(store, config, send=send)["notices"] == 0  # the relay is down: kept for later
        failing.clear()
        assert housekeeping(store, config, send=send)["notices"] == 1
        [(relay, to, message)] = sent
        assert relay == ("127.0.0.1", 10025) and to == "postmaster@example.com"
        assert "Auto-Submitted: auto-generated" in message and "To: <postmaster@example.com>" in message
        assert "waiting messages:   1 " in message and "last ETRN:          never" in message
        assert kinds() == ["mail for example.com is queueing on mx2.test"]
        housekeeping(store, config, send=send)
        assert kinds() == []  # once
        now[0] += 2 * 3600
        housekeeping(store, config, send=send)
        assert kinds() == ["mail for example.com has waited over 1h0m on mx2.test"]
        housekeeping(store, config, send=send)
        assert kinds() == []
        record_delivered(store, first, "example.com", ["x@example.com"], "250 ok")
        housekeeping(store, config, send=send)  # drained: the next queueing period is a new one
        enqueue("example.com")
        housekeeping(store, config, send=send)
        assert kinds() == ["mail for example.com is queueing on mx2.test"]
