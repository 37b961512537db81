"""The queue: one SQLite database (store_db.py), schema in schema.sql, used in roles.

QueueStore is the whole queue; each role is a class of its own module, named
for the processes that use it:

  store_intake.Intake               SMTP workers: new mail, group commit, quota usage
  store_flushes.FlushRequests       ETRN/flush requests (workers, CLI, housekeeping);
                                    domain leases (flushers)
  store_delivery.Delivery           flushers: a domain's queued mail, each recipient's outcome
  store_housekeeping.Housekeeping   lifecycle: expiry, DSN claims, retention, upkeep
  store_operator.OperatorQueries    the CLI: reports and postsuper-style actions
  store_status.DomainStatus         per-domain status (last ETRN, last delivery, queueing
                                    since) and counters: metrics, health, notices
  store_verify.VerifyCache          SMTP workers, the CLI: the primary's answers to recipient callouts
  store_greylist.Greylist           SMTP workers: greylisting's triples
  store_probes.PrimaryProbes        flush workers, SMTP workers: what the monitored primaries' probes found
  store_auth.AuthFailures           SMTP workers, inetd sessions: failed AUTHs per client

What must always hold (each public method keeps it in ONE transaction):
  - A message is in `messages` once, with one `queue` row per recipient domain
    and one `recipients` row per RCPT TO of that domain.
  - The caller may say "250 queued as <id>" only after enqueue_many() returned:
    the commit is durable then (journal_mode=WAL, synchronous=FULL).
  - Nothing is ever half-queued: any failure rolls the whole enqueue back.
  - A recipient the primary accepted is deleted; its queue row goes with its
    last recipient, and the message, once its last row is gone, is listed
    for housekeeping to delete (table reclaim; triggers in schema.sql).
  - Every other outcome is a state (queued, held, failed, expired) with the
    reply that caused it, and an `events` row; nothing is "unknown".
  - At most one flusher holds a domain's lease; a lease ends by itself.

Open a QueueStore only in the process that uses it (after fork): an SQLite
connection must never cross a fork.
"""

from backupmx.store_auth import AuthFailures  # noqa: F401
from backupmx.store_bodies import BodyReader  # noqa: F401
from backupmx.store_db import (DELIVERED, EXPIRED, FAILED, HELD, QUEUED, RECEIVED, REJECTS, STATES,  # noqa: F401
                               WAITING, QueueDatabase, RecipientStatus, check_database, needs_migration)
from backupmx.store_delivery import Delivery, QueuedMessage  # noqa: F401
from backupmx.store_errors import QueueUnavailable  # noqa: F401
from backupmx.store_flushes import FlushRequests  # noqa: F401
from backupmx.store_greylist import Greylist, GreylistEntry, Triple  # noqa: F401
from backupmx.store_housekeeping import (DSN_CLAIM_SECONDS, NAME_ROWS_SQL, Bounce, ExpiredRow,  # noqa: F401
                                         Housekeeping, PurgedRow, unnamed_queue_rows)
from backupmx.store_ids import is_queue_id, new_queue_id  # noqa: F401
from backupmx.store_intake import Intake, QuotaExceeded, Submission  # noqa: F401
from backupmx.store_operator import (Event, MessageDetail, MessageRow, OperatorQueries,  # noqa: F401
                                     QueueSummary, RowDetail, RowKey, Selection)
from backupmx.store_probes import PrimaryProbes, PrimaryState  # noqa: F401
from backupmx.store_status import DomainChange, DomainReport, DomainStatus, Notice  # noqa: F401
from backupmx.store_verify import ACCEPTED, REFUSED, VerifyAnswer, VerifyCache  # noqa: F401


class QueueStore(Intake, FlushRequests, Delivery, Housekeeping, OperatorQueries, DomainStatus, VerifyCache,
                 AuthFailures, Greylist, PrimaryProbes):
    """The whole queue, every role on one connection. One instance per process, created after fork."""
