"""A domain's flush lease, kept alive while its flush runs.

The queue hands a domain to one flusher at a time (store.claim_flush) under a
lease that runs out by itself, so that the domains of a flusher that died
are free again. While a flush delivers, Lease renews that lease from a
thread of its own, and the delivery side (flush_session.Flush, the helper
process of flush_sharing) asks it between steps whether it still holds.

What must always hold:

- The flush lease is renewed while we work (Lease, a thread), and when it
  is lost we stop at the next message or body chunk (closing the
  connection mid-DATA, so the primary discards that copy) rather than race
  another flusher.
"""

from __future__ import annotations

import logging
import threading
import time

from backupmx.log import log_event
from backupmx.store import FlushRequests, QueueUnavailable

LOGGER = logging.getLogger("backupmx.flusher")  # the flusher's logger: a lease's lines are its flush's


def default_lease_seconds(timeout: float) -> float:
    """A lease that outlives the longest wait between two renewals.

    Renewal happens every lease/6 at the latest between blocking steps; the
    longest step is a reply wait plus one chunk send (2 * timeout).
    """
    return 3 * timeout + 30


class LeaseLost(Exception):
    """Another flusher owns the domain now: stop without touching anything."""


class Lease:
    """Keeps a domain's flush lease alive while its flush runs, from a thread of its own.

    Entering checks once, on the caller's store, that the lease is still
    `owner`'s (LeaseLost if not: nothing is sent). Then a thread renews it
    every lease/6 on its own SQLite connection, so a slow primary or a long
    body never lets it run out, and no SMTP read loop writes to the database.
    The delivery side asks `check()` between steps (each message, each body
    chunk), which raises LeaseLost once the lease is another flusher's, and
    also once it is about to run out: renewals that failed for five intervals
    (the queue busy or full), or a renewal thread that died, must not let this
    flusher go on while a second one claims the domain (both would send the
    same mail). `ran_out` then tells the caller to ask for the flush again.
    """

    def __init__(self, store, domain: str, owner: str, seconds: float, log: logging.Logger = LOGGER):
        self.store, self.domain, self.owner, self.seconds, self.log = store, domain, owner, seconds, log
        self.interval = seconds / 6
        self.lost = False  # a renewal found the lease another's, or the renewals stopped
        self.ran_out = False  # ... and it was not another's: nobody may be delivering the rest
        # Monotonic time until which the lease surely holds: when the last successful
        # renewal started, plus its length (the queue's lease_expires is at least that).
        self.valid_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{domain}", daemon=True)

    def __enter__(self) -> "Lease":
        started = time.monotonic()
        if not self.store.renew_lease(self.domain, self.owner, self.seconds):
            raise LeaseLost()
        self.valid_until = started + self.seconds
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        try:
            with FlushRequests(self.store.path) as own:  # SQLite connections stay in their thread
                while not self._stop.wait(self.interval):
                    started = time.monotonic()
                    try:
                        renewed = own.renew_lease(self.domain, self.owner, self.seconds)
                    except QueueUnavailable:
                        continue  # busy or full now: check() stops the flush before the lease runs out
                    if not renewed:
                        self.lost = True
                        return
                    self.valid_until = started + self.seconds
        except Exception as exc:  # an unforeseen error: without renewals the lease must count as lost
            log_event(self.log, "flush-error", domain=self.domain, owner=self.owner,
                      error=f"lease renewal: {type(exc).__name__}: {exc}", level=logging.ERROR)
            self.ran_out = self.lost = True

    @property
    def stolen(self) -> bool:
        """Another flusher owns the lease now: its flush delivers every message still queued."""
        return self.lost and not self.ran_out

    def check(self) -> None:
        if not self.lost and time.monotonic() >= self.valid_until - self.interval:
            self.ran_out = self.lost = True  # one interval before anyone else may claim it
        if self.lost:
            raise LeaseLost()
