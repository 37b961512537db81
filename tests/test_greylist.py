"""Greylisting: a real server with a one-second delay, the triples read back with sqlite3; the rules
(judge, the key's normalisation, exemptions, the per-network bound, expiry) on a real queue."""

import shutil
import sqlite3
import subprocess
import time

import pytest

from backupmx import replies
from backupmx.config import load_config
from backupmx.greylist import Greylisting, judge, normalize_sender, triple_of
from backupmx.offload import Offload
from backupmx.store import GreylistEntry, QueueStore
from backupmx.store_greylist import LOOKUP, REMEMBER_PASSED
from conftest import REPO
from test_verify import Client

FILTER = REPO / "contrib" / "fail2ban" / "filter.d" / "backupmx.conf"


def rows(server):
    db = sqlite3.connect(server.queue_path)
    try:
        return db.execute("SELECT client, sender, recipient, passed IS NOT NULL FROM greylist ORDER BY 3").fetchall()
    finally:
        db.close()


def test_a_retry_after_the_delay_passes_and_is_remembered(server_factory, tmp_path):
    server = server_factory(greylist="0.5s", greylist_expire="1h")
    c = Client(server.port)
    c.ask("EHLO client.test")
    c.ask("MAIL FROM:<Bounce-4711@Sender.test>")
    first = time.monotonic()
    assert c.ask("RCPT TO:<bob@example.com>") == replies.GREYLISTED.render(
        address="bob@example.com", seconds=1).decode().rstrip("\r\n")
    assert c.ask("RCPT TO:<bob@example.com>").startswith("450 4.7.1 <bob@example.com>: Recipient address rejected: "
                                                          "Greylisted")
    passed = None
    while passed is None and time.monotonic() - first < 10:  # the retry a real server makes, sooner
        reply = c.ask("RCPT TO:<bob@example.com>")
        if reply.startswith("250"):
            passed = time.monotonic() - first
        else:
            assert reply.startswith("450 4.7.1") and time.monotonic() - first < 2.0, reply
            time.sleep(0.05)
    assert passed is not None and passed >= 0.5
    assert c.ask("DATA").startswith("354")
    c.send("Subject: greylisted once", "", "hi", ".")
    assert c.reply().startswith("250 2.0.0 Ok: queued as")
    # A later message of the same sender (another VERP number) passes at once; a new recipient waits.
    c.ask("MAIL FROM:<bounce-4712@sender.test>")
    assert c.ask("RCPT TO:<bob@example.com>") == "250 2.1.5 Ok"
    assert c.ask("RCPT TO:<carol@example.com>").startswith("450 4.7.1")
    c.close()
    wanted = [("127.0.0.0/24", "bounce-#@sender.test", "bob@example.com", 1),
              ("127.0.0.0/24", "bounce-#@sender.test", "carol@example.com", 0)]
    deadline = time.monotonic() + 5
    while rows(server) != wanted and time.monotonic() < deadline:  # written off the loop
        time.sleep(0.05)
    assert rows(server) == wanted
    log = server.log()
    assert "reject client=127.0.0.1 command=RCPT reason=greylisted" in log
    assert "greylist-passed client=127.0.0.1 from=<Bounce-4711@Sender.test> to=<bob@example.com>" in log
    # fail2ban: the greylist jail's mode counts these lines, the main jail does not.
    lines = [line.split(": ", 1)[1] for line in log.splitlines() if " reject " in line]
    assert lines and [banned(line, "greylist") for line in lines] == [["127.0.0.1"]] * len(lines)
    assert [banned(line, "normal") for line in lines] == [[]] * len(lines)
    if shutil.which("fail2ban-regex"):  # the real thing, as the backupmx-greylist jail reads a log file
        dated = tmp_path / "mail.log"
        dated.write_text("".join(f"2026-12-04 10:00:00,000 backupmx[77]: {line}\n" for line in lines))
        result = subprocess.run(["fail2ban-regex", "-o", "ip", str(dated), f"{FILTER}[mode=greylist]"],
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.split() == ["127.0.0.1"] * len(lines), result.stdout + result.stderr


def banned(line, mode):
    """The hosts the fail2ban filter in `mode` takes from one of our log lines (as a log file shows it)."""
    from test_observe import failregexes

    form = f"backupmx[77]: {line}"
    return [m.group("host") for m in (r.search(form) for r in failregexes(mode)) if m]


@pytest.mark.parametrize("entry,now,expected", [
    (None, 100, (True, "first")),
    (GreylistEntry(100, None, 100), 160, (True, None)),  # too early (first_seen is rounded down): not restarted
    (GreylistEntry(100, None, 100), 161, (False, "seen")),  # in time
    (GreylistEntry(100, None, 100), 100 + 3601, (True, "first")),  # too late: a new first attempt
    (GreylistEntry(100, 160, 160), 5000, (False, None)),  # passed before
    (GreylistEntry(100, 160, 160), 160 + 86400, (False, "seen")),  # passed, last seen a day ago: refreshed
], ids=["new", "too-early", "in-time", "expired", "passed", "refresh"])
def test_judge(entry, now, expected):
    assert judge(entry, now, delay=60, expire=3600) == expected


@pytest.mark.parametrize("sender,key", [
    ("Alice@Example.COM", "alice@example.com"),
    ("bounce-123-456@lists.test", "bounce-#-#@lists.test"),
    ("prvs=1234abcdef=alice@example.com", "alice@example.com"),
    ("SRS0=HHH=TT=origin.test=alice@forwarder.test", "srs@forwarder.test"),
    ("", ""),
])
def test_the_sender_key_forgives_what_changes_between_retries(sender, key):
    assert normalize_sender(sender) == key


def test_keys_exemptions_and_the_bound_per_network(tmp_path):
    path = tmp_path / "c.ini"
    path.write_text(f"[backupmx]\nqueue = {tmp_path}/q.db\ngreylist = 5m\n"
                    "greylist_exempt = 192.0.2.0/24, 2001:db8::/32\n[domain:example.com]\nprimary = 127.0.0.1:25\n")
    config = load_config(path)
    assert triple_of("::ffff:198.51.100.9", "a@b", "X@Example.com").client == "198.51.100.0/24"
    assert triple_of("2001:db8:1:2:3::4", "a@b", "x@example.com").client == "2001:db8:1:2::/64"
    clock = [1_000_000.0]
    offload = Offload(1)
    try:
        with QueueStore(config.queue, clock=lambda: clock[0]) as store:
            greylisting = Greylisting(config, store, offload, None)
            assert greylisting.exempt("192.0.2.200", False) and greylisting.exempt("2001:db8:ffff::1", False)
            assert greylisting.exempt("198.51.100.1", True) and not greylisting.exempt("198.51.100.1", False)
            assert [store.greylist_first_attempt(triple_of("198.51.100.7", f"s{n}x@spam.test", "bob@example.com"),
                                                 3600, 3) for n in "abcd"] == [True, True, True, False]
            plan = " ".join(r[-1] for r in store.connection.execute("EXPLAIN QUERY PLAN " + LOOKUP, ("a", "b", "c")))
            assert plan == "SEARCH greylist USING PRIMARY KEY (client=? AND sender=? AND recipient=?)"
            store.greylist_seen(triple_of("198.51.100.7", "sax@spam.test", "bob@example.com"))
            clock[0] += 3601  # the waiting ones expire; the passed one stays
            assert store.purge_greylist(3600) == 2
            clock[0] += REMEMBER_PASSED
            assert store.purge_greylist(3600) == 1
    finally:
        offload.close()


def test_greylist_must_be_shorter_than_its_expiry(tmp_path):
    from backupmx.config import ConfigError

    path = tmp_path / "c.ini"
    path.write_text("[backupmx]\ngreylist = 2d\n[domain:example.com]\nprimary = 127.0.0.1:25\n")
    with pytest.raises(ConfigError, match=r"\[backupmx\] greylist: must be shorter than greylist_expire"):
        load_config(path)
    path.write_text("[backupmx]\ngreylist_exempt = 192.0.2.1/24\n[domain:example.com]\nprimary = 127.0.0.1:25\n")
    with pytest.raises(ConfigError, match=r"greylist_exempt: bad network '192.0.2.1/24'"):
        load_config(path)
