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
from backupmx.config import DEFAULT_CONFIG_PATH, Config, load_config

__all__ = ["main", "build_parser", "humanize_age"]

DEBUG_ENV = "BACKUPMX_DEBUG"
QUEUE_STATES = ("queued", "held", "failed", "expired")
# Age histogram of `backupmx queue`: (column header, upper bound in seconds).
AGE_BUCKETS = (("<1h", 3600), ("<6h", 6 * 3600), ("<1d", 86400), ("<3d", 3 * 86400), ("3d+", float("inf")))


class OperatorError(Exception):
    """A one-line problem the operator can fix, reported as "backupmx: <message>"."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other error."""

    def error(self, message: str):
        command = self.prog.removeprefix("backupmx").strip()
        self.exit(2, f"backupmx: {command + ': ' if command else ''}{message} (try `{self.prog} --help`)\n")


def _load(args) -> Config:
    return load_config(args.config or DEFAULT_CONFIG_PATH)


def _open_store(config: Config):
    """The QueueStore for config.queue, or None when the database does not exist yet.

    Opening never creates the database: a typo in -c must not leave files behind.
    """
    if not os.path.exists(config.queue):
        return None
    from backupmx.store import QueueStore

    _become_queue_owner(config.queue)
    return QueueStore(config.queue)


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


def humanize_age(seconds: float) -> str:
    """45 -> "45s", 300 -> "5m0s", 11520 -> "3h12m", 190000 -> "2d4h"."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _safe(value) -> str:
    """Client-supplied text (senders, replies) for one output line; see log.format_value."""
    from backupmx.log import format_value

    return format_value(value)


# --------------------------------------------------------------------------
# Commands


def cmd_serve(args) -> int:
    if args.tls and not args.inetd:
        raise OperatorError("serve: --tls is for --inetd (implicit-TLS listeners are set with listen_tls)")
    config = _load(args)
    args.serving = True  # from here on the server owns the socket (under --inetd)
    if args.inetd:
        from backupmx.inetd import serve_inetd

        return serve_inetd(config, implicit_tls=args.tls)
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
    problems += _check_database(config.queue)
    problems += _check_user(config.user)
    problems += _check_log(config.log)
    _check_primaries(config)
    for problem in problems:
        print(f"backupmx: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _check_primaries(config: Config) -> None:
    """Show what each host-name primary resolves to now: `serve` pins these addresses at start.

    A name that does not resolve is a warning, not a failure: the server still
    accepts mail for the domain and keeps it queued until a reload resolves it.
    """
    from backupmx import primaries

    names = sorted({d.primary for d in config.domains.values() if not primaries.is_ip_literal(d.primary[0])})
    for host, port in names:
        try:
            print(f"ok: primary {host}:{port} resolves to {', '.join(primaries.resolve(host, port))}")
        except (OSError, UnicodeError) as exc:
            print(f"backupmx: warning: primary {host}:{port} does not resolve ({_message(exc)}): "
                  "its mail stays queued until it does and the server is reloaded", file=sys.stderr)


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


def _check_database(path: str) -> list[str]:
    """Permissions and schema version (store.check_database), then a read-only integrity_check."""
    import sqlite3
    from pathlib import Path

    from backupmx.store import check_database

    problems = check_database(path)
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
    try:
        # Read-only: `check` changes nothing. integrity_check also compares every
        # index with its table, which quick_check skips.
        db = sqlite3.connect(Path(path).as_uri() + "?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return [f"{path}: cannot check the database: {exc}"]
    if rows != [("ok",)]:
        first = "; ".join(str(r[0]) for r in rows[:3])
        return [f"{path}: integrity_check failed: {' '.join(first.split())}"]
    print(f"ok: database {path}: integrity_check ok")
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
        print(f"no mail queued ({config.queue} does not exist yet)")
        return 0
    try:
        summary = list(store.summary())
        histogram: dict[str, list[int]] = {}
        now = time.time()
        for state in ("queued", "held"):  # the rows queue_summary counts
            for row in store.list_messages(state=state):
                counts = histogram.setdefault(row.domain, [0] * len(AGE_BUCKETS))
                age = now - row.received_at
                counts[next(i for i, (_, bound) in enumerate(AGE_BUCKETS) if age < bound)] += 1
    finally:
        store.close()
    if not summary:
        print("no mail queued")
        return 0
    table = [("domain", "messages", "bytes", "oldest") + tuple(h for h, _ in AGE_BUCKETS)]
    for row in summary:
        counts = histogram.get(row.domain) or [0] * len(AGE_BUCKETS)
        age = humanize_age(now - row.oldest) if row.oldest is not None else "-"
        table.append((row.domain, str(row.messages), str(row.bytes), age) + tuple(map(str, counts)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        print("  ".join(cells).rstrip())
    return 0


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
    store = _open_store(config)
    if store is None:
        return 0
    try:
        rows = store.list_messages(domain=domain, state=args.state)
        now = time.time()
        for row in rows:
            print(_message_line(row, now))
    finally:
        store.close()
    return 0


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
    store = _open_store(config)
    if store is None:  # nothing was ever queued; do not create the database from here
        pending = {}
    else:
        try:
            pending = store.request_flush(domains)
        finally:
            store.close()
    if any(pending.values()):
        # Without a running `serve` (inetd-only setups) nobody else would deliver;
        # with one, the flush lease lets only one of them do it.
        from backupmx.inetd import spawn_detached_flusher

        spawn_detached_flusher(config)
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


def _open_target(args):
    """(target, open QueueStore) for commands taking ID|DOMAIN; one-line error without a queue."""
    config = _load(args)
    target = _target(config, args.target)
    store = _open_store(config)
    if store is None:
        raise OperatorError(f"{args.target}: not in the queue ({config.queue} does not exist yet)")
    return target, store


def cmd_show(args) -> int:
    """postcat-like: the envelope, each domain's row and recipients, the history, then the content."""
    target, store = _open_target(args)
    try:
        if "domain" in target:
            now = time.time()
            for row in store.list_messages(domain=target["domain"]):
                print(_message_line(row, now))
            return 0
        detail = store.show(target["queue_id"])
        if detail is None:
            raise OperatorError(f"{target['queue_id']}: no such message in the queue")
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
        for event in detail.events:
            print(f"event: {_timestamp(event.at)} {event.domain or '-'} {event.what}"
                  f" {_safe(event.detail or '-')}")
        print()
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


def _timestamp(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(unix))


def _operator_action(args) -> int:
    """hold / release / delete / requeue ID|DOMAIN via QueueStore.<action>(queue_id=|domain=)."""
    target, store = _open_target(args)
    try:
        action = {"hold": store.hold, "release": store.release, "delete": store.delete,
                  "requeue": store.requeue}[args.command]
        if args.command == "delete" and not args.yes:
            what = target.get("queue_id") or f"all mail for {target['domain']}"
            if not (sys.stdin and sys.stdin.isatty()):
                raise OperatorError(f"delete: refusing to delete {what} without --yes (stdin is not a terminal)")
            try:
                answer = input(f"delete {what} from the queue, with no bounce? [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return 1
        count = action(**target)
    finally:
        store.close()
    name = target.get("queue_id") or target["domain"]
    print(f"{args.command}: {name}: {count} row(s)")
    if not count:
        print(f"backupmx: {args.command}: {name}: nothing matched", file=sys.stderr)
        return 1
    return 0


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
    p.set_defaults(serving=False)

    command("check", cmd_check, "validate the config, certificate, key and database")

    p = command("queue", cmd_queue, "per-domain summary of the queue; `queue list` for the messages")
    actions = p.add_subparsers(dest="action", metavar="list", parser_class=_Parser)
    p.set_defaults(action=None)
    lp = actions.add_parser("list", parents=[after], help="one line per queued message")
    lp.add_argument("domain", nargs="?", metavar="DOMAIN")
    lp.add_argument("--state", choices=QUEUE_STATES)

    p = command("flush", cmd_flush, "deliver a domain's mail now, like an authorized ETRN")
    p.add_argument("domain", metavar="DOMAIN", help="a configured domain; @DOMAIN includes its subdomains")

    p = command("show", cmd_show, "show a queued message (envelope and content) or a domain's messages")
    p.add_argument("target", metavar="ID|DOMAIN")
    for name, help in (
        ("hold", "keep a message or a domain's mail from being delivered"),
        ("release", "undo hold"),
        ("delete", "remove a message or a domain's mail from the queue (no bounce)"),
        ("requeue", "put failed or expired mail back in the queue"),
    ):
        p = command(name, _operator_action, help)
        p.add_argument("target", metavar="ID|DOMAIN")
        if name == "delete":
            p.add_argument("--yes", action="store_true", help="do not ask")

    p = command("passwd", cmd_passwd, "read a password, print its {SCRYPT} (or {SCRAM-SHA-256}) value for the config")
    p.add_argument("--scheme", choices=("scrypt", "scram-sha-256"), default="scrypt",
                   help="scrypt (default: serves PLAIN and LOGIN) or scram-sha-256 (also serves SCRAM-SHA-256)")

    p = command("etrn", cmd_etrn, "ask a backup MX to deliver (the primary's side)")
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
