"""The pre-fork master: it supervises SMTP workers and flush workers, and accepts.

Modelled on gunicorn's arbiter. The master only supervises and accepts:

- start-up (startup.py) validates everything once before forking (TLS
  context, queue database, listeners) and the master holds no SQLite
  connection across a fork (docs/DESIGN.md, "Processes");
- it accepts on every listener (listeners.py) and hands each connection to
  an SMTP worker over that worker's control socket (smtp_workers.py: the
  busiest below PACK_SESSIONS, else the least loaded; see worker.py for the
  protocol); a worker holds up to SESSIONS_PER_WORKER sessions at once;
- the verbs: spawn, reap (reap_workers: every child), murder, manage, in
  smtp_workers.SmtpWorkers for SMTP workers and flush_workers.FlushWorkers
  for flush workers;
- signal handlers only queue the signal and wake the loop through
  signal.set_wakeup_fd; one handle_<signal> method each does the work in the
  main loop;
- a worker that stops sending heartbeats gets SIGABRT (its faulthandler
  writes the stack it was stuck in to the log), and SIGKILL if it is still
  there ABORT_GRACE seconds later;
- a child that exits with children.BOOT_ERROR cannot start with this
  configuration: the master stops instead of respawning it forever;
- flush workers start first, and each says "ready" once its queue is open
  (a pipe per flush worker); only then are connections accepted: a flusher
  that cannot start fails the start-up with its reason (ServeError), rather
  than the server answering ETRN with 250/253 and nobody delivering. One that
  cannot start later is logged at ERROR and tried again, slower each time
  (the server keeps receiving mail meanwhile);
- a flush worker that died (kill -9, the OOM killer) has its domain leases
  released when it is reaped, and their flushes requested again, so another
  flusher goes on at once instead of when the leases run out;
- a connection to a listen_odmr port gets a process of its own
  (odmr_sessions.OdmrSessions: ATRN turns it into a blocking delivery),
  counted with the client's other sessions and reaped like the workers.
- its other parts live beside it: smtp_workers.py (the SMTP workers and
  the hand-off of each accepted connection), client_counts.py (each client's
  sessions, and the master's own refusals until a worker takes them over),
  flush_workers.py (the flush workers),
  helper_processes.py (the metrics process, the checkpointer) and
  primary_lookups.py (the DNS look-ups of host-name primaries, in a child, at
  start-up, at each reload, and again for the names that did not resolve).

Replies the master itself writes (no worker involved) are the two refusals,
both transient (RFC 5321 4.2.1: 421 closes the channel):
  replies.BUSY                  every worker is full and max_workers are running
  replies.TOO_MANY_CONNECTIONS  the client already has max_connections_per_client sessions
Each is a `reject ... command=CONNECT` line like the workers' refusals, and is
counted (client_counts.RejectCounts): the master holds no queue, so it hands
its counts to a worker ("rejects <reason> <n>" on the control socket), which
adds them to the queue's.
"""

import logging
import os
import selectors
import signal
import socket
import time

from backupmx import children, primaries, replies, worker
from backupmx.children import first_line
from backupmx.client_counts import ClientCounts, RejectCounts
from backupmx.client_socket import prepare_socket
from backupmx.clients import limit_key, shown_address
from backupmx.config import load_config, tuning
from backupmx.config_values import format_hostport
from backupmx.connection import SMTPConnection
from backupmx.flush_workers import FlusherHandle, FlushWorkers
from backupmx.flusher import run_flush_worker
from backupmx.helper_processes import HelperProcesses, MetricsProcess
from backupmx.listeners import Listener, build_listeners
from backupmx.log import log_event
from backupmx.metrics_http import bind as bind_metrics
from backupmx.odmr_sessions import OdmrSessions
from backupmx.primary_lookups import PendingLookups, UnresolvedPrimaries, log_lookup_timeout, pin_primaries
from backupmx.smtp_workers import SmtpWorkers, WorkerHandle
from backupmx.store_db import leave_checkpoints_to_checkpointer
from backupmx.startup import (ServeError, become_user, build_ssl_context, check_queue, log_tuning, raise_fd_limit,
                              record_clean_stop, start_logging)
from backupmx.tls import TLSConfigError

# After SIGTERM: how long the master waits for its children before SIGKILLing them.
# A worker drains within worker.DRAIN_GRACE + worker.DRAIN_CLOSE; a little margin on top.
STOP_TIMEOUT = worker.DRAIN_GRACE + worker.DRAIN_CLOSE + 5.0
# Pause accepting this long when the process is out of file descriptors.
ACCEPT_PAUSE = 0.1
# The master's loop wakes at least this often (heartbeat checks, respawns).
TICK = 0.25
# How long the flush workers have, at start-up, to say they are ready.
FLUSHER_BOOT_TIMEOUT = tuning("BACKUPMX_FLUSHER_BOOT_TIMEOUT", 30.0)
# Seconds a server TLS context (and so its session-ticket key) serves before the
# master builds a new one and replaces the SMTP workers with it. OpenSSL makes
# the ticket key once per context and Python cannot set or rotate it: whoever
# reads it from a worker's memory decrypts every recorded TLS 1.2 session that
# got a ticket, so its life is bounded, hourly like Postfix's tlsmgr.
TICKET_KEY_LIFETIME = tuning("BACKUPMX_TLS_TICKET_LIFETIME", 3600.0)


def serve(config, *, connection_class=SMTPConnection, flush_worker=run_flush_worker) -> int:
    """`backupmx serve`: start-up in its order, then the master's loop. Returns the exit status.

    Raises startup.ServeError, listeners.ListenError (OSErrors) and the
    config/TLS modules' errors with a one-line message when the server cannot
    start. `connection_class` makes the workers' session drivers;
    `flush_worker(config, owner, should_stop, ready=)` is the flush workers' body.
    """
    logger = start_logging(config, inetd=False)
    for warning in config.warnings:
        log_event(logger, "config-warning", warning=warning, level=logging.WARNING)
    log_tuning(logger)
    raise_fd_limit()
    ssl_context = build_ssl_context(config)  # as root: the key may be readable by root only
    master = Master(config, ssl_context, logger, connection_class=connection_class, flush_worker=flush_worker)
    config = master.config = pin_primaries(master)  # resolved once: later DNS answers cannot divert mail
    master.listeners = build_listeners(config, master)  # as root: ports < 1024
    if config.metrics_listen is not None:
        try:
            master.helpers.metrics = MetricsProcess(bind_metrics(config.metrics_listen))
        except OSError as exc:
            master.close_listeners()
            raise ServeError(f"metrics_listen {format_hostport(*config.metrics_listen)}: "
                             f"{exc.strerror or exc}") from None
    try:
        become_user(config, logger)
        check_queue(config)  # as the user: the database and its WAL are created as theirs
        return master.run()
    finally:
        master.close_listeners()


def _drain(sock):
    """Empty a non-blocking wakeup socket."""
    try:
        while sock.recv(64):
            pass
    except (BlockingIOError, InterruptedError):
        pass


class Master:
    """The supervisor. Construct with a validated config; run() returns the exit status."""

    def __init__(self, config, ssl_context, logger, *, connection_class=SMTPConnection,
                 flush_worker=run_flush_worker):
        self.config = config
        self.ssl_context = ssl_context
        self.listeners: list[Listener] = []
        self.logger = logger
        self.connection_class = connection_class
        self.flush_workers = FlushWorkers(self, flush_worker)
        self.generation = 0
        self.smtp_workers = SmtpWorkers(self)  # the SMTP workers (pid -> WorkerHandle) and the hand-off
        self.odmr = OdmrSessions(self)  # the processes of ODMR connections (listen_odmr)
        self.clients = ClientCounts()  # sessions per client, across workers
        self.rejects = RejectCounts()  # the master's 421s not yet handed to a worker
        self.sig_queue = []
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.stopping = False
        self.stop_deadline = None
        self.exit_status = 0
        self.killed_at_stop = False  # a child was SIGKILLed at the stop (stop-timeout)
        self.lookups = None  # the PendingLookups of a reload
        self.serving = False  # start-up is over: the listeners are being served
        self.accept_paused_until = 0.0
        self.in_hand = None  # the accepted socket being dispatched (a fork now must not keep it)
        self.pid = os.getpid()
        self.helpers = HelperProcesses()  # the metrics process (metrics_listen), the checkpointer
        self.ticket_keys = TicketKeys()  # when the TLS context is next rebuilt
        self.unresolved = UnresolvedPrimaries()  # when the primaries that did not resolve are looked up again

    # -- signals -----------------------------------------------------------

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

    def init_signals(self):
        for sock in (self.wakeup_r, self.wakeup_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self.signal_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "wakeup")

    def signal_handler(self, signum, frame):
        """Only record the signal (docs/DESIGN.md, "Processes"); the wakeup fd ends the select()."""
        if len(self.sig_queue) < 16:
            self.sig_queue.append(signum)

    def handle_signals(self):
        while self.sig_queue:
            signum = self.sig_queue.pop(0)
            name = signal.Signals(signum).name[3:].lower()
            getattr(self, f"handle_{name}")()

    def handle_chld(self):
        self.reap_workers()

    def handle_term(self):
        if self.stopping:  # a second TERM/INT: do not wait any longer
            log_event(self.logger, "stop-now")
            self.kill_all(signal.SIGKILL)
            return
        log_event(self.logger, "stopping", pid=self.pid)
        self.stopping = True
        self.cancel_lookups()
        self.stop_deadline = time.monotonic() + STOP_TIMEOUT
        self.close_listeners()
        self.smtp_workers.drain_all("stop")
        self.flush_workers.signal_all(signal.SIGTERM)
        self.helpers.stop()
        self.odmr.stop()

    handle_int = handle_term

    def handle_hup(self):
        """Reload: new config and TLS context; new workers, old ones drain."""
        if self.stopping:
            return
        try:
            config = load_config(self.config.path)
            ssl_context = build_ssl_context(config)
            if config.queue != self.config.queue:
                check_queue(config)
            if (config.log, config.log_level) != (self.config.log, self.config.log_level):
                # Only then: after a privilege drop the old file may not be ours to reopen.
                self.logger = start_logging(config, inetd=False)
        except Exception as exc:
            log_event(self.logger, "reload-failed", error=first_line(exc), level=logging.WARNING)
            return
        if (config.listen, config.listen_tls, config.listen_odmr, config.metrics_listen) != (
                self.config.listen, self.config.listen_tls, self.config.listen_odmr, self.config.metrics_listen):
            log_event(self.logger, "listen-change-ignored", reason="restart to change listeners")
        self.begin_lookups(config, ssl_context)

    def begin_lookups(self, config, ssl_context):
        """The reload waits for its DNS lookups, made in a child (PendingLookups)."""
        self.cancel_lookups()
        names = primaries.host_primaries(config)
        if not names:
            return self.finish_reload(config, ssl_context, {})
        try:
            PendingLookups.begin(self, config, ssl_context, names)
        except OSError as exc:  # no child: look them up here, as at start-up
            log_event(self.logger, "fork-failed", error=exc.strerror)
            return self.finish_reload(config, ssl_context, primaries.look_up(names))

    def end_lookups(self, timed_out=False):
        pending = self.lookups
        self.cancel_lookups()
        if timed_out:
            log_lookup_timeout(self.logger)
        pending.finish(self, pending.results())

    def cancel_lookups(self):
        pending, self.lookups = self.lookups, None
        if pending is not None:
            children.forget_pipe(self.selector, pending.fd)
            children.send_signal(pending.pid, signal.SIGKILL)  # reaped with the other children

    def finish_reload(self, config, ssl_context, lookups):
        if self.stopping:
            return
        self.config = primaries.pin(config, self.logger, previous=self.config, resolver=primaries.answered(lookups))
        self.flush_workers.retire_all()
        self.helpers.stop(retiring=True)  # they run with the old config: new ones start with the new
        self.replace_workers(ssl_context)
        log_event(self.logger, "reloaded", generation=self.generation, config=self.config.path)
        self.smtp_workers.manage()
        self.flush_workers.manage()

    def replace_workers(self, ssl_context, how="drain"):
        """A new generation of SMTP workers with `ssl_context` (and self.config); the old ones
        drain (`how`: "drain" or "retire": worker.py). Only a new context restarts the ticket clock."""
        if ssl_context is not self.ssl_context:
            self.ticket_keys.restart()
        self.ssl_context = ssl_context
        self.generation += 1
        self.smtp_workers.drain_all(how)

    def rotate_ticket_keys(self):
        """When TicketKeys says so: new SMTP workers with a new TLS context, so a new
        session-ticket key (the configuration stays); run() then spawns them."""
        if (ssl_context := self.ticket_keys.due_context(self)) is not None:
            self.replace_workers(ssl_context, "retire")  # hourly: old sessions are not hurried
            log_event(self.logger, "tls-keys-rotated", generation=self.generation)

    # -- listeners -----------------------------------------------------------

    def register_listeners(self):
        for listener in self.listeners:
            self.selector.register(listener.socket, selectors.EVENT_READ, listener)
            log_event(self.logger, "listening", address=listener.label, **listener.log_fields(bool(self.ssl_context)))

    def close_listeners(self):
        for listener in self.listeners:
            try:
                self.selector.unregister(listener.socket)
            except (KeyError, ValueError):
                pass
            listener.server_close()
        self.listeners = []

    def accept_failed(self, listener, exc):
        if children.is_fd_exhaustion(exc):
            # The socket stays readable: stop polling it a moment instead of spinning.
            log_event(self.logger, "accept-failed", listener=listener.label, error=exc.strerror or str(exc))
            self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE
            for lst in self.listeners:
                try:
                    self.selector.unregister(lst.socket)
                except (KeyError, ValueError):
                    pass

    def resume_accepting(self):
        if self.accept_paused_until and time.monotonic() >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            for listener in self.listeners:
                self.selector.register(listener.socket, selectors.EVENT_READ, listener)

    def verify_request(self, listener, sock, address):
        """max_connections_per_client, counted per limit_key (an IPv6 client per /64)."""
        ip = shown_address(address[0])
        sessions = self.clients.of(ip)
        if sessions >= self.config.max_connections_per_client:
            self.rejects.refuse(self.logger, self.config.hostname, sock, ip, replies.TOO_MANY_CONNECTIONS,
                                sessions=sessions)
            return False
        return True

    def process_request(self, listener, sock, address):
        if listener.odmr:
            return self.odmr.start(listener, sock, address)  # a process of its own (odmr_sessions.py)
        ip, port = shown_address(address[0]), address[1]
        prepare_socket(sock)  # here rather than in the worker, whose one core the sessions share
        header = f"conn {'tls' if listener.implicit_tls else 'plain'} {ip} {port} {int(sock.family)}".encode("ascii")
        self.in_hand = sock
        try:
            self.smtp_workers.dispatch(listener, sock, ip, header)
        finally:
            self.in_hand = None

    # -- children ----------------------------------------------------------------

    def close_in_child(self, keep=None):
        """In a fresh child: drop every descriptor that is the master's.

        Listeners (an orphan must not hold the port), the other workers'
        control sockets (each worker must see EOF when the master dies), the
        wakeup pair and the selector.
        """
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for listener in self.listeners:
            listener.socket.close()
        self.helpers.close_in_child(keep)
        if self.in_hand is not None:
            # Spawned while dispatching: without this the new child would hold the
            # client's socket open for its whole life (the client never sees EOF).
            self.in_hand.close()
        self.smtp_workers.close_in_child()
        self.flush_workers.close_in_child()
        self.wakeup_r.close()
        self.wakeup_w.close()
        self.selector.close()
        leave_checkpoints_to_checkpointer()  # no child writes the queue before this: its writers' backstop
        # The default actions are back: a SIGTERM that came meanwhile (blocked across
        # children.fork_blocking) ends this child now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)

    def reap_workers(self):
        """waitpid(-1, WNOHANG) until nothing is left to reap."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.smtp_workers.handles:
                self.smtp_workers.exited(self.smtp_workers.handles.pop(pid), status)
            elif pid in self.flush_workers.handles:
                self.flush_workers.exited(self.flush_workers.handles.pop(pid), status, stopping=self.stopping,
                                          serving=self.serving)
            elif pid in self.helpers.pids():
                self.helpers.exited(self, pid, status)
            elif pid in self.odmr.children:
                self.odmr.exited(pid, status)

    def start_flushers(self):
        """Start-up: every flush worker ready before anything is served (never a silent "started")."""
        failure = self.flush_workers.wait_until_ready(FLUSHER_BOOT_TIMEOUT)
        if failure is not None:
            raise ServeError(f"a flush worker could not start: {failure}; not starting")

    # -- the loop --------------------------------------------------------------

    def poll(self):
        """One turn: what is ready on the selector (at most TICK's wait), then signals and reaping."""
        for key, _ in self.selector.select(TICK):
            data = key.data
            if data == "wakeup":
                _drain(self.wakeup_r)
            elif isinstance(data, Listener):
                if not self.stopping:
                    data.handle_request_noblock()
            elif isinstance(data, WorkerHandle):
                self.smtp_workers.read(data)
            elif isinstance(data, FlusherHandle):
                self.flush_workers.read_ready(data)
            elif isinstance(data, PendingLookups) and data.read():
                self.end_lookups()
        self.handle_signals()
        self.reap_workers()

    def kill_all(self, sig):
        for pid in [*self.smtp_workers.handles, *self.flush_workers.handles, *self.odmr.children, *self.helpers.pids()]:
            children.send_signal(pid, sig)

    def halt(self, status):
        """Stop now (a worker cannot boot): children are told to stop, the loop ends."""
        self.exit_status = status
        if not self.stopping:
            self.handle_term()

    def run(self):
        self.init_signals()
        self.start_flushers()
        self.serving = True
        self.register_listeners()
        if (metrics := self.helpers.metrics) is not None:
            log_event(self.logger, "listening", address=format_hostport(*metrics.sock.getsockname()[:2]), serves="metrics")
        self.smtp_workers.manage()
        self.helpers.manage(self)
        log_event(self.logger, "server-started", pid=self.pid, workers=self.config.workers, hostname=self.config.hostname)
        try:
            while True:
                self.poll()
                if self.lookups is not None and time.monotonic() > self.lookups.deadline:
                    self.end_lookups(timed_out=True)
                if self.stopping:
                    if not (self.smtp_workers.handles or self.flush_workers.handles or self.odmr.children or self.helpers.pids()):
                        break
                    if time.monotonic() > self.stop_deadline:
                        children_left = len(self.smtp_workers.handles) + len(self.flush_workers.handles) + len(self.odmr.children)
                        log_event(self.logger, "stop-timeout", children=children_left)
                        self.killed_at_stop = True
                        self.kill_all(signal.SIGKILL)
                        self.stop_deadline = time.monotonic() + 5.0
                    continue
                self.resume_accepting()
                self.rotate_ticket_keys()
                self.unresolved.look_up_due(self)
                self.rejects.hand_over(self.smtp_workers.active())
                self.smtp_workers.murder()
                self.smtp_workers.manage()
                self.flush_workers.manage()
                self.helpers.manage(self)
        finally:
            self.close_listeners()
            if self.helpers.metrics is not None:
                self.helpers.metrics.sock.close()
            signal.set_wakeup_fd(-1)
        if self.exit_status == 0 and not self.killed_at_stop:
            record_clean_stop(self.config.queue)  # the next start need not read it all (check_queue)
        log_event(self.logger, "stopped", pid=self.pid, status=self.exit_status)
        return self.exit_status


class TicketKeys:
    """When the server TLS context is due to be built again (TICKET_KEY_LIFETIME after
    the last one). OpenSSL makes the session-ticket key once per context and Python
    can neither set nor rotate it: a new context is the only new key."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.due = time.monotonic() + TICKET_KEY_LIFETIME

    def due_context(self, master):
        """A new server context when one is due, else None. Not with no TLS, nor while a
        reload is under way (it brings its own). One that cannot be built now (the key
        file unreadable) is logged and tried an interval later, the old one serving
        meanwhile: a late rotation is better than a server that stops."""
        if master.ssl_context is None or master.lookups is not None or time.monotonic() < self.due:
            return None
        self.restart()
        try:
            return build_ssl_context(master.config)
        except TLSConfigError as exc:
            log_event(master.logger, "tls-keys-rotation-failed", error=first_line(exc), level=logging.WARNING)
            return None
