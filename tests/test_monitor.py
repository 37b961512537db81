"""Monitoring mode (accept_when = primary-unreachable): a real server whose primary stand-in is
stopped and started again; the on-demand probe of a process without flush workers (serve
--inetd); one probe per interval across processes."""

import select
import smtplib
import sqlite3
import ssl
import time

from backupmx import replies
from backupmx.config import load_config
from backupmx.offload import Offload
from backupmx.prober import Monitor, probe
from backupmx.store import QueueStore
from conftest import wait_for
from sink import Sink
from test_verify import Client

PASSWORD = "s3cret"


def rcpt_reply(server, address):
    c = Client(server.port)
    try:
        c.ask("EHLO client.test")
        c.ask("MAIL FROM:<a@sender.test>")
        return c.ask(f"RCPT TO:<{address}>")
    finally:
        c.close()


def logged(server, line, count=1):
    return wait_for(lambda: server.log().count(line) >= count, 10)


def test_rcpt_is_refused_while_the_primary_is_up_and_accepted_while_it_is_down(server_factory, certs):
    up = replies.PRIMARY_IS_UP.render(address="bob@example.com").decode().rstrip("\r\n")
    primary = Sink().start()
    port = primary.port
    try:
        server = server_factory(tls=True, certs=certs, users={"prim": ("{PLAIN}" + PASSWORD, "example.com")},
                                domains={
                                    "example.com": {"primary": f"127.0.0.1:{port}", "primary_tls": "none",
                                                    "accept_when": "primary-unreachable",
                                                    "primary_probe_interval": "0.2s"},
                                    "example.org": {"primary": f"127.0.0.1:{port}", "primary_tls": "none"}})
        assert logged(server, "primary-up domain=example.com"), server.log()
        assert wait_for(lambda: rcpt_reply(server, "bob@example.com") == up, 5)
        assert rcpt_reply(server, "bob@example.org") == "250 2.1.5 Ok"  # not monitored
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:  # the primary itself, say
            client.starttls(context=ssl.create_default_context(cafile=certs["ca"]))
            client.login("prim", PASSWORD)
            client.mail("a@sender.test")
            assert client.rcpt("bob@example.com") == (250, b"2.1.5 Ok")
        db = sqlite3.connect(server.queue_path)
        assert db.execute("SELECT up, reply FROM primary_status WHERE domain = 'example.com'").fetchone() == (
            1, "220 primary.test ESMTP sink")
        db.close()

        primary.stop()
        assert logged(server, "primary-down domain=example.com"), server.log()
        assert wait_for(lambda: rcpt_reply(server, "bob@example.com") == "250 2.1.5 Ok", 5)

        primary = Sink(port=port).start()
        assert logged(server, "primary-up domain=example.com", 2), server.log()
        assert wait_for(lambda: rcpt_reply(server, "bob@example.com") == up, 5)
        # (written at the end of the worker's round, after the reply: waited for)
        assert logged(server, "reject client=127.0.0.1 command=RCPT reason=primary_is_up"), server.log()
        assert server.log().count("primary-down domain=example.com") == 1  # each change logged once
    finally:
        primary.stop()


def pump(offload, timeout=10):
    """Run the loop's side of finished Offload calls, as SessionLoop.answer_offloaded does."""
    assert select.select([offload], [], [], timeout)[0]
    for owner, then, future in offload.completed():
        then(future)


def test_a_process_without_flush_workers_probes_on_demand(tmp_path):
    """serve --inetd: no watch runs; the session's own Monitor probes, and RCPT never waits for it."""
    with Sink() as primary:
        path = tmp_path / "c.ini"
        path.write_text(f"[backupmx]\nqueue = {tmp_path}/q.db\n[domain:example.com]\nprimary = 127.0.0.1:{primary.port}\n"
                        "accept_when = primary-unreachable\nprimary_probe_interval = 60s\n")
        config = load_config(path)
        domain = config.domains["example.com"]
        now = [time.time()]
        offload = Offload(1)
        try:
            with QueueStore(config.queue) as store:
                monitor = Monitor(config, store, offload, logger_for_tests(), clock=lambda: now[0])
                assert monitor.primary_up(domain) is False  # nothing known yet: accepted, and a probe starts
                pump(offload)
                assert monitor.primary_up(domain) is True
                primary.stop()
                now[0] += 60  # one interval on: still the watch's business (there is none here)
                assert monitor.primary_up(domain) is True and not offload.completed()
                now[0] += 60  # two intervals old: this process probes itself
                assert monitor.primary_up(domain) is True  # the old state, while the probe runs
                pump(offload)
                assert monitor.primary_up(domain) is False
        finally:
            offload.close()


def logger_for_tests():
    import logging

    return logging.getLogger("test-monitor")


def test_one_probe_per_interval_across_processes(tmp_path):
    path = tmp_path / "c.ini"
    path.write_text(f"[backupmx]\nqueue = {tmp_path}/q.db\n[domain:example.com]\nprimary = 127.0.0.1:1\n"
                    "accept_when = primary-unreachable\nprimary_probe_interval = 60s\n")
    config = load_config(path)
    domain = config.domains["example.com"]
    clock = [1_000_000.0]
    with QueueStore(config.queue, clock=lambda: clock[0]) as one, QueueStore(config.queue,
                                                                               clock=lambda: clock[0]) as two:
        assert one.claim_probe("example.com", 60, 30) and not two.claim_probe("example.com", 60, 30)
        assert one.record_probe("example.com", False, "refused") is None
        clock[0] += 59
        assert not probe(two, domain, config, logger_for_tests())  # not due
        clock[0] += 1
        assert probe(two, domain, config, logger_for_tests())
        state = one.primary_state("example.com")
        assert (state.up, state.checked_at, state.changed_at) == (False, 1_000_060, 1_000_000)
