"""The `backupmx` command line.

Each subcommand is one `cmd_<name>(args) -> int` function. The modules a
command needs are imported inside it, so that `backupmx passwd` does not load
the server.

Exit status: 0 all well; 1 an operator mistake or a failed check (one line on
stderr: "backupmx: <message>", never a traceback; BACKUPMX_DEBUG=1 shows one);
2 a usage error; 130 interrupted.

Under `serve --inetd` stdin/stdout (and often stderr) are the client's socket:
nothing but SMTP is written there, so errors go to the log (syslog by default)
and the client gets a 421.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from backupmx import __version__
from backupmx.addresses import normalize_domain
from backupmx.config import DEFAULT_CONFIG_PATH, Config, humanize_age, load_config

__all__ = ["main", "build_parser", "humanize_age"]

DEBUG_ENV = "BACKUPMX_DEBUG"
QUEUE_STATES = ("queued", "held", "failed", "expired")
# Age histogram of `backupmx queue`: (column header, upper bound in seconds).
AGE_BUCKETS = (("<1h", 3600), ("<6h", 6 * 3600), ("<1d", 86400), ("<3d", 3 * 86400), ("3d+", float("inf")))


class OperatorError(Exception):
    """A one-line problem the operator can fix, reported as "backupmx: <message>"."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, like every other error: exit 2, or the
    command's own `usage_status` (etrn: 64, EX_USAGE; health: 3, UNKNOWN). A
    monitoring plugin (health) also prints its UNKNOWN line on stdout, which is
    what Nagios shows."""

    usage_status = 2
    plugin_line = None  # health: reason -> its "BACKUPMX UNKNOWN - ..." line

    def error(self, message: str):
        command = self.prog.removeprefix("backupmx").strip()
        if self.plugin_line is not None:
            print(self.plugin_line(f"usage: {message}"))
        self.exit(self.usage_status,
                  f"backupmx: {command + ': ' if command else ''}{message} (try `{self.prog} --help`)\n")


def _load(args) -> Config:
    return load_config(args.config or DEFAULT_CONFIG_PATH)


def _open_store(config: Config, *, write: bool = False):
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


def _safe(value) -> str:
    """Client-supplied text (senders, replies) for one output line; see log.format_value."""
    from backupmx.log import format_value

    return format_value(value)


# --------------------------------------------------------------------------
# Commands


def cmd_serve(args) -> int:
    if args.tls and not args.inetd:
        raise OperatorError("serve: --tls is for --inetd (implicit-TLS listeners are set with listen_tls)")
    if args.odmr and not args.inetd:
        raise OperatorError("serve: --odmr is for --inetd (ODMR listeners are set with listen_odmr)")
    if args.odmr and args.tls:
        raise OperatorError("serve: --odmr and --tls do not go together (ODMR starts in plain text, then STARTTLS)")
    config = _load(args)
    args.serving = True  # from here on the server owns the socket (under --inetd)
    if args.inetd:
        from backupmx.inetd import serve_inetd

        return serve_inetd(config, implicit_tls=args.tls, odmr=args.odmr)
    from backupmx.master import serve

    return serve(config)


def cmd_check(args) -> int:
    from backupmx.config import plain_secrets_exposure

    config = _load(args)
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
            print(f"backupmx: warning: primary {host}:{port} does not resolve ({_message(exc)}): "
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


def cmd_queue(args) -> int:
    if args.action == "list":
        return _queue_list(args)
    config = _load(args)
    store = _open_store(config)
    if store is None:
        if args.json:
            return _print_json([])
        print(f"no mail queued ({config.queue} does not exist yet)")
        return 0
    try:
        now = time.time()
        reports = [r for r in store.domain_reports() if any(r.states.values())]
        histogram = store.age_histogram([bound for _, bound in AGE_BUCKETS], now)
    finally:
        store.close()
    if args.json:
        return _print_json([_summary_json(r, histogram.get(r.domain)) for r in reports])
    if not reports:
        print("no mail queued")
        return 0
    table = [("domain", "messages", "bytes", "oldest") + tuple(h for h, _ in AGE_BUCKETS)
             + ("held", "failed", "expired", "last-etrn", "last-delivery")]
    for r in reports:
        counts = histogram.get(r.domain) or [0] * len(AGE_BUCKETS)
        age = humanize_age(now - r.oldest) if r.oldest is not None else "-"
        table.append((r.domain, str(r.messages), str(r.bytes), age) + tuple(map(str, counts))
                     + tuple(str(r.states[s]) for s in ("held", "failed", "expired"))
                     + (_ago(r.last_etrn, now), _ago(r.last_delivery, now)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        print("  ".join(cells).rstrip())
    return 0


def _ago(unix: int | None, now: float) -> str:
    return "never" if unix is None else humanize_age(now - unix) + "-ago"


def _print_json(value) -> int:
    """One JSON value on stdout (postqueue -j prints one object a line; the SPEC asks for one value)."""
    import json

    json.dump(value, sys.stdout, ensure_ascii=False, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


def _summary_json(report, histogram) -> dict:
    counts = histogram or [0] * len(AGE_BUCKETS)
    return {
        "domain": report.domain, "messages": report.messages, "bytes": report.bytes, "oldest": report.oldest,
        "states": report.states, "ages": dict(zip((h for h, _ in AGE_BUCKETS), counts)),
        "queueing_since": report.queueing_since, "last_etrn": report.last_etrn,
        "last_delivery": report.last_delivery,
    }


def _row_json(row) -> dict:
    return {
        "queue_id": row.queue_id, "domain": row.domain, "state": row.state, "received_at": row.received_at,
        "size": row.size, "sender": row.sender, "recipients": row.recipients, "attempts": row.attempts,
        "last_attempt": row.last_attempt, "next_attempt": row.next_attempt, "last_reply": row.last_reply,
    }


def _message_line(row, now: float) -> str:
    recipients = ",".join(row.recipients)
    return " ".join(
        [
            row.queue_id,
            row.domain,
            row.state,
            humanize_age(now - row.received_at),
            str(row.size),
            _safe(f"<{row.sender}>"),
            _safe(recipients),
            f"attempts={row.attempts}",
            f"last={_safe(row.last_reply or '-')}",
        ]
    )


def _queue_list(args) -> int:
    config = _load(args)
    domain = _domain_arg(config, args.domain, must_exist=False) if args.domain else None
    selection = _filters(config, args, everything=True, domain=domain)
    store = _open_store(config)
    if store is None:
        return _print_json([]) if args.json else 0
    try:
        rows = store.list_messages(selection=selection)
    finally:
        store.close()
    if args.json:
        return _print_json([_row_json(row) for row in rows])
    if args.ids:
        for queue_id in dict.fromkeys(row.queue_id for row in rows):
            print(queue_id)
        return 0
    now = time.time()
    for row in rows:
        print(_message_line(row, now))
    return 0


def _filters(config: Config, args, *, domain: str | None = None, **selection):
    """The Selection of --domain, --sender, --older-than (and queue list's DOMAIN and --state)."""
    from backupmx.config import parse_duration
    from backupmx.store import Selection

    if args.filter_domain is not None:
        filter_domain = _domain_arg(config, args.filter_domain, must_exist=False)
        if domain is not None and filter_domain != domain:
            raise OperatorError(f"{domain} and --domain {filter_domain}: two different domains")
        domain = filter_domain
    cutoff = None
    if args.older_than is not None:
        try:
            cutoff = int(time.time() - parse_duration(args.older_than))
        except ValueError as exc:
            raise OperatorError(f"--older-than: {exc}") from None
    return Selection(domain=domain, sender=args.sender, received_before=cutoff,
                     state=getattr(args, "state", None), **selection)


def _domain_arg(config: Config, text: str, *, must_exist: bool = True) -> str:
    try:
        domain = normalize_domain(text)
    except ValueError as exc:
        raise OperatorError(f"{text}: {exc}") from None
    if must_exist and domain not in config.domains:
        raise OperatorError(f"{domain}: not a configured domain (no [domain:{domain}] in {config.path})")
    return domain


def cmd_flush(args) -> int:
    config = _load(args)
    text = args.domain
    if text.startswith("@"):
        # As ETRN @domain (RFC 1985 section 3): the domain and its configured subdomains.
        parent = _domain_arg(config, text[1:], must_exist=False)
        domains = [d for d in config.domains if d == parent or d.endswith("." + parent)]
        if not domains:
            raise OperatorError(f"{text}: no configured domain matches")
    else:
        domains = [_domain_arg(config, text)]
    store = _open_store(config, write=True)
    if store is None:  # nothing was ever queued; do not create the database from here
        pending = {}
    else:
        try:
            pending = store.request_flush(domains)
        finally:
            store.close()
    if any(pending.values()):
        # Without a running `serve` (inetd-only setups) nobody else would deliver;
        # with one, the flush lease lets only one of them do it. It must start:
        # "started" with nobody delivering would be a silent failure.
        from backupmx.inetd import spawn_detached_flusher, wait_until_ready

        problem = wait_until_ready(spawn_detached_flusher(config, report_ready=True))
        if problem is not None:
            raise OperatorError(f"flush: requested, but the flusher could not start: {problem}")
    for domain in domains:
        count = pending.get(domain, 0)
        if count:
            print(f"253 OK, {count} pending messages for node {domain} started")
        else:
            print(f"251 OK, no messages waiting for node {domain}")
    return 0


def _target(config: Config, text: str) -> dict[str, str]:
    """ID|DOMAIN -> {"queue_id": ...} or {"domain": ...}. Queue ids never contain a dot."""
    if "." in text or text.lower() in config.domains:
        return {"domain": _domain_arg(config, text, must_exist=False)}
    if not text.isalnum() or not text.isascii():
        raise OperatorError(f"{text}: neither a queue id nor a domain")
    return {"queue_id": text.upper()}


def cmd_show(args) -> int:
    """postcat-like: the envelope, each domain's row and recipients, the history, then the content.

    A message that left the queue (delivered, deleted, purged) still has its
    history until expired_retention: that is shown instead.
    """
    config = _load(args)
    target = _target(config, args.target)
    store = _open_store(config)
    if store is None:
        raise OperatorError(f"{args.target}: not in the queue ({config.queue} does not exist yet)")
    try:
        if "domain" in target:
            rows = store.list_messages(domain=target["domain"])
            if args.json:
                return _print_json([_row_json(row) for row in rows])
            now = time.time()
            for row in rows:
                print(_message_line(row, now))
            return 0
        queue_id = target["queue_id"]
        detail = store.show(queue_id)
        if detail is None:
            return _show_history(queue_id, store.history(queue_id), args.json)
        if args.json:
            return _print_json(_detail_json(detail))
        _print_detail(detail)
        sys.stdout.flush()
        body = store.open_body(detail.queue_id)
        try:
            out = sys.stdout.buffer
            while chunk := body.read(65536):
                out.write(chunk)
            out.flush()
        finally:
            body.close()
    finally:
        store.close()
    return 0


def _print_detail(detail) -> None:
    print(f"queue_id: {detail.queue_id}")
    print(f"received: {_timestamp(detail.received_at)} from {_safe(detail.client or '-')}"
          f" helo={_safe(detail.helo or '-')}")
    print(f"size: {detail.size} body={detail.body_type} envid={_safe(detail.envid or '-')}"
          f" ret={detail.ret or '-'}")
    print(f"sender: {_safe('<' + detail.sender + '>')}")
    for row in detail.rows:
        print(f"domain: {row.domain} state={row.state} attempts={row.attempts}"
              f" last={_safe(row.last_reply or '-')}")
        for r in row.recipients:
            print(f"  recipient: {_safe('<' + r.address + '>')} state={r.state}"
                  f" last={_safe(r.last_reply or '-')}")
    _print_events(detail.events)
    print()


def _print_events(events) -> None:
    for event in events:
        print(f"event: {_timestamp(event.at)} {event.domain or '-'} {event.what}"
              f" {_safe(event.detail or '-')}")


def _show_history(queue_id: str, events, as_json: bool) -> int:
    """A message no longer in the queue: its history, if any is left."""
    if not events:
        raise OperatorError(f"{queue_id}: no such message in the queue or its history")
    if as_json:
        return _print_json({"queue_id": queue_id, "in_queue": False, "events": [_event_json(e) for e in events]})
    print(f"queue_id: {queue_id} (no longer in the queue: {events[-1].what})")
    _print_events(events)
    return 0


def _event_json(event) -> dict:
    return {"at": event.at, "domain": event.domain, "what": event.what, "detail": event.detail}


def _detail_json(detail) -> dict:
    return {
        "queue_id": detail.queue_id, "in_queue": True, "sender": detail.sender, "received_at": detail.received_at,
        "size": detail.size, "client": detail.client, "helo": detail.helo, "envid": detail.envid, "ret": detail.ret,
        "body_type": detail.body_type,
        "rows": [{"domain": row.domain, "state": row.state, "attempts": row.attempts,
                  "last_attempt": row.last_attempt, "last_reply": row.last_reply, "next_attempt": row.next_attempt,
                  "state_changed": row.state_changed,
                  "recipients": [{"address": r.address, "state": r.state, "last_reply": r.last_reply,
                                  "notify": r.notify, "orcpt": r.orcpt, "dsn_sent": r.dsn_sent}
                                 for r in row.recipients]}
                 for row in detail.rows],
        "events": [_event_json(e) for e in detail.events],
    }


def _verify_target(text: str | None) -> str | None:
    """ADDRESS|DOMAIN|ALL -> the verify_cache key, the domain, or None (everything)."""
    if text is None or text == "ALL":
        return None
    from backupmx.verify import cache_key

    local, at, domain = text.strip("<>").rpartition("@")
    try:
        domain = normalize_domain(domain)
    except ValueError as exc:
        raise OperatorError(f"{text}: {exc}") from None
    return cache_key(f"{local}@{domain}", domain) if at else domain


def cmd_verify(args) -> int:
    """`verify list [ADDRESS|DOMAIN]`, `verify flush ADDRESS|DOMAIN|ALL`: the callout cache (recipients = verify)."""
    config = _load(args)
    target = _verify_target(args.target)
    store = _open_store(config, write=args.action == "flush")
    if store is None:
        return 0 if args.action == "list" else 1
    try:
        if args.action == "flush":
            count = store.flush_verify(target)
            print(f"verify flush: {args.target}: {count} answer(s) forgotten")
            return 0
        now = time.time()
        for answer in store.verify_answers(target):
            left = answer.expires - now
            expiry = f"expires={humanize_age(left)}" if left > 0 else f"stale={humanize_age(-left)}"
            print(f"{_safe(answer.address)} {answer.result} {expiry} checked={humanize_age(now - answer.checked)}"
                  f" reply={_safe(answer.reply)}")
    finally:
        store.close()
    return 0


def _timestamp(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(unix))


# The states each action applies to (store_operator: rows in other states are left alone).
_ACTION_STATES = {"hold": ("queued",), "release": ("held",), "requeue": ("held", "failed", "expired"),
                  "delete": ("queued", "held", "failed", "expired")}
_ACTION_DONE = {"hold": "held", "release": "released", "requeue": "requeued", "delete": "deleted"}


def _selection_of(config: Config, args):
    """The Selection the targets (ID, DOMAIN, `-`, ALL) and the filters name."""
    queue_ids, domains, everything = set(), set(), False
    for text in args.targets:
        if text == "ALL":
            everything = True
        elif text == "-":
            queue_ids |= _ids_from_stdin()
        else:
            target = _target(config, text)
            (queue_ids if "queue_id" in target else domains).add(target.get("queue_id") or target["domain"])
    selection = _filters(config, args, queue_ids=frozenset(queue_ids), domains=frozenset(domains),
                         everything=everything)
    if selection.empty:
        raise OperatorError(f"{args.command}: name the mail: ID, DOMAIN, - (IDs on stdin), ALL,"
                            " or --domain/--sender/--older-than")
    return selection


def _ids_from_stdin() -> set[str]:
    """postsuper's `-`: queue ids on stdin, one a line; the first word of a line counts,
    so `backupmx queue list` output can be piped in as it is."""
    ids = set()
    for number, line in enumerate(sys.stdin, 1):
        words = line.split()
        if not words:
            continue
        if not (words[0].isascii() and words[0].isalnum()):
            raise OperatorError(f"stdin line {number}: {_safe(words[0])}: not a queue id")
        ids.add(words[0].upper())
    return ids


def _operator_action(args) -> int:
    """hold / release / delete / requeue: select the rows, (delete: ask), act, say how many."""
    config = _load(args)
    selection = _selection_of(config, args)
    store = _open_store(config, write=True)
    if store is None:
        raise OperatorError(f"{args.command}: nothing in the queue ({config.queue} does not exist yet)")
    try:
        rows = store.select(selection, _ACTION_STATES[args.command])
        if args.command == "delete" and rows and not args.yes:
            messages = len({row.queue_id for row in rows})
            what = f"{messages} message(s) ({len(rows)} queue row(s))"
            if "-" in args.targets or not (sys.stdin and sys.stdin.isatty()):
                raise OperatorError(f"delete: refusing to delete {what} without --yes (stdin is not a terminal)")
            try:
                answer = input(f"delete {what} from the queue, with no bounce? [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        count = getattr(store, args.command)(rows)
    finally:
        store.close()
    messages = len({row.queue_id for row in rows})
    print(f"{args.command}: {_ACTION_DONE[args.command]} {count} queue row(s) of {messages} message(s)")
    if not count:
        print(f"backupmx: {args.command}: nothing matched", file=sys.stderr)
        return 1
    return 0


def cmd_metrics(args) -> int:
    """Prometheus text exposition of the queue (read-only)."""
    from backupmx import metrics

    config = _load(args)
    store = _open_store(config)
    try:
        families = metrics.collect(store, config.domains, time.time())
    finally:
        if store is not None:
            store.close()
    sys.stdout.write(metrics.render(families))
    return 0


def cmd_health(args) -> int:
    """Nagios/Icinga plugin: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (never 1 for a mistake)."""
    from backupmx import health
    from backupmx.config import parse_duration

    try:
        thresholds = health.Thresholds(
            warn_age=parse_duration(args.warn_age) if args.warn_age else health.DEFAULT_WARN_AGE,
            max_age=parse_duration(args.max_age) if args.max_age else health.DEFAULT_MAX_AGE,
            warn_messages=args.warn_messages, max_messages=args.max_messages)
        config = _load(args)
        if not os.path.exists(config.queue):
            status, line = health.unknown(f"{config.queue} does not exist (has the server ever started?)")
        else:
            store = _open_store(config)
            try:
                status, line = health.evaluate(store.domain_reports(), thresholds, time.time())
            finally:
                store.close()
    except Exception as exc:  # noqa: BLE001 - a plugin says UNKNOWN, whatever went wrong
        status, line = health.unknown(_message(exc))
    print(line)
    return status


def cmd_passwd(args) -> int:
    from backupmx.auth import hash_password

    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        try:
            password = getpass.getpass("Password: ")
            if password and getpass.getpass("Again: ") != password:
                raise OperatorError("passwd: the passwords do not match")
        except EOFError:  # ^D
            password = ""
    else:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        raise OperatorError("passwd: empty password refused")
    try:
        print(hash_password(password, args.scheme))
    except ValueError as exc:
        raise OperatorError(f"passwd: {exc}") from None
    return 0


def cmd_etrn(args) -> int:
    from backupmx import etrnclient

    return etrnclient.main(args)


def cmd_atrn(args) -> int:
    from backupmx import atrnclient

    return atrnclient.main(args)


def cmd_bundle(args) -> int:
    import importlib.resources
    import shutil
    import tempfile
    import zipapp
    from pathlib import Path

    package = importlib.resources.files("backupmx")
    schema = package / "schema.sql"  # installed package or a bundle
    if not schema.is_file():
        schema = Path(__file__).resolve().parent.parent / "schema.sql"  # a checkout
        if not schema.is_file():
            raise OperatorError(f"bundle: schema.sql not found (looked in the package and at {schema})")
    target = os.path.abspath(args.output)
    with tempfile.TemporaryDirectory(prefix="backupmx-bundle-") as tmp:
        pkg = Path(tmp, "app", "backupmx")
        pkg.mkdir(parents=True)
        for item in package.iterdir():
            if item.name.endswith(".py") and item.is_file():
                (pkg / item.name).write_bytes(item.read_bytes())
        (pkg / "schema.sql").write_bytes(schema.read_bytes())
        Path(tmp, "app", "__main__.py").write_text(
            '"""backupmx single-file bundle: python3 backupmx.pyz serve -c ..."""\n'
            "import sys\n\nfrom backupmx.cli import main\n\nsys.exit(main())\n",
            encoding="utf-8",
        )
        partial = os.path.join(tmp, "bundle.pyz")
        zipapp.create_archive(Path(tmp, "app"), partial, interpreter="/usr/bin/env python3", compressed=True)
        # A program for every user: supervisors run it as backupmx (systemd
        # User=, xinetd user, tcpserver -u); zipapp's own chmod is u+x only.
        os.chmod(partial, 0o755)
        shutil.move(partial, target)  # whole file or nothing at the destination's name
    print(f"wrote {target}")
    return 0


# --------------------------------------------------------------------------
# The parser


def _queue_commands(command, after) -> None:
    """The parsers of the operator's commands: queue, flush, show, hold/release/delete/requeue, metrics, health."""
    def filters(p):
        p.add_argument("--domain", dest="filter_domain", metavar="DOMAIN", help="only this domain's mail")
        p.add_argument("--sender", metavar="PATTERN",
                       help="only mail whose sender matches this glob (any case; '<>' is the null sender)")
        p.add_argument("--older-than", metavar="DURATION", help="only mail received at least this long ago")

    p = command("queue", cmd_queue, "per-domain summary of the queue; `queue list` for the messages")
    p.add_argument("--json", action="store_true", help="one JSON array of the domains (times: unix seconds)")
    actions = p.add_subparsers(dest="action", metavar="list", parser_class=_Parser)
    p.set_defaults(action=None)
    lp = actions.add_parser("list", parents=[after], help="one line per queued message")
    lp.add_argument("domain", nargs="?", metavar="DOMAIN")
    lp.add_argument("--state", choices=QUEUE_STATES)
    filters(lp)
    shown = lp.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one JSON array of the rows (times: unix seconds)")
    shown.add_argument("--ids", action="store_true", help="queue ids only, one a line (for hold/delete ... -)")

    p = command("flush", cmd_flush, "deliver a domain's mail now, like an authorized ETRN")
    p.add_argument("domain", metavar="DOMAIN", help="a configured domain; @DOMAIN includes its subdomains")

    p = command("show", cmd_show, "show a message (envelope, history and content; or the history of one "
                                  "that left the queue) or a domain's messages")
    p.add_argument("target", metavar="ID|DOMAIN")
    p.add_argument("--json", action="store_true", help="one JSON object (no content; times: unix seconds)")
    for name, help in (
        ("hold", "keep mail from being delivered"),
        ("release", "undo hold"),
        ("delete", "remove mail from the queue (no bounce)"),
        ("requeue", "put held, failed or expired mail back in the queue"),
    ):
        p = command(name, _operator_action, help)
        p.add_argument("targets", metavar="ID|DOMAIN|-|ALL", nargs="*",
                       help="queue ids and domains; - reads ids from stdin, one a line; ALL is every message")
        filters(p)
        if name == "delete":
            p.add_argument("--yes", action="store_true", help="do not ask")

    command("metrics", cmd_metrics, "print the queue's metrics (Prometheus text format)")

    p = command("health", cmd_health, "Nagios/Icinga check of the queue: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    p.usage_status = 3
    p.plugin_line = _health_unknown
    p.add_argument("--warn-age", metavar="DURATION", help="WARNING when mail waits longer (default 4h)")
    p.add_argument("--max-age", metavar="DURATION", help="CRITICAL when mail waits longer (default 1d)")
    p.add_argument("--warn-messages", metavar="N", type=_count, help="WARNING when more messages wait")
    p.add_argument("--max-messages", metavar="N", type=_count, help="CRITICAL when more messages wait")


def _health_unknown(reason: str) -> str:
    from backupmx import health

    return health.unknown(reason)[1]


def _count(text: str) -> int:
    """A number of messages: 0 or more (a usage error otherwise, which health answers with UNKNOWN)."""
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of messages (0 or more)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    # -c/--config is accepted before the subcommand (main parser, holds the default)
    # and after it (every subparser, default SUPPRESS so it never overwrites the first).
    after = _Parser(add_help=False)
    after.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS,
                       help=f"configuration file (default {DEFAULT_CONFIG_PATH})")

    parser = _Parser(prog="backupmx", description="A backup MX: queue mail per domain, hand it over on ETRN.")
    parser.add_argument("-c", "--config", metavar="PATH", default=None,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--version", action="version", version=f"backupmx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name, func, help, **kw):
        p = sub.add_parser(name, parents=[after], help=help, description=help, **kw)
        p.set_defaults(func=func)
        return p

    p = command("serve", cmd_serve, "run the server in the foreground")
    p.add_argument("--inetd", action="store_true", help="serve one SMTP session on the socket at stdin/stdout")
    p.add_argument("--tls", action="store_true", help="with --inetd: the socket is implicit TLS (port 465)")
    p.add_argument("--odmr", action="store_true",
                   help="with --inetd: the socket is an ODMR port (RFC 2645: STARTTLS, AUTH, ATRN; 366)")
    p.set_defaults(serving=False)

    p = command("check", cmd_check, "validate the config, certificate, key and database")
    p.add_argument("--quick", action="store_true",
                   help="leave out the read of the whole database (integrity_check): for a unit's ExecStartPre")

    _queue_commands(command, after)

    p = command("verify", cmd_verify, "the primary's cached answers to recipient callouts (recipients = verify)")
    actions = p.add_subparsers(dest="action", metavar="list|flush", parser_class=_Parser, required=True)
    lp = actions.add_parser("list", parents=[after], help="one line per cached answer")
    lp.add_argument("target", nargs="?", metavar="ADDRESS|DOMAIN")
    lp = actions.add_parser("flush", parents=[after], help="forget answers: the next RCPT asks the primary again")
    lp.add_argument("target", metavar="ADDRESS|DOMAIN|ALL")

    p = command("passwd", cmd_passwd, "read a password, print its {SCRYPT} (or {SCRAM-SHA-256}) value for the config")
    p.add_argument("--scheme", choices=("scrypt", "scram-sha-256"), default="scrypt",
                   help="scrypt (default: serves PLAIN and LOGIN) or scram-sha-256 (also serves SCRAM-SHA-256)")

    p = command("etrn", cmd_etrn, "ask a backup MX to deliver (the primary's side)")
    p.usage_status = 64  # EX_USAGE, as every etrn status is a sysexits.h one
    p.add_argument("target", metavar="HOST[:PORT][,HOST[:PORT]...]",
                   help="the backup MX; several (equal MX preference, each with its own queue) comma-separated")
    p.add_argument("domains", metavar="DOMAIN", nargs="+")
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", metavar="FILE", help="first line is the password ('-' = stdin)")
    p.add_argument("--tls", action="store_true", help="implicit TLS (port 465) instead of STARTTLS")
    p.add_argument("--cafile", metavar="FILE", help="CA certificates to verify the server with")
    p.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--mechanism", type=str.upper, choices=("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"),
                   help="the SASL mechanism to use (default: SCRAM-SHA-256 when offered, else PLAIN, LOGIN, CRAM-MD5)")

    p = command("atrn", cmd_atrn, "fetch the mail from a backup MX over ODMR (RFC 2645: the primary's side, behind NAT)")
    p.usage_status = 64  # EX_USAGE, as every atrn status is a sysexits.h one
    p.add_argument("target", metavar="HOST[:PORT]", help="the backup MX's ODMR port (default port 366)")
    p.add_argument("domains", metavar="DOMAIN", nargs="*", help="the domains to fetch (default: all of the user's)")
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", metavar="FILE", help="first line is the password ('-' = stdin)")
    p.add_argument("--cafile", metavar="FILE", help="CA certificates to verify the server with")
    p.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    p.add_argument("--deliver-to", required=True, metavar="HOST:PORT|lmtp:HOST:PORT|/PATH",
                   help="the local MTA each message goes to: SMTP, or LMTP (lmtp:, or a Unix socket path)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per command, both ways (default 300)")
    p.add_argument("--mechanism", type=str.upper, choices=("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"),
                   help="the SASL mechanism to use (default: SCRAM-SHA-256 when offered, else PLAIN, LOGIN, CRAM-MD5)")

    p = command("bundle", cmd_bundle, "write a single-file zipapp of backupmx")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    return parser


def _message(exc: BaseException) -> str:
    """One line for an operator mistake."""
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else None
        text = f"{name}: {exc.strerror}" if name else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _report_inetd(message: str, serving: bool) -> None:
    """Under --inetd: the error to the log, a 421 to the client, nothing on stderr."""
    try:
        from backupmx.log import log_event, setup_logging

        log_event(setup_logging(None, inetd=True), "inetd-error", error=message, level=40)
    except Exception:  # nowhere left to say it
        pass
    if not serving:
        try:
            os.write(1, b"421 4.3.0 Service not available, closing transmission channel\r\n")
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return 130
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        return 2
    inetd = bool(getattr(args, "inetd", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `backupmx queue list | head`: the reader went away; say nothing more.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place errors become one line
        # Our modules raise deliberate one-line errors (ConfigError, QueueUnavailable,
        # TLSConfigError, ...); so do the OS, SQLite and ssl. Anything else is a bug.
        module = type(exc).__module__ or ""
        known = isinstance(exc, OSError) or module.startswith("backupmx") or module in ("sqlite3", "ssl")
        message = _message(exc) if known else f"internal error: {type(exc).__name__}: {_message(exc)}"
        if os.environ.get(DEBUG_ENV) and not inetd:
            import traceback

            traceback.print_exc()
        if inetd:
            _report_inetd(message, bool(getattr(args, "serving", False)))
        else:
            print(f"backupmx: {message}", file=sys.stderr)
        return 1
