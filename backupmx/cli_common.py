"""What every `backupmx` command shares: its config, the queue opened as the server's
user, and its errors as one line.

A command raises OperatorError for a problem the operator can fix; cli.main
prints it as "backupmx: <message>" (one_line), never a traceback.
"""

from __future__ import annotations

import os

from backupmx.config import DEFAULT_CONFIG_PATH, Config, load_config


class OperatorError(Exception):
    """A one-line problem the operator can fix, reported as "backupmx: <message>"."""


def config_of(args) -> Config:
    """The command's config: the file -c names, or DEFAULT_CONFIG_PATH."""
    return load_config(args.config or DEFAULT_CONFIG_PATH)


def open_store(config: Config, *, write: bool = False):
    """The QueueStore for config.queue, or None when the database does not exist yet.

    Opening never creates the database: a typo in -c must not leave files behind.
    No command migrates it either (only `serve` does): an older server may still
    be serving from it, and its next fork would refuse a newer schema. Reports
    open it read-only; actions (write=True) refuse a queue that is not migrated
    yet, with "start the server once to migrate the queue".
    """
    if not os.path.exists(config.queue):
        return None
    from backupmx.store import QueueStore

    _drop_root(config)
    return QueueStore(config.queue, read_only=not write, migrate=False)


def _drop_root(config: Config) -> None:
    """Run as root, become `user` (the queue's root-owned files handed to it first), as
    `serve` does; without `user`, the queue file's owner (_become_queue_owner)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    if not config.user:
        return _become_queue_owner(config.queue)
    import logging

    from backupmx import inetd  # noqa: F401 - what runs after the drop must be importable now
    from backupmx.startup import become_user

    become_user(config, logging.getLogger("backupmx.cli"))


def _become_queue_owner(path: str) -> None:
    """Run as root, take on the database owner's identity before opening it.

    SQLite creates the -wal and -shm files with the opener's identity; files
    left behind owned by root would lock the server (running as `user`) out of
    its own queue.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    st = os.stat(path)
    if st.st_uid == 0:
        return
    import pwd

    import backupmx.log  # noqa: F401 - everything imported later must be importable now

    try:
        name = pwd.getpwuid(st.st_uid).pw_name
        os.initgroups(name, st.st_gid)
    except KeyError:
        os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)


def escaped(value) -> str:
    """Client-supplied text (senders, replies) for one output line; see log.format_value."""
    from backupmx.log import format_value

    return format_value(value)


def one_line(exc: BaseException) -> str:
    """One line for an operator mistake."""
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else None
        text = f"{name}: {exc.strerror}" if name else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
