"""Queue housekeeping: expiry, bounces (RFC 3464 DSNs), delay warnings, retries,
retention and the database's own upkeep.

housekeeping() is one round of it. The lead calls it about once a minute from
a flush worker; it has no process or loop of its own. Each step is one or a
few store transactions, so it is safe to run from several processes at once:

  1. expire   queued rows older than queue_lifetime (per domain) -> expired
  2. bounces  failed/expired recipients get a DSN through bounce_relay. A DSN is
              claimed in the store before it is sent (claim_dsns), so two
              housekeepers never send the same one; one that dies between the
              send and the record makes it go out again after DSN_CLAIM_SECONDS
              (at least once, never lost). Null sender, NOTIFY=NEVER (or without
              FAILURE) and "no bounce_relay" are recorded as skipped. A relay that
              is down: released, tried again next round. A relay that refuses
              it (5xx): recorded as undeliverable, not tried again -- the row
              still stays for expired_retention.
  3. delay warnings (delay_warning > 0 and a bounce_relay): one per row, at most once.
  4. retries  domains with retry_interval > 0 whose mail is due get a flush request.
  5. purge    failed/expired rows older than expired_retention; the
              recipient-callout answers past their time (verify_cache) and
              greylist triples past theirs;
              failed AUTHs older than auth_failure_window;
  6. domains  domain-queueing / domain-drained lines for what changed any other
              way than a new message or a flush (expiry, operator actions), and
              the `notify` notices (notify.py) through bounce_relay: claimed
              first (at most once per queueing period); one the relay did not
              take is released for the next round.
  7. reclaim  the messages whose last row left (table reclaim: delivered,
              deleted, purged), in queue id order, a few hundred a transaction
              (not while a flush delivers, for a few minutes at most);
              then incremental_vacuum hands their pages back (it too waits
              for a flush, as long at most), and a WAL checkpoint
              (not under `serve`: its checkpointer process runs it, checkpointer.py).

Every state change is one log line (backupmx.log.log_event), with the queue id.
"""

from __future__ import annotations

import dataclasses
import logging
import smtplib
import time
from collections.abc import Callable

from backupmx import dsn as dsnlib
from backupmx import notify as notifylib
from backupmx.config_values import format_hostport
from backupmx.log import log_event
from backupmx.outcome import Outcome, classify
from backupmx.reclaim import reclaim_round, vacuum_round
from backupmx.store import DSN_CLAIM_SECONDS, QueueStore, QueueUnavailable
from backupmx.store_db import checkpoints_elsewhere

__all__ = ["BounceFailed", "housekeeping", "log_domain_changes", "next_retry_delay", "send_dsn"]

LOGGER = logging.getLogger("backupmx.lifecycle")

DSN_TIMEOUT = 30.0  # seconds per SMTP step with the bounce relay (capped by config.timeout)
DSN_BATCH = 20  # DSNs claimed per store transaction
DSN_ROUND_SECONDS = 30.0  # a round stops sending after this (wall clock), the rest waits for the next
MAX_BACKOFF_FACTOR = 8  # next_retry_delay: at most 8 times retry_interval ...
MAX_BACKOFF = 86400.0  # ... and at most a day (unless retry_interval itself is longer)
# The WAL's upkeep (see _Round.upkeep): the TRUNCATE checkpoint that empties the
# -wal file waits this long for other connections, i.e. not at all: while it
# waited it would hold the write lock, and an SMTP worker's 250 with it.
CHECKPOINT_BUSY_TIMEOUT = 0.0


class BounceFailed(Exception):
    """A DSN could not be handed to the bounce relay.

    permanent: the relay refused it with 5xx (retrying will not help);
    otherwise (connection trouble, 4xx) it is tried again next round.
    """

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def next_retry_delay(retry_interval: float, attempts: int) -> float:
    """Seconds until the next automatic attempt after `attempts` failed ones (>= 1).

    Exponential: retry_interval * 2**(attempts - 1), so 1x, 2x, 4x, 8x, capped
    at 8x retry_interval and at one day (a retry_interval above a day is kept
    as it is). The flusher passes it to store.record_attempts as retry_after.
    """
    if retry_interval <= 0:
        raise ValueError("retry_interval must be > 0")
    cap = min(retry_interval * MAX_BACKOFF_FACTOR, max(retry_interval, MAX_BACKOFF))
    exponent = max(0, min(attempts - 1, 32))  # 2**32 * anything is past the cap already
    return min(retry_interval * 2**exponent, cap)


def send_dsn(relay: tuple[str, int], sender: str, dsn_bytes: bytes, *, hostname: str, timeout: float) -> None:
    """Hand one DSN to the bounce relay: MAIL FROM:<> (RFC 5321 4.5.5), RCPT TO:<sender>.

    Raises BounceFailed on any trouble; .permanent when the relay answered 5xx.
    """
    host, port = relay
    # RFC 6533's form (dsn.is_international), or a UTF-8 sender: sent with SMTPUTF8.
    international = not sender.isascii() or b"report-type=global-delivery-status" in dsn_bytes.split(b"\r\n\r\n", 1)[0]
    try:
        with smtplib.SMTP(host, port, local_hostname=hostname, timeout=timeout) as client:
            client.ehlo_or_helo_if_needed()
            options = []
            if not dsn_bytes.isascii() and client.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")  # RFC 6152: an 8-bit original is attached
            if international:
                options.append("SMTPUTF8")  # RFC 6533: UTF-8 in its header and addresses
            client.sendmail("", [sender], dsn_bytes, mail_options=options)
    except smtplib.SMTPNotSupportedError as exc:  # a relay without SMTPUTF8 never takes it
        raise BounceFailed(f"the bounce relay does not offer SMTPUTF8 ({exc})", permanent=True) from exc
    except smtplib.SMTPRecipientsRefused as exc:
        code, reply = next(iter(exc.recipients.values()))
        raise BounceFailed(_reply_text(code, reply), permanent=classify(code) is Outcome.FAILED) from exc
    except smtplib.SMTPResponseException as exc:  # SenderRefused, DataError, ...
        raise BounceFailed(_reply_text(exc.smtp_code, exc.smtp_error),
                           permanent=classify(exc.smtp_code) is Outcome.FAILED) from exc
    except (OSError, smtplib.SMTPException) as exc:  # refused, timeout, disconnected
        raise BounceFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc


def _reply_text(code: int, message: bytes | str) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return f"{code} {' '.join(message.split())}"


def _read_original(store: QueueStore, bounce, full: bool, limit: int) -> tuple[bytes, bytes | None]:
    """(header section, body or None) of the queued message, read from its blob.

    `full` (dsn.returns_full) is only ever true for a message of at most
    `limit` octets (bounce_size_limit); otherwise the header alone is read in
    pieces and cut to `limit`, so a DSN never carries more of the original.
    """
    with store.open_body(bounce.queue_id) as reader:
        data = reader.read(limit + 1) if full else b""
        if full and len(data) <= limit:
            return dsnlib.split_headers(data)
        while len(data) <= limit and b"\r\n\r\n" not in data and not data.startswith(b"\r\n"):
            chunk = reader.read(16 * 1024)
            if not chunk:
                break
            data += chunk
    headers, _ = dsnlib.split_headers(data)
    return dsnlib.cut_headers(headers, limit), None


class _Round:
    """One housekeeping round: the config, the store, and what was done."""

    def __init__(self, store: QueueStore, config, logger: logging.Logger, clock: Callable[[], float],
                 send: Callable[..., None]):
        self.store = store
        self.config = config
        self.log = logger
        self.clock = clock
        self.send = send
        self.summary: dict[str, object] = {
            "expired": 0, "dsn_sent": 0, "dsn_skipped": 0, "dsn_failed": 0,
            "delay_warnings": 0, "retries": [], "purged": 0, "verify_purged": 0, "greylist_purged": 0, "reclaimed": 0,
            "reclaim_deferred": False, "vacuumed_pages": 0, "vacuum_deferred": False,
            "checkpoint": None, "errors": 0, "notices": 0,
        }

    def lifetime(self, domain: str) -> float:
        d = self.config.domains.get(domain)
        return d.queue_lifetime if d is not None else self.config.queue_lifetime

    def compose(self, bounce, wanted, action: str, full: bool, **extra) -> bytes:
        """The RFC 3464 report for `wanted` recipients of `bounce`, with the original attached."""
        headers, body = _read_original(self.store, bounce, full, self.config.bounce_size_limit)
        return dsnlib.build_dsn(
            dataclasses.replace(bounce, recipients=wanted),
            reporting_mta=self.config.hostname,
            original_headers=headers,
            original_body=body,
            action=action,
            arrival_date=bounce.received_at,
            now=self.clock(),
            remote_mta=self.remote_mta(bounce.domain),
            **extra,
        )

    def remote_mta(self, domain: str) -> str | None:
        d = self.config.domains.get(domain)
        return d.primary[0] if d is not None else None

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one step; a queue that cannot be used now is logged, the round goes on."""
        try:
            fn()
        except QueueUnavailable as exc:
            self.summary["errors"] += 1
            log_event(self.log, "housekeeping-error", step=name, error=str(exc), level=logging.WARNING)

    # 1. expiry

    def expire(self) -> None:
        lifetimes = {name: d.queue_lifetime for name, d in self.config.domains.items()}
        now = self.clock()
        for row in self.store.expire_rows(lifetimes, self.config.queue_lifetime):
            self.summary["expired"] += 1
            log_event(self.log, "expired", id=row.queue_id, domain=row.domain,
                      age=f"{max(0, int(now - row.received_at))}s", lifetime=f"{row.lifetime:g}s")

    # 2. bounces

    def bounces(self) -> None:
        relay = self.config.bounce_relay
        deadline = time.monotonic() + DSN_ROUND_SECONDS
        while time.monotonic() < deadline:
            claimed = self.store.claim_dsns(DSN_BATCH, DSN_CLAIM_SECONDS)
            if not claimed:
                return
            relay_down = False
            for bounce in claimed:
                if relay_down or time.monotonic() >= deadline:
                    # Not tried this round: free the claim for the next one.
                    self.store.release_dsns(bounce.queue_id, bounce.domain, [r.address for r in bounce.recipients])
                    continue
                if not self.one_bounce(bounce, relay):
                    relay_down = True
            if relay_down:
                return

    def skip(self, bounce, recipients, reason: str) -> None:
        addresses = [r.address for r in recipients]
        self.store.dsn_sent(bounce.queue_id, bounce.domain, addresses, f"no DSN: {reason}")
        self.summary["dsn_skipped"] += len(addresses)
        log_event(self.log, "dsn-skipped", id=bounce.queue_id, domain=bounce.domain,
                  to=",".join(f"<{a}>" for a in addresses), reason=reason)

    def one_bounce(self, bounce, relay) -> bool:
        """Handle one claimed row. False when the relay is down (stop this round)."""
        if not bounce.sender:
            self.skip(bounce, bounce.recipients, "null sender")
            return True
        wanted = [r for r in bounce.recipients if dsnlib.notify_wants(r.notify, dsnlib.FAILED)]
        unwanted = [r for r in bounce.recipients if r not in wanted]
        if unwanted:
            self.skip(bounce, unwanted, "NOTIFY=" + ",".join(sorted({(r.notify or "").upper() for r in unwanted})))
        if not wanted:
            return True
        if relay is None:
            self.skip(bounce, wanted, "no bounce_relay")
            return True
        addresses = [r.address for r in wanted]
        to = ",".join(f"<{a}>" for a in addresses)
        try:
            full = dsnlib.returns_full(bounce.ret, bounce.size, dsnlib.FAILED, self.config.bounce_size_limit)
            message = self.compose(bounce, wanted, dsnlib.FAILED, full)
            self.send(self.config.bounce_relay, bounce.sender, message, hostname=self.config.hostname,
                      timeout=min(self.config.timeout, DSN_TIMEOUT))
        except KeyError:  # the message left the queue meanwhile (operator delete): nothing to report
            return True
        except BounceFailed as exc:
            return self.bounce_failed(bounce, addresses, relay, exc)
        except QueueUnavailable:
            raise
        except Exception as exc:  # a bug building this one DSN must not stop the others
            # The claim is kept: this DSN is tried again once it runs out
            # (DSN_CLAIM_SECONDS), not in a tight loop within this round.
            self.summary["errors"] += 1
            log_event(self.log, "bounce-failed", id=bounce.queue_id, domain=bounce.domain, to=to,
                      error=f"{type(exc).__name__}: {exc}", retry=f"in {DSN_CLAIM_SECONDS}s", level=logging.ERROR)
            return True
        self.store.dsn_sent(bounce.queue_id, bounce.domain, addresses, f"sent relay={format_hostport(*relay)}")
        self.summary["dsn_sent"] += len(addresses)
        log_event(self.log, "dsn-sent", id=bounce.queue_id, domain=bounce.domain, to=to, from_=f"<{bounce.sender}>",
                  relay=format_hostport(*relay), action=dsnlib.FAILED)
        return True

    def bounce_failed(self, bounce, addresses, relay, exc: BounceFailed) -> bool:
        """Record a failed send: 5xx -> not again; else released for the next round (False)."""
        to = ",".join(f"<{a}>" for a in addresses)
        if exc.permanent:
            # A bounce that bounces is not retried (Postfix would send it to
            # the postmaster); the row stays for expired_retention regardless.
            self.store.dsn_sent(bounce.queue_id, bounce.domain, addresses, f"undeliverable: {exc}")
            self.summary["dsn_failed"] += len(addresses)
            log_event(self.log, "bounce-failed", id=bounce.queue_id, domain=bounce.domain, to=to,
                      relay=format_hostport(*relay), error=str(exc), retry="no", level=logging.WARNING)
            return True
        self.store.release_dsns(bounce.queue_id, bounce.domain, addresses, f"relay={format_hostport(*relay)} {exc}")
        self.summary["dsn_failed"] += len(addresses)
        log_event(self.log, "bounce-failed", id=bounce.queue_id, domain=bounce.domain, to=to,
                  relay=format_hostport(*relay), error=str(exc), retry="yes", level=logging.WARNING)
        return False

    # 3. delay warnings

    def delay_warnings(self) -> None:
        delay = self.config.delay_warning
        relay = self.config.bounce_relay
        if delay <= 0 or relay is None:
            return
        deadline = time.monotonic() + DSN_ROUND_SECONDS
        while time.monotonic() < deadline:
            claimed = self.store.claim_delay_warnings(delay, DSN_BATCH)
            if not claimed:
                return
            for i, bounce in enumerate(claimed):
                if not self.one_warning(bounce, relay):
                    for rest in claimed[i + 1:]:
                        self.store.release_delay_warning(rest.queue_id, rest.domain)
                    return

    def one_warning(self, bounce, relay) -> bool:
        wanted = [r for r in bounce.recipients if dsnlib.notify_wants(r.notify, dsnlib.DELAYED)]
        addresses = [r.address for r in wanted]
        if not bounce.sender or not wanted:
            reason = "null sender" if not bounce.sender else "NOTIFY"
            self.store.delay_warning_done(bounce.queue_id, bounce.domain, [r.address for r in bounce.recipients],
                                          f"no warning: {reason}")
            return True
        to = ",".join(f"<{a}>" for a in addresses)
        try:
            message = self.compose(bounce, wanted, dsnlib.DELAYED, False,
                                   will_retry_until=max(bounce.received_at, bounce.state_changed)
                                   + self.lifetime(bounce.domain))
            self.send(relay, bounce.sender, message, hostname=self.config.hostname,
                      timeout=min(self.config.timeout, DSN_TIMEOUT))
        except KeyError:
            return True
        except BounceFailed as exc:
            log_event(self.log, "bounce-failed", id=bounce.queue_id, domain=bounce.domain, to=to,
                      relay=format_hostport(*relay), error=str(exc), action=dsnlib.DELAYED,
                      retry="no" if exc.permanent else "yes", level=logging.WARNING)
            if exc.permanent:
                self.store.delay_warning_done(bounce.queue_id, bounce.domain, addresses, f"undeliverable: {exc}")
                return True
            self.store.release_delay_warning(bounce.queue_id, bounce.domain, f"relay={format_hostport(*relay)} {exc}")
            return False
        except QueueUnavailable:
            raise
        except Exception as exc:  # a bug: this row's warning is lost, the others go on
            self.summary["errors"] += 1
            log_event(self.log, "bounce-failed", id=bounce.queue_id, domain=bounce.domain, to=to,
                      error=f"{type(exc).__name__}: {exc}", action=dsnlib.DELAYED, retry="no", level=logging.ERROR)
            return True
        self.store.delay_warning_done(bounce.queue_id, bounce.domain, addresses, f"sent relay={format_hostport(*relay)}")
        self.summary["delay_warnings"] += 1
        log_event(self.log, "dsn-sent", id=bounce.queue_id, domain=bounce.domain, to=to, from_=f"<{bounce.sender}>",
                  relay=format_hostport(*relay), action=dsnlib.DELAYED)
        return True

    # 4. retries

    def retries(self) -> None:
        retrying = {name for name, d in self.config.domains.items() if d.retry_interval > 0}
        if not retrying:
            return
        due = self.store.due_domains(retrying)
        if not due:
            return
        for domain, count in self.store.request_flush(due).items():
            if count:
                self.summary["retries"].append(domain)
                log_event(self.log, "retry", domain=domain, queued=count)

    # 5. retention and the database

    def purge(self) -> None:
        for row in self.store.purge_rows(self.config.expired_retention):
            self.summary["purged"] += 1
            log_event(self.log, "purged", id=row.queue_id, domain=row.domain, state=row.state,
                      retention=f"{self.config.expired_retention:g}s")
        self.store.purge_auth_failures(self.config.auth_failure_window)  # auth_limit.py: they have aged out

    def purge_verify(self) -> None:
        self.summary["verify_purged"] = self.store.purge_verify()

    def purge_greylist(self) -> None:
        self.summary["greylist_purged"] = self.store.purge_greylist(self.config.greylist_expire)

    # 6. domains: queueing / drained, notices

    def domains(self) -> None:
        log_domain_changes(self.store, self.log)
        relay = self.config.bounce_relay
        wanted = {name: (d.notify_age or None) for name, d in self.config.domains.items() if d.notify}
        if relay is None or not wanted:
            return
        for notice in self.store.claim_notices(wanted):
            domain = self.config.domains[notice.domain]
            message = notifylib.build_notice(notice, hostname=self.config.hostname, to=domain.notify,
                                             now=self.clock(), notify_age=domain.notify_age)
            fields = dict(domain=notice.domain, kind=notice.kind, to=f"<{domain.notify}>",
                          relay=format_hostport(*relay))
            try:
                self.send(relay, domain.notify, message, hostname=self.config.hostname,
                          timeout=min(self.config.timeout, DSN_TIMEOUT))
            except BounceFailed as exc:
                if not exc.permanent:
                    self.store.release_notice(notice)
                log_event(self.log, "notice-failed", **fields, error=str(exc),
                          retry="no" if exc.permanent else "yes", level=logging.WARNING)
                continue
            self.summary["notices"] += 1
            log_event(self.log, "notice-sent", **fields)

    # 7. the messages that left, then the database's upkeep

    def reclaim(self) -> None:
        # reclaim.py: not while a flush delivers, for a few minutes at most
        self.summary["reclaimed"], self.summary["reclaim_deferred"] = reclaim_round(self.store, self.log)

    def upkeep(self) -> None:
        # reclaim.py: free pages beyond a tenth of the file go back, not while a flush delivers
        pages, self.summary["vacuum_deferred"] = vacuum_round(self.store)
        self.summary["vacuumed_pages"] = pages
        if pages:
            log_event(self.log, "vacuum", pages=pages)
        if checkpoints_elsewhere():
            return  # under `serve` the checkpointer process copies the WAL (checkpointer.py), not a flush worker
        # A PASSIVE checkpoint copies the WAL into the database without ever
        # holding the write lock; the TRUNCATE after it has nothing left to copy
        # and empties the -wal file at once, or, when a reader still uses the WAL
        # (a long `queue list`, Litestream), gives up at once instead of waiting
        # with the write lock held (journal_size_limit bounds the file meanwhile).
        self.store.checkpoint("PASSIVE", CHECKPOINT_BUSY_TIMEOUT)
        self.summary["checkpoint"] = self.store.checkpoint("TRUNCATE", CHECKPOINT_BUSY_TIMEOUT)


def housekeeping(store: QueueStore, config, *, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.time, send: Callable[..., None] = send_dsn) -> dict:
    """One round of queue housekeeping (see the module docstring). Returns a summary:

        expired, dsn_sent, dsn_skipped, dsn_failed (recipients), delay_warnings (rows),
        retries (domains asked to flush), purged (rows), verify_purged (cached callout
        answers), greylist_purged (triples), notices (sent), reclaimed (messages
        deleted after their last row left), reclaim_deferred (True: a flush was
        delivering, the reclaim waited for a later round), vacuumed_pages,
        vacuum_deferred (True: the vacuum gave way to a flush likewise, its pages
        wait), checkpoint (SQLite's (busy, wal pages, checkpointed)), errors (steps
        that met QueueUnavailable; the others still ran).

    `clock` dates the DSNs (the store has its own clock for the queue's times);
    `send` is send_dsn (tests may pass another callable with its signature).
    """
    r = _Round(store, config, logger or LOGGER, clock, send)
    r.step("expire", r.expire)
    r.step("bounces", r.bounces)
    r.step("delay_warnings", r.delay_warnings)
    r.step("retries", r.retries)
    r.step("purge", r.purge)
    r.step("purge_verify", r.purge_verify)
    r.step("purge_greylist", r.purge_greylist)
    r.step("domains", r.domains)
    r.step("reclaim", r.reclaim)  # before upkeep: its vacuum hands their pages back this round
    r.step("upkeep", r.upkeep)
    return r.summary


def log_domain_changes(store: QueueStore, log: logging.Logger, domain: str | None = None) -> None:
    """domain-queueing / domain-drained for what store.reconcile_domains found (each
    logged once: it records them in the same transaction). Only `domain` when given."""
    started, drained = store.reconcile_domains(domain)
    for change in started:
        log_event(log, "domain-queueing", domain=change.domain, since=change.since)
    for change in drained:
        log_event(log, "domain-drained", domain=change.domain, since=change.since,
                  queued=f"{max(0, int(time.time()) - change.since)}s")


def request_due_retries(store: QueueStore, config, *, logger: logging.Logger | None = None) -> list[str]:
    """Only the retries step of housekeeping: cheap, so flush workers run it more often.

    Returns the domains asked to flush.
    """
    r = _Round(store, config, logger or LOGGER, time.time, send_dsn)
    r.step("retries", r.retries)
    return r.summary["retries"]
