"""Monitoring mode (`accept_when = primary-unreachable`): is the primary taking mail right now?

While a domain's primary answers its banner, a backup MX has no business
taking that domain's mail: RCPT gets 450 4.4.0 "the primary MX is up;
deliver there" (the sender's MTA then tries its other MX hosts, RFC 5321
5.1), and a spammer who goes straight to the backup gets nothing.
Authenticated sessions are not affected (policy.py).

Who probes (connect to the pinned addresses, read the greeting, QUIT):

- Under `serve`, each flush worker runs a PrimaryWatch thread. A domain due
  for a probe is claimed in the queue first (store_probes.claim_probe), so
  one process probes it once per primary_probe_interval, however many flush
  workers there are; no SMTP worker probes while the watch keeps up.
- Under `serve --inetd` there is no master and no flush worker: the session
  process probes on demand (Monitor, on the Offload's "probe" lane) when the
  recorded state is ON_DEMAND_AFTER intervals old, the same claim keeping it
  to one probe per interval across every process. Under `serve` the same
  covers a watch that fell behind.
- The state is in the queue (primary_status): every worker reads it at RCPT
  (cached CACHE_SECONDS), so all of them see a change within that. The
  process that records a change logs it, once: primary-up / primary-down.

RCPT never waits for a probe: with no state, or one older than STALE_AFTER
intervals (+ PROBE_TIMEOUT), the primary's state is unknown and the mail is
accepted -- a backup MX's job when in doubt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from backupmx.config import tuning
from backupmx.log import log_event
from backupmx.offload import Offload, PerThread
from backupmx.smtpclient import Primary, PrimaryUnavailable
from backupmx.store import PrimaryProbes, PrimaryState, QueueUnavailable

LANE = "probe"
PROBE_TIMEOUT = tuning("BACKUPMX_PROBE_TIMEOUT", 10.0)  # seconds for the connect and for the greeting
CLAIM_HOLD = 3 * PROBE_TIMEOUT  # a claim outlives a probe that hangs; a prober that died frees it then
CACHE_SECONDS = 1.0  # how long a worker keeps a state it read
ON_DEMAND_AFTER = 2  # intervals: an older state makes a worker probe itself
STALE_AFTER = 3  # intervals (+ PROBE_TIMEOUT): an older state is unknown
WATCH_TICK = 1.0  # the longest a watch sleeps between looks


def monitored(config) -> list:
    return [d for d in config.domains.values() if d.accept_when == "primary-unreachable"]


def due(state: PrimaryState | None, interval: float, now: float, intervals: float = 1) -> bool:
    return state is None or state.checked_at is None or now >= state.checked_at + intervals * interval


def probe(store: PrimaryProbes, domain, config, logger: logging.Logger) -> bool:
    """Claim, probe and record `domain`'s primary (False: another process has it, or it is not due)."""
    if not store.claim_probe(domain.name, domain.primary_probe_interval, CLAIM_HOLD):
        return False
    primary = Primary(domain, hostname=config.hostname, timeout=PROBE_TIMEOUT, log=logger)
    try:
        reply, up = primary.greeting(), True
    except PrimaryUnavailable as exc:
        reply, up = exc.reason, False
    before = store.record_probe(domain.name, up, reply)
    if before is None or before.up != up:
        log_event(logger, "primary-up" if up else "primary-down", domain=domain.name, relay=primary.relay,
                  reply=reply if up else None, reason=None if up else reply,
                  was=None if before is None else ("up" if before.up else "down"),
                  effect="RCPT gets 450 4.4.0" if up else "mail is accepted",
                  level=logging.INFO if up else logging.WARNING)
    return True


class PrimaryWatch(threading.Thread):
    """A flush worker's thread probing the monitored primaries as they fall due (its own queue connection)."""

    def __init__(self, config, logger: logging.Logger, should_stop: Callable[[], bool], *,
                 clock: Callable[[], float] = time.time):
        super().__init__(name="primary-watch", daemon=True)
        self.config, self.logger, self.should_stop, self.clock = config, logger, should_stop, clock
        self.domains = monitored(config)

    def run(self) -> None:
        try:
            store = PrimaryProbes(self.config.queue, durable=False)
        except QueueUnavailable as exc:
            log_event(self.logger, "probe-error", error=str(exc), level=logging.ERROR)
            return
        with store:
            while not self.should_stop():
                wait = WATCH_TICK
                for domain in self.domains:
                    wait = min(wait, self._look(store, domain))
                self._sleep(max(wait, 0.05))

    def _look(self, store: PrimaryProbes, domain) -> float:
        """Probe `domain` when due (one read when not: the claim's write lock only then); seconds to its next turn."""
        interval = domain.primary_probe_interval
        try:
            state = store.primary_state(domain.name)
            if due(state, interval, self.clock()):
                probe(store, domain, self.config, self.logger)
                state = store.primary_state(domain.name)
        except QueueUnavailable as exc:
            log_event(self.logger, "probe-error", domain=domain.name, error=str(exc), level=logging.WARNING)
            return WATCH_TICK
        checked = state.checked_at if state is not None and state.checked_at is not None else self.clock()
        return checked + interval - self.clock()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


class Monitor:
    """Monitoring mode in one SMTP worker (or inetd session): is this domain's primary up?"""

    def __init__(self, config, store: PrimaryProbes, offload: Offload, logger: logging.Logger, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self.config, self.store, self.offload, self.logger = config, store, offload, logger
        self.clock, self.monotonic = clock, monotonic
        if monitored(config):
            offload.add_lane(LANE, 1)
        self._read: dict[str, tuple[float, PrimaryState | None]] = {}  # domain -> (monotonic read at, state)
        self._probing: set[str] = set()
        self._writer = PerThread(lambda: PrimaryProbes(config.queue, clock, durable=False))

    def primary_up(self, domain) -> bool:
        """True while the latest probe found the primary answering (and is recent); never waits."""
        state = self._state(domain.name)
        interval = domain.primary_probe_interval
        now = self.clock()
        if due(state, interval, now, ON_DEMAND_AFTER) and domain.name not in self._probing:
            self._probing.add(domain.name)
            self.offload.submit(None, lambda: probe(self._writer.get(), domain, self.config, self.logger),
                                lane=LANE, then=lambda future: self._probed(domain.name, future))
        return bool(state is not None and state.up and now < state.checked_at + STALE_AFTER * interval + PROBE_TIMEOUT)

    def _state(self, name: str) -> PrimaryState | None:
        now = self.monotonic()
        cached = self._read.get(name)
        if cached is None or now - cached[0] >= CACHE_SECONDS:
            try:
                state = self.store.primary_state(name)
            except QueueUnavailable:
                state = cached[1] if cached else None
            self._read[name] = cached = (now, state)
        return cached[1]

    def _probed(self, name: str, future) -> None:
        self._probing.discard(name)
        self._read.pop(name, None)  # read what it found at the next RCPT
        try:
            future.result()
        except Exception as exc:  # a queue that cannot be written now: the next RCPT tries again
            log_event(self.logger, "probe-error", domain=name, error=f"{type(exc).__name__}: {exc}",
                      level=logging.WARNING)
