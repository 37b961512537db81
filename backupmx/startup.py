"""Start-up: what is checked once, before anything forks, and the drop of root.

docs/DESIGN.md, "Processes": validate before forking (the config, the
certificate and key, the queue database, each with a one-line error) and
build the TLS context once; bind as root, then become `user` before any
client byte is read. Used by `serve` (master.py), `serve --inetd` and the
detached flusher (inetd.py), and the master again on SIGHUP.
"""

import logging
import os
import resource
import stat
import time

from backupmx import tls
from backupmx.config import TUNED
from backupmx.log import LOGGER_NAME, log_event, setup_logging
from backupmx.store import QueueStore, check_database


class ServeError(OSError):
    """A one-line reason why the server cannot start (the CLI prints it).

    An OSError subclass so that callers catching OSError print it cleanly:
    str(ServeError("x")) == "x".
    """


def start_logging(config, *, inetd: bool, stderr=None) -> logging.Logger:
    """The logger for config.log at config.log_level; under --inetd the default is syslog
    (stderr is often the client), and `log = stderr` needs the caller's checked `stderr`."""
    return setup_logging(config.log or ("syslog" if inetd else "stderr"), inetd=inetd, level=config.log_level,
                         stderr=stderr)


def log_tuning(logger: logging.Logger) -> None:
    """One line per BACKUPMX_* environment knob set (config.tuning): a timing changed
    from outside the config file is never silent."""
    for name, (text, default, used) in sorted(TUNED.items()):
        if used:
            log_event(logger, "tuning", variable=name, value=text, default=default)
        else:
            log_event(logger, "tuning-ignored", variable=name, value=text, default=default,
                      reason="not a number of 0 or more", level=logging.WARNING)


def build_ssl_context(config):
    """The server SSLContext (shared by every worker), or None.

    Built at start (as root: the key may be readable by root only), and again
    as the server's user at each reload and each ticket-key rotation
    (master.Master.rotate_ticket_keys). Raises tls.TLSConfigError (one line)
    for an unreadable, mismatched or world-readable key.
    """
    if not config.tls_cert:
        return None
    context = tls.server_context(config.tls_cert, config.tls_key, config.tls_min_version)
    tls.check_key_file(config.tls_key)
    return context


def check_queue(config) -> None:
    """Open the queue once (applies schema.sql, migrates an older queue), then close
    it: no SQLite across fork. `serve` is the one command that migrates.

    A damaged queue is refused before anything writes to it, never replaced:
    the mail in it stays there for `backupmx check` and the operator. The
    damage to look for (PRAGMA quick_check, a read of the whole file: seconds
    at a million messages) comes from a crash, a power loss or something
    else's write; a queue that the last `serve` stopped cleanly and that
    nothing changed since (its clean-stop mark, record_clean_stop) is not
    read again.
    """
    path = config.queue
    mark = _clean_stop_mark(path)
    unchanged = mark is not None and mark == _queue_identity(path)
    _forget_clean_stop(path)  # from here on it may change: the next start checks unless this one stops cleanly
    problems = check_database(path, quick_check=not unchanged)
    if problems:
        raise ServeError(f"{problems[0]}; not starting")
    if unchanged:
        log_event(logging.getLogger(LOGGER_NAME), "queue-check", queue=path,
                  quick_check="skipped: unchanged since the last clean stop")
    migrate_queue(config)


def record_clean_stop(path: str) -> None:
    """After a stop in which every child ended on its own: the queue's identity (its file's and
    its WAL's device, inode, size and mtime) in `<queue>-clean-stop`, so that the next start
    need not read it all again (check_queue). Nothing to lose when it cannot be written."""
    identity = _queue_identity(path)
    if identity is None:
        return
    mark = _clean_stop_path(path)
    try:
        with open(mark + ".new", "w", encoding="ascii") as f:
            f.write(identity + "\n")
        os.replace(mark + ".new", mark)
    except OSError:
        pass


def _clean_stop_path(path: str) -> str:
    return f"{path}-clean-stop"


def _clean_stop_mark(path: str) -> str | None:
    try:
        with open(_clean_stop_path(path), encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, ValueError):
        return None


def _forget_clean_stop(path: str) -> None:
    try:
        os.unlink(_clean_stop_path(path))
    except OSError:
        pass


def _queue_identity(path: str) -> str | None:
    """What a write to the queue changes: the database's and its -wal's stat (None: no queue)."""
    parts = []
    for name in (path, f"{path}-wal"):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            if name == path:
                return None
            parts.append("-")
            continue
        except OSError:
            return None
        parts.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return " ".join(parts)


def migrate_queue(config) -> None:
    """Open the queue once, migrating an older one, then close it; schema 13's one-time
    rebuild is logged (queue-rebuild, queue-rebuilt). `serve --inetd` calls it alone, without
    check_database's quick_check: a read of the whole file, in every session that comes
    while another rebuilds the queue."""
    logger = logging.getLogger(LOGGER_NAME)
    started = []

    def rebuilding(found: int) -> None:  # schema 13's one-time rebuild: minutes at a million messages
        started.append(time.monotonic())
        log_event(logger, "queue-rebuild", queue=config.queue, schema=found,
                  note="the mail's tables are rebuilt clustered by domain, once; this can take minutes")

    try:
        store = QueueStore(config.queue, migrate=True, on_rebuild=rebuilding)
    except Exception as exc:
        raise ServeError(f"{config.queue}: {exc}") from None
    store.close()
    if started:
        log_event(logger, "queue-rebuilt", queue=config.queue, seconds=f"{time.monotonic() - started[0]:.1f}")


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: sessions cost descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# -- privileges -------------------------------------------------------------------


def _lookup_user(user):
    import pwd

    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise ServeError(f"user = {user}: no such user") from None


def warn_if_root(config, logger) -> None:
    """Root without `user`: every worker parses hostile input as root. Say so, loudly."""
    if os.geteuid() == 0 and not config.user:
        log_event(logger, "running-as-root", level=logging.WARNING,
                  warning="no 'user =' in [backupmx]: SMTP workers and flushers keep root privileges; "
                          "set user = backupmx (or run under a supervisor's User=)")


def _queue_files(queue):
    """The database and the files SQLite keeps beside it (WAL mode: -wal and -shm)."""
    return [queue + suffix for suffix in ("", "-wal", "-shm", "-journal")]


def _is_memory(queue):
    return queue == ":memory:" or queue.startswith("file:")


def hand_queue_to(entry, queue, logger) -> None:
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
        log_event(logger, "queue-directory-created", path=directory, user=entry.pw_name)
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
                log_event(logger, "queue-file-chowned", path=path, user=entry.pw_name)
        finally:
            os.close(fd)


def drop_privileges(user, logger) -> None:
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
            log_event(logger, "user-ignored", user=user, reason="not running as root")
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
    log_event(logger, "privileges-dropped", user=user, uid=entry.pw_uid, gid=entry.pw_gid)


def become_user(config, logger) -> None:
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
