"""Housekeeping's reclaim (schema 14): the messages whose last queue row left.

A flush, a delete or a purge does not delete a message's own row and body chunks:
trigger queue_gone lists it in the table `reclaim` (schema.sql), and each
housekeeping round (lifecycle.py) deletes the listed ones here, in queue id order:
after a drain, consecutive ids share their pages (in the flush's order, a domain's,
each message would dirty pages of its own among the other domains' mail;
bench/README.md, "The flush at 1M with the message's deletion deferred"). Then the
vacuum (vacuum_round) hands the pages they freed back to the file system. Both give
way to a flush for a few minutes at most (may_give_way).
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
# The vacuum: free pages (flushed mail) up to this share of the file stay: new mail
# reuses them without growing the file. Beyond it they go back to the file system...
VACUUM_KEEP = 0.10
# ... at most this many bytes per write transaction (the SMTP workers' commits
# wait while one runs: ~8 MB moves in a few tens of ms), for at most
# VACUUM_ROUND_SECONDS per housekeeping round, with a pause after each for them.
VACUUM_STEP = 8 * 1024 * 1024
VACUUM_ROUND_SECONDS = 2.0
VACUUM_PAUSE = 0.05
# It gives way to a flush as the reclaim does, within the same bound (may_give_way):
# nearly empty, its steps landed in the flushes an ETRN asked for (bench/README.md,
# "What the flush workers' housekeeping costs a flush at 1M"); the pages can go back
# a round later, and a queue that flushes all the time still gets them back.
_vacuumed_at: dict[str, float] = {}  # queue path -> time.monotonic() its last whole vacuum round ended here


def reclaim_round(store: QueueStore, log: logging.Logger) -> tuple[int, bool]:
    """One round's reclaim: (messages deleted, whether it gave way to a flush)."""
    may_wait = may_give_way(store, _reclaimed_at)
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


def vacuum_round(store: QueueStore) -> tuple[int, bool]:
    """Hand free pages beyond VACUUM_KEEP of the file back, VACUUM_STEP at a time:
    (pages handed back, whether it gave way to a flush)."""
    may_wait = may_give_way(store, _vacuumed_at)
    step = max(1, VACUUM_STEP // store.page_size())
    deadline = time.monotonic() + VACUUM_ROUND_SECONDS
    freed = 0
    deferred = False
    while time.monotonic() < deadline:
        free, pages = store.free_pages()
        excess = free - int(pages * VACUUM_KEEP)
        if excess <= 0:
            break
        if may_wait and store.flush_wanted():  # one is wanted, or started since the last step (a tiny read)
            deferred = True
            break
        freed += store.incremental_vacuum(min(step, excess))
        time.sleep(VACUUM_PAUSE)
    if not deferred:  # a round cut short by a flush does not count as one
        _vacuumed_at[store.path] = time.monotonic()
    return freed, deferred


def may_give_way(store: QueueStore, ran_at: dict[str, float]) -> bool:
    """Whether this round's reclaim or vacuum may give way to a flush: the step's last
    whole round (`ran_at`: _reclaimed_at, _vacuumed_at) ended here less than
    RECLAIM_DEFER_SECONDS ago, and the list is short (see RECLAIM_DEFER_SECONDS)."""
    last = ran_at.get(store.path)
    if last is None or time.monotonic() - last > RECLAIM_DEFER_SECONDS:
        return False
    return store.reclaim_span() < RECLAIM_DEFER_SPAN
