"""`backupmx etrn`: the primary's side of the hand-over (RFC 1985 ETRN).

Run on (or for) the primary once it is back: connect to the backup MX,
STARTTLS (or implicit TLS), verify its certificate, AUTH, and send
`ETRN <domain>` for each domain.  The backup MX answers at once and delivers
in the background on a new connection to the primary.

Several backup MX hosts (equal MX preference, each with its own queue) are
one comma-separated HOST[:PORT] list: each is asked in turn, and a host that
is down does not keep the others from being asked.

Passwords only ever travel inside TLS: a server that does not offer STARTTLS
is refused before AUTH.  Needs no config file.
"""

import base64
import getpass
import hashlib
import hmac
import smtplib
import socket
import ssl
import sys

from backupmx import scram

__all__ = ["main", "parse_target", "parse_targets", "run", "run_hosts"]

# RFC 1985 section 5: 250 queuing started, 251 no messages waiting,
# 252 pending messages for node started, 253 <n> pending messages started.
ETRN_OK = frozenset({250, 251, 252, 253})


class _Failed(Exception):
    """One-line reason the whole run stops (printed on stderr, exit 1)."""


def parse_target(target: str, default_port: int) -> tuple[str, int]:
    """HOST[:PORT] -> (host, port); "[::1]:2525", "::1" and "host" are fine.

    ValueError (one line) on a bad port.
    """
    host, port = target, None
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise ValueError(f"{target}: missing ']'")
        host, rest = target[1:end], target[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{target}: expected [HOST]:PORT")
            port = rest[1:]
    elif target.count(":") == 1:
        host, port = target.split(":")
    if not host:
        raise ValueError(f"{target}: empty host")
    if port is None:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{target}: bad port {port!r}")
    return host, int(port)


def parse_targets(text: str, default_port: int) -> list[tuple[str, int]]:
    """HOST[:PORT][,HOST[:PORT]...] -> [(host, port), ...] in the order given, each once.

    ValueError (one line) on an empty item or a bad port.
    """
    targets = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{text}: empty host in the list")
        target = parse_target(item, default_port)
        if target not in targets:
            targets.append(target)
    return targets


def _tls_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        # With --cafile that CA alone is trusted, else the system's CAs.
        try:
            ctx = ssl.create_default_context(cafile=cafile)
        except FileNotFoundError:
            raise _Failed(f"{cafile}: no such file") from None
        except OSError as exc:
            raise _Failed(f"{cafile}: {exc.strerror or exc}") from None
        except ssl.SSLError:
            raise _Failed(f"{cafile}: not a PEM CA file") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _reply_text(code: int, msg: bytes) -> str:
    text = msg.decode("utf-8", "replace")
    return " ".join(f"{code} {line}" for line in text.split("\n")) if text else str(code)


# The order `backupmx etrn` tries mechanisms in: SCRAM-SHA-256 proves the server
# holds our secret and never shows it the password; PLAIN works for every kind
# of stored secret; CRAM-MD5 only for {PLAIN} ones, so it comes last.
PREFERENCE = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5")


def choose_mechanism(offered: list[str], wanted: str | None = None) -> str:
    """The mechanism to use: `wanted` (it must be offered), else the first of PREFERENCE offered."""
    if wanted is not None:
        if wanted not in offered:
            raise _Failed(f"the server does not offer {wanted} (it offers {' '.join(offered) or 'nothing'})")
        return wanted
    for mechanism in PREFERENCE:
        if mechanism in offered:
            return mechanism
    raise _Failed(f"server offers no usable AUTH mechanism (wanted one of {' '.join(PREFERENCE)})")


def _authenticate(smtp: smtplib.SMTP, user: str, password: str, mechanism: str | None = None) -> None:
    """AUTH with one mechanism (choose_mechanism), once: no second try with another.

    A failed try counts against the user (max_auth_failures, the per-client
    ban, fail2ban); a {SCRYPT} user whose server offers SCRAM-SHA-256 gets a
    hint to run with --mechanism PLAIN instead. Done by hand rather than with
    smtplib.login, which base64-encodes ASCII only; here user and password
    are UTF-8 (RFC 4616, RFC 5802).
    """
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    mech = choose_mechanism(offered, mechanism)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    if mech == "SCRAM-SHA-256":
        return _scram(smtp, user, password, mechanism is None)
    if mech == "CRAM-MD5":
        code, msg = smtp.docmd("AUTH", "CRAM-MD5")
        if code == 334:
            try:
                challenge = base64.b64decode(msg, validate=True)
            except ValueError:
                smtp.docmd("*")  # RFC 4954: cancel the exchange
                raise _Failed("server sent a malformed CRAM-MD5 challenge") from None
            digest = hmac.new(password.encode("utf-8"), challenge, hashlib.md5).hexdigest()
            code, msg = smtp.docmd(b64(f"{user} {digest}".encode("utf-8")))
    elif mech == "PLAIN":
        code, msg = smtp.docmd("AUTH", "PLAIN " + b64(f"\0{user}\0{password}".encode("utf-8")))
    else:
        code, msg = smtp.docmd("AUTH", "LOGIN")
        if code == 334:
            code, msg = smtp.docmd(b64(user.encode("utf-8")))
        if code == 334:
            code, msg = smtp.docmd(b64(password.encode("utf-8")))
    if code != 235:
        raise _Failed(f"authentication failed: {_reply_text(code, msg)}")


def _scram(smtp: smtplib.SMTP, user: str, password: str, chosen_by_us: bool) -> None:
    """RFC 5802 as the client, with the server's signature checked before ETRN."""
    try:
        client = scram.Client(user, password)
    except scram.ScramError as exc:
        raise _Failed(f"SCRAM-SHA-256 cannot use this user name or password ({exc}): try --mechanism PLAIN") from None
    code, msg = smtp.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(client.first().encode("utf-8")).decode())
    if code == 334:
        try:
            final = client.final(_decode_challenge(msg))
        except scram.ScramError as exc:
            smtp.docmd("*")
            raise _Failed(f"server sent an unusable SCRAM message: {exc}") from None
        code, msg = smtp.docmd(base64.b64encode(final.encode("utf-8")).decode())
        if code == 334:
            if not client.check(_decode_challenge(msg)):
                smtp.docmd("*")
                raise _Failed("the server's SCRAM signature is wrong: it does not hold this user's secret "
                              "(not the backup MX it claims to be?)")
            code, msg = smtp.docmd("")
    if code == 235:
        return
    hint = ""
    if code == 535 and chosen_by_us:
        hint = " (a {SCRYPT} secret on the server cannot serve SCRAM-SHA-256: try --mechanism PLAIN)"
    raise _Failed(f"authentication failed: {_reply_text(code, msg)}{hint}")


def _decode_challenge(msg: bytes) -> str:
    try:
        return base64.b64decode(msg, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise scram.ScramError("the 334 text is not base64 UTF-8") from None


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_hosts(targets, domains, **options) -> int:
    """run() for each (host, port) in turn; 0 when every host's run was 0, else the
    first failing host's status. With several hosts each reply line starts with
    "<host>:<port>: " so the output says which backup MX answered."""
    statuses = []
    for host, port in targets:
        label = f"{_where(host, port)}: " if len(targets) > 1 else ""
        statuses.append(run(host, port, domains, label=label, **options))
    return next((status for status in statuses if status), 0)


def run(host, port, domains, *, user, password, implicit_tls=False, cafile=None, insecure=False,
        timeout=30, out=None, err=None, label="", mechanism=None) -> int:
    """Send ETRN for each domain; 0 when every reply is 250/251/252/253, else 1.

    Prints "<label>ETRN <domain>: <reply>" for each on `out`; a connection, TLS
    or AUTH problem is one line on `err` (no traceback; it names the host) and exit 1.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    where = _where(host, port)
    smtp = None
    try:
        ctx = _tls_context(cafile, insecure)
        # local_hostname: smtplib's default, getfqdn(), may wait on DNS.
        helo = socket.gethostname() or "localhost"
        stage = "connect"
        if implicit_tls:
            smtp = smtplib.SMTP_SSL(host, port, local_hostname=helo, timeout=timeout, context=ctx)
        else:
            smtp = smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout)
        stage = "EHLO"
        code, msg = smtp.ehlo()
        if code != 250:
            raise _Failed(f"EHLO refused: {_reply_text(code, msg)}")
        if not implicit_tls:
            if not smtp.has_extn("starttls"):
                raise _Failed("server does not offer STARTTLS; not sending the password in clear text")
            stage = "STARTTLS"
            smtp.starttls(context=ctx)
            code, msg = smtp.ehlo()
            if code != 250:
                raise _Failed(f"EHLO after STARTTLS refused: {_reply_text(code, msg)}")
        stage = "AUTH"
        if not smtp.has_extn("auth"):
            raise _Failed("server does not offer AUTH")
        _authenticate(smtp, user, password, mechanism)
        stage = "ETRN"
        status = 0
        for domain in domains:
            code, msg = smtp.docmd("ETRN", domain)
            print(f"{label}ETRN {domain}: {_reply_text(code, msg)}", file=out, flush=True)
            if code not in ETRN_OK:
                status = 1
            if code == 421:  # the server is closing the connection
                return 1
        stage = "QUIT"
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        smtp = None
        return status
    except _Failed as exc:
        print(f"backupmx etrn: {where}: {exc}", file=err)
    except ssl.SSLCertVerificationError as exc:
        print(f"backupmx etrn: {where}: certificate verification failed: {exc.verify_message or exc.reason}",
              file=err)
    except ssl.SSLError as exc:
        print(f"backupmx etrn: {where}: TLS failed: {exc.reason or exc}", file=err)
    except smtplib.SMTPResponseException as exc:
        print(f"backupmx etrn: {where}: {stage}: {_reply_text(exc.smtp_code, exc.smtp_error)}", file=err)
    except smtplib.SMTPServerDisconnected as exc:
        print(f"backupmx etrn: {where}: connection closed during {stage}: {exc}", file=err)
    except smtplib.SMTPException as exc:
        print(f"backupmx etrn: {where}: {stage}: {exc}", file=err)
    except socket.timeout:
        print(f"backupmx etrn: {where}: timed out during {stage}", file=err)
    except OSError as exc:
        print(f"backupmx etrn: {where}: {stage}: {exc.strerror or exc}", file=err)
    finally:
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                pass
    return 1


def _read_password(password_file: str | None, user: str) -> str:
    if password_file:
        try:
            if password_file == "-":
                line = sys.stdin.readline()
            else:
                with open(password_file, encoding="utf-8") as f:
                    line = f.readline()
        except OSError as exc:
            raise _Failed(f"{password_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise _Failed(f"{password_file}: not UTF-8") from None
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
        if not password:
            raise _Failed(f"{password_file}: the first line (the password) is empty")
        return password
    if sys.stdin is not None and sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
        if not password:
            raise _Failed("empty password")
        return password
    raise _Failed("no --password-file given and stdin is not a terminal to ask on")


def main(args) -> int:
    """Entry point from `backupmx etrn` (the argparse namespace of cli.build_parser).

    args.target is HOST[:PORT], or several, comma-separated.
    """
    try:
        try:
            targets = parse_targets(args.target, 465 if args.tls else 25)
        except ValueError as exc:
            raise _Failed(str(exc)) from None
        password = _read_password(args.password_file, args.user)
    except _Failed as exc:
        print(f"backupmx etrn: {exc}", file=sys.stderr)
        return 1
    return run_hosts(targets, list(args.domains), user=args.user, password=password, implicit_tls=args.tls,
                     cafile=args.cafile, insecure=args.insecure, timeout=args.timeout,
                     mechanism=getattr(args, "mechanism", None))
