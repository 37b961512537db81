"""ODMR sessions (RFC 2645) as processes: one per connection, forked by the master or run by inetd.

Why a process of its own, and not a session in an SMTP worker: after ATRN
the connection becomes our SMTP client session toward the customer, and the
delivery code (flusher.deliver_domain over smtplib) blocks on the network;
in a worker it would stall every other session of its loop. Nor can the
connection move to a flusher once TLS is up: TLS state cannot leave its
process. ODMR connections are rare (a few primaries, a few times an hour),
so the master forks one process per connection (as inetd mode has one per
session): it runs the same session loop (worker.SessionLoop) for that one
connection up to the 250 to ATRN, then the blocking delivery over the same
socket and TLS layer (odmr_connection.ReversedPeer), then QUIT, and exits.

Bounds: at most MAX_SESSIONS such processes, MAX_SESSIONS_PER_CLIENT from
one address (beyond: 421 busy, as the master says when every worker is
full), odmr_connection.LOGIN_TIME to authenticate, the per-command
`timeout` both ways (each reply of the customer, each write to it), and
the lease kept alive only while this process lives.
"""

import collections
import functools
import logging
import os
import signal
import socket
import time

from backupmx import children, replies
from backupmx.children import StopFlag
from backupmx.clients import limit_key, shown_address
from backupmx.connection_context import ConnectionContext
from backupmx.flush_workers import release_leases
from backupmx.flush_lease import default_lease_seconds
from backupmx.flusher import deliver_domain
from backupmx.log import log_event
from backupmx.odmr_connection import OdmrConnection, Reversal, ReversedPeer, lease_owner, release_domains
from backupmx.smtpclient import PrimaryUnavailable
from backupmx.worker import SessionLoop

MAX_SESSIONS = 16
MAX_SESSIONS_PER_CLIENT = 4


def serve_odmr_session(sock, peer, config, ssl_context, logger: logging.Logger, stop: StopFlag) -> None:
    """One ODMR connection from its greeting to its end, in this process (forked, or inetd's)."""
    owner = lease_owner(socket.gethostname(), os.getpid())
    connection = functools.partial(OdmrConnection, owner=owner, lease_seconds=default_lease_seconds(config.timeout))
    context = ConnectionContext(config=config, ssl_context=ssl_context, logger=logger)
    try:
        loop = SessionLoop(None, context, logger, connection_class=connection, stop=stop)
        conn = loop.add_session(sock, peer, implicit_tls=False)
        loop.run()
        if conn is not None and conn.reversal is not None:
            deliver_reversed(conn.handoff(), context.store, config, logger,
                             should_stop=lambda: stop.should_stop() or loop.draining)
    finally:
        context.close()


def deliver_reversed(reversal: Reversal, store, config, logger: logging.Logger, *, should_stop) -> None:
    """Each leased domain's mail over the reversed connection (deliver_domain, the flushers'
    rules and outcomes), then QUIT; the leases are given back whatever happens."""
    peer = ReversedPeer(reversal, hostname=config.hostname, timeout=config.timeout, log=logger)
    counts = collections.Counter()
    started = time.monotonic()
    try:
        peer.start()
        for name in reversal.waiting:
            if should_stop() or not peer.alive:
                break
            counts.update(deliver_domain(store, config.domains[name], owner=reversal.owner,
                                         hostname=config.hostname, timeout=config.timeout,
                                         lease_seconds=default_lease_seconds(config.timeout), log=logger,
                                         should_stop=should_stop, primary=peer))
    except PrimaryUnavailable as exc:  # it did not greet, or not as an SMTP server
        log_event(logger, "atrn-failed", client=reversal.client, user=reversal.user, error=exc.reason,
                  level=logging.WARNING)
    except Exception as exc:  # the queue: what was recorded stays, the rest is delivered next time
        log_event(logger, "atrn-failed", client=reversal.client, user=reversal.user,
                  error=f"{type(exc).__name__}: {exc}", level=logging.ERROR)
    finally:
        peer.quit()
        release_domains(store, reversal.waiting, reversal.owner, logger)
    log_event(logger, "atrn-done", client=reversal.client, user=reversal.user, messages=counts["messages"],
              delivered=counts["delivered"], deferred=counts["deferred"], failed=counts["failed"],
              seconds=f"{time.monotonic() - started:.3f}")


class OdmrSessions:
    """The master's ODMR connections, one forked process each (module docstring).

    The master hands each connection of a listen_odmr listener to start(),
    tells exited() of each process it reaps, and stop() when it stops. A
    process that died (kill -9) has its leases released at once and their
    flushes requested again, as a dead flush worker's (flush_workers.py).
    """

    def __init__(self, master):
        self.master = master
        self.children: dict[int, str] = {}  # pid -> the client's address (clients.shown_address)

    def start(self, listener, sock, address) -> None:
        master, ip = self.master, shown_address(address[0])
        same_client = sum(1 for other in self.children.values() if limit_key(other) == limit_key(ip))
        if len(self.children) >= MAX_SESSIONS or same_client >= MAX_SESSIONS_PER_CLIENT:
            return self._refuse(listener, sock, ip)
        try:
            pid = children.fork_blocking(master.SIGNALS)
        except OSError as exc:
            log_event(master.logger, "fork-failed", error=exc.strerror)
            return self._refuse(listener, sock, ip)
        if pid == 0:
            master.close_in_child()
            config, ssl_context, logger, parent = master.config, master.ssl_context, master.logger, master.pid

            def session():
                serve_odmr_session(sock, address, config, ssl_context, logger, StopFlag(parent=parent).install())

            children.run_child(session, logger, "odmr-session-crashed")
        sock.close()  # the session's process has its own
        self.children[pid] = ip
        master.clients.opened(ip)
        log_event(master.logger, "odmr-session-started", pid=pid, client=ip, level=logging.DEBUG)

    def exited(self, pid: int, status: int) -> None:
        ip = self.children.pop(pid)
        self.master.clients.closed(ip)
        if status != 0:
            log_event(self.master.logger, "odmr-session-died", pid=pid, client=ip,
                      status=children.describe_status(status), level=logging.WARNING)
            release_leases(self.master.config.queue, lease_owner(socket.gethostname(), pid), self.master.logger,
                           reason="odmr session died")

    def stop(self) -> None:
        """SIGTERM to each: before ATRN its session gets 421, after it the delivery stops between messages."""
        for pid in self.children:
            children.send_signal(pid, signal.SIGTERM)

    def _refuse(self, listener, sock, ip: str) -> None:
        """421 busy, as the master says when every worker is full (a `reject` line, counted)."""
        self.master.rejects.refuse(self.master.logger, self.master.config.hostname, sock, ip, replies.BUSY)
        listener.shutdown_request(sock)
