"""Housekeeping's reclaim (schema 14): the messages whose last queue row left.

A flush, a delete or a purge does not delete a message's own row and body chunks:
trigger queue_gone lists it in the table `reclaim` (schema.sql), and each
housekeeping round (lifecycle.py) deletes the listed ones here, in queue id order:
after a drain, consecutive ids share their pages (in the flush's order, a domain's,
each message would dirty pages of its own among the other domains' mail;
bench/README.md, "The flush at 1M with the message's deletion deferred").
"""

from __future__ import annotations

import logging
import time

from backupmx.log import log_event
from backupmx.store import QueueStore

# The reclaim (schema.sql, table reclaim): this many messages deleted per write
# transaction (the write lock held a few ms), while their bodies add up to at most
# RECLAIM_BYTES (at least one message: freeing a page costs its write, ~6 s a GB
# with SECURE_DELETE; 250 of 50 MB would hold the lock for a minute), for at most
# RECLAIM_ROUND_SECONDS per round, out of at most RECLAIM_LISTED listed ones read
# and sorted at once (the list's memory: ~200 bytes each); a pause after each for
# the SMTP workers.
RECLAIM_BATCH = 250
RECLAIM_BYTES = 16 * 1024 * 1024
RECLAIM_LISTED = 100_000
RECLAIM_ROUND_SECONDS = 3.0
RECLAIM_PAUSE = 0.005
# While a flush or an ATRN delivers (a live lease), or an ETRN waits for a flusher
# (a request not taken yet), the reclaim skips its round, or stops when one starts or
# is asked for during it (checked before each transaction): its deletes took the 2
# cores and the write lock from the drain the primary waits for (bench/README.md, "The
# reclaim waits while a flush delivers"), and the flush workers run their rounds at
# the same moments, so an ETRN that came during one waited for it to end (up to
# RECLAIM_ROUND_SECONDS; "Where the flush at 1M spends its CPU"). Never for long: it
# runs anyway once it last ran RECLAIM_DEFER_SECONDS ago in this process (the messages
# wait a few minutes more; a 1M drain lasts ~6), or when the list spans
# RECLAIM_DEFER_SPAN ids (~0.6 GB of bodies at 2.5 KB, some 5 rounds to catch up).
RECLAIM_DEFER_SECONDS = 300.0
RECLAIM_DEFER_SPAN = 250_000
_reclaimed_at: dict[str, float] = {}  # queue path -> time.monotonic() its last whole reclaim round ended here


def reclaim_round(store: QueueStore, log: logging.Logger) -> tuple[int, bool]:
    """One round's reclaim: (messages deleted, whether it gave way to a flush)."""
    may_wait = _may_wait(store)
    if may_wait and store.flush_wanted():
        return 0, True
    listed = store.reclaim_listed(RECLAIM_LISTED)
    queue_ids = sorted({queue_id for _, queue_id in listed})
    deadline = time.monotonic() + RECLAIM_ROUND_SECONDS
    done = reclaimed = 0
    deferred = False
    while done < len(queue_ids) and time.monotonic() < deadline:
        if done and may_wait and store.flush_wanted():  # a flush started or was asked for meanwhile (a tiny read)
            deferred = True
            break
        deleted, taken = store.reclaim(queue_ids[done:done + RECLAIM_BATCH], RECLAIM_BYTES)
        reclaimed += deleted
        done += taken
        time.sleep(RECLAIM_PAUSE)
    if not deferred:  # a round cut short by a flush does not count as one
        _reclaimed_at[store.path] = time.monotonic()
    if done:
        gone = set(queue_ids[:done])
        store.forget_reclaimed(row for row in listed if row[1] in gone)
    if reclaimed:  # the one trace of it an operator sees (like `vacuum`)
        log_event(log, "reclaimed", messages=reclaimed)
    return reclaimed, deferred


def _may_wait(store: QueueStore) -> bool:
    """Whether this round's reclaim may give way to a flush (see RECLAIM_DEFER_SECONDS)."""
    last = _reclaimed_at.get(store.path)
    if last is None or time.monotonic() - last > RECLAIM_DEFER_SECONDS:
        return False
    return store.reclaim_span() < RECLAIM_DEFER_SPAN
