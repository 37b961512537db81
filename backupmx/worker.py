"""One SMTP worker process: many sessions at once over non-blocking sockets.

The master (master.py) accepts connections and hands each one to a worker
over the worker's control socket (an AF_UNIX SOCK_SEQPACKET pair, one message
per datagram, the connection's file descriptor attached with SCM_RIGHTS).
The worker drives every session with one `selectors` loop (SessionLoop); the
per-connection protocol work is the session driver's
(connection.SMTPConnection). Idle clients therefore cost a file descriptor,
not a process.

Control protocol (ASCII, one message per SEQPACKET datagram):

  master -> worker   "conn plain|tls <ip> <port> [<family>]"  + one fd   a new session;
                                with <family> (AF_INET, AF_INET6 as numbers) the master
                                prepared the socket (client_socket.prepare_socket)
                     "drain"    (SIGHUP) no more sessions will come: let the ones
                                in flight finish, exit when none is left
                     "stop"     (SIGTERM) the same, but sessions are asked to end
                                after their current transaction at once
                     "retire"   (TLS ticket-key rotation) like "drain", but the
                                sessions are left to end on their own (max_session_time)
                     "rejects <reason> <n>"  the master refused n connections itself
                                (its 421s): added to the queue's counters
  worker -> master   "hb <sessions>"   heartbeat, every HEARTBEAT_INTERVAL
                     "closed <ip> [<ip> ...]"  sessions ended (each echoes the <ip>
                                       it was handed, so the master's per-client
                                       counts stay exact): those of one loop
                                       round in one message (CLOSED_BATCH)

EOF on the control socket means the master is gone: the worker stops and exits.

"drain" and "stop" are bounded by DRAIN_GRACE + DRAIN_CLOSE seconds. "stop" calls
conn.begin_shutdown(DRAIN_GRACE) on every session at once (the transaction in
flight finishes, then 421 4.3.2; an idle session gets it now). "drain" leaves
sessions undisturbed for DRAIN_GRACE seconds (a reload should not cut anyone
off), then calls begin_shutdown(DRAIN_CLOSE). Whatever is still open at the
end is closed. "retire" comes every hour (master.TicketKeys) rather than when the
operator asks: a slow client's big message must not be cut off each time, so its
patience is max_session_time instead of DRAIN_GRACE (each session's own limit
ends it first); a "stop" afterwards still ends it within DRAIN_GRACE + DRAIN_CLOSE.

Slow calls a driver hands to the worker's Offload (a password check) come
back through the same loop: it watches the Offload and calls each one's
answer in the loop's thread. The loop owns the group commit: a driver whose
client ended DATA hands out a QueueMessage outcome; at the end of the loop round every such message of the
worker is committed in ONE transaction (one fsync), and only then is each
driver told `committed(problem)`, which sends the 250 (or 452). Other
outcomes go to hook methods (`flush_requested`), which a mode may override
(inetd.py starts a flusher there).

Everything process-wide (signal handlers, the SQLite connection) is set up here,
after the fork (docs/DESIGN.md, "Processes"); nothing of it exists in the master.
"""

import logging
import os
import selectors
import socket
import time

from backupmx import children
from backupmx.children import BOOT_ERROR, StopFlag
from backupmx.client_socket import prepare_socket
from backupmx.config import tuning
from backupmx.connection import FlushRequested, SMTPConnection
from backupmx.connection_context import ConnectionContext
from backupmx.connection_messages import QueueMessage
from backupmx.log import defer_writes, flush_pending, log_event
from backupmx.store import QueueUnavailable

# Seconds between heartbeats sent to the master (it aborts a worker whose last
# heartbeat is older than smtp_workers.HEARTBEAT_TIMEOUT).
HEARTBEAT_INTERVAL = 1.0

# Drain bounds, in seconds (see the module docstring).
DRAIN_GRACE = tuning("BACKUPMX_DRAIN_GRACE", 25.0)
DRAIN_CLOSE = tuning("BACKUPMX_DRAIN_CLOSE", 5.0)

# Upper bound on one select() wait, so the drain phases and heartbeats stay on time.
MAX_WAIT = 1.0

# Seconds of TLS handshake steps one loop round may spend (at least one step), after every
# cheap session of the round was served: a step with the client's ClientHello is a signature
# (~1.5 ms of CPU with RSA-2048), and a worker packed with STARTTLS clients had twenty of them
# ready at once, a ~40 ms round, while a plain client's MAIL waited behind them. The others
# wait, oldest first, for the next rounds, which then do not wait in select(); their sockets are
# not watched for input meanwhile (SessionLoop.handshakes), so a round costs the steps it serves,
# not a selector event for every session still waiting.
HANDSHAKE_BUDGET = 0.002

# Seconds between writes of the refusals counted (ConnectionContext.flush_counts),
# when no group commit wrote them meanwhile: a client refused in a loop costs a
# counter increment, not a transaction each. Never a wait on another's lock.
COUNTS_INTERVAL = tuning("BACKUPMX_COUNTS_INTERVAL", 5.0)

_CTRL_MAX = 256  # bytes: the longest control message ("conn tls <ipv6> <port>")
# Bytes of one "closed ..." message at most (the master reads _CTRL_MAX at a time): a round's
# ended sessions go out together, as few sends as fit, rather than one send each.
CLOSED_BATCH = 200


# socket.socket(..., fileno=) with this in its type takes the descriptor as non-blocking as it is.
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
# recvmsg's flag as a plain int: `flags & socket.MSG_CTRUNC` is an IntFlag operation, three
# Python calls per hand-off.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def _prepared_family(words) -> int | None:
    """A hand-off's fifth word: the address family of a socket the master prepared (prepare_socket)."""
    if words and words[0].isdigit() and int(words[0]) in (socket.AF_INET, socket.AF_INET6):
        return int(words[0])
    return None


class SessionLoop:
    """The selectors loop over the control socket and every session of one process.

    `ctrl` is None in inetd mode: then the loop serves the sessions it was
    given with add_session() and returns when the last one ends.
    `connection_class(sock, peer, context, implicit_tls=...)` makes a session
    driver; SMTPConnection unless a test supervises something simpler. The loop
    uses of a driver: on_readable(), on_writable(), on_timeout(), close(),
    begin_shutdown(grace), interest(), deadline, closed, sock, `handshaking`
    (its next input is a TLS handshake step: costly, served after the cheap
    work of a round, within HANDSHAKE_BUDGET), and `outcomes` (a list it takes,
    when not empty, after each callback).
    """

    def __init__(self, ctrl, context: ConnectionContext, logger: logging.Logger, *,
                 connection_class=SMTPConnection, stop: StopFlag | None = None):
        self.ctrl = ctrl
        self.context = context
        self.connection_class = connection_class
        self.logger = logger
        self.stop = stop or StopFlag()
        self.selector = selectors.DefaultSelector()
        self.sessions = {}  # conn -> peer ip as the master sent it
        # conn -> its deadline as of its last callback (every callback of a session is followed
        # by update(), and apply_interest() asks it), so the loop need not ask all of them each turn.
        self.deadlines = {}
        self.registered = {}  # conn -> the events its socket is registered for (absent: not registered)
        # Sessions whose interest may have changed this round: the selector is told once, before
        # the next select() (apply_interest). A session waiting for the group commit wants nothing
        # for a moment and then reading again: in the same round that costs no epoll_ctl at all.
        self.changed = {}  # conn -> None (an ordered set)
        self.to_commit = []  # (conn, Submission) waiting for this round's group commit
        # Sessions whose handshake step is ready, oldest first, with their selector events
        # (serve_handshakes): a session left over keeps its place for the next round. While it
        # waits here its socket is not watched for input (apply_interest): its input is known to be
        # there, and a burst of k of them would otherwise come back from every zero-wait select(),
        # k events a round to serve the few steps the budget allows. Its deadlines still run
        # (check_deadlines); a peer that closed meanwhile is read when its step is served.
        self.handshakes = {}  # conn -> mask
        self.outbox = []  # control messages the socket could not take yet
        self.ended = []  # the report ips of the sessions that ended this round (report_closed)
        self.draining = False
        self.polite_at = None  # monotonic: when begin_shutdown goes to every session
        self.close_at = None  # monotonic: when whatever is left is closed
        self.polite_sent = False
        self.master_gone = False
        self.next_heartbeat = 0.0
        self.next_counts = time.monotonic() + COUNTS_INTERVAL
        if ctrl is not None:
            ctrl.setblocking(False)
            self.selector.register(ctrl, selectors.EVENT_READ, None)
        self.selector.register(context.offload, selectors.EVENT_READ, context.offload)
        context.socket_closing = self._unregister

    # -- hooks (may be overridden) ----------------------------------------------

    def flush_requested(self, domains: tuple[str, ...]) -> None:
        """An ETRN recorded flush requests for `domains`. Under the master the
        flush workers poll the queue for them: nothing to do here."""

    # -- sessions -------------------------------------------------------------

    def add_session(self, sock, peer, implicit_tls, report_ip=None, *, prepared=False):
        """Start a session driver on `sock` (connected, any blocking mode; `prepared`: by
        client_socket.prepare_socket, as the master does before a hand-off)."""
        report_ip = peer[0] if report_ip is None else report_ip
        try:
            if not prepared:
                prepare_socket(sock)
            conn = self.connection_class(sock, peer, self.context, implicit_tls=implicit_tls)
        except Exception:
            self.logger.exception("session-start-failed client=%s", peer[0])
            sock.close()
            self._ended(report_ip)
            return None
        self.sessions[conn] = report_ip
        if self.draining and self.polite_sent:
            self._call(conn, lambda: conn.begin_shutdown(max(0.0, self.close_at - time.monotonic())))
        self.update(conn)
        return conn

    def update(self, conn):
        """After a callback of `conn`: retire it now when closed (its descriptor number may be
        reused at once), else look at its deadline and interest before the next select()."""
        if conn not in self.sessions:
            return
        if conn.closed:
            self._unregister(conn)
            self.changed.pop(conn, None)
            self.deadlines.pop(conn, None)
            self.handshakes.pop(conn, None)  # ended while waiting its turn (a deadline, a drain)
            self._ended(self.sessions.pop(conn))
            return
        self.changed[conn] = None

    def apply_interest(self):
        """Give the selector, and the deadlines, what the sessions changed since the last call."""
        changed, self.changed = self.changed, {}
        for conn in changed:
            if conn not in self.sessions:
                continue
            if conn.closed:  # closed outside a callback: retire it as update() does
                self.update(conn)
                continue
            self.deadlines[conn] = conn.deadline
            mask = conn.interest()
            if conn in self.handshakes:  # its input waits its turn (serve_handshakes)
                mask &= ~selectors.EVENT_READ
            if mask == 0:  # open, but waiting for nothing but its deadline
                self._unregister(conn)
                continue
            # Its own record of what is registered: selector.get_key() raises for a new
            # socket, and the KeyError's message formats the socket (a tenth of a hand-off).
            registered = self.registered.get(conn)
            if registered is None:
                self.selector.register(conn.sock, mask, conn)
            elif registered != mask:
                self.selector.modify(conn.sock, mask, conn)
            self.registered[conn] = mask

    def _unregister(self, conn):
        if self.registered.pop(conn, None) is None:
            return
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _call(self, conn, method):
        """Run one driver callback, then collect what it handed out.

        A bug in one session never ends the others: it is logged and that
        session is closed.
        """
        try:
            method()
            if conn.outcomes:
                self._collect(conn)
        except Exception:
            ip = self.sessions.get(conn, "?")
            self.logger.exception("session-error client=%s", ip)
            try:
                conn.close()
            except Exception:
                pass
            if not conn.closed:
                # close() itself failed: make sure the socket is gone.
                self._unregister(conn)
                try:
                    conn.sock.close()
                except OSError:
                    pass
                self.deadlines.pop(conn, None)
                self._ended(self.sessions.pop(conn, ip))

    def _collect(self, conn):
        outcomes, conn.outcomes = conn.outcomes, []
        for outcome in outcomes:
            if isinstance(outcome, QueueMessage):
                self.to_commit.append((conn, outcome.submission))
            elif isinstance(outcome, FlushRequested):
                self.flush_requested(outcome.domains)

    def service(self, conn, mask):
        if mask & selectors.EVENT_READ and not conn.closed:
            self._call(conn, conn.on_readable)
        if mask & selectors.EVENT_WRITE and not conn.closed and conn in self.sessions:
            self._call(conn, conn.on_writable)
        self.update(conn)

    def serve_handshakes(self):
        """Serve the ready TLS handshake steps, oldest first, for HANDSHAKE_BUDGET (at least one)."""
        started = time.perf_counter()
        while self.handshakes:
            conn = next(iter(self.handshakes))
            mask = self.handshakes.pop(conn)
            if conn in self.sessions:
                self.service(conn, mask)
            if time.perf_counter() - started >= HANDSHAKE_BUDGET:
                return

    def answer_offloaded(self):
        """Hand each call done on the Offload's threads back to the session that made it.

        A call whose owner is None belongs to a per-process service (the
        callout single-flight): its answer runs whatever became of the sessions,
        and reaches them through Offload.deliver, which comes back here.
        """
        for conn, then, future in self.context.offload.completed():
            if conn is None:
                try:
                    then(future)
                except Exception:
                    self.logger.exception("offload-error")
            elif conn in self.sessions and not conn.closed:
                self._call(conn, lambda conn=conn, then=then, future=future: then(future))
                self.update(conn)

    def commit_round(self):
        """Group-commit the messages whose DATA ended in this round, then answer them.

        One durable transaction for all of them (one fsync instead of one each).
        Answering may end another pipelined message at once: that one is
        committed now too rather than after the next select() (bounded: each
        round answers at least one message, and a session's input is finite).
        """
        while self.to_commit:
            batch = [(conn, submission) for conn, submission in self.to_commit if not conn.closed]
            self.to_commit = []
            problems = self.commit([submission for _, submission in batch])
            for (conn, _), problem in zip(batch, problems):
                if not conn.closed:
                    self._call(conn, lambda conn=conn, problem=problem: conn.committed(problem))
                self.update(conn)

    def commit(self, submissions) -> list:
        """enqueue_many, with the whole batch refused (452, never 250) when the queue cannot commit.
        The refusals counted so far are written in the same transaction."""
        if not submissions:
            return []
        counts = self.context.counts_for_commit()
        try:
            problems = self.context.store.enqueue_many(submissions, quotas=self.context.quotas, counts=counts)
            self.context.counts_committed(counts)
            return problems
        except (QueueUnavailable, OSError) as exc:
            return [exc] * len(submissions)
        except Exception as exc:  # e.g. a malformed database
            log_event(self.logger, "queue-error", error=f"{type(exc).__name__}: {exc}", level=logging.ERROR)
            return [exc] * len(submissions)

    def check_deadlines(self, now):
        for conn in [c for c, deadline in self.deadlines.items() if deadline is not None and deadline <= now]:
            if not conn.closed:
                self._call(conn, conn.on_timeout)
            self.update(conn)

    def close_all(self):
        for conn in list(self.sessions):
            self._call(conn, conn.close)
            self.update(conn)
            if conn in self.sessions:  # a close() that did not close
                self._unregister(conn)
                self.deadlines.pop(conn, None)
                self._ended(self.sessions.pop(conn))

    # -- control socket -------------------------------------------------------

    def report(self, text):
        if self.ctrl is None or self.master_gone:
            return
        self.outbox.append(text.encode("ascii", "replace"))
        self.flush_outbox()

    def _ended(self, report_ip):
        if self.ctrl is not None:
            self.ended.append(report_ip)

    def report_closed(self):
        """Tell the master which sessions ended since the last call (end of each loop round)."""
        ended, self.ended = self.ended, []
        message = ""
        for ip in ended:
            if message and len(message) + 1 + len(ip) > CLOSED_BATCH:
                self.report(message)
                message = ""
            message = f"{message} {ip}" if message else f"closed {ip}"
        if message:
            self.report(message)

    def flush_outbox(self):
        while self.outbox:
            try:
                self.ctrl.send(self.outbox[0])
            except BlockingIOError:
                break
            except OSError:  # the master is gone
                self.outbox.clear()
                self.master_gone = True
                self.begin_drain("stop")
                break
            self.outbox.pop(0)
        try:
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
            if not self.master_gone and self.selector.get_key(self.ctrl).events != want:
                self.selector.modify(self.ctrl, want, None)
        except (KeyError, ValueError):
            pass

    def read_control(self):
        for _ in range(1024):  # bounded: the rest waits for the next turn
            try:
                msg, fds, flags, _ = socket.recv_fds(self.ctrl, _CTRL_MAX, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:
                self.master_is_gone()
                return
            if flags & _MSG_CTRUNC:
                self.logger.warning("control-message-truncated")
            self.handle_control(msg, fds)

    def handle_control(self, msg, fds):
        words = msg.decode("ascii", "replace").split()
        if words and words[0] == "conn" and len(words) in (4, 5) and len(fds) == 1:
            try:
                peer = (words[2], int(words[3]))
            except ValueError:
                peer = (words[2], 0)
            family = _prepared_family(words[4:])
            if family is None:
                sock = socket.socket(fileno=fds[0])  # the kernel is asked what it is
            else:  # nothing to ask the kernel: the master said, and made it non-blocking
                sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK, 0, fileno=fds[0])
            self.add_session(sock, peer, implicit_tls=(words[1] == "tls"), report_ip=words[2],
                             prepared=family is not None)
            return
        for fd in fds:  # not a session message: never leak a descriptor
            os.close(fd)
        if words and words[0] in ("drain", "stop", "retire"):
            self.begin_drain(words[0])
        elif words[:1] == ["rejects"] and len(words) == 3 and words[2].isdigit():
            # The master's own refusals (its 421s): it holds no queue, so a worker counts them.
            self.context.rejects[words[1]] += int(words[2])
        else:
            self.logger.warning("control-message-unknown text=%r", msg[:64])

    def master_is_gone(self):
        self.master_gone = True
        try:
            self.selector.unregister(self.ctrl)
        except (KeyError, ValueError):
            pass
        self.begin_drain("stop")

    # -- drain ------------------------------------------------------------------

    def begin_drain(self, how):
        """Start draining ("drain": gently, "retire": more gently still, "stop": shutting
        down; see the module doc)."""
        now = time.monotonic()
        if self.draining:
            if how == "stop" and not self.polite_sent:
                self.polite_at = now  # a stop overtakes a gentle drain
                self.close_at = min(self.close_at, now + DRAIN_GRACE + DRAIN_CLOSE)
            return
        self.draining = True
        patience = self.context.config.max_session_time if how == "retire" else DRAIN_GRACE
        self.close_at = now + patience + DRAIN_CLOSE
        self.polite_at = now if how == "stop" else now + patience

    def drain_step(self, now):
        """Advance the drain phases; True when the loop may end."""
        if not self.sessions:
            return True
        if not self.polite_sent and now >= self.polite_at:
            self.polite_sent = True
            grace = max(0.0, self.close_at - now)
            for conn in list(self.sessions):
                self._call(conn, lambda conn=conn: conn.begin_shutdown(grace))
                self.update(conn)
        if now >= self.close_at:
            self.close_all()
        return not self.sessions

    # -- the loop -------------------------------------------------------------

    def wait_time(self, now):
        if self.handshakes:  # steps left over from the last round: none of them waits for the clock
            return 0.0
        wait = MAX_WAIT
        if self.ctrl is not None and not self.master_gone:
            wait = min(wait, self.next_heartbeat - now)
        earliest = min([d for d in self.deadlines.values() if d is not None], default=None)
        if earliest is not None:
            wait = min(wait, earliest - now)
        upkeep = self.context.next_upkeep()
        if upkeep is not None:
            wait = min(wait, upkeep - now)
        if self.draining:
            wait = min(wait, (self.close_at if self.polite_sent else self.polite_at) - now)
        return max(wait, 0.0)

    def run(self):
        """Serve until drained (or, in inetd mode, until the last session ends); then close what is left.

        The log lines of a round are written together at its end (log.defer_writes)."""
        defer_writes(True)
        try:
            self._serve()
        finally:
            flush_pending()
            defer_writes(False)

    def _serve(self):
        while True:
            if self.stop.stopped:
                self.stop.stopped = False
                self.begin_drain("stop")
            now = time.monotonic()
            if self.ctrl is not None and not self.master_gone and now >= self.next_heartbeat:
                self.next_heartbeat = now + HEARTBEAT_INTERVAL
                self.report(f"hb {len(self.sessions)}")
            if now >= self.next_counts:
                self.next_counts = now + COUNTS_INTERVAL
                self.context.flush_counts()
            if self.ctrl is None and not self.sessions:
                break
            if self.draining and self.drain_step(now):
                break
            self.turn()
        self.close_all()
        self.report_closed()

    def turn(self):
        """One round: wait for events, serve them (the cheap ones first, then handshake steps
        within HANDSHAKE_BUDGET), group-commit, look at deadlines, write the round's log lines."""
        self.apply_interest()
        for key, mask in self.selector.select(self.wait_time(time.monotonic())):
            if key.data is None:
                if mask & selectors.EVENT_WRITE:
                    self.flush_outbox()
                if mask & selectors.EVENT_READ and not self.master_gone:
                    self.read_control()
            elif key.data is self.context.offload:
                self.answer_offloaded()
            elif mask & selectors.EVENT_READ and key.data.handshaking:
                # Not watched for input while it waits (apply_interest); one already waiting that
                # comes back (an error, a hang-up: reported whatever it is registered for) keeps its place.
                self.handshakes[key.data] = mask
                self.changed[key.data] = None
            else:
                self.service(key.data, mask)
        self.serve_handshakes()
        self.commit_round()
        self.apply_interest()
        self.check_deadlines(time.monotonic())
        self.context.upkeep(time.monotonic())
        self.report_closed()
        flush_pending()


def run_worker(ctrl_sock, config, ssl_context, logger: logging.Logger, *, connection_class=SMTPConnection):
    """The body of a forked SMTP worker. Never returns: ends with os._exit().

    `connection_class` makes the session drivers (the one seam: the
    supervision tests drive the real loop with a toy protocol).
    """

    def serve():
        stop = StopFlag().install()
        try:
            context = ConnectionContext(config=config, ssl_context=ssl_context, logger=logger)
        except Exception as exc:
            log_event(logger, "worker-boot-failed", pid=os.getpid(), queue=config.queue, error=str(exc),
                      level=logging.ERROR)
            raise SystemExit(BOOT_ERROR) from None
        try:
            SessionLoop(ctrl_sock, context, logger, connection_class=connection_class, stop=stop).run()
        finally:
            context.close()

    children.run_child(serve, logger, "worker-crashed")
