"""`recipients = verify`: a recipient is queued only if the domain's primary would take it.

The primary is asked by callout, as Postfix's reject_unverified_recipient
does: `MAIL FROM:<>`, `RCPT TO:<address>`, `RSET`, on a session opened like
a delivery's (smtpclient.Primary.open: the pinned addresses, primary_tls).
Its answer is kept in the queue database (store_verify, verify_cache) for
verify_positive_ttl (2xx) or verify_negative_ttl (5xx), shared by every
SMTP worker; a 4xx is answered 450 4.1.1 and not kept.

What must hold:

- A callout never blocks the worker's loop: it runs on the Offload's
  "callout" lane and the RCPT is answered when it returns (Offload.deliver).
  A cached answer costs one primary-key search (store_verify) on the loop.
- At most one callout per address is in flight in a worker: later RCPTs
  for it wait for that one's answer (`_waiting`). Across workers each may
  ask once (at most `workers` callouts for one address at a time); the first
  answer lands in the shared cache and every worker uses it from then on.
- A connection to the primary serves up to MAX_CALLOUTS_PER_CONNECTION
  callouts and is closed (QUIT) once idle for IDLE_SECONDS; a reused one
  that the primary closed meanwhile is replaced once, silently.
- The primary is hostile input too: its reply is bounded (smtpclient's
  reader), cut to REPLY_QUOTED characters and cleaned (replies.clean) before
  it is quoted to our client.
- When the primary cannot be reached (or will not take `MAIL FROM:<>`), a
  stale cached answer still decides; with none, verify_unreachable does:
  accept (a backup MX's job) or 450 4.4.0. Such a primary is not asked again
  for UNREACHABLE_BACKOFF seconds, so a dead primary costs one connect, not
  one per RCPT.
"""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from backupmx import replies
from backupmx.addresses import fold_local_part
from backupmx.config import tuning
from backupmx.log import log_event
from backupmx.offload import Offload, PerThread
from backupmx.outcome import Outcome, classify
from backupmx.smtpclient import Primary, PrimaryClient, PrimaryUnavailable, describe, reply_text
from backupmx.store import ACCEPTED, REFUSED, QueueUnavailable, VerifyAnswer, VerifyCache

LANE = "callout"
CALLOUT_THREADS = 4  # callouts at once per worker (and so connections to one primary)
CALLOUT_TIMEOUT = tuning("BACKUPMX_CALLOUT_TIMEOUT", 30.0)  # seconds for each step of a callout
IDLE_SECONDS = tuning("BACKUPMX_CALLOUT_IDLE", 10.0)  # an unused connection to the primary is closed then
MAX_CALLOUTS_PER_CONNECTION = 50
UNREACHABLE_BACKOFF = tuning("BACKUPMX_CALLOUT_BACKOFF", 30.0)  # seconds a primary that failed is not asked
REPLY_QUOTED = 200  # characters of the primary's reply quoted in ours (a reply line is at most 512)

TEMPFAIL, UNREACHABLE = "tempfail", "unreachable"

Refusal = tuple[replies.Reply, dict]


@dataclass(frozen=True)
class CalloutResult:
    """What one callout learnt: ACCEPTED, REFUSED, TEMPFAIL (a 4xx) or UNREACHABLE, and the reply or reason."""

    kind: str
    reply: str


def cache_key(address: str, domain: str) -> str:
    """verify_cache.address: the local part as recipients lists compare it, @ the configured domain."""
    return f"{fold_local_part(address.rpartition('@')[0])}@{domain}"


class Connections:
    """Sessions to one domain's primary, kept open between callouts (bounded in use and in idle time)."""

    def __init__(self, primary: Primary, *, clock: Callable[[], float] = time.monotonic):
        self.primary, self.clock = primary, clock
        self._lock = threading.Lock()
        self._idle: list[tuple[PrimaryClient, int, float]] = []  # (client, callouts so far, idle since)

    def take(self) -> tuple[PrimaryClient, int]:
        """(a session ready for MAIL, callouts it has made), reused when one is idle; PrimaryUnavailable."""
        with self._lock:
            if self._idle:
                client, uses, _ = self._idle.pop()
                return client, uses
        client, _ = self.primary.open()
        return client, 0

    def give_back(self, client: PrimaryClient, uses: int) -> None:
        if uses >= MAX_CALLOUTS_PER_CONNECTION:
            return self.primary.release(client)
        with self._lock:
            self._idle.append((client, uses, self.clock()))

    def idle_too_long(self) -> list[PrimaryClient]:
        """Take the sessions idle for IDLE_SECONDS out of the pool (the caller quits them)."""
        limit = self.clock() - IDLE_SECONDS
        with self._lock:
            old = [entry[0] for entry in self._idle if entry[2] <= limit]
            self._idle = [entry for entry in self._idle if entry[2] > limit]
        return old

    def close(self) -> None:
        """Drop every idle session without a word (the process is ending; QUIT could block)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for client, _, _ in idle:
            client.close()


def callout(connections: Connections, address: str) -> CalloutResult:
    """Ask the primary whether it takes mail for `address` (on a callout thread).

    A reused session the primary closed meanwhile is replaced by a fresh one, once.
    """
    for _ in range(2):
        try:
            client, uses = connections.take()
        except PrimaryUnavailable as exc:
            return CalloutResult(UNREACHABLE, exc.reason)
        try:
            result, reusable = _ask(client, address)
        except (OSError, smtplib.SMTPException, UnicodeError) as exc:
            client.close()
            if uses:
                continue
            return CalloutResult(UNREACHABLE, describe(exc))
        if reusable:
            connections.give_back(client, uses + 1)
        else:
            connections.primary.release(client)
        return result
    return CalloutResult(UNREACHABLE, "the primary closed the connection")


def _ask(client: PrimaryClient, address: str) -> tuple[CalloutResult, bool]:
    """MAIL FROM:<>, RCPT TO:<address>, RSET (pipelined when the primary offers it, RFC 2920).

    Returns the result and whether the session may serve another callout.
    """
    utf8 = not address.isascii()
    if utf8 and not client.has_extn("smtputf8"):  # RFC 6531 3.4: never sent where it cannot be
        return CalloutResult(REFUSED, "553 5.6.7 the primary does not offer SMTPUTF8"), True
    commands = ["MAIL FROM:<>" + (" SMTPUTF8" if utf8 else ""), f"RCPT TO:<{address}>", "RSET"]
    if client.has_extn("pipelining"):
        client.send("".join(c + "\r\n" for c in commands).encode("utf-8"))
        mail, rcpt, rset = (client.getreply() for _ in commands)
    else:
        client.send((commands[0] + "\r\n").encode("utf-8"))
        mail = client.getreply()
        rcpt = None
        if 200 <= mail[0] < 300:
            client.send((commands[1] + "\r\n").encode("utf-8"))
            rcpt = client.getreply()
        client.send(b"RSET\r\n")
        rset = client.getreply()
    reusable = rset[0] == 250 and 421 not in (mail[0], rcpt and rcpt[0])
    if not 200 <= mail[0] < 300:
        return CalloutResult(UNREACHABLE, "MAIL FROM:<> refused: " + reply_text(*mail)), reusable
    kind = {Outcome.DELIVERED: ACCEPTED, Outcome.FAILED: REFUSED}.get(classify(rcpt[0]), TEMPFAIL)
    return CalloutResult(kind, reply_text(*rcpt)), reusable


class Verifier:
    """The callouts of one SMTP worker process (ConnectionContext), answered in its loop."""

    def __init__(self, config, store: VerifyCache, offload: Offload, logger: logging.Logger, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self.config, self.store, self.offload, self.logger = config, store, offload, logger
        self.clock, self.monotonic = clock, monotonic
        self._connections = {
            name: Connections(Primary(domain, hostname=config.hostname, timeout=CALLOUT_TIMEOUT, log=logger),
                              clock=monotonic)
            for name, domain in config.domains.items() if domain.verify}
        if self._connections:
            offload.add_lane(LANE, CALLOUT_THREADS)
        # cache key -> [(owner, resume, cached answer)] of the RCPTs waiting for the callout in flight
        self._waiting: dict[str, list[tuple[object, Callable, VerifyAnswer | None]]] = {}
        self._unreachable: dict[str, tuple[float, str]] = {}  # domain -> (monotonic until, reason)
        self._writer = PerThread(lambda: VerifyCache(config.queue, durable=False))

    def check(self, owner, recipient, resume: Callable[[Refusal | None], None]) -> None:
        """Answer `resume(None or (reply, fields))` for a recipient of a `recipients = verify` domain:
        now when the cache knows (or the primary is known to be down), else after the callout."""
        domain = self.config.domains[recipient.domain]
        key = cache_key(recipient.address, domain.name)
        try:
            cached = self.store.verify_answer(key)
        except QueueUnavailable:
            cached = None
        if cached is not None and cached.fresh(self.clock()):
            return resume(_judge_answer(cached.result, cached.reply))
        down = self._unreachable.get(domain.name)
        if down is not None and self.monotonic() < down[0]:
            return resume(_when_unreachable(domain, cached))
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append((owner, resume, cached))
            return None
        self._waiting[key] = [(owner, resume, cached)]
        started = self.monotonic()
        self.offload.submit(None, self._callout, domain, key, recipient.address, lane=LANE,
                            then=lambda future: self._answered(domain, key, recipient.address, started, future))
        return None

    def _callout(self, domain, key: str, address: str) -> CalloutResult:
        """On a callout thread: ask the primary, and keep a 2xx or 5xx in the cache."""
        result = callout(self._connections[domain.name], address)
        ttl = {ACCEPTED: domain.verify_positive_ttl, REFUSED: domain.verify_negative_ttl}.get(result.kind)
        if ttl is not None:
            try:
                self._writer.get().record_verify(key, domain.name, result.kind, result.reply, ttl)
            except QueueUnavailable as exc:  # answered all the same; asked again next time
                log_event(self.logger, "verify-cache-failed", address=key, error=str(exc), level=logging.WARNING)
        return result

    def _answered(self, domain, key: str, address: str, started: float, future: Future) -> None:
        """In the loop: the callout is done; every RCPT waiting for it gets its answer."""
        waiting = self._waiting.pop(key, [])
        try:
            result = future.result()
        except Exception as exc:  # a callout that broke verifies nothing
            result = CalloutResult(UNREACHABLE, f"{type(exc).__name__}: {exc}")
        if result.kind == UNREACHABLE:
            self._unreachable[domain.name] = (self.monotonic() + UNREACHABLE_BACKOFF, result.reply)
        else:
            self._unreachable.pop(domain.name, None)
        log_event(self.logger, "verify", domain=domain.name, to=f"<{address}>", result=result.kind,
                  relay=self._connections[domain.name].primary.relay, reply=result.reply,
                  policy=domain.verify_unreachable if result.kind == UNREACHABLE else None,
                  waiting=len(waiting), seconds=f"{self.monotonic() - started:.3f}",
                  level=logging.WARNING if result.kind == UNREACHABLE else logging.INFO)
        for owner, resume, cached in waiting:
            if result.kind == UNREACHABLE:
                refusal = _when_unreachable(domain, cached)
            else:
                refusal = _judge_answer(result.kind, result.reply)
            self.offload.deliver(owner, lambda done, resume=resume: resume(done.result()), refusal)

    def upkeep(self) -> None:
        """From the worker loop: sessions idle for IDLE_SECONDS are quit on a callout thread."""
        for connections in self._connections.values():
            idle = connections.idle_too_long()
            if idle:
                self.offload.submit(None, lambda idle=idle, primary=connections.primary: [
                    primary.release(client) for client in idle], lane=LANE, then=lambda future: None)

    def close(self) -> None:
        for connections in self._connections.values():
            connections.close()


def _judge_answer(kind: str, reply: str) -> Refusal | None:
    """The RCPT answer for the primary's: 2xx accepts, 5xx is 550 5.1.1, 4xx is 450 4.1.1."""
    if kind == ACCEPTED:
        return None
    quoted = reply[:REPLY_QUOTED]
    if kind == REFUSED:
        return replies.RECIPIENT_UNDELIVERABLE, {"reply": quoted}
    return replies.RECIPIENT_UNVERIFIED, {"reply": quoted}


def _when_unreachable(domain, cached: VerifyAnswer | None) -> Refusal | None:
    """The primary cannot be asked: a stale answer decides, else verify_unreachable."""
    if cached is not None:
        return _judge_answer(cached.result, cached.reply)
    if domain.verify_unreachable == "accept":
        return None
    return replies.VERIFY_UNREACHABLE, {}
