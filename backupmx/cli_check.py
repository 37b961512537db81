"""`backupmx check`: the config, certificate, key, database, user and log file, checked
as `serve` would at start, each an "ok: ..." line on stdout or a problem on stderr (exit 1).

The host-name primaries are looked up too, but one that does not resolve is a
warning: `serve` starts anyway and keeps that domain's mail queued.
"""

from __future__ import annotations

import os
import sys

from backupmx.cli_common import config_of, one_line
from backupmx.config import Config


def cmd_check(args) -> int:
    from backupmx.config_auth import plain_secrets_exposure

    config = config_of(args)
    exposure = plain_secrets_exposure(config.path, config.users.values())
    problems: list[str] = [exposure] if exposure else []  # serve only warns: `check` refuses
    print(f"ok: config {config.path}: {len(config.domains)} domain(s), {len(config.users)} user(s)")
    for warning in config.warnings:
        if warning != exposure:
            print(f"backupmx: warning: {warning}", file=sys.stderr)
    problems += _check_tls(config)
    problems += _check_database(config.queue, whole=not args.quick)
    problems += _check_user(config.user)
    problems += _check_log(config.log)
    _check_primaries(config)
    for problem in problems:
        print(f"backupmx: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _check_primaries(config: Config) -> None:
    """Show what each host-name primary resolves to now: `serve` pins these addresses at start.

    A name that does not resolve is a warning, not a failure: the server still
    accepts mail for the domain and keeps it queued until the name resolves (the
    server looks it up again every 300 s). Each lookup gets LOOKUP_TIMEOUT, as in `serve`.
    """
    from backupmx import primaries

    resolve = primaries.resolve_within(primaries.LOOKUP_TIMEOUT)
    names = sorted({d.primary for d in config.domains.values() if not primaries.is_ip_literal(d.primary[0])})
    for host, port in names:
        try:
            print(f"ok: primary {host}:{port} resolves to {', '.join(resolve(host, port))}")
        except (OSError, UnicodeError) as exc:
            print(f"backupmx: warning: primary {host}:{port} does not resolve ({one_line(exc)}): "
                  "its mail stays queued until it does", file=sys.stderr)


def _check_tls(config: Config) -> list[str]:
    if not config.tls_cert:
        print("ok: no tls_cert: STARTTLS, AUTH and so ETRN are not offered")
        return []
    from backupmx import tls

    try:
        tls.server_context(config.tls_cert, config.tls_key, config.tls_min_version)
        tls.check_key_file(config.tls_key)
    except tls.TLSConfigError as exc:
        return [str(exc)]
    print(f"ok: tls certificate {config.tls_cert} and key {config.tls_key}")
    return []


def _check_database(path: str, *, whole: bool = True) -> list[str]:
    """Permissions and schema version (store.check_database), then a read-only integrity_check,
    a read of the whole file (minutes at a million messages on a cold cache) that `--quick`
    leaves out: a unit's ExecStartPre must not run into its start timeout, and `serve` checks
    the queue itself at start."""
    import sqlite3
    from pathlib import Path

    from backupmx.store import NAME_ROWS_SQL, check_database, unnamed_queue_rows

    # integrity_check below does all quick_check would, and more: the file is read once.
    problems = check_database(path, quick_check=False)
    if problems:
        return problems
    if not os.path.exists(path):
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            return [f"{path}: directory {directory} does not exist"]
        if not os.access(directory, os.W_OK | os.X_OK):
            return [f"{path}: directory {directory} is not writable: the database cannot be created"]
        print(f"ok: database {path} does not exist yet; it will be created")
        return []
    if not os.path.isfile(path):
        return [f"{path}: not a regular file"]
    if not whole:
        print(f"ok: database {path}: not read whole (--quick; serve checks it at start)")
        return []
    try:
        # Read-only: `check` changes nothing. integrity_check also compares every
        # index with its table, which quick_check skips.
        db = sqlite3.connect(Path(path).as_uri() + "?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
            unnamed = unnamed_queue_rows(db) if rows == [("ok",)] else 0
        finally:
            db.close()
    except sqlite3.Error as exc:
        return [f"{path}: cannot check the database: {exc}"]
    if rows != [("ok",)]:
        first = "; ".join(str(r[0]) for r in rows[:3])
        return [f"{path}: integrity_check failed: {' '.join(first.split())}"]
    if unnamed:
        # The reclaim would delete their messages under them (store_housekeeping.UNNAMED_ROWS_SQL).
        return [f"{path}: {unnamed} queue row(s) missing from message_domains: their mail can be lost;"
                f" stop the server and run: sqlite3 {path} '{NAME_ROWS_SQL}'"]
    print(f"ok: database {path}: integrity_check ok, every queue row in message_domains")
    return []


def _check_user(user: str | None) -> list[str]:
    if not user:
        return []
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return [f"user {user}: no such user"]
    print(f"ok: user {user} exists")
    return []


def _check_log(target: str | None) -> list[str]:
    if target in (None, "stderr", "syslog"):
        return []
    if os.path.exists(target):
        if not os.access(target, os.W_OK):
            return [f"{target}: log file is not writable"]
    elif not os.access(os.path.dirname(target) or ".", os.W_OK | os.X_OK):
        return [f"{target}: cannot create the log file (directory missing or not writable)"]
    return []
