"""The `backupmx` command line: the parser, `main`, and the commands that are not the queue's.

Each subcommand is one `cmd_<name>(args) -> int` function. The modules a
command needs are imported inside it, so that `backupmx passwd` does not load
the server. `check` is cli_check.py; the operator's queue commands (queue,
show, flush, hold/release/delete/requeue, verify, metrics, health) are
cli_queue.py; what every command shares (the config, the queue opened as the
server's user, OperatorError) is cli_common.py. Every parser is here.

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

from backupmx import __version__
from backupmx.cli_check import cmd_check
from backupmx.cli_common import OperatorError, config_of, one_line
from backupmx.cli_queue import (cmd_flush, cmd_health, cmd_metrics, cmd_operator_action, cmd_queue, cmd_show,
                                cmd_verify)
from backupmx.config import DEFAULT_CONFIG_PATH
from backupmx.config_values import humanize_age

__all__ = ["main", "build_parser", "humanize_age"]

DEBUG_ENV = "BACKUPMX_DEBUG"
QUEUE_STATES = ("queued", "held", "failed", "expired")


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


# --------------------------------------------------------------------------
# Commands


def cmd_serve(args) -> int:
    if args.tls and not args.inetd:
        raise OperatorError("serve: --tls is for --inetd (implicit-TLS listeners are set with listen_tls)")
    if args.odmr and not args.inetd:
        raise OperatorError("serve: --odmr is for --inetd (ODMR listeners are set with listen_odmr)")
    if args.odmr and args.tls:
        raise OperatorError("serve: --odmr and --tls do not go together (ODMR starts in plain text, then STARTTLS)")
    config = config_of(args)
    args.serving = True  # from here on the server owns the socket (under --inetd)
    if args.inetd:
        from backupmx.inetd import serve_inetd

        return serve_inetd(config, implicit_tls=args.tls, odmr=args.odmr)
    from backupmx.master import serve

    return serve(config)


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
        p = command(name, cmd_operator_action, help)
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
        message = one_line(exc) if known else f"internal error: {type(exc).__name__}: {one_line(exc)}"
        if os.environ.get(DEBUG_ENV) and not inetd:
            import traceback

            traceback.print_exc()
        if inetd:
            _report_inetd(message, bool(getattr(args, "serving", False)))
        else:
            print(f"backupmx: {message}", file=sys.stderr)
        return 1
