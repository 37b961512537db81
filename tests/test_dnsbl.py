"""DNSBL (RFC 5782): real sockets into a worker's real session loop, whose ConnectionContext is
given a resolver that answers from a table (the one seam: ConnectionContext's `resolver`).

How to try a zone with the real resolver is in the README ("DNS blocklists"): every
list answers 127.0.0.2 for the test entry 2.0.0.127.<zone> (RFC 5782 5).
"""

import logging
import socket
import threading
import time

import pytest

from backupmx import client_dns, replies
from backupmx.client_dns import dnsbl_query
from backupmx.config import load_config
from backupmx.connection_context import ConnectionContext
from backupmx.worker import SessionLoop
from test_lifecycle import Lines
from test_verify import Client
from test_xforward import TableResolver


def config(tmp_path, **keys):
    path = tmp_path / "c.ini"
    path.write_text("\n".join(["[backupmx]", "hostname = mx2.test", f"queue = {tmp_path}/q.db",
                               *(f"{k} = {v}" for k, v in keys.items()),
                               "[domain:example.com]", "primary = 127.0.0.1:25", "primary_tls = none"]) + "\n")
    return load_config(path)


class OneSession:
    """A client connected to a worker's session loop (in a thread), the loop's log lines kept."""

    def __init__(self, cfg, resolver, host="127.0.0.1"):
        self.log = Lines()
        logger = logging.getLogger(f"test-dnsbl-{id(self)}")
        logger.addHandler(self.log)
        logger.setLevel(logging.INFO)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as listener:
            listener.bind((host, 0))
            listener.listen(1)
            client = threading.Thread(target=lambda: setattr(self, "client", Client(listener.getsockname()[1],
                                                                                     host=host)))
            client.start()
            sock, peer = listener.accept()
        self.context = ConnectionContext(config=cfg, ssl_context=None, logger=logger, resolver=resolver)
        self.loop = SessionLoop(None, self.context, logger)
        self.loop.add_session(sock, peer, implicit_tls=False)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()
        client.join(10)

    def rcpt(self):
        self.client.ask("EHLO client.test")
        self.client.ask("MAIL FROM:<a@sender.test>")
        return self.client.ask("RCPT TO:<bob@example.com>")

    def close(self):
        self.client.ask("QUIT")
        self.client.close()
        self.thread.join(10)
        self.context.close()


LISTED = {"1.0.0.127.bl.test": ["127.0.0.2"], "1.0.0.127.second.test": ["127.0.0.4"]}


@pytest.mark.parametrize("action,reply", [
    ("reject", replies.CLIENT_BLOCKLISTED),
    ("tempfail", replies.CLIENT_BLOCKLISTED_TEMPFAIL),
])
def test_a_listed_client_is_refused_at_rcpt(tmp_path, action, reply):
    session = OneSession(config(tmp_path, dnsbl="clean.test, bl.test, second.test", dnsbl_action=action),
                         TableResolver(addresses=LISTED))
    try:
        assert session.rcpt() == reply.render(client="127.0.0.1", zone="bl.test").decode().rstrip("\r\n")
    finally:
        session.close()
    assert "dnsbl-listed client=127.0.0.1 zone=bl.test answer=127.0.0.2" in session.log.lines
    assert "dnsbl-listed client=127.0.0.1 zone=second.test answer=127.0.0.4" in session.log.lines
    # fail2ban's main jail counts a rejection, not a tempfail (the operator did not trust the list that far).
    from test_greylist import banned

    [reject] = [line for line in session.log.lines if line.startswith("reject ")]
    assert reject.startswith(f"reject client=127.0.0.1 command=RCPT reason={replies.reason(reply)} ")
    assert banned(reject, "normal") == (["127.0.0.1"] if action == "reject" else [])


def test_answers_that_list_nobody(tmp_path):
    """An unlisted client, a list refusing our resolver (127.255.255.254), a resolver that makes up answers."""
    answers = {"1.0.0.127.refuses.test": ["127.255.255.254"], "1.0.0.127.hijacked.test": ["198.51.100.1"]}
    session = OneSession(config(tmp_path, dnsbl="clean.test, refuses.test, hijacked.test"),
                         TableResolver(addresses=answers))
    try:
        assert session.rcpt() == "250 2.1.5 Ok"
    finally:
        session.close()
    errors = [line for line in session.log.lines if line.startswith("dnsbl-error")]
    assert sorted(errors) == [
        'dnsbl-error client=127.0.0.1 zone=hijacked.test answer=198.51.100.1 reason="not a 127.0.0.0/8 answer"',
        'dnsbl-error client=127.0.0.1 zone=refuses.test answer=127.255.255.254 reason="the list refused the query"']


class Stuck(TableResolver):
    """A resolver that never answers for the blocklist (until the test ends)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def addresses(self, name, family=0):
        if name.endswith(".slow.test"):
            self.release.wait(10)
        return super().addresses(name, family)


def test_a_resolver_that_hangs_is_given_up_and_the_mail_goes_on(tmp_path, monkeypatch):
    # The wait runs from the connection on: timed from before it (timed from after the session was
    # set up, in threads, a loaded machine saw less than the wait); 0.3 s leaves the bound more room.
    monkeypatch.setattr(client_dns, "LOOKUP_WAIT", 0.3)
    resolver = Stuck()
    started = time.monotonic()
    session = OneSession(config(tmp_path, dnsbl="slow.test"), resolver)
    try:
        assert session.rcpt() == "250 2.1.5 Ok"
        assert 0.3 <= time.monotonic() - started < 0.9  # at its deadline, not at the loop's next 1 s tick
    finally:
        resolver.release.set()
        session.close()
    assert "lookup-timeout client=127.0.0.1 seconds=0.3" in session.log.lines


def test_ipv6_clients_are_looked_up_by_reversed_nibbles(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")
    query = "1" + ".0" * 31 + ".bl.test"
    assert dnsbl_query("::1", "bl.test") == query
    assert dnsbl_query("2001:db8::7", "z.test").startswith("7.0.0.0.") and dnsbl_query(
        "2001:db8::7", "z.test").endswith(".8.b.d.0.1.0.0.2.z.test")
    session = OneSession(config(tmp_path, dnsbl="bl.test"), TableResolver(addresses={query: ["127.0.0.2"]}),
                         host="::1")
    try:
        assert session.rcpt().startswith("554 5.7.1 Service unavailable; client [::1] blocked using bl.test")
    finally:
        session.close()
