"""The real client passed on: Received: with the client's verified name, TLS and RFC 3848
protocol; XFORWARD to a primary that offers it (Postfix's XFORWARD_README)."""

import logging
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from backupmx.client_dns import (FACTS_SECONDS, UNKNOWN, ClientDNS, SystemResolver, TemporaryLookupError,
                                 verified_name)
from backupmx.offload import Offload
from backupmx.trace_header import received_header
from backupmx.smtpclient import xforward_commands, xtext
from conftest import REPO
from sink import Sink


def test_the_primary_sees_the_original_client(server_factory, certs):
    expected_name = verified_name(SystemResolver(), "127.0.0.1")  # "localhost" where /etc/hosts says so
    with Sink() as primary:
        primary.xforward = True
        server = server_factory(tls=True, certs=certs, domains={
            "example.com": {"primary": f"127.0.0.1:{primary.port}", "primary_tls": "none"}})
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
            client.starttls(context=ssl.create_default_context(cafile=certs["ca"]))
            client.ehlo("client.test")
            client.sendmail("a@sender.test", ["bob@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
        db = sqlite3.connect(server.queue_path)
        [(queue_id, client_ip, name, helo, protocol)] = db.execute(
            "SELECT queue_id, client, client_name, helo, protocol FROM messages").fetchall()
        db.close()
        assert (client_ip, name, helo, protocol) == ("127.0.0.1", expected_name, "client.test", "ESMTPS")

        flush = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "flush", "example.com",
                                "-c", server.config_path], capture_output=True, text=True, timeout=30)
        assert flush.returncode == 0, flush.stderr
        primary.wait_for(1, timeout=15)
        delivery = primary.deliveries[0]
    assert delivery.xforward == {"NAME": expected_name, "ADDR": "127.0.0.1", "PROTO": "ESMTPS",
                                 "HELO": "client.test", "IDENT": queue_id, "SOURCE": "REMOTE"}
    received = delivery.body.split(b"\r\n\t;", 1)[0].split(b"\r\n\tfor", 1)[0].decode()
    assert received.startswith(f"Received: from client.test ({expected_name} [127.0.0.1])\r\n"
                               f"\tby mx2.test (backupmx) with ESMTPS id {queue_id}\r\n\t(using TLSv1.")
    assert " with cipher " in received and received.endswith(" bits))")


def test_xforward_lines_are_xtext_within_512_octets_and_only_what_is_offered():
    lines = xforward_commands("NAME ADDR PROTO HELO", {
        "NAME": "n" * 200, "ADDR": "IPV6:2001:db8::1", "PROTO": "ESMTPSA", "HELO": "a=b+c d\u00e9" + "x" * 600,
        "IDENT": "Q1"})
    assert lines[0] == f"XFORWARD NAME={'n' * 200} ADDR=IPV6:2001:db8::1 PROTO=ESMTPSA"
    assert lines[1].startswith("XFORWARD HELO=a+3Db+2Bc+20d+C3+A9xxx") and len(lines) == 2
    assert len(lines[1]) == len("XFORWARD HELO=") + 255
    assert xforward_commands("NAME", {"NAME": None}) == ["XFORWARD NAME=[UNAVAILABLE]"]
    assert all(len(line) + 2 <= 512 and line.isascii() for line in lines)
    assert xtext("[UNAVAILABLE]") == "[UNAVAILABLE]" and xtext("a\r\nb") == "a+0D+0Ab"
    assert xforward_commands("ADDR", {"NAME": "n", "IDENT": "Q"}) == []


class TableResolver:
    """Answers from dicts: a resolver for tests (client_dns's seam)."""

    def __init__(self, names=None, addresses=None):
        self._names, self._addresses = names or {}, addresses or {}

    def names(self, address):
        return self._names.get(address, [])

    def addresses(self, name, family=0):
        return self._addresses.get(name, [])


@pytest.mark.parametrize("names,addresses,expected", [
    ({"192.0.2.7": ["mx.sender.test."]}, {"mx.sender.test": ["192.0.2.7"]}, "mx.sender.test"),
    ({"192.0.2.7": ["Forged.Example."]}, {"forged.example": ["198.51.100.1"]}, UNKNOWN),  # not confirmed
    ({"192.0.2.7": ["evil\r\nX: 1", "ok.test"]}, {"evil\r\nX: 1": ["192.0.2.7"], "ok.test": ["192.0.2.7"]},
     "ok.test"),  # a PTR that is no host name is skipped
    ({}, {}, UNKNOWN),
    ({"2001:db8::7": ["v6.test"]}, {"v6.test": ["2001:DB8:0::7"]}, "v6.test"),
], ids=["confirmed", "not-confirmed", "hostile-ptr", "no-ptr", "ipv6"])
def test_the_client_name_is_forward_confirmed(names, addresses, expected):
    address = next(iter(names), "192.0.2.7")
    assert verified_name(TableResolver(names, addresses), address) == expected


def test_received_shows_the_name_before_the_address():
    header = received_header(helo="mx.sender.test", client_ip="192.0.2.7", hostname="mx2.test", queue_id="Q1",
                             esmtp=True, tls=None, authenticated=True, recipients=["a@example.com"], timestamp=0,
                             client_name="mx.sender.test").decode()
    assert header.startswith("Received: from mx.sender.test (mx.sender.test [192.0.2.7])\r\n"
                             "\tby mx2.test (backupmx) with ESMTPA id Q1\r\n")


class CountingResolver(TableResolver):
    """Counts the questions it is asked."""

    def __init__(self, *args):
        super().__init__(*args)
        self.asked = 0

    def names(self, address):
        self.asked += 1
        return super().names(address)

    def addresses(self, name, family=0):
        self.asked += 1
        return super().addresses(name, family)


def test_a_worker_reuses_a_client_s_facts_for_a_minute():
    """The next connections of a sender cost no lookup (client_dns.FACTS_SECONDS); a failed one is not kept."""
    clock = [1000.0]
    offload = Offload(1)
    resolver = CountingResolver({"192.0.2.7": ["mx.sender.test"]}, {"mx.sender.test": ["192.0.2.7"]})
    dns = ClientDNS(SimpleNamespace(dnsbl=("bl.test",)), offload, logging.getLogger("test-xforward"), resolver,
                    clock=lambda: clock[0])

    def connect(address="192.0.2.7"):
        facts = dns.look_up(object(), address)
        deadline = time.monotonic() + 10
        while not facts.done and time.monotonic() < deadline:  # the loop's part: answers come back
            for _, then, future in offload.completed():
                then(future)
            time.sleep(0.001)
        return facts

    try:
        assert connect().name == "mx.sender.test" and resolver.asked == 3  # PTR, its A/AAAA, the list
        clock[0] += FACTS_SECONDS - 1
        assert connect().name == "mx.sender.test" and resolver.asked == 3
        clock[0] += 2
        assert connect().name == "mx.sender.test" and resolver.asked == 6
        resolver.addresses = lambda name, family=0: (_ for _ in ()).throw(TemporaryLookupError("SERVFAIL"))
        connect("192.0.2.8")
        connect("192.0.2.8")
        assert resolver.asked == 8  # the failed lookup was asked again: nothing kept
    finally:
        offload.close()
