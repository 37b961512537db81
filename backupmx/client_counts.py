"""What the master counts of its clients: their sessions, and the refusals it gave them.

ClientCounts holds each client's sessions across the SMTP workers and the ODMR
processes (under clients.limit_key: an IPv6 client per /64), which the
master's max_connections_per_client check reads at each accept. RejectCounts
holds the master's own 421s (replies.BUSY, replies.TOO_MANY_CONNECTIONS) by
reason: the master holds no queue, so a worker takes them over ("rejects
<reason> <n>" on its control socket) and adds them to the queue's counters.
"""

import collections

from backupmx import replies
from backupmx.clients import limit_key
from backupmx.listeners import refuse
from backupmx.log import log_event


class ClientCounts(collections.Counter):
    """Sessions per client across workers, counted under clients.limit_key (an IPv6 client per /64)."""

    def of(self, ip):
        return self[limit_key(ip)]

    def opened(self, ip):
        self[limit_key(ip)] += 1

    def closed(self, ip, sessions=1):
        key = limit_key(ip)
        self[key] -= sessions
        if self[key] <= 0:
            del self[key]


class RejectCounts(collections.Counter):
    """The master's own 421s by reason (replies.reason), until a worker takes them over:
    the master holds no queue, the worker adds them to the queue's counters."""

    def refuse(self, logger, hostname, sock, ip, reply, **fields):
        """Write the 421, log it as a reject like the workers' refusals, count it."""
        line = reply.render(hostname=hostname)
        refuse(sock, line)
        reason = replies.reason(reply)
        self[reason] += 1
        log_event(logger, "reject", client=ip, command="CONNECT", reason=reason,
                  reply=line.decode("ascii").rstrip("\r\n"), **fields)

    def hand_over(self, workers):
        """Send the counts to a worker ("rejects <reason> <n>"); what its socket does not take waits."""
        while self and workers:
            reason, count = next(iter(self.items()))
            try:
                workers[0].ctrl.send(f"rejects {reason} {count}".encode("ascii"))
            except OSError:
                return  # full or gone: next tick
            del self[reason]
