"""One SMTP worker process: many sessions at once over non-blocking sockets.

The master (master.py) accepts connections and hands each one to a worker
over the worker's control socket (an AF_UNIX SOCK_SEQPACKET pair, one message
per datagram, the connection's file descriptor attached with SCM_RIGHTS).
The worker drives every session with one `selectors` loop; the per-connection
protocol work is backupmx.connection.SMTPConnection's. Idle clients therefore
cost a file descriptor, not a process.

Control protocol (ASCII, one message per SEQPACKET datagram):

  master -> worker   "conn plain|tls <ip> <port>"  + one fd   a new session
                     "drain"    (SIGHUP) no more sessions will come: let the ones
                                in flight finish, exit when none is left
                     "stop"     (SIGTERM) the same, but sessions are asked to end
                                after their current transaction at once
  worker -> master   "hb <sessions>"   heartbeat, every HEARTBEAT_INTERVAL
                     "closed <ip>"     one session ended (echoes the <ip> it was
                                       handed, so the master's per-client
                                       counts stay exact)

EOF on the control socket means the master is gone: the worker stops and exits.

Both are bounded by DRAIN_GRACE + DRAIN_CLOSE seconds. "stop" calls
conn.begin_shutdown(DRAIN_GRACE) on every session at once (the transaction in
flight finishes, then 421 4.3.2; an idle session gets it now). "drain" leaves
sessions undisturbed for DRAIN_GRACE seconds (a reload should not cut anyone
off), then calls begin_shutdown(DRAIN_CLOSE). Whatever is still open at the
end is closed.

Everything process-wide (signal handlers, the SQLite connection) is set up here,
after the fork (STYLE 8); nothing of it exists in the master.
"""

import errno
import logging
import os
import selectors
import signal
import socket
import time

from backupmx import replies

# Seconds between heartbeats sent to the master (it kills a worker whose last
# heartbeat is older than master.HEARTBEAT_TIMEOUT).
HEARTBEAT_INTERVAL = 1.0

# Exit status meaning "this worker cannot start with this configuration (the
# queue cannot be opened, ...): do not respawn it in a loop" (gunicorn's
# WORKER_BOOT_ERROR). The master stops the server when it sees it.
WORKER_BOOT_ERROR = 3


def _float_env(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return float(default)


# Drain bounds, in seconds (see the module docstring). The environment
# variables exist for the test suite, which cannot wait 30 s.
DRAIN_GRACE = _float_env("BACKUPMX_DRAIN_GRACE", 25.0)
DRAIN_CLOSE = _float_env("BACKUPMX_DRAIN_CLOSE", 5.0)

# Upper bound on one select() wait, so the drain phases and heartbeats stay on time.
MAX_WAIT = 1.0

_CTRL_MAX = 256  # bytes: the longest control message ("conn tls <ipv6> <port>")


def load_connection_classes():
    """(ConnectionContext, SMTPConnection) from backupmx.connection.

    Imported lazily so that this module loads (and its tests run) even when
    connection.py is being rewritten.
    """
    from backupmx.connection import ConnectionContext, SMTPConnection

    return ConnectionContext, SMTPConnection


def set_nodelay(sock):
    """Disable Nagle on TCP sockets: SMTP replies are small and latency-bound."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class SessionLoop:
    """The selectors loop over the control socket and every session.

    `ctrl` is None in inetd mode: then the loop serves the sessions it was
    given with add_session() and returns when the last one ends.
    """

    def __init__(self, ctrl, context, connection_class, logger):
        self.ctrl = ctrl
        self.context = context
        self.connection_class = connection_class
        self.logger = logger
        self.selector = selectors.DefaultSelector()
        self.sessions = {}  # conn -> peer ip as the master sent it
        self.unregistered = set()  # open sessions with interest() == 0 (deadline only)
        self.outbox = []  # control messages the socket could not take yet
        self.draining = False
        self.polite_at = None  # monotonic: when begin_shutdown goes to every session
        self.close_at = None  # monotonic: when whatever is left is closed
        self.polite_sent = False
        self.master_gone = False
        self.next_heartbeat = 0.0
        self.signalled_stop = False  # set by the SIGTERM handler (a flag only)
        if ctrl is not None:
            ctrl.setblocking(False)
            self.selector.register(ctrl, selectors.EVENT_READ, None)

    # -- sessions -------------------------------------------------------------

    def add_session(self, sock, peer, implicit_tls, report_ip=None):
        """Start an SMTPConnection on `sock` (connected, any blocking mode)."""
        report_ip = peer[0] if report_ip is None else report_ip
        try:
            sock.setblocking(False)
            set_nodelay(sock)
            conn = self.connection_class(sock, peer, self.context, implicit_tls=implicit_tls)
        except Exception:
            self.logger.exception("session-start-failed client=%s", peer[0])
            sock.close()
            self.report(f"closed {report_ip}")
            return None
        self.sessions[conn] = report_ip
        if self.draining and self.polite_sent:
            self._call(conn, lambda: conn.begin_shutdown(max(0.0, self.close_at - time.monotonic())))
        self.update(conn, new=True)
        return conn

    def update(self, conn, new=False):
        """Re-register `conn` with the mask it wants now; retire it when closed."""
        if conn not in self.sessions:
            return
        mask = 0 if conn.closed else conn.interest()
        if conn.closed:
            self._unregister(conn)
            self.unregistered.discard(conn)
            ip = self.sessions.pop(conn)
            self.report(f"closed {ip}")
            return
        if mask == 0:
            # Open but waiting for nothing but its deadline.
            self._unregister(conn)
            self.unregistered.add(conn)
            return
        self.unregistered.discard(conn)
        try:
            key = self.selector.get_key(conn.sock)
        except (KeyError, ValueError):
            key = None
        if key is None:
            self.selector.register(conn.sock, mask, conn)
        elif key.events != mask:
            self.selector.modify(conn.sock, mask, conn)

    def _unregister(self, conn):
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _call(self, conn, method):
        """Run one SMTPConnection callback; a bug in one session never ends the others."""
        try:
            method()
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
                self.unregistered.discard(conn)
                self.report(f"closed {self.sessions.pop(conn, ip)}")

    def service(self, conn, mask):
        if mask & selectors.EVENT_READ and not conn.closed:
            self._call(conn, conn.on_readable)
        if mask & selectors.EVENT_WRITE and not conn.closed and conn in self.sessions:
            self._call(conn, conn.on_writable)
        self.update(conn)

    def commit_round(self):
        """Group-commit the messages whose DATA ended in this round, then answer them."""
        commit_pending = getattr(self.context, "commit_pending", None)
        if commit_pending is None:
            return
        # Answering may end another pipelined message at once: commit that too
        # now rather than after the next select() (bounded: each round answers
        # at least one message, and a session's input is finite).
        while answered := commit_pending():
            for conn, problem in answered:
                if not conn.closed:
                    self._call(conn, lambda conn=conn, problem=problem: conn.committed(problem))
                self.update(conn)

    def check_deadlines(self, now):
        for conn in [c for c in self.sessions if c.deadline is not None and c.deadline <= now]:
            if not conn.closed:
                self._call(conn, conn.on_timeout)
            self.update(conn)

    def close_all(self):
        for conn in list(self.sessions):
            self._call(conn, conn.close)
            self.update(conn)
            if conn in self.sessions:  # a close() that did not close
                self._unregister(conn)
                self.report(f"closed {self.sessions.pop(conn)}")

    # -- control socket -------------------------------------------------------

    def report(self, text):
        if self.ctrl is None or self.master_gone:
            return
        self.outbox.append(text.encode("ascii", "replace"))
        self.flush_outbox()

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
            if flags & socket.MSG_CTRUNC:
                self.logger.warning("control-message-truncated")
            self.handle_control(msg, fds)

    def handle_control(self, msg, fds):
        words = msg.decode("ascii", "replace").split()
        if words and words[0] == "conn" and len(words) == 4 and len(fds) == 1:
            try:
                peer = (words[2], int(words[3]))
            except ValueError:
                peer = (words[2], 0)
            sock = socket.socket(fileno=fds[0])
            self.add_session(sock, peer, implicit_tls=(words[1] == "tls"), report_ip=words[2])
            return
        for fd in fds:  # not a session message: never leak a descriptor
            os.close(fd)
        if words and words[0] in ("drain", "stop"):
            self.begin_drain(words[0])
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
        """Start draining ("drain": gently, "stop": shutting down; see the module doc)."""
        now = time.monotonic()
        if self.draining:
            if how == "stop" and not self.polite_sent:
                self.polite_at = now  # a stop overtakes a gentle drain
            return
        self.draining = True
        self.close_at = now + DRAIN_GRACE + DRAIN_CLOSE
        self.polite_at = now if how == "stop" else now + DRAIN_GRACE

    def drain_step(self, now):
        """Advance the drain phases; True when the loop may end."""
        if not self.sessions:
            return True
        if not self.polite_sent and now >= self.polite_at:
            self.polite_sent = True
            grace = max(0.0, self.close_at - now)
            for conn in list(self.sessions):
                self._call(conn, lambda: conn.begin_shutdown(grace))
                self.update(conn)
        if now >= self.close_at:
            self.close_all()
        return not self.sessions

    # -- the loop -------------------------------------------------------------

    def wait_time(self, now):
        wait = MAX_WAIT
        if self.ctrl is not None and not self.master_gone:
            wait = min(wait, self.next_heartbeat - now)
        for conn in self.sessions:
            if conn.deadline is not None:
                wait = min(wait, conn.deadline - now)
        if self.draining:
            wait = min(wait, (self.close_at if self.polite_sent else self.polite_at) - now)
        return max(wait, 0.0)

    def run(self):
        """Serve until drained (or, in inetd mode, until the last session ends)."""
        while True:
            if self.signalled_stop:
                self.signalled_stop = False
                self.begin_drain("stop")
            now = time.monotonic()
            if self.ctrl is not None and not self.master_gone and now >= self.next_heartbeat:
                self.next_heartbeat = now + HEARTBEAT_INTERVAL
                self.report(f"hb {len(self.sessions)}")
            if self.ctrl is None and not self.sessions:
                return
            if self.draining and self.drain_step(now):
                return
            try:
                events = self.selector.select(self.wait_time(time.monotonic()))
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                events = []
            for key, mask in events:
                if key.data is None:
                    if mask & selectors.EVENT_WRITE:
                        self.flush_outbox()
                    if mask & selectors.EVENT_READ and not self.master_gone:
                        self.read_control()
                else:
                    self.service(key.data, mask)
            self.commit_round()
            self.check_deadlines(time.monotonic())


def _reset_signals(loop):
    """After the fork: the master's handlers and wakeup fd are not ours."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass

    def on_term(signum, frame):
        loop.signalled_stop = True  # a flag only (STYLE 8)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in a terminal: the master decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reload is the master's business
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def _open_store(config, logger):
    from backupmx.store import QueueStore

    try:
        return QueueStore(config.queue)
    except Exception as exc:
        logger.error("worker-boot-failed pid=%d queue=%s error=%r", os.getpid(), config.queue, str(exc))
        return None


def run_worker(ctrl_sock, config, ssl_context, *, logger=None, classes=None):
    """The body of a forked SMTP worker. Never returns: ends with os._exit().

    `classes` = (ConnectionContext, SMTPConnection); None means the real ones.
    """
    logger = logger or logging.getLogger("backupmx")

    def serve():
        context_class, connection_class = classes or load_connection_classes()
        loop = SessionLoop(ctrl_sock, None, connection_class, logger)
        _reset_signals(loop)
        store = _open_store(config, logger)
        if store is None:
            os._exit(WORKER_BOOT_ERROR)
        try:
            loop.context = context_class(config=config, store=store, ssl_context=ssl_context, logger=logger)
            loop.run()
            loop.close_all()
        finally:
            try:
                store.close()
            except Exception:
                pass

    run_child(serve, logger, "worker-crashed")


def run_child(body, logger, crash_event: str):
    """The end of every forked child: run `body`, log a crash, flush the log, os._exit.

    Never returns: a child must not unwind into the parent's code (its
    finally blocks, its atexit handlers) after a fork.
    """
    status = 1
    try:
        body()
        status = 0
    except BaseException:
        try:
            logger.exception("%s pid=%d", crash_event, os.getpid())
        except BaseException:
            pass
    finally:
        try:
            logging.shutdown()
        except BaseException:
            pass
        os._exit(status)


def serve_one(sock, peer, config, ssl_context, *, implicit_tls=False, logger=None, classes=None,
              on_flush_requested=None):
    """inetd mode: one session on an already connected socket, in this process.

    Returns when the session has ended. SIGTERM stops it as in a worker
    (begin_shutdown: the transaction in flight may finish, then 421 4.3.2).
    `on_flush_requested(domains)` is called after an ETRN has recorded a flush
    (ConnectionContext.on_flush_requested): there is no master whose flush
    workers would notice the request, so the caller starts one.
    """
    logger = logger or logging.getLogger("backupmx")
    context_class, connection_class = classes or load_connection_classes()
    loop = SessionLoop(None, None, connection_class, logger)

    def on_term(signum, frame):
        loop.signalled_stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    from backupmx.store import QueueStore

    store = None
    try:
        store = QueueStore(config.queue)
        loop.context = context_class(config=config, store=store, ssl_context=ssl_context, logger=logger)
        if on_flush_requested is not None:
            loop.context.on_flush_requested = on_flush_requested
    except Exception:
        if not implicit_tls:  # RFC 5321 3.1: a 421 greeting refuses service
            try:
                sock.send(replies.NOT_AVAILABLE.render(hostname=config.hostname))
            except OSError:
                pass
        sock.close()
        if store is not None:
            store.close()
        raise
    try:
        loop.add_session(sock, peer, implicit_tls)
        loop.run()
        loop.close_all()
    finally:
        store.close()


def is_fd_exhaustion(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
