"""Admission control: may the queue take more mail for this domain right now?

Per-domain quotas (`max_queue_messages`, `max_queue_bytes`) and the global
`min_free_space` refuse new mail with 452 4.3.1 before it is received, so one
flooded domain cannot fill the disk for the others; nothing already queued is
touched. Answers are cached for a moment: a RCPT must not cost a query. The
limits are therefore soft by the mail in flight during that moment, which is
what Postfix's queue_minfree does too.
"""

import os
import time

from backupmx import replies
from backupmx.replies import Reply
from backupmx.store import QueueStore, QueueUnavailable

CACHE_SECONDS = 1.0


class Admission:
    """Looks at the queue and the disk for one worker process."""

    def __init__(self, config, store: QueueStore, *, clock=time.monotonic):
        self.config, self.store, self.clock = config, store, clock
        self._usage: dict[str, tuple[float, tuple[int, int]]] = {}
        self._free: tuple[float, int] | None = None
        self._queue_dir = os.path.dirname(os.path.abspath(config.queue))

    def recipient(self, domain: str) -> Reply | None:
        """None if mail for `domain` may be queued, else the 452 to answer the RCPT with."""
        if self._disk_short(0):
            return replies.QUEUE_UNAVAILABLE
        limits = self.config.domains[domain]
        if limits.max_queue_messages is None and limits.max_queue_bytes is None:
            return None
        messages, size = self._domain_usage(domain)
        if limits.max_queue_messages is not None and messages >= limits.max_queue_messages:
            return replies.DOMAIN_QUEUE_FULL
        if limits.max_queue_bytes is not None and size >= limits.max_queue_bytes:
            return replies.DOMAIN_QUEUE_FULL
        return None

    def message_size(self, size: int) -> Reply | None:
        """None if a message of the declared SIZE (RFC 1870) fits on the disk."""
        return replies.QUEUE_UNAVAILABLE if self._disk_short(size) else None

    def queued(self, domains) -> None:
        """This worker just queued mail for `domains`: look again at the next RCPT."""
        for domain in domains:
            self._usage.pop(domain, None)

    def _domain_usage(self, domain: str) -> tuple[int, int]:
        now = self.clock()
        cached = self._usage.get(domain)
        if cached is None or now - cached[0] > CACHE_SECONDS:
            try:
                usage = self.store.usage(domain)
            except QueueUnavailable:
                usage = cached[1] if cached else (0, 0)
            self._usage[domain] = cached = (now, usage)
        return cached[1]

    def _disk_short(self, size: int) -> bool:
        now = self.clock()
        if self._free is None or now - self._free[0] > CACHE_SECONDS:
            try:
                stat = os.statvfs(self._queue_dir)
                free = stat.f_bavail * stat.f_frsize
            except OSError:
                free = 1 << 62  # cannot tell: let the commit decide (it answers 452 itself)
            self._free = (now, free)
        return self._free[1] - size < self.config.min_free_space
