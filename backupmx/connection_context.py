"""What every SMTP connection of one worker process shares: ConnectionContext.

Built after the fork (it opens the queue), once per worker process (and once
per process under `serve --inetd` and for an ODMR connection): the queue, the
sessions' settings, the password checks and the AUTH failure limit, recipient
admission (quotas, the policy), the client DNS look-ups, the Offload that runs
slow calls off the event loop, and the refusals counted for the queue's
counters until the worker loop writes them (flush_counts, or along with the
mail in its group commit: counts_for_commit). connection.SMTPConnection takes
it as `ctx`.
"""

import collections
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable

from backupmx.auth import Authenticator
from backupmx.auth_limit import ClientAuthLimit
from backupmx.client_dns import ClientDNS
from backupmx.config import Config
from backupmx.offload import Offload
from backupmx.policy import RecipientPolicy
from backupmx.quota import Admission
from backupmx.smtp import SessionSettings
from backupmx.store import REJECTS, QueueStore, QueueUnavailable

# Slow calls (credential checks: scrypt, ~16 MB and ~60 ms each) run at once per worker.
OFFLOAD_THREADS = 2


@dataclass
class ConnectionContext:
    """What every connection of one worker process shares. Built after the fork: it opens the queue."""

    config: Config
    ssl_context: ssl.SSLContext | None
    logger: logging.Logger
    clock: Callable[[], float] = time.monotonic
    wallclock: Callable[[], float] = time.time
    # What answers DNS questions about clients (client_dns.SystemResolver when None): the
    # one seam for tests, which hand in a resolver answering from a table.
    resolver: object = None
    store: QueueStore = field(init=False)
    spool_dir: str = field(init=False)
    settings: SessionSettings = field(init=False)  # each connection's, but for its TLS state
    # The settings of a session on a plain and on an implicit-TLS listener (session_settings).
    _settings_by_tls: dict = field(init=False, repr=False)
    authenticator: Authenticator = field(init=False)
    auth_limit: ClientAuthLimit = field(init=False)  # max_auth_failures_per_client, across processes
    admission: Admission = field(init=False)
    quotas: dict = field(init=False)
    offload: Offload = field(init=False)  # where slow calls run, off the event loop (the loop watches it)
    # Refusals by reason (replies.reason) not yet added to the queue's counters:
    # the worker loop writes them now and then (flush_counts), not one transaction each.
    rejects: collections.Counter = field(init=False, default_factory=collections.Counter)
    policy: RecipientPolicy = field(init=False)  # recipient admission: quotas, callouts, ...
    client_dns: ClientDNS = field(init=False)  # each client's verified name, looked up at connect
    # Called with a connection just before its socket closes (the worker loop unregisters it from
    # its selector then: after the close, the selector looks for it and the kernel refuses).
    socket_closing: Callable[[object], None] | None = field(init=False, default=None)

    def __post_init__(self):
        self.store = QueueStore(self.config.queue)
        self.settings = SessionSettings.from_config(self.config)
        self._settings_by_tls = {implicit: self.settings.with_tls(available=self.ssl_context is not None and not implicit,
                                                                  active=implicit) for implicit in (False, True)}
        self.offload = Offload(OFFLOAD_THREADS, "offload")
        self.authenticator = Authenticator(self.config.users)
        self.auth_limit = ClientAuthLimit(self.config, self.store)
        self.admission = Admission(self.config, self.store)
        self.policy = RecipientPolicy(self.config, self.store, self.offload, self.logger, self.admission)
        self.client_dns = ClientDNS(self.config, self.offload, self.logger, self.resolver)
        self.quotas = {name: (d.max_queue_messages, d.max_queue_bytes) for name, d in self.config.domains.items()
                       if d.max_queue_messages is not None or d.max_queue_bytes is not None}
        # Bodies that outgrow memory are spooled beside the queue (same file system).
        self.spool_dir = os.path.dirname(os.path.abspath(self.config.queue))

    def session_settings(self, implicit_tls: bool) -> SessionSettings:
        """A new session's settings: STARTTLS offered when there is a certificate and no TLS yet."""
        return self._settings_by_tls[implicit_tls]

    def upkeep(self, now: float) -> None:
        """Once per turn of the worker loop (at least every second, and at next_upkeep())."""
        self.policy.upkeep()
        self.client_dns.upkeep()

    def next_upkeep(self) -> float | None:
        """The monotonic time at which upkeep has something to give up (None: nothing waits)."""
        return self.client_dns.next_deadline()

    def close(self) -> None:
        self.policy.close()
        self.offload.close()
        self.flush_counts(wait=True)  # the last chance: worth the busy timeout (5 s at most)
        self.store.close()

    def flush_counts(self, *, wait: bool = False) -> None:
        """Add the refusals counted so far to the queue's counters (one transaction);
        kept for the next time when the queue cannot take them now. The event loop
        calls this: by default it does not wait for another process's write lock
        (a purge, `delete ALL`, a Litestream checkpoint, an operator's sqlite3),
        which would freeze every session of the worker for the busy timeout.
        Most of the time the counts are written sooner anyway, inside the group
        commit of the mail (counts_for_commit)."""
        if not self.rejects:
            return
        try:
            self.store.add_counts(REJECTS, self.rejects, wait=wait)
        except QueueUnavailable:
            return
        self.rejects.clear()

    def counts_for_commit(self) -> dict[str, dict[str, int]]:
        """The counts a group commit writes along with the mail (enqueue_many's `counts`);
        forget them with counts_committed() once it committed."""
        return {REJECTS: dict(self.rejects)} if self.rejects else {}

    def counts_committed(self, counts: dict[str, dict[str, int]]) -> None:
        for reason, n in counts.get(REJECTS, {}).items():
            self.rejects[reason] -= n
            if self.rejects[reason] <= 0:
                del self.rejects[reason]

