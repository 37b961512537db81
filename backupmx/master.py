"""The pre-fork master: listeners, SMTP workers, flush workers, signals.

Modelled on gunicorn's arbiter. The master only supervises and accepts:

- it validates everything once before forking (TLS context, queue database,
  listeners; STYLE 9) and holds no SQLite connection across a fork (STYLE 8);
- it accepts on every listener (socketserver.TCPServer subclasses, so the hook
  names are socketserver's: get_request, verify_request, process_request,
  shutdown_request) and hands each connection to the least-loaded SMTP worker
  over that worker's control socket (see worker.py for the protocol); a
  worker holds up to SESSIONS_PER_WORKER sessions at once;
- the verbs: spawn_worker, reap_workers, murder_workers, manage_workers (and
  the same for flush workers);
- signal handlers only queue the signal and wake the loop through
  signal.set_wakeup_fd; one handle_<signal> method each does the work in the
  main loop;
- a worker that exits with WORKER_BOOT_ERROR cannot start with this
  configuration: the master stops instead of respawning it forever.

Replies the master itself writes (no worker involved) are the two refusals,
both transient (RFC 5321 4.2.1: 421 closes the channel):
  replies.BUSY                  every worker is full and max_workers are running
  replies.TOO_MANY_CONNECTIONS  the client already has max_connections_per_client sessions
"""

import collections
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import time

from backupmx import replies
from backupmx import worker as worker_mod
from backupmx.worker import WORKER_BOOT_ERROR



def _number_env(name, default, kind=float):
    try:
        return kind(os.environ.get(name, default))
    except ValueError:
        return kind(default)


# Seconds without a heartbeat after which a worker is taken for hung and
# SIGKILLed (it sends one every worker.HEARTBEAT_INTERVAL).
HEARTBEAT_TIMEOUT = _number_env("BACKUPMX_HEARTBEAT_TIMEOUT", 30.0)
# Sessions one worker holds at once (non-blocking sockets: fds, not processes).
SESSIONS_PER_WORKER = _number_env("BACKUPMX_SESSIONS_PER_WORKER", 256, int)
# When every worker holds more than this many sessions, start another one (up to
# max_workers). High on purpose: idle and slow sessions cost descriptors, not
# processes, and `workers` already spreads busy ones over the cores.
SPAWN_THRESHOLD = _number_env("BACKUPMX_SPAWN_THRESHOLD", 128, int)
# After SIGTERM: how long the master waits for its children before SIGKILLing them.
# A worker drains within worker.DRAIN_GRACE + worker.DRAIN_CLOSE; a little margin on top.
STOP_TIMEOUT = worker_mod.DRAIN_GRACE + worker_mod.DRAIN_CLOSE + 5.0
# A child that dies sooner than this after its start is respawned only after
# RESPAWN_DELAY, so a crash at start-up cannot become a fork loop.
QUICK_DEATH = 1.0
RESPAWN_DELAY = 1.0
# A worker started beyond config.workers (under load) is drained after this
# many seconds without a session.
IDLE_RETIRE = 60.0
# Accepts per listener per loop turn (fairness between listeners and workers).
ACCEPT_BATCH = 64
# Pause accepting this long when the process is out of file descriptors.
ACCEPT_PAUSE = 0.1
# The master's loop wakes at least this often (heartbeat checks, respawns).
TICK = 0.25


class ServeError(OSError):
    """A one-line reason why the server cannot start (the CLI prints it).

    An OSError subclass so that callers catching OSError print it cleanly:
    str(ServeError("x")) == "x".
    """


def _log(logger, event, **fields):
    from backupmx.log import log_event

    log_event(logger, event, **fields)


def _first_line(exc):
    text = str(exc)
    return text.splitlines()[0] if text else repr(exc)


# -- listeners ------------------------------------------------------------------


class Listener(socketserver.TCPServer):
    """One listening address. socketserver does bind/listen; the master's
    selectors loop (not serve_forever: there are several listeners) calls
    handle_request_noblock() when the socket is readable.
    """

    allow_reuse_address = True  # rebind at once after a crash (SPEC: serve)
    request_queue_size = 1024  # listen() backlog: bursts wait in the kernel

    def __init__(self, address, master, implicit_tls, *, sock=None):
        self.master = master
        self.implicit_tls = implicit_tls
        if sock is not None:  # adopted (systemd socket activation): no bind
            self.address_family = sock.family
            super().__init__(address, None, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        else:
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            super().__init__(address, None, bind_and_activate=True)
        self.socket.setblocking(False)

    def server_bind(self):
        """May be overridden. IPv6 listeners are IPv6 only: 0.0.0.0 and :: are two listeners."""
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    @property
    def label(self):
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def get_request(self):
        """May be overridden. accept(); raises BlockingIOError when nobody waits."""
        return self.socket.accept()

    def verify_request(self, request, client_address):
        """May be overridden. The per-client session limit (the master counts)."""
        return self.master.verify_request(self, request, client_address)

    def process_request(self, request, client_address):
        """May be overridden. Hand the connection to a worker (or refuse: busy)."""
        self.master.process_request(self, request, client_address)

    def shutdown_request(self, request):
        """May be overridden. Half-close then close, so a 421 just written is not lost to a RST."""
        super().shutdown_request(request)

    def handle_request_noblock(self):
        """Accept what is waiting (up to ACCEPT_BATCH); the _handle_request_noblock of socketserver, in a loop."""
        for _ in range(ACCEPT_BATCH):
            try:
                request, client_address = self.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.master.accept_failed(self, exc)
                return
            if self.verify_request(request, client_address):
                try:
                    self.process_request(request, client_address)
                except Exception:
                    self.master.logger.exception("dispatch-failed client=%s", client_address[0])
                    self.shutdown_request(request)
            else:
                self.shutdown_request(request)


def _reject(sock, reply: bytes):
    """Write a one-line refusal on a just-accepted socket (its send buffer is empty)."""
    try:
        sock.setblocking(False)
        sock.send(reply)
    except OSError:
        pass


def _fd_sockets_from_systemd():
    """Listening sockets passed by systemd (LISTEN_PID/LISTEN_FDS, Accept=no), or []."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    result = []
    for i in range(count):
        sock = socket.socket(fileno=3 + i)
        os.set_inheritable(sock.fileno(), False)
        result.append((sock, names[i] if i < len(names) else ""))
    return result


def build_listeners(config, master):
    """Listeners for config.listen (plain) and config.listen_tls (implicit TLS).

    Under systemd socket activation the passed sockets are adopted instead: a
    socket is implicit-TLS when its FileDescriptorName is "tls"/"smtps" or its
    port is one of listen_tls's.
    """
    listeners = []
    inherited = _fd_sockets_from_systemd()
    if inherited:
        tls_ports = {port for _, port in config.listen_tls}
        for sock, name in inherited:
            port = sock.getsockname()[1]
            tls = name in ("tls", "smtps") or (port in tls_ports and name not in ("plain", "smtp"))
            listeners.append(Listener(sock.getsockname()[:2], master, tls, sock=sock))
        return listeners
    try:
        for addresses, tls in ((config.listen, False), (config.listen_tls, True)):
            for host, port in addresses:
                try:
                    listeners.append(Listener((host, port), master, tls))
                except OSError as exc:
                    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                    reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                    raise ServeError(f"cannot listen on {shown}: {reason}") from None
    except BaseException:
        for listener in listeners:
            listener.server_close()
        raise
    return listeners


# -- validation done once, before forking ---------------------------------------


def build_ssl_context(config):
    """The server SSLContext (built once per config, shared by every worker), or None.

    Raises backupmx.tls.TLSConfigError (one line) for an unreadable, mismatched
    or world-readable key.
    """
    if not config.tls_cert:
        return None
    from backupmx import tls

    context = tls.server_context(config.tls_cert, config.tls_key, config.tls_min_version)
    tls.check_key_file(config.tls_key)
    return context


def check_queue(config):
    """Open the queue once (applies schema.sql), then close it: no SQLite across fork."""
    from backupmx.store import QueueStore, check_database

    # A damaged queue is refused before anything writes to it, never replaced:
    # the mail in it stays there for `backupmx check` and the operator.
    problems = check_database(config.queue)
    if problems:
        raise ServeError(f"{problems[0]}; not starting")
    try:
        store = QueueStore(config.queue)
    except Exception as exc:
        raise ServeError(f"{config.queue}: {exc}") from None
    store.close()


def raise_fd_limit():
    """Soft RLIMIT_NOFILE up to the hard limit: sessions cost descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _lookup_user(user):
    import pwd

    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise ServeError(f"user = {user}: no such user") from None


def warn_if_root(config, logger):
    """Root without `user`: every worker parses hostile input as root. Say so, loudly."""
    if os.geteuid() == 0 and not config.user:
        _log(logger, "running-as-root", level=logging.WARNING,
             warning="no 'user =' in [backupmx]: SMTP workers and flushers keep root privileges; "
                     "set user = backupmx (or run under a supervisor's User=)")


def _queue_files(queue):
    """The database and the files SQLite keeps beside it (WAL mode: -wal and -shm)."""
    return [queue + suffix for suffix in ("", "-wal", "-shm", "-journal")]


def _is_memory(queue):
    return queue == ":memory:" or queue.startswith("file:")


def hand_queue_to(entry, queue, logger):
    """As root, before the drop: the queue must belong to the user the server becomes.

    Creates the queue's directory (0700, owned by the user) when only its last
    component is missing, and gives the user the database files that root
    owns (left by an earlier start without `user`, or a root `sqlite3`
    session): SQLite running as the user could not open them otherwise.
    Opened with O_NOFOLLOW and changed through the descriptor, and only
    regular files with one link, so a link planted in the queue's directory
    cannot make root chown something else.
    """
    if _is_memory(queue):
        return
    directory = os.path.dirname(os.path.abspath(queue))
    if not os.path.exists(directory) and os.path.isdir(os.path.dirname(directory)):
        os.mkdir(directory, 0o700)
        os.chown(directory, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        _log(logger, "queue-directory-created", path=directory, user=entry.pw_name)
    for path in _queue_files(queue):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ServeError(f"{path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == 0:
                os.fchown(fd, entry.pw_uid, entry.pw_gid)
                os.fchmod(fd, 0o600)
                _log(logger, "queue-file-chowned", path=path, user=entry.pw_name)
        finally:
            os.close(fd)


def drop_privileges(user, logger):
    """setgid/setuid to `user` (with its groups) after binding; ports < 1024 need root, nothing else does.

    initgroups keeps the user's supplementary groups (e.g. ssl-cert, so that a
    SIGHUP can re-read a group-readable key). Raises ServeError when the drop
    did not stick.
    """
    if not user:
        return
    entry = _lookup_user(user)
    if os.getuid() != 0:
        if os.getuid() != entry.pw_uid:
            _log(logger, "user-ignored", user=user, reason="not running as root")
        return
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if entry.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - the kernel refused to drop
            raise ServeError(f"user = {user}: could not drop root privileges")
    _log(logger, "privileges-dropped", user=user, uid=entry.pw_uid, gid=entry.pw_gid)


def become_user(config, logger):
    """Root: give the queue to config.user and become it; warn when there is no user.

    Called after the listeners are bound and the key is read, before any
    client byte is read (every worker is forked after it).
    """
    warn_if_root(config, logger)
    if not config.user:
        return
    entry = _lookup_user(config.user)
    was_root = os.getuid() == 0
    if was_root and entry.pw_uid != 0:
        hand_queue_to(entry, config.queue, logger)
    drop_privileges(config.user, logger)
    if was_root and not _is_memory(config.queue):
        directory = os.path.dirname(os.path.abspath(config.queue))
        if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
            raise ServeError(f"{directory}: not writable by user {config.user} "
                             f"(the queue's directory: SQLite creates its -wal and -shm files there)")


# -- children ------------------------------------------------------------------


class WorkerHandle:
    """The master's view of one SMTP worker process."""

    def __init__(self, pid, ctrl, generation):
        self.pid = pid
        self.ctrl = ctrl  # the master's end of the SEQPACKET pair
        self.generation = generation
        self.sessions = 0
        self.clients = collections.Counter()  # ip -> sessions in this worker
        self.started = time.monotonic()
        self.last_seen = self.started
        self.draining = False
        self.killed = False
        self.full_until = 0.0  # monotonic: its control socket refused a hand-off until then
        self.idle_since = self.started  # monotonic, None while it holds sessions


class FlusherHandle:
    def __init__(self, pid, slot, generation):
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.started = time.monotonic()
        self.retiring = False


def _describe_status(status):
    if os.WIFSIGNALED(status):
        return f"signal-{os.WTERMSIG(status)}"
    return f"exit-{os.waitstatus_to_exitcode(status)}"


class Master:
    """The supervisor. Construct with a validated config; run() returns the exit status."""

    def __init__(self, config, ssl_context, listeners, logger, *, classes=None):
        self.config = config
        self.ssl_context = ssl_context
        self.listeners = listeners
        self.logger = logger
        self.classes = classes  # (ConnectionContext, SMTPConnection) or None for the real ones
        self.generation = 0
        self.workers = {}  # pid -> WorkerHandle
        self.flushers = {}  # pid -> FlusherHandle
        self.clients = collections.Counter()  # ip -> sessions, across workers
        self.sig_queue = []
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.stopping = False
        self.stop_deadline = None
        self.exit_status = 0
        self.respawn_after = 0.0  # monotonic: no SMTP worker spawned before this
        self.flusher_respawn_after = {}  # slot -> monotonic
        self.flush_worker_fn = None
        self.accept_paused_until = 0.0
        self.in_hand = None  # the accepted socket being dispatched (a fork now must not keep it)
        self.pid = os.getpid()

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
        """Only record the signal (STYLE 8); the wakeup fd ends the select()."""
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
            _log(self.logger, "stop-now")
            self.kill_all(signal.SIGKILL)
            return
        _log(self.logger, "stopping", pid=self.pid)
        self.stopping = True
        self.stop_deadline = time.monotonic() + STOP_TIMEOUT
        self.close_listeners()
        for w in list(self.workers.values()):
            self.drain_worker(w, "stop")
        for f in self.flushers.values():
            self._kill(f.pid, signal.SIGTERM)

    handle_int = handle_term

    def handle_hup(self):
        """Reload: new config and TLS context; new workers, old ones drain."""
        if self.stopping:
            return
        from backupmx.config import load_config

        try:
            config = load_config(self.config.path)
            ssl_context = build_ssl_context(config)
            if config.queue != self.config.queue:
                check_queue(config)
            if config.log != self.config.log:
                # Only then: after a privilege drop the old file may not be ours to reopen.
                self.logger = _setup_logging(config, inetd=False)
        except Exception as exc:
            _log(self.logger, "reload-failed", error=_first_line(exc), level=logging.WARNING)
            return
        if (config.listen, config.listen_tls) != (self.config.listen, self.config.listen_tls):
            _log(self.logger, "listen-change-ignored", reason="restart to change listeners")
        self.config, self.ssl_context = config, ssl_context
        self.generation += 1
        for w in list(self.workers.values()):
            self.drain_worker(w, "drain")
        for f in self.flushers.values():
            f.retiring = True
            self._kill(f.pid, signal.SIGTERM)
        self.respawn_after = 0.0
        self.flusher_respawn_after.clear()
        _log(self.logger, "reloaded", generation=self.generation, config=config.path)
        self.manage_workers()
        self.manage_flushers()

    # -- listeners -----------------------------------------------------------

    def register_listeners(self):
        for listener in self.listeners:
            self.selector.register(listener.socket, selectors.EVENT_READ, listener)
            _log(self.logger, "listening", address=listener.label, tls="implicit" if listener.implicit_tls else "starttls")

    def close_listeners(self):
        for listener in self.listeners:
            try:
                self.selector.unregister(listener.socket)
            except (KeyError, ValueError):
                pass
            listener.server_close()
        self.listeners = []

    def accept_failed(self, listener, exc):
        if worker_mod.is_fd_exhaustion(exc):
            # The socket stays readable: stop polling it a moment instead of spinning.
            _log(self.logger, "accept-failed", listener=listener.label, error=exc.strerror or str(exc))
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
        ip = address[0]
        if self.clients[ip] >= self.config.max_connections_per_client:
            _reject(sock, replies.TOO_MANY_CONNECTIONS.render(hostname=self.config.hostname))
            _log(self.logger, "too-many-connections", client=ip, sessions=self.clients[ip])
            return False
        return True

    def process_request(self, listener, sock, address):
        ip, port = address[0], address[1]
        header = f"conn {'tls' if listener.implicit_tls else 'plain'} {ip} {port}".encode("ascii")
        self.in_hand = sock
        try:
            self.dispatch(listener, sock, ip, header)
        finally:
            self.in_hand = None

    def dispatch(self, listener, sock, ip, header):
        for _ in range(3):  # a worker whose control socket is full is skipped
            w = self.choose_worker()
            if w is None:
                break
            try:
                socket.send_fds(w.ctrl, [header], [sock.fileno()])
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EPIPE, errno.ECONNRESET):
                    raise
                w.full_until = time.monotonic() + 1.0  # its control socket is full: skip it a moment
                continue
            w.sessions += 1
            w.idle_since = None
            w.clients[ip] += 1
            self.clients[ip] += 1
            sock.close()  # the worker has its own copy now
            return
        _reject(sock, replies.BUSY.render(hostname=self.config.hostname))
        _log(self.logger, "busy", client=ip)
        listener.shutdown_request(sock)

    # -- SMTP workers ----------------------------------------------------------

    def active_workers(self):
        return [w for w in self.workers.values() if not w.draining and not w.killed]

    def choose_worker(self):
        """The least-loaded worker with room; spawn one when all are past SPAWN_THRESHOLD."""
        active = self.active_workers()
        now = time.monotonic()
        room = [w for w in active if w.sessions < SESSIONS_PER_WORKER and w.full_until <= now]
        if (not room or min(w.sessions for w in room) >= SPAWN_THRESHOLD) and len(active) < self.config.max_workers:
            w = self.spawn_worker()
            if w is not None:
                return w
        return min(room, key=lambda w: w.sessions) if room else None

    def spawn_worker(self):
        if self.stopping or time.monotonic() < self.respawn_after:
            return None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            parent_end.close()
            child_end.close()
            _log(self.logger, "fork-failed", error=exc.strerror)
            self.respawn_after = time.monotonic() + RESPAWN_DELAY
            return None
        if pid == 0:
            parent_end.close()
            self.close_in_child(keep=child_end)
            worker_mod.run_worker(child_end, self.config, self.ssl_context, logger=self.logger, classes=self.classes)
            os._exit(1)  # pragma: no cover - run_worker never returns
        child_end.close()
        parent_end.setblocking(False)
        w = WorkerHandle(pid, parent_end, self.generation)
        self.workers[pid] = w
        self.selector.register(parent_end, selectors.EVENT_READ, w)
        _log(self.logger, "worker-started", pid=pid, generation=self.generation)
        return w

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
        if self.in_hand is not None:
            # Spawned while dispatching: without this the new child would hold the
            # client's socket open for its whole life (the client never sees EOF).
            self.in_hand.close()
        for w in self.workers.values():
            w.ctrl.close()
        self.wakeup_r.close()
        self.wakeup_w.close()
        self.selector.close()

    def drain_worker(self, w, how):
        if w.draining:
            return
        w.draining = True
        try:
            w.ctrl.send(how.encode("ascii"))
        except OSError:
            self._kill(w.pid, signal.SIGTERM)

    def read_worker(self, w):
        for _ in range(1024):
            try:
                data = w.ctrl.recv(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker is gone; reap_workers does the bookkeeping
                self.forget_ctrl(w)
                return
            w.last_seen = time.monotonic()
            words = data.decode("ascii", "replace").split()
            if words[:1] == ["closed"] and len(words) == 2:
                self.session_closed(w, words[1])
            # "hb <n>": last_seen above is all a heartbeat is for. The session
            # count stays the master's own (hand-offs minus "closed"), which
            # also covers connections still queued on the control socket.

    def session_closed(self, w, ip):
        if w.clients[ip] > 0:
            w.clients[ip] -= 1
            if not w.clients[ip]:
                del w.clients[ip]
            w.sessions = max(0, w.sessions - 1)
            if not w.sessions:
                w.idle_since = time.monotonic()
            self.clients[ip] -= 1
            if self.clients[ip] <= 0:
                del self.clients[ip]

    def forget_ctrl(self, w):
        try:
            self.selector.unregister(w.ctrl)
        except (KeyError, ValueError):
            pass

    def forget_sessions(self, w):
        for ip, n in w.clients.items():
            self.clients[ip] -= n
            if self.clients[ip] <= 0:
                del self.clients[ip]
        w.clients.clear()
        w.sessions = 0

    def reap_workers(self):
        """waitpid(-1, WNOHANG) until nothing is left to reap."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.workers:
                self.worker_exited(self.workers.pop(pid), status)
            elif pid in self.flushers:
                self.flusher_exited(self.flushers.pop(pid), status)

    def worker_exited(self, w, status):
        self.forget_ctrl(w)
        w.ctrl.close()
        lost = w.sessions
        self.forget_sessions(w)
        code = os.waitstatus_to_exitcode(status)
        if code == WORKER_BOOT_ERROR and not self.stopping:
            _log(self.logger, "worker-boot-failed", pid=w.pid, status=_describe_status(status))
            self.halt(WORKER_BOOT_ERROR)
            return
        if (w.draining or self.stopping) and code == 0:
            _log(self.logger, "worker-exited", pid=w.pid)
            return
        _log(self.logger, "worker-died", pid=w.pid, status=_describe_status(status), sessions=lost)
        if time.monotonic() - w.started < QUICK_DEATH:
            self.respawn_after = time.monotonic() + RESPAWN_DELAY

    def murder_workers(self):
        """SIGKILL a worker whose last heartbeat is older than HEARTBEAT_TIMEOUT."""
        now = time.monotonic()
        for w in self.workers.values():
            if not w.killed and now - w.last_seen > HEARTBEAT_TIMEOUT:
                _log(self.logger, "worker-hung", pid=w.pid, silent=f"{now - w.last_seen:.1f}s")
                w.killed = True
                self._kill(w.pid, signal.SIGKILL)

    def manage_workers(self):
        """Keep config.workers workers of the current generation running."""
        if self.stopping:
            return
        active = self.active_workers()
        missing = self.config.workers - len(active)
        for _ in range(max(0, missing)):
            if self.spawn_worker() is None:
                break
        # Workers spawned under load go again once they have been idle a while.
        now = time.monotonic()
        for w in active[self.config.workers:]:
            if w.sessions == 0 and w.idle_since is not None and now - w.idle_since > IDLE_RETIRE:
                _log(self.logger, "worker-retired", pid=w.pid, reason="idle")
                self.drain_worker(w, "drain")

    # -- flush workers -------------------------------------------------------------

    def load_flush_worker(self):
        if self.flush_worker_fn is None:
            try:
                from backupmx.flusher import run_flush_worker
            except ImportError as exc:
                _log(self.logger, "flush-workers-skipped", reason=str(exc))
                self.flush_worker_fn = False
            else:
                self.flush_worker_fn = run_flush_worker
        return self.flush_worker_fn

    def manage_flushers(self):
        if self.stopping or self.config.flush_workers <= 0 or not self.load_flush_worker():
            return
        busy = {f.slot for f in self.flushers.values() if not f.retiring}
        now = time.monotonic()
        for slot in range(self.config.flush_workers):
            if slot not in busy and now >= self.flusher_respawn_after.get(slot, 0.0):
                self.spawn_flusher(slot)

    def spawn_flusher(self, slot):
        owner = f"{socket.gethostname()}:{self.pid}:{slot}:{self.generation}"
        try:
            pid = os.fork()
        except OSError as exc:
            _log(self.logger, "fork-failed", error=exc.strerror)
            self.flusher_respawn_after[slot] = time.monotonic() + RESPAWN_DELAY
            return
        if pid == 0:
            self.close_in_child()
            _run_flusher(self.flush_worker_fn, self.config, owner, self.pid, self.logger)
        self.flushers[pid] = FlusherHandle(pid, slot, self.generation)
        _log(self.logger, "flush-worker-started", pid=pid, owner=owner)

    def flusher_exited(self, f, status):
        if f.retiring or self.stopping:
            _log(self.logger, "flush-worker-exited", pid=f.pid, status=_describe_status(status))
            return
        _log(self.logger, "flush-worker-died", pid=f.pid, status=_describe_status(status))
        if time.monotonic() - f.started < QUICK_DEATH:
            self.flusher_respawn_after[f.slot] = time.monotonic() + RESPAWN_DELAY

    # -- the loop --------------------------------------------------------------

    def _kill(self, pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self, sig):
        for pid in list(self.workers) + list(self.flushers):
            self._kill(pid, sig)

    def halt(self, status):
        """Stop now (a worker cannot boot): children are told to stop, the loop ends."""
        self.exit_status = status
        if not self.stopping:
            self.handle_term()

    def run(self):
        self.init_signals()
        self.register_listeners()
        self.manage_workers()
        self.manage_flushers()
        _log(self.logger, "server-started", pid=self.pid, workers=self.config.workers, hostname=self.config.hostname)
        try:
            while True:
                for key, mask in self.selector.select(TICK):
                    data = key.data
                    if data == "wakeup":
                        try:
                            while self.wakeup_r.recv(64):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    elif isinstance(data, Listener):
                        if not self.stopping:
                            data.handle_request_noblock()
                    elif isinstance(data, WorkerHandle):
                        self.read_worker(data)
                self.handle_signals()
                self.reap_workers()
                if self.stopping:
                    if not self.workers and not self.flushers:
                        break
                    if time.monotonic() > self.stop_deadline:
                        _log(self.logger, "stop-timeout", children=len(self.workers) + len(self.flushers))
                        self.kill_all(signal.SIGKILL)
                        self.stop_deadline = time.monotonic() + 5.0
                    continue
                self.resume_accepting()
                self.murder_workers()
                self.manage_workers()
                self.manage_flushers()
        finally:
            self.close_listeners()
            signal.set_wakeup_fd(-1)
        _log(self.logger, "stopped", pid=self.pid, status=self.exit_status)
        return self.exit_status


def _run_flusher(fn, config, owner, master_pid, logger):
    """Body of a forked flush worker; never returns."""
    stop = []

    def should_stop():
        return bool(stop) or os.getppid() != master_pid

    def flush():
        signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))  # a flag only
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        fn(config, owner, should_stop)

    worker_mod.run_child(flush, logger, "flush-worker-crashed")


# -- entry points -----------------------------------------------------------------


def _setup_logging(config, inetd):
    from backupmx.log import setup_logging

    target = config.log or ("syslog" if inetd else "stderr")
    result = setup_logging(target, inetd=inetd)
    return result if isinstance(result, logging.Logger) else logging.getLogger("backupmx")


def serve(config, *, inetd=False, implicit_tls=False, tls=None, classes=None):
    """`backupmx serve`: the pre-fork server, or one inetd session. Returns the exit status.

    Raises ServeError (an OSError) and the config/TLS modules' errors with a
    one-line message when the server cannot start. `tls` is an alias of
    `implicit_tls` (the CLI's --tls). `classes` = (ConnectionContext,
    SMTPConnection) replaces backupmx.connection's (tests).
    """
    implicit_tls = bool(implicit_tls or tls)
    if inetd:
        return serve_inetd(config, implicit_tls=implicit_tls, classes=classes)
    logger = _setup_logging(config, inetd=False)
    for warning in getattr(config, "warnings", ()):
        _log(logger, "config-warning", warning=warning)
    raise_fd_limit()
    if classes is None:
        worker_mod.load_connection_classes()  # an import error shows now, not in every worker
    ssl_context = build_ssl_context(config)  # as root: the key may be readable by root only
    master = Master(config, ssl_context, [], logger, classes=classes)
    master.listeners = build_listeners(config, master)  # as root: ports < 1024
    try:
        become_user(config, logger)
        check_queue(config)  # as the user: the database and its WAL are created as theirs
        return master.run()
    finally:
        master.close_listeners()


def serve_inetd(config, *, implicit_tls=False, classes=None):
    """One session on the socket at fd 0 (inetd, xinetd, tcpserver, systemd Accept=yes).

    fds 0, 1 and 2 are the client's socket here: the session gets its own
    duplicate and 0-2 are pointed at /dev/null, so that no stray write
    (a warning, a traceback) can ever reach the client. Logging goes to
    config.log, syslog by default.

    Started as root with `user` set, it drops to that user after reading the
    key and before reading from the client. An ETRN starts a detached flusher
    process (DetachedFlushers) so that delivery outlives the session;
    flush_workers = 0 turns that off (some other process delivers).
    """
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError as exc:
        raise ServeError(f"--inetd: standard input is not a socket: {exc.strerror or exc}") from None
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    logger = _setup_logging(config, inetd=True)
    started = []
    try:
        ssl_context = build_ssl_context(config)
        if implicit_tls and ssl_context is None:
            raise ServeError(f"{config.path}: serve --inetd --tls needs tls_cert and tls_key in [backupmx]")
        become_user(config, logger)
        flushers = DetachedFlushers(config, logger) if config.flush_workers > 0 else None
        try:
            peer = sock.getpeername()
            peer = (peer[0], peer[1]) if isinstance(peer, tuple) else ("unknown", 0)
        except OSError:
            peer = ("unknown", 0)
        started.append(True)  # from here on serve_one answers the client itself
        worker_mod.serve_one(sock, peer, config, ssl_context, implicit_tls=implicit_tls, logger=logger,
                             classes=classes, on_flush_requested=flushers)
    except Exception as exc:
        # stderr is /dev/null now: the log is the only place to say it.
        _log(logger, "inetd-failed", error=_first_line(exc), level=logging.ERROR)
        try:
            if not started and not implicit_tls:  # RFC 5321 3.1: a 421 greeting refuses service
                sock.send(replies.NOT_AVAILABLE.render(hostname=config.hostname))
            sock.close()
        except OSError:
            pass
        return 1
    return 0


# -- serve --inetd: delivery after ETRN --------------------------------------------
#
# Under inetd there is no master and no flush worker polling the queue: the
# session process answers ETRN (the request is committed first, as always) and
# starts a flusher in a new session (setsid, stdio on /dev/null, a fresh
# interpreter: no SQLite connection or client socket inherited across a fork),
# so that it outlives the SMTP session and the supervisor's view of it. The
# flusher takes each requested domain's lease, delivers, and exits when no
# request is left. Several at once are harmless: the lease lets one flush a
# domain, the others find nothing to claim and exit.

# Live detached flushers one inetd session may have; more ETRNs meanwhile only
# record their request (the live ones claim it before they exit).
MAX_DETACHED_FLUSHERS = 4
# Domains one detached flusher handles before it exits (a bound, not a limit
# anyone should reach: requests coalesce per domain).
MAX_DETACHED_ROUNDS = 1000

_DETACHED_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from backupmx.master import detached_flush_main; sys.exit(detached_flush_main(sys.argv[2]))"
)


def package_root():
    """The sys.path entry this backupmx was imported from (a directory, or the zipapp file)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_detached_flusher(config):
    """Start `detached_flush_main(config.path)` in a new session; returns the Popen.

    A fresh interpreter (-I: no PYTHON* variables, no user site) importing
    this same copy of backupmx: a checkout, an installed package or the zipapp.
    Raises OSError when it cannot be started.
    """
    if not sys.executable:
        raise OSError("no Python interpreter (sys.executable) to start a flusher with")
    argv = [sys.executable, "-I", "-c", _DETACHED_BOOT, package_root(), os.path.abspath(config.path)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


class DetachedFlushers:
    """ConnectionContext.on_flush_requested for serve --inetd: start a detached flusher."""

    def __init__(self, config, logger):
        self.config = config
        self.logger = logger
        self.procs = []

    def __call__(self, domains):
        self.procs = [p for p in self.procs if p.poll() is None]  # also reaps the finished ones
        if len(self.procs) >= MAX_DETACHED_FLUSHERS:
            _log(self.logger, "flush-process-skipped", domains=",".join(domains), running=len(self.procs))
            return
        proc = spawn_detached_flusher(self.config)
        self.procs.append(proc)
        _log(self.logger, "flush-process-started", pid=proc.pid, domains=",".join(domains))


def run_detached_flush(config, logger, should_stop=lambda: False):
    """Claim and deliver every domain with a flush request, then one housekeeping round.

    Returns the number of domains delivered. The same work as a flush
    worker's loop (flusher.run_flush_worker), but it ends when nothing is
    left to claim instead of polling.
    """
    from backupmx.flusher import default_lease_seconds, deliver_domain
    from backupmx.store import QueueStore

    owner = f"{socket.gethostname()}:{os.getpid()}:inetd"
    lease_seconds = default_lease_seconds(config.timeout)
    flushed = 0
    store = QueueStore(config.queue)
    try:
        for _ in range(MAX_DETACHED_ROUNDS):
            if should_stop():
                break
            name = store.claim_flush(owner, lease_seconds)
            if name is None:
                break
            try:
                domain = config.domains.get(name)
                if domain is None:
                    _log(logger, "flush-skipped", domain=name, reason="domain not configured",
                         level=logging.WARNING)
                    continue
                deliver_domain(store, domain, owner=owner, hostname=config.hostname, timeout=config.timeout,
                               lease_seconds=lease_seconds, log=logger, should_stop=should_stop)
                flushed += 1
            finally:
                store.release_flush(name, owner)
        if not should_stop():
            # Nothing else runs expiry and bounces when every session is an inetd one.
            try:
                from backupmx.lifecycle import housekeeping

                housekeeping(store, config, logger=logger)
            except Exception as exc:
                _log(logger, "housekeeping-error", error=_first_line(exc), level=logging.ERROR)
    finally:
        store.close()
    return flushed


def detached_flush_main(config_path):
    """Entry point of the process spawn_detached_flusher starts. Returns the exit status."""
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))  # a flag only
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    from backupmx.config import load_config
    from backupmx.log import setup_logging

    try:
        config = load_config(config_path)
    except Exception as exc:
        _log(setup_logging(None, inetd=True), "flush-process-failed", error=_first_line(exc), level=logging.ERROR)
        return 1
    try:
        logger = _setup_logging(config, inetd=True)
    except OSError as exc:  # e.g. a log file root opened for the session, not writable by `user`
        logger = setup_logging(None, inetd=True)
        _log(logger, "log-unavailable", log=config.log, error=_first_line(exc), level=logging.WARNING)
    try:
        _log(logger, "flush-process", pid=os.getpid())
        run_detached_flush(config, logger, lambda: bool(stop))
    except Exception as exc:
        _log(logger, "flush-process-failed", error=_first_line(exc), level=logging.ERROR)
        return 1
    finally:
        logging.shutdown()
    return 0
