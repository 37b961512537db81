"""max_auth_failures_per_client: failed AUTHs counted per client across all sessions and workers.

Per session, max_auth_failures ends a session (smtp.py). An attacker opens
many sessions, though, from several workers or inetd processes, so failures
are also counted per client in the queue database (store_auth), the one
place they all share, which also outlives a worker's death:

- once a client (clients.limit_key: an IPv6 client's /64) has
  max_auth_failures_per_client failures within auth_failure_window, its next
  AUTH gets 421 4.7.0 and the session ends, before any password is looked at
  (Postfix's smtpd_client_auth_rate_limit, counting failures only);
- the count is read when AUTH arrives (on the worker's loop: an indexed read)
  and again on the pool thread just before the password check, and a failure
  is written there before it is answered: concurrent sessions overshoot the
  limit by at most the checks in flight (the pool's threads per process);
- only failures count, per client address: an attacker elsewhere cannot lock
  the primary out of its own address; a success does not clear the count
  (a user with a valid login could otherwise guess another user's password
  between logins): the failures age out with the window;
- a queue that cannot be read now (QueueUnavailable) does not lock anyone
  out: the per-session limit and the delays still hold.
"""

from __future__ import annotations

import threading

from backupmx.clients import limit_key
from backupmx.store import AuthFailures, QueueUnavailable

BLOCKED = "blocked"  # check()'s answer when the limit was reached: no password was looked at


class ClientAuthLimit:
    """One per process (ConnectionContext). `store` is the loop thread's; pool threads open their own."""

    def __init__(self, config, store: AuthFailures):
        self.limit = config.max_auth_failures_per_client
        self.window = config.auth_failure_window
        self.path = config.queue
        self.store = store
        # A pool thread's own connection (SQLite's stay in their thread); it is
        # closed with the process.
        self._local = threading.local()

    def failures_if_blocked(self, client_ip: str) -> int | None:
        """On the loop thread, at AUTH: the client's failures once the limit is reached, else None."""
        try:
            failures = self.store.auth_failures(limit_key(client_ip), self.window)
        except QueueUnavailable:
            return None
        return failures if failures >= self.limit else None

    def check(self, verify, credentials, client_ip: str):
        """On a pool thread: BLOCKED (no password looked at) once the limit is reached; else
        verify(credentials), a failure recorded before it is returned."""
        key = limit_key(client_ip)
        store = self._thread_store()
        try:
            if store is not None and store.auth_failures(key, self.window) >= self.limit:
                return BLOCKED
        except QueueUnavailable:
            pass
        ok = verify(credentials)
        if not ok and store is not None:
            try:
                store.record_auth_failure(key, self.window)
            except QueueUnavailable:
                pass
        return ok

    def _thread_store(self) -> AuthFailures | None:
        store = getattr(self._local, "store", None)
        if store is None:
            try:
                store = AuthFailures(self.path)
            except QueueUnavailable:
                return None
            self._local.store = store
        return store
