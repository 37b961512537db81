"""`greylist = DURATION`: a (client network, sender, recipient) we have not seen must try again.

Spam engines rarely retry; real mail servers always do (RFC 5321 4.5.4.1).
The first attempt of a triple gets 450 4.7.1; a retry once `greylist` has
passed, and within `greylist_expire`, is let through, and so is the triple
for REMEMBER_PASSED after it was last seen (Postgrey's rules). Triples live
in the queue database (store_greylist), shared by every worker.

What must hold:

- The look-up at RCPT is one primary-key search on the loop's connection;
  what it decided (a first attempt, a pass) is written on the "greylist"
  lane's thread with its own connection, so RCPT never waits for the
  write lock or an fsync.
- A client rotating senders creates at most MAX_WAITING_PER_NETWORK waiting
  rows per network; beyond, its new triples get 450 all the same and are not
  recorded (logged once per network per GREYLIST_FULL_LOG seconds). Housekeeping
  expires the rest (lifecycle).
- The key forgives what changes between a real server's retries: any address
  of the client's /24 (IPv6: /64), VERP digits, BATV and SRS tags in the sender.
- Authenticated sessions and `greylist_exempt` networks are never greylisted;
  a queue that cannot be read now lets the recipient through (the backup
  MX's job is to take mail, and nothing is lost by it).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable

from backupmx import replies
from backupmx.clients import network_of, shown_address
from backupmx.config import tuning
from backupmx.log import log_event
from backupmx.offload import Offload, PerThread
from backupmx.store import Greylist, GreylistEntry, QueueUnavailable, Triple
from backupmx.verify import Refusal

LANE = "greylist"
MAX_WAITING_PER_NETWORK = tuning("BACKUPMX_GREYLIST_MAX_WAITING", 1000, int)
REFRESH = 86400  # seconds: a passed triple's last_seen is written at most this often
GREYLIST_FULL_LOG = 600.0  # seconds between two greylist-full lines for one network

# BATV (prvs=tag=local), Microsoft's and Barracuda's variants, and SRS (SRS0=hash=tt=domain=local):
# the tags change with each message, the rest names the sender.
_TAGGED = re.compile(r"^(?:prvs|msprvs1|btv1)=[^=]*=|^srs[01]=.*", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


def normalize_sender(sender: str) -> str:
    """The sender as greylisting remembers it: lower-cased, tags dropped, digit runs as "#"."""
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        return sender.lower()
    local = _TAGGED.sub(lambda m: "srs" if m.group(0).startswith("srs") else "", local)
    return f"{_DIGITS.sub('#', local)}@{domain}"


def triple_of(client_ip: str, sender: str, recipient: str) -> Triple:
    return Triple(network_of(client_ip), normalize_sender(sender), recipient.lower())


class Greylisting:
    """Greylisting in one SMTP worker process (policy.RecipientPolicy asks it at RCPT)."""

    def __init__(self, config, store: Greylist, offload: Offload, logger: logging.Logger, *,
                 clock: Callable[[], float] = time.time):
        self.config, self.store, self.offload, self.logger, self.clock = config, store, offload, logger, clock
        self.delay, self.expire = config.greylist, config.greylist_expire
        offload.add_lane(LANE, 1)  # one writer per worker: its writes keep their order
        self._writer = PerThread(lambda: Greylist(config.queue, durable=False))
        self._full_logged: dict[str, float] = {}

    def exempt(self, client_ip: str, authenticated: bool) -> bool:
        if authenticated:
            return True
        try:
            ip = ipaddress.ip_address(shown_address(client_ip))
        except ValueError:
            return False
        return any(ip in network for network in self.config.greylist_exempt)

    def check(self, client_ip: str, sender: str, recipient: str) -> Refusal | None:
        """None to let the recipient through, else the 450 (and the write it implies, off the loop)."""
        triple = triple_of(client_ip, sender, recipient)
        try:
            entry = self.store.greylist_entry(triple)
        except QueueUnavailable:
            return None
        now = self.clock()
        refused, write = judge(entry, now, self.delay, self.expire)
        if write is not None:
            self.offload.submit(None, self._first_attempt if write == "first" else self._seen, triple, lane=LANE,
                                then=self._written)
        if not refused:
            if entry is not None and entry.passed is None:
                log_event(self.logger, "greylist-passed", client=client_ip, from_=f"<{sender}>",
                          to=f"<{recipient}>", waited=f"{now - entry.first_seen:.0f}s")
            return None
        left = self.delay if write == "first" else self.delay - waited(entry, now)
        return replies.GREYLISTED, {"seconds": max(1, int(left + 0.999))}

    def _first_attempt(self, triple: Triple) -> tuple[Triple, bool]:
        return triple, self._writer.get().greylist_first_attempt(triple, self.expire, MAX_WAITING_PER_NETWORK)

    def _seen(self, triple: Triple) -> tuple[Triple, bool]:
        self._writer.get().greylist_seen(triple)
        return triple, True

    def _written(self, future) -> None:
        """In the loop: a write failed (logged), or a network is full (logged now and then)."""
        try:
            triple, recorded = future.result()
        except QueueUnavailable as exc:
            log_event(self.logger, "greylist-write-failed", error=str(exc), level=logging.WARNING)
            return
        now = self.clock()
        if not recorded and now - self._full_logged.get(triple.client, -GREYLIST_FULL_LOG) >= GREYLIST_FULL_LOG:
            if len(self._full_logged) >= 10_000:  # many full networks at once: forget the quiet ones
                self._full_logged = {k: t for k, t in self._full_logged.items() if now - t < GREYLIST_FULL_LOG}
            self._full_logged[triple.client] = now
            log_event(self.logger, "greylist-full", client=triple.client, waiting=MAX_WAITING_PER_NETWORK,
                      level=logging.WARNING)


def judge(entry: GreylistEntry | None, now: float, delay: float, expire: float) -> tuple[bool, str | None]:
    """(refused?, the write it implies: "first", "seen" or None) for a triple's RCPT now.

    Unknown, or its wait expired: refused, and its wait starts ("first").
    Waiting, too early: refused, nothing written (the wait counts from the first try).
    Waiting, in time: passes ("seen"). Passed before: passes ("seen" when last seen a day ago).
    """
    if entry is None:
        return True, "first"
    if entry.passed is not None:
        return False, "seen" if now - entry.last_seen >= REFRESH else None
    if now - entry.first_seen > expire:
        return True, "first"
    if waited(entry, now) < delay:
        return True, None
    return False, "seen"


def waited(entry: GreylistEntry, now: float) -> float:
    """How long the triple has surely waited: first_seen is whole seconds, rounded down."""
    return now - (entry.first_seen + 1)
