"""recipients = verify: callouts to a real primary stand-in (tests/sink.py) that knows its users.

Real server processes, real sockets, the cache read back with sqlite3 and
`backupmx verify`. The primary is stopped to show what a backup MX does when
it cannot ask.
"""

import select
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from backupmx import replies
from backupmx.store import QueueStore
from conftest import REPO, read_line
from sink import Sink

USERS = {"alice@example.com", "dave@example.com", "alice@example.org", "erin@example.com"}


def domains(primary_port, **extra):
    """example.com verifies (accept when unreachable), example.org too (tempfail), example.net takes anyone."""
    primary = f"127.0.0.1:{primary_port}"
    return {
        "example.com": {"primary": primary, "primary_tls": "none", "recipients": "verify", **extra},
        "example.org": {"primary": primary, "primary_tls": "none", "recipients": "verify",
                        "verify_unreachable": "tempfail"},
        "example.net": {"primary": primary, "primary_tls": "none"},
    }


class Client:
    """A raw SMTP client: send lines when we like, read replies when we like."""

    def __init__(self, port, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=10)
        assert read_line(self.sock).startswith(b"220")

    def send(self, *lines):
        self.sock.sendall(b"".join(line.encode() + b"\r\n" for line in lines))

    def reply(self, timeout=10):
        """One whole reply (its last line)."""
        while True:
            line = read_line(self.sock, timeout).decode()
            if line[3:4] != "-":
                return line.rstrip("\r\n")

    def ask(self, line):
        self.send(line)
        return self.reply()

    def close(self):
        self.sock.close()


def cli(server, *args):
    return subprocess.run([sys.executable, str(REPO / "backupmx.py"), *args, "-c", server.config_path],
                          capture_output=True, text=True, timeout=30)


def cache(server):
    db = sqlite3.connect(server.queue_path)
    try:
        return {address: (result, expires - checked) for address, result, checked, expires in
                db.execute("SELECT address, result, checked, expires FROM verify_cache")}
    finally:
        db.close()


def test_callouts_accept_refuse_cache_and_decide_while_the_primary_is_down(server_factory):
    with Sink() as primary:
        primary.valid_users = USERS
        primary.behaviour, primary.behaviour_addresses = "rcpt_4xx", ["dave@example.com"]
        server = server_factory(domains=domains(primary.port))
        c = Client(server.port)
        c.ask("EHLO client.test")
        assert c.ask("MAIL FROM:<sender@client.test>").startswith("250")
        assert c.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok"
        refused = c.ask("RCPT TO:<bob@example.com>")
        assert refused.startswith("550 5.1.1 <bob@example.com>: Recipient address rejected: undeliverable address: "
                                  "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown")
        assert c.ask("RCPT TO:<dave@example.com>").startswith(
            "450 4.1.1 <dave@example.com>: Recipient address rejected: unverified address: 450 4.2.0")
        assert c.ask("RCPT TO:<ALICE@example.com>") == "250 2.1.5 Ok"  # cached: no callout
        # One connection served every callout; each ended with RSET.
        assert primary.rcpts_seen == ["alice@example.com", "bob@example.com", "dave@example.com"]
        assert len(primary.sessions) == 1
        assert primary.sessions[0].commands.count("MAIL FROM:<>") == 3
        assert primary.sessions[0].commands.count("RSET") == 3
        # The cache, as sqlite3 shows it: 2xx for 30 days, 5xx for 3 hours, 4xx not at all.
        assert cache(server) == {"alice@example.com": ("accepted", 30 * 86400),
                                 "bob@example.com": ("refused", 3 * 3600)}

    # The primary is gone: cached answers still decide; unknown addresses follow verify_unreachable.
    assert c.ask("RCPT TO:<alice@example.com>") == "250 2.1.5 Ok"
    assert c.ask("RCPT TO:<bob@example.com>").startswith("550 5.1.1")
    assert c.ask("RCPT TO:<carol@example.com>") == "250 2.1.5 Ok"
    assert c.ask("RCPT TO:<carol@example.org>") == replies.VERIFY_UNREACHABLE.render(
        address="carol@example.org").decode().rstrip("\r\n")
    assert c.ask("DATA").startswith("354")
    c.send("Subject: t", "", "hello", ".")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    c.close()
    assert "verify domain=example.org to=<carol@example.org> result=unreachable" in server.log()
    # fail2ban's recipient jail counts an address the primary refused (a dictionary attack), not a 4xx;
    # the main jail counts none of them (a mailing list with stale addresses draws them too).
    from test_greylist import banned

    rejects = [line.split(": ", 1)[1] for line in server.log().splitlines() if " reject " in line]
    assert {line.split(" reason=")[1].split()[0]: banned(line, "recipients") for line in rejects} == {
        "recipient_undeliverable": ["127.0.0.1"], "recipient_unverified": [], "verify_unreachable": []}
    assert not any(banned(line, "normal") for line in rejects)

    listed = cli(server, "verify", "list", "example.com")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["alice@example.com", "accepted"], ["bob@example.com", "refused"]]
    assert 'reply="550 5.1.1 <bob@example.com>' in lines[1]
    flushed = cli(server, "verify", "flush", "Bob@Example.COM")
    assert (flushed.returncode, flushed.stdout.strip()) == (0, "verify flush: Bob@Example.COM: 1 answer(s) forgotten")
    assert set(cache(server)) == {"alice@example.com"}


def test_a_slow_callout_holds_up_neither_the_worker_nor_a_second_callout(server_factory):
    """workers = 1: while the primary takes 1.2 s over one callout, another client's whole
    transaction is queued at once; two sessions asking for one address make one callout."""
    with Sink() as primary:
        primary.valid_users = USERS
        primary.rcpt_delay = 1.2
        server = server_factory(domains=domains(primary.port), workers=1)
        waiting = [Client(server.port), Client(server.port)]
        asked = time.monotonic()  # before the callout's RCPT: its answer comes rcpt_delay after that at the least
        for c in waiting:
            assert c.ask("EHLO a.test").startswith("250")  # EHLO ends a group (RFC 2920 3.1): it is waited for
            c.send("MAIL FROM:<a@a.test>", "RCPT TO:<erin@example.com>")
            assert c.reply().startswith("250")  # MAIL
        primary.wait(lambda: primary.rcpts_seen == ["erin@example.com"])

        other = Client(server.port)
        assert other.ask("EHLO b.test").startswith("250")
        other.send("MAIL FROM:<b@b.test>", "RCPT TO:<anyone@example.net>", "DATA")
        assert [other.reply() for _ in range(3)][1:] == ["250 2.1.5 Ok", replies.START_DATA.render().decode().strip()]
        other.send("Subject: t", "", "hi", ".")
        assert other.reply().startswith("250 2.0.0 Ok: queued as")
        # Queued while the callout still waits: had the worker waited for it, the waiting sessions'
        # answers would have come first (an order, where a 0.6 s bound raced a loaded machine).
        assert not select.select([c.sock for c in waiting], [], [], 0)[0], "the callout's answer came first"
        for c in waiting:
            assert c.reply(timeout=10) == "250 2.1.5 Ok"
        slow = time.monotonic() - asked
        assert slow >= primary.rcpt_delay, slow  # the callout's answer, not one made up before it
        assert primary.rcpts_seen == ["erin@example.com"]  # one callout for both sessions
        for c in waiting + [other]:
            c.close()


def test_the_cache_lookup_is_one_primary_key_search(tmp_path):
    from backupmx.store_verify import LOOKUP

    with QueueStore(str(tmp_path / "q.db")) as store:
        plan = " ".join(row[-1] for row in store.connection.execute("EXPLAIN QUERY PLAN " + LOOKUP, ("a@b",)))
        store.record_verify("a@example.com", "example.com", "accepted", "250 ok", 60)
        assert store.verify_answer("a@example.com").result == "accepted"
    assert plan == "SEARCH verify_cache USING PRIMARY KEY (address=?)"


def test_an_older_queue_gets_the_cache_table(tmp_path):
    path = str(tmp_path / "q.db")
    QueueStore(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE verify_cache")
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    with QueueStore(path) as store:
        assert store.connection.execute("PRAGMA user_version").fetchone()[0] >= 4
        store.record_verify("a@example.com", "example.com", "refused", "550 no", 60)
        assert store.flush_verify("example.com") == 1


@pytest.mark.parametrize("hostile", ["550 " + "x" * 600, "550 5.1.1 caf\u00e9 \u202e\x07 <a@b>"],
                         ids=["long", "unprintable"])
def test_the_primary_reply_we_quote_is_bounded_and_clean(hostile):
    from backupmx.verify import _judge_answer

    reply, fields = _judge_answer("refused", hostile)
    line = reply.render(address="bob@example.com", **fields)
    assert len(line) <= 512 and line.endswith(b"\r\n") and line[:-2].isascii()
    assert all(32 <= byte < 127 for byte in line[:-2])


def test_config_recipients_verify_and_its_keys(tmp_path):
    from backupmx.config import ConfigError, load_config

    def load(**keys):
        lines = ["[backupmx]", f"queue = {tmp_path}/q.db", "[domain:example.com]", "primary = 127.0.0.1:2525"]
        path = tmp_path / "c.ini"
        path.write_text("\n".join(lines + [f"{k} = {v}" for k, v in keys.items()]) + "\n")
        return load_config(path)

    domain = load(recipients="Verify", verify_negative_ttl="10m").domains["example.com"]
    assert (domain.verify, domain.recipients, domain.verify_negative_ttl, domain.verify_positive_ttl,
            domain.verify_unreachable) == (True, None, 600, 30 * 86400, "accept")
    assert domain.accepts("anyone@example.com")
    assert not load(recipients="verify@example.com").domains["example.com"].accepts("bob@example.com")
    assert any("verify_unreachable: only used with recipients = verify" in w
               for w in load(verify_unreachable="tempfail").warnings)
    with pytest.raises(ConfigError, match=r"\[domain:example.com\] verify_unreachable: must be one of accept, tempfail"):
        load(recipients="verify", verify_unreachable="maybe")


def test_kept_connections_are_bounded_in_use_and_in_idle_time():
    from backupmx.config import DomainConfig
    from backupmx.smtpclient import Primary
    from backupmx.verify import IDLE_SECONDS, MAX_CALLOUTS_PER_CONNECTION, Connections, callout

    with Sink() as primary:
        domain = DomainConfig(name="example.com", primary=("127.0.0.1", primary.port), primary_tls="none",
                              recipients=None, primary_ca=None, max_queue_messages=None, max_queue_bytes=None,
                              queue_lifetime=86400.0, retry_interval=0.0, verify=True)
        now = [0.0]
        connections = Connections(Primary(domain, hostname="mx2.test", timeout=10, log=None), clock=lambda: now[0])
        for n in range(MAX_CALLOUTS_PER_CONNECTION + 1):
            assert callout(connections, f"u{n}@example.com").kind == "accepted"
        first = primary.sessions[0].commands  # EHLO, MAIL/RCPT/RSET per callout, QUIT at the bound
        assert len(primary.sessions) == 2 and len(first) == 1 + 3 * MAX_CALLOUTS_PER_CONNECTION + 1
        assert first[-1].upper() == "QUIT"
        now[0] += IDLE_SECONDS - 1
        assert connections.idle_too_long() == []
        now[0] += 1
        [idle] = connections.idle_too_long()
        connections.give_back(idle, 1)  # kept once more ...
    with Sink(port=primary.port) as again:  # ... while the primary restarted: the callout goes on a new one
        assert callout(connections, "late@example.com").kind == "accepted"
        assert again.rcpts_seen == ["late@example.com"] and len(again.sessions) == 1
        connections.close()
