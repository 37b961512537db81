"""`serve --inetd`: one SMTP session on the socket at stdin, and delivery after it.

Under inetd, xinetd, tcpserver or systemd `Accept=yes` there is no master and
no flush worker polling the queue. The session process answers ETRN as
always (the request is committed first) and, because nobody else would act
on it, starts a detached flusher: a fresh interpreter in a new session
(setsid, stdio on /dev/null: no SQLite connection or client socket inherited
across a fork), so that delivery outlives the SMTP session and the
supervisor's view of it. The flusher runs the one delivery loop
(flusher.drain) until nothing is left to claim, then one housekeeping round,
and exits; started as root it becomes `user` first, as every process that
touches the queue does. Several at once are harmless: the lease lets one flush a domain,
the others find nothing to claim. `backupmx flush` starts the same flusher.

fds 0, 1 and 2 are the client's socket here: nothing but SMTP may ever be
written to them (docs/SPEC.md, "Logging"), so the session gets its own
duplicate and 0-2 are pointed at /dev/null; the log is syslog by default.
`log = stderr` is honoured when fd 2 is not the client's socket (tcpserver
hands it svlogd's pipe; systemd, StandardError=journal): a duplicate of it
is kept for the log. A stdin that is no socket at all means a person ran
it by hand: that is said on stderr and in the configured log, exit 64.
"""

import logging
import os
import select
import socket
import subprocess
import sys

from backupmx import primaries, replies
from backupmx.children import StopFlag, first_line
from backupmx.clients import shown_address
from backupmx.config import load_config
from backupmx.connection_context import ConnectionContext
from backupmx.flush_lease import default_lease_seconds
from backupmx.flusher import FlushFailed, QueueConnectionLost, drain, reopened_queue
from backupmx.lifecycle import housekeeping
from backupmx.log import log_event, setup_logging
from backupmx.odmr_sessions import serve_odmr_session
from backupmx.startup import ServeError, become_user, build_ssl_context, migrate_queue, start_logging
from backupmx.store import QueueStore, needs_migration
from backupmx.worker import SessionLoop

# Live detached flushers one inetd session may have; more ETRNs meanwhile only
# record their request (the live ones claim it before they exit).
MAX_DETACHED_FLUSHERS = 4
# How long `backupmx flush` waits for its flusher to say it is ready.
FLUSHER_READY_TIMEOUT = 15.0
# Domains one detached flusher delivers before it exits (a bound, not a limit
# anyone should reach: requests coalesce per domain).
MAX_DETACHED_ROUNDS = 1000
# Exit status when stdin is not a socket: a usage error (sysexits.h EX_USAGE).
EX_USAGE = os.EX_USAGE

_DETACHED_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from backupmx.inetd import detached_flush_main; sys.exit(detached_flush_main(sys.argv[2]))"
)


class InetdLoop(SessionLoop):
    """The session loop of one inetd session: an ETRN starts a detached flusher."""

    def __init__(self, context, logger, *, stop):
        super().__init__(None, context, logger, stop=stop)
        self.flushers = []  # Popen of the detached flushers this session started

    def flush_requested(self, domains):
        self.flushers = [p for p in self.flushers if p.poll() is None]  # also reaps the finished ones
        if len(self.flushers) >= MAX_DETACHED_FLUSHERS:
            log_event(self.logger, "flush-process-skipped", domains=",".join(domains), running=len(self.flushers))
            return
        try:
            proc = spawn_detached_flusher(self.context.config)
        except OSError as exc:  # the request is on disk: the next ETRN or flusher picks it up
            log_event(self.logger, "flush-start-failed", domains=",".join(domains), error=str(exc),
                      level=logging.WARNING)
            return
        self.flushers.append(proc)
        log_event(self.logger, "flush-process-started", pid=proc.pid, domains=",".join(domains))


def _peer(sock):
    try:
        peer = sock.getpeername()
    except OSError:
        return ("unknown", 0)
    return (shown_address(peer[0]), peer[1]) if isinstance(peer, tuple) else ("unknown", 0)


def _refuse(sock, config, implicit_tls):
    """A 421 greeting refuses service (RFC 5321 3.1); under implicit TLS there is no plaintext to say it in."""
    try:
        if not implicit_tls:
            sock.send(replies.NOT_AVAILABLE.render(hostname=config.hostname))
        sock.close()
    except OSError:
        pass


def _stdin_socket() -> socket.socket | None:
    """A duplicate of fd 0 as a socket, or None when fd 0 is not a socket."""
    fd = os.dup(0)
    try:
        return socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None


def _not_a_socket(config) -> int:
    """stdin is no socket: a person at a terminal, not inetd. Say so there and in the log."""
    message = ("serve --inetd: standard input is not a socket (run it from inetd, xinetd, tcpserver"
               " or a systemd Accept=yes socket; `serve` alone runs the server)")
    print(f"backupmx: {message}", file=sys.stderr)
    if config.log != "stderr":  # else that was the log already
        try:
            logger = setup_logging(config.log or "syslog", inetd=True, level=config.log_level)
            log_event(logger, "inetd-failed", error=message, level=logging.ERROR)
        except OSError:
            pass
    return EX_USAGE


def _log_stderr(config):
    """A stream on a duplicate of fd 2 for `log = stderr`, when fd 2 is not the client's socket
    (nor closed); else None. tcpserver gives fd 2 to its log pipe; inetd and xinetd give it the socket."""
    if config.log != "stderr":
        return None
    try:
        err = os.fstat(2)
        if any(os.path.samestat(err, os.fstat(fd)) for fd in (0, 1)):
            return None
        return os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    except OSError:
        return None


def serve_inetd(config, *, implicit_tls: bool = False, odmr: bool = False) -> int:
    """One session on the socket at fd 0; returns the exit status.

    Started as root with `user` set, it drops to that user after reading the
    key and before reading from the client. With `odmr` the session is an
    ODMR one (odmr_sessions.serve_odmr_session: ATRN, then the delivery in
    this process).
    """
    sock = _stdin_socket()
    if sock is None:
        return _not_a_socket(config)
    stderr = _log_stderr(config)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    logger = start_logging(config, inetd=True, stderr=stderr)
    try:
        ssl_context = build_ssl_context(config)
        if (implicit_tls or odmr) and ssl_context is None:
            option = "--odmr" if odmr else "--tls"
            raise ServeError(f"{config.path}: serve --inetd {option} needs tls_cert and tls_key in [backupmx]")
        become_user(config, logger)
        if needs_migration(config.queue):  # as `serve` does: schema 13's rebuild takes a while, and says so
            migrate_queue(config)
        context = ConnectionContext(config=config, ssl_context=ssl_context, logger=logger)
    except Exception as exc:
        # stderr is /dev/null now: the log is the only place to say it.
        log_event(logger, "inetd-failed", error=first_line(exc), level=logging.ERROR)
        _refuse(sock, config, implicit_tls)
        return 1
    stop = StopFlag().install()
    if odmr:
        context.close()  # the ODMR session opens its own
        serve_odmr_session(sock, _peer(sock), config, ssl_context, logger, stop)
        return 0
    try:
        loop = InetdLoop(context, logger, stop=stop)
        loop.add_session(sock, _peer(sock), implicit_tls)
        loop.run()
    finally:
        context.close()
    return 0


# -- the detached flusher ----------------------------------------------------------


def package_root() -> str:
    """The sys.path entry this backupmx was imported from (a directory, or the zipapp file)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_detached_flusher(config, *, report_ready: bool = False) -> subprocess.Popen:
    """Start `detached_flush_main(config.path)` in a new session; returns the Popen.

    A fresh interpreter (-I: no PYTHON* variables, no user site) importing
    this same copy of backupmx: a checkout, an installed package or the zipapp.
    With `report_ready` its stdout is a pipe on which it says "ready" once its
    queue is open, or "error <why>" (wait_until_ready). Raises OSError when it
    cannot be started.
    """
    if not sys.executable:
        raise OSError("no Python interpreter (sys.executable) to start a flusher with")
    argv = [sys.executable, "-I", "-c", _DETACHED_BOOT, package_root(), os.path.abspath(config.path)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if report_ready else subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def wait_until_ready(proc: subprocess.Popen, timeout: float = FLUSHER_READY_TIMEOUT) -> str | None:
    """None once a flusher started with report_ready says it is ready; else why it is not."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode("utf-8", "replace").strip() if ready else ""
    proc.stdout.close()
    if line == "ready":
        return None
    if line.startswith("error "):
        return line[6:]
    return f"no word from it in {timeout:g}s" if not ready else "it ended before it was ready (see the log)"


class DetachedFlushFailed(Exception):
    """A flush of the detached flusher failed (logged by drain): it ends, with this one line."""


def run_detached_flush(config, logger, should_stop=lambda: False, ready=lambda: None) -> int:
    """Deliver every domain with a flush request (flusher.drain), then one housekeeping round.

    Calls ready() once the queue is open. Returns the number of domains
    delivered. Nothing else runs expiry and bounces when every session is an
    inetd one, hence the round. A flush that fails half-way ends it
    (DetachedFlushFailed), the flush requested again. One that lost the queue
    connection (a helper's fork, then EMFILE) is given back on a new one, as a
    flush worker does (the lease would otherwise keep the domain from every
    flusher for 3 x timeout + 30 s), and tried once more there without a helper
    process, as a flush worker goes on: in an inetd-only setup nothing else
    would deliver the domain before its next ETRN.
    """
    owner = f"{socket.gethostname()}:{os.getpid()}:inetd"
    lease_seconds = default_lease_seconds(config.timeout)
    store = QueueStore(config.queue)
    try:
        ready()
        try:
            flushed = drain(store, config, owner, lease_seconds=lease_seconds, log=logger,
                            should_stop=should_stop, rounds=MAX_DETACHED_ROUNDS)
        except QueueConnectionLost as e:
            store.close()
            store = reopened_queue(config, owner, logger)
            if store is None:
                raise DetachedFlushFailed(f"the flush of {e} lost its queue connection, which does not open again: "
                                          f"its lease runs out in {lease_seconds:g}s") from e
            flushed = _flush_again_without_a_helper(store, config, owner, lease_seconds, logger, should_stop, e)
        except FlushFailed as e:
            raise DetachedFlushFailed(f"the flush of {e} failed: requested again") from e
        if not should_stop():
            try:
                housekeeping(store, config, logger=logger)
            except Exception as exc:
                log_event(logger, "housekeeping-error", error=first_line(exc), level=logging.ERROR)
    finally:
        if store is not None:
            store.close()
    return flushed


def _flush_again_without_a_helper(store, config, owner, lease_seconds, logger, should_stop,
                                  lost: QueueConnectionLost) -> int:
    """The one retry of a flush that lost its queue connection at its helper's fork (given back
    on `store`, requested again): on the new connection, its second one in a thread (no fork)."""
    try:
        return drain(store, config, owner, lease_seconds=lease_seconds, log=logger,
                     should_stop=should_stop, rounds=MAX_DETACHED_ROUNDS, helper=False)
    except QueueConnectionLost as e:  # drain logged it; its lease runs out
        raise DetachedFlushFailed(f"the flush of {lost} lost its queue connection twice") from e
    except FlushFailed as e:  # drain logged it
        raise DetachedFlushFailed(f"the flush of {lost} lost its queue connection, and failed again "
                                  "without a helper: requested again") from e


def detached_flush_main(config_path: str) -> int:
    """Entry point of the process spawn_detached_flusher starts. Returns the exit status.

    Started as root (`backupmx flush` run by root, an inetd session of a
    supervisor without User=) it hands the queue to `user` and becomes it
    before it opens the queue, as `serve` does. What stops it before the
    queue is open goes to stdout too ("error <why>"), for wait_until_ready.
    """
    stop = StopFlag().install()
    try:
        config = load_config(config_path)
    except Exception as exc:
        _tell_spawner("error " + first_line(exc))
        log_event(setup_logging(None, inetd=True), "flush-process-failed", error=first_line(exc),
                  level=logging.ERROR)
        return 1
    try:
        logger = start_logging(config, inetd=True)
    except OSError as exc:  # e.g. a log file root opened for the session, not writable by `user`
        logger = setup_logging(None, inetd=True)
        log_event(logger, "log-unavailable", log=config.log, error=first_line(exc), level=logging.WARNING)
    try:
        log_event(logger, "flush-process", pid=os.getpid())
        become_user(config, logger)
        # Bounded: the ETRN session that spawned this process waits for "ready".
        resolver = primaries.resolve_within(primaries.LOOKUP_TIMEOUT)
        run_detached_flush(primaries.pin(config, logger, resolver=resolver), logger, stop.should_stop,
                           ready=lambda: _tell_spawner("ready"))
    except Exception as exc:
        _tell_spawner("error " + first_line(exc))
        log_event(logger, "flush-process-failed", error=first_line(exc), level=logging.ERROR)
        return 1
    finally:
        logging.shutdown()
    return 0


def _tell_spawner(line: str) -> None:
    """One line on stdout (a pipe for `backupmx flush`, /dev/null otherwise), said once."""
    try:
        os.write(1, line.encode("utf-8", "replace")[:500] + b"\n")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass
