"""The flush: delivery of one domain's queue to that domain's configured primary, and the flush worker's loop.

A flush worker process loops: claim a domain whose flush was requested (ETRN,
`backupmx flush`), deliver its queue to `DomainConfig.primary` -- that host
and port only, at the addresses it resolved to when the configuration was
loaded (backupmx.primaries), never a host found in DNS now -- then release
the claim. Between flushes it runs the queue's housekeeping rounds.

deliver_domain is one domain's flush: its pieces live apart, each its own
job. flush_session is one SMTP connection's transactions and the outcomes
it records; flush_lease keeps the flush's lease alive while it runs;
flush_sharing shares the work list with a second connection (a thread's,
or a helper process's for a big flush).

What must always hold:

- A flush that stops before its end without another flusher to finish it
  (stopped, its lease run out, failed half-way, its helper lost, or a
  message left unrecorded) is asked for again (_request_again): the ETRN
  that started it was answered "started".
- After MAX_CONSECUTIVE_TROUBLE connection troubles in a row, or when the
  primary cannot be reached at all, the rest of the flush is deferred with
  the reason (_suspend), by the main connection only.
- One bad flush never ends the flush worker: drain logs it and
  run_flush_worker pauses and goes on, on a new queue connection if the
  flush lost its own (reopened_queue).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

from backupmx import children

from backupmx.flush_lease import Lease, LeaseLost, default_lease_seconds
from backupmx.flush_session import Flush, Trouble
from backupmx.flush_sharing import (EXTRA_CONNECTION_MIN_MESSAGES, EXTRA_CONNECTIONS, ExtraConnection, HelperLost,
                                    SharedWork, Work, share)
from backupmx.lifecycle import housekeeping, log_domain_changes, request_due_retries
from backupmx.log import log_event
from backupmx.outcome import Verdict
from backupmx.prober import PrimaryWatch, monitored
from backupmx.smtpclient import Primary
from backupmx.store import QueueStore, QueueUnavailable

__all__ = [
    "FlushFailed",
    "QueueConnectionLost",
    "deliver_domain",
    "drain",
    "reopened_queue",
    "run_flush_worker",
]

LOGGER = logging.getLogger("backupmx.flusher")

# Seconds between looks for a flush to claim when there is nothing to flush: half
# of it is how late, on average, a flush starts after its ETRN. A look is a read
# (store.flush_waiting); only a domain to claim takes the write lock.
POLL_INTERVAL = 0.05
MAX_CONSECUTIVE_TROUBLE = 3  # connection troubles in a row before the rest of the queue waits
# Seconds between housekeeping rounds (expiry, bounces, retries, purge): the
# contract (docs/SPEC.md, "Queue lifecycle") wants expiry and bounces acted on
# within a minute of becoming due.
HOUSEKEEPING_INTERVAL = 30.0
# Seconds between looks for domains whose retry_interval backoff has run out, at most
# (a retry_interval shorter than twice this is looked at twice per interval).
RETRY_SCAN_INTERVAL = 2.0
MIN_RETRY_SCAN_INTERVAL = 0.25  # ... and at least: a retry scan at most 4 times a second per flush worker
# A retry scan (store.due_domains) reads the queued rows of the domains with retry_interval
# on, up to the first due one each: next_attempt is in no index (one would cost every
# accepted and every delivered message another b-tree). At 1,000,000 queued, all of them
# retrying and none due, a scan takes 130-230 ms of a core (61 MB of pages), every 2 s in each
# flush worker: 7-11% of a core, which the idle one's scans take from the flush beside
# them (the flushing one and its helper use both cores). So the next scan waits at least
# RETRY_SCAN_SPACING times as long as the last one took: the scans take at most a
# fiftieth of a core, and a due retry comes that much later at most (~7-12 s at 1M, for
# retry_intervals of minutes; bench/README.md, "What the flush workers' housekeeping
# costs a flush at 1M").
RETRY_SCAN_SPACING = 50
# ... but never more than this after the last scan ended: a scan that took long for another
# reason (a paused machine, pages read back from a slow disk) must not hold every due retry
# back for minutes (50 x 10 s).
MAX_RETRY_SCAN_WAIT = 60.0


def deliver_domain(
    store,
    domain,
    *,
    owner: str,
    hostname: str,
    timeout: float = 60.0,
    lease_seconds: float | None = None,
    log: logging.Logger = LOGGER,
    should_stop: Callable[[], bool] | None = None,
    primary: Primary | None = None,
    helper: bool = True,
) -> dict[str, int]:
    """Deliver every queued message of `domain` (a DomainConfig) to domain.primary.

    `primary` is where the SMTP sessions come from (its open() and relay):
    the domain's configured primary unless another is given (a session the
    peer opened, as ODMR reverses one). `helper`: a big flush may have its
    second connection in a helper process (share); else in a thread.

    The caller holds the flush lease for domain.name under `owner`
    (store.claim_flush); it is kept alive here (Lease) and released by the caller.
    Returns counts: {"messages": tried, "delivered"/"deferred"/"failed": recipients}.
    When the connection gives trouble, the next message gets a new one; after
    MAX_CONSECUTIVE_TROUBLE in a row (or when the primary cannot be reached at all)
    the rest is deferred with the same reason. When `should_stop()` turns true
    the flush stops between messages and is requested again, so that it resumes
    after a restart. Store errors (QueueUnavailable) propagate.
    """
    should_stop = should_stop or (lambda: False)
    lease = Lease(store, domain.name, owner, lease_seconds or default_lease_seconds(timeout), log)
    flush = Flush(store, domain, owner=owner, hostname=hostname, timeout=timeout, lease=lease, log=log,
                   primary=primary)
    messages = store.messages_for_flush(domain.name)
    if not messages:
        return flush.counts
    started = time.monotonic()
    log_event(log, "flush-start", domain=domain.name, relay=flush.relay, messages=len(messages))
    work = share(flush, messages, helper)  # before the lease's thread starts: a fork from one thread
    try:
        with lease:
            status = _deliver_work(flush, work, should_stop)
    except LeaseLost:
        status = "lease-lost"
        log_event(log, "flush-aborted", domain=domain.name, relay=flush.relay,
                  reason="the flush lease ran out" if lease.ran_out else "the flush lease was lost",
                  level=logging.WARNING)
        if lease.ran_out:  # no other flusher took over: the rest must not wait for the next ETRN
            _request_again(store, domain.name, log)
    finally:
        work.stop_helper()  # a no-op once it is gone
        _join_helper(flush, work)
    counts = flush.counts
    log_event(log, "flush-" + status, domain=domain.name, relay=flush.relay, messages=counts["messages"],
              delivered=counts["delivered"], deferred=counts["deferred"], failed=counts["failed"],
              seconds=f"{time.monotonic() - started:.3f}")
    return counts


def _join_helper(flush: Flush, work: Work) -> None:
    """The helper process's counts into the flush's; one that was lost, or that left a message
    unrecorded (its report's "again"), has the flush asked for again."""
    try:
        counts = work.join_helper()
        again = counts.pop("again", 0)
        for kind, count in counts.items():
            flush.counts[kind] += count
        if again:
            _request_again(flush.store, flush.domain.name, flush.log)
    except HelperLost as e:
        log_event(flush.log, "flush-helper-lost", domain=flush.domain.name, relay=flush.relay, status=e.status,
                  level=logging.WARNING)
        _request_again(flush.store, flush.domain.name, flush.log)


def _deliver_work(flush: Flush, work: Work, should_stop: Callable[[], bool]) -> str:
    """The main connection's loop over the work list (shared with the extra connections,
    or with a helper process).

    Returns how the flush ended: done, interrupted (requested again) or suspended.
    """
    finished = threading.Event()
    extra = []
    if (len(work) >= EXTRA_CONNECTION_MIN_MESSAGES and not flush.primary.single_session
            and not isinstance(work, SharedWork)):
        extra = [ExtraConnection(flush, work, finished, should_stop) for _ in range(EXTRA_CONNECTIONS)]
    troubles = 0
    try:
        for thread in extra:
            thread.start()
        while True:
            if should_stop():
                work.stop_helper()
                flush.store.request_flush([flush.domain.name])
                return "interrupted"
            message = flush.next_message(work)
            if message is None:
                if work.wait(should_stop, flush.lease):
                    continue
                break
            trouble = flush.deliver(message, work)
            troubles = 0 if trouble is None else troubles + 1
            if trouble is not None and (trouble.at_connect or troubles >= MAX_CONSECUTIVE_TROUBLE):
                finished.set()
                work.stop_helper()
                _suspend(flush, work, trouble, should_stop)
                return "suspended"
        return "done"
    finally:
        finished.set()
        for thread in extra:
            if thread.is_alive() or thread.ident is not None:
                thread.join()
            for kind, count in thread.counts.items():
                flush.counts[kind] += count
        if any(thread.again for thread in extra):  # as a helper's report's "again" (_join_helper)
            _request_again(flush.store, flush.domain.name, flush.log)
        try:
            flush.record_outcomes()
        finally:
            flush.quit()


def _suspend(flush: Flush, work: Work, trouble: Trouble, should_stop: Callable[[], bool]) -> None:
    """Postfix's "delivery temporarily suspended": the primary is not taking mail
    now; record why on every row left (a helper's too, once it stopped), and stop."""
    log_event(flush.log, "flush-suspended", domain=flush.domain.name, relay=flush.relay,
              reason=trouble.reason, level=logging.WARNING)
    while True:
        if should_stop():
            flush.store.request_flush([flush.domain.name])
            return
        try:
            rest = work.popleft()
        except IndexError:
            if work.wait(should_stop, flush.lease):
                continue
            return
        flush.lease.check()
        flush.counts["messages"] += 1
        flush.record(rest, {r.address: Verdict.deferred(trouble.reason) for r in rest.recipients})


def drain(store, config, owner: str, *, lease_seconds: float, log: logging.Logger = LOGGER,
          should_stop: Callable[[], bool] = lambda: False, rounds: int | None = None, helper: bool = True) -> int:
    """The one delivery loop: claim a domain with a flush request, deliver it, release it.

    Runs until nothing is left to claim, should_stop() turns true, or `rounds`
    domains were tried; returns the number delivered. Flush workers call it
    each poll; the detached flusher (inetd.py: `serve --inetd` and `backupmx
    flush`) calls it once. A flush that fails half-way is requested again
    (the ETRN that started it was answered "started") and ends this pass, so
    the caller decides how long to wait before the next one. Store errors
    while claiming (QueueUnavailable) propagate. A flush that leaves the
    store without a connection (QueueConnectionLost) can neither be released
    nor requested again here: that is the caller's, on a new connection. `helper`: as
    deliver_domain's.
    """
    delivered = 0
    for _ in itertools.repeat(None) if rounds is None else range(rounds):
        if should_stop() or not store.flush_waiting():
            break
        name = store.claim_flush(owner, lease_seconds)
        if name is None:
            break
        lost = False
        try:
            domain = config.domains.get(name)
            if domain is None:
                log_event(log, "flush-skipped", domain=name, reason="domain not configured", level=logging.WARNING)
                continue
            deliver_domain(store, domain, owner=owner, hostname=config.hostname, timeout=config.timeout,
                           lease_seconds=lease_seconds, log=log, should_stop=should_stop, helper=helper)
            delivered += 1
            log_domain_changes(store, log, name)
        except Exception as e:  # one bad flush must not end the process
            log_event(log, "flush-error", domain=name, owner=owner, error=f"{type(e).__name__}: {e}",
                      level=logging.ERROR)
            if lost := _connection_lost(store):
                raise QueueConnectionLost(name) from e
            _request_again(store, name, log)
            raise FlushFailed(name) from e
        finally:
            try:
                if not lost:
                    store.release_flush(name, owner)
            except Exception as e:
                log_event(log, "flush-error", domain=name, owner=owner,
                          error=f"release: {type(e).__name__}: {e}", level=logging.ERROR)
    return delivered


class FlushFailed(Exception):
    """A domain's flush failed half-way (logged, and requested again)."""


class QueueConnectionLost(FlushFailed):
    """A domain's flush failed and took the store's connection with it (logged; its lease
    is still held and its flush not requested again: nothing can be written on that store)."""


def _connection_lost(store) -> bool:
    """Whether the store has no connection any more: closed across a fork
    (closed_for_fork, share) and not opened again (EMFILE, a full disk)."""
    try:
        store.connection
    except ValueError:
        return True
    return False


def run_flush_worker(config, owner: str, should_stop: Callable[[], bool], *,
                     ready: Callable[[], None] = lambda: None) -> None:
    """The flush worker process: drain(), then wait POLL_INTERVAL; repeat until should_stop().

    Opens its own QueueStore (this runs after fork) and then calls ready():
    what fails before that means this worker cannot start (the master stops
    its start-up). Returns soon after should_stop() turns true, and never
    dies because of a bad primary: errors are logged per flush, and the
    worker pauses a second after one. Nor of a queue connection that a flush
    lost (QueueConnectionLost): it opens another and gives that flush back
    (reopened_queue), pausing a second between tries while it cannot. Only
    a helper's fork loses it (the connection closed across the fork does not
    open again: EMFILE, a full disk), and a cause that persists would fail
    every big flush so, each costing a fork and its log lines, delivering
    nothing: this worker's flushes then go without a helper process (their
    second connection in a thread, as in a process with threads) for
    HELPER_RETRY_MIN, doubled each time a helper's fork loses it again.

    Every HOUSEKEEPING_INTERVAL it also runs lifecycle.housekeeping (expiry,
    bounces, retries on a backoff, retention); that is safe from several
    flush workers at once, as the store claims what each one acts on. With a
    domain in monitoring mode, a thread probes the primaries (prober.PrimaryWatch).
    """
    log = LOGGER
    lease_seconds = default_lease_seconds(config.timeout)
    retry_intervals = [d.retry_interval for d in config.domains.values() if d.retry_interval > 0]
    retrying = bool(retry_intervals)
    retry_scan = min([RETRY_SCAN_INTERVAL] + [interval / 2 for interval in retry_intervals])
    retry_scan = max(retry_scan, MIN_RETRY_SCAN_INTERVAL)
    next_housekeeping = time.monotonic() + 1.0
    next_retry_scan = time.monotonic() + min(1.0, retry_scan)
    if monitored(config):  # accept_when = primary-unreachable: the probes run here, not in SMTP workers
        PrimaryWatch(config, log, should_stop).start()
    store = QueueStore(config.queue)
    helpers = _HelperBackoff()
    try:
        ready()
        while not should_stop():
            if store is None:
                store = reopened_queue(config, owner, log)
                _pause(1.0, should_stop)  # as after any failed flush: one that fails so again is not retried at once
                continue
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
                _housekeeping(housekeeping, store, config, log)
            elif retrying and now >= next_retry_scan:
                _housekeeping(request_due_retries, store, config, log)
                next_retry_scan = next_retry_scan_at(now, time.monotonic(), retry_scan)
            try:
                drain(store, config, owner, lease_seconds=lease_seconds, log=log, should_stop=should_stop,
                      helper=helpers.allowed())
            except QueueUnavailable as e:
                log_event(log, "flush-error", owner=owner, error=str(e), level=logging.WARNING)
                _pause(1.0, should_stop)
            except QueueConnectionLost:
                store.close()
                store = None  # opened again at once, at the top of the loop
                helpers.lost()
            except FlushFailed:
                _pause(1.0, should_stop)
            else:
                _pause(POLL_INTERVAL, should_stop)
    finally:
        if store is not None:
            store.close()


# After a helper's fork lost the flush's queue connection, a flush worker's flushes go without
# a helper for this long, doubled each time a helper's fork loses it again, up to HELPER_RETRY_MAX:
# a cause that passes (a burst of descriptors) costs no helper for ever; one that lasts, a failed
# flush and its lines once in a while, not at every big flush.
HELPER_RETRY_MIN = 60.0
HELPER_RETRY_MAX = 3600.0


class _HelperBackoff:
    """Whether a flush worker's next flush may fork a helper process (see HELPER_RETRY_MIN)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.until = 0.0  # on the clock: no helper before
        self.pause = HELPER_RETRY_MIN

    def allowed(self) -> bool:
        return self.clock() >= self.until

    def lost(self) -> None:
        self.until = self.clock() + self.pause
        self.pause = min(self.pause * 2, HELPER_RETRY_MAX)


def reopened_queue(config, owner: str, log) -> QueueStore | None:
    """A flusher's new queue connection, once a flush lost the old one (QueueConnectionLost),
    and that flush given back: the leases `owner` holds released, their flushes requested again
    (as the master does for a flush worker that died). None while the queue cannot be opened:
    the flush-error line said why (a flush worker tries again a second later)."""
    try:
        store = QueueStore(config.queue)
    except (QueueUnavailable, OSError):
        return None
    try:
        domains = store.release_leases_of(owner)
    except QueueUnavailable:
        store.close()
        return None
    for domain in domains:
        log_event(log, "flush-lease-released", domain=domain, owner=owner, reason="queue connection lost")
    return store


def _request_again(store, domain: str, log) -> None:
    """A flush that failed half-way is asked for again: the ETRN that started
    it was answered "started", so it must not be forgotten."""
    try:
        store.request_flush([domain])
    except Exception as e:
        log_event(log, "flush-error", domain=domain, error=f"re-request: {type(e).__name__}: {e}",
                  level=logging.ERROR)


def next_retry_scan_at(started: float, ended: float, interval: float) -> float:
    """When the next retry scan is due after one from `started` to `ended` (time.monotonic()):
    `interval` after this one started, or RETRY_SCAN_SPACING times as long as it took after it
    ended when that is later (a big queue's scan: see RETRY_SCAN_SPACING), but not more than
    MAX_RETRY_SCAN_WAIT after it ended."""
    spaced = ended + min(RETRY_SCAN_SPACING * (ended - started), MAX_RETRY_SCAN_WAIT)
    return max(started + interval, spaced)


def _housekeeping(step, store, config, log) -> None:
    try:
        step(store, config, logger=log)
    except Exception as e:  # housekeeping trouble must not stop deliveries
        log_event(log, "housekeeping-error", error=f"{type(e).__name__}: {e}", level=logging.ERROR)


def _pause(seconds: float, should_stop: Callable[[], bool]):
    """The flush worker's waits between its looks: children.pause, which its SIGTERM ends at once."""
    children.pause(seconds, should_stop)
