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

Exit status (sysexits.h, SPEC Part 2), so that a timer can tell "try again
later" from "fix something":
   0  every ETRN answered 250/251/252/253
  75  EX_TEMPFAIL  connection trouble, a 4xx (458 included): try again later
  77  EX_NOPERM    530, 535 or 459: the user, its password or its domains are wrong
  64  EX_USAGE     bad arguments (a bad HOST:PORT, no password source, 501 to ETRN)
  78  EX_CONFIG    certificate or password-file trouble, a server that offers no
                   STARTTLS or no usable AUTH, implicit TLS against a plain port
  69  EX_UNAVAILABLE  any other 5xx (e.g. a server without ETRN)
With several domains or hosts the status that needs a person wins over 75:
75 only when everything else was fine.
"""

import base64
import getpass
import hashlib
import hmac
import os
import smtplib
import socket
import ssl
import sys

from backupmx import scram
from backupmx.addresses import normalize_domain

__all__ = ["Failed", "Progress", "authenticated_session", "close_quietly", "failure", "main", "parse_target",
           "parse_targets", "read_password", "reply_text", "report", "run", "run_hosts", "status_of_reply",
           "tls_context", "where", "worse"]

# RFC 1985 section 5: 250 queuing started, 251 no messages waiting,
# 252 pending messages for node started, 253 <n> pending messages started.
ETRN_OK = frozenset({250, 251, 252, 253})
# Replies that say "this user may not": RFC 4954 530 (authentication required)
# and 535 (credentials invalid), RFC 1985 459 (node not allowed).
NOT_PERMITTED = frozenset({530, 534, 535, 459})

EX_OK, EX_USAGE, EX_UNAVAILABLE = os.EX_OK, os.EX_USAGE, os.EX_UNAVAILABLE
EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = os.EX_TEMPFAIL, os.EX_NOPERM, os.EX_CONFIG


def status_of_reply(code: int) -> int:
    """The exit status one reply stands for (see the module docstring)."""
    if code in ETRN_OK:
        return EX_OK
    if code in NOT_PERMITTED:
        return EX_NOPERM
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if code == 501:
        return EX_USAGE
    return EX_UNAVAILABLE


def worse(status: int, other: int) -> int:
    """Two statuses as one: a failure beats success, one that needs a person beats
    75 (which only says "later"); otherwise the first one stays."""
    if status == EX_OK or (status == EX_TEMPFAIL and other != EX_OK):
        return other
    return status


class Failed(Exception):
    """One-line reason the whole run stops (printed on stderr) and its exit status."""

    def __init__(self, message: str, status: int = EX_TEMPFAIL):
        super().__init__(message)
        self.status = status


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


def tls_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        # With --cafile that CA alone is trusted, else the system's CAs.
        try:
            ctx = ssl.create_default_context(cafile=cafile)
        except FileNotFoundError:
            raise Failed(f"{cafile}: no such file", EX_CONFIG) from None
        except OSError as exc:
            raise Failed(f"{cafile}: {exc.strerror or exc}", EX_CONFIG) from None
        except ssl.SSLError:
            raise Failed(f"{cafile}: not a PEM CA file", EX_CONFIG) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def reply_text(code: int, msg: bytes) -> str:
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
            raise Failed(f"the server does not offer {wanted} (it offers {' '.join(offered) or 'nothing'})",
                          EX_CONFIG)
        return wanted
    for mechanism in PREFERENCE:
        if mechanism in offered:
            return mechanism
    raise Failed(f"server offers no usable AUTH mechanism (wanted one of {' '.join(PREFERENCE)})", EX_CONFIG)


def _authenticate(smtp: smtplib.SMTP, user: str, password: str, mechanism: str | None = None, *,
                  verified: bool = True, note=lambda line: None) -> None:
    """AUTH with one mechanism (choose_mechanism); Failed unless the server says 235.

    One exception to "one try": when we chose SCRAM-SHA-256 ourselves, it got 535,
    the server also offers PLAIN and its certificate was verified, PLAIN is tried
    once on the same TLS session, and note() tells the operator why. A
    {SCRYPT} secret on the server (the only kind before SCRAM came, and still
    `backupmx passwd`'s default) cannot serve SCRAM-SHA-256: without the retry
    every ETRN of an upgraded primary would fail and the mail would wait until
    it expires. The retry costs one more failure (max_auth_failures, the
    per-client count, fail2ban) only when the password really is wrong. Done by
    hand rather than with smtplib.login, which base64-encodes ASCII only; here
    user and password are UTF-8 (RFC 4616, RFC 5802).
    """
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    mech = choose_mechanism(offered, mechanism)
    code, msg = _auth_exchange(smtp, mech, user, password)
    if code == 535 and mech == "SCRAM-SHA-256" and mechanism is None:
        if "PLAIN" in offered and verified:
            note(f"SCRAM-SHA-256 refused ({reply_text(code, msg)}); trying PLAIN once on the same TLS session, "
                 "as a {SCRYPT} secret on the backup MX cannot serve SCRAM-SHA-256. To stop this extra failed try: "
                 "write the secret there with `backupmx passwd --scheme scram-sha-256`, or pass --mechanism PLAIN")
            code, msg = _auth_exchange(smtp, "PLAIN", user, password)
        else:
            msg += (b" (a {SCRYPT} secret on the backup MX cannot serve SCRAM-SHA-256: write it with"
                    b" `backupmx passwd --scheme scram-sha-256`, or choose another --mechanism)")
    if code != 235:
        raise Failed(f"authentication failed: {reply_text(code, msg)}", _auth_status(code))


def _auth_exchange(smtp: smtplib.SMTP, mech: str, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH exchange with `mech`: the server's last reply."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    if mech == "SCRAM-SHA-256":
        return _scram(smtp, user, password)
    if mech == "CRAM-MD5":
        code, msg = smtp.docmd("AUTH", "CRAM-MD5")
        if code == 334:
            try:
                challenge = base64.b64decode(msg, validate=True)
            except ValueError:
                smtp.docmd("*")  # RFC 4954: cancel the exchange
                raise Failed("server sent a malformed CRAM-MD5 challenge", EX_UNAVAILABLE) from None
            digest = hmac.new(password.encode("utf-8"), challenge, hashlib.md5).hexdigest()
            code, msg = smtp.docmd(b64(f"{user} {digest}".encode("utf-8")))
        return code, msg
    if mech == "PLAIN":
        return smtp.docmd("AUTH", "PLAIN " + b64(f"\0{user}\0{password}".encode("utf-8")))
    code, msg = smtp.docmd("AUTH", "LOGIN")
    if code == 334:
        code, msg = smtp.docmd(b64(user.encode("utf-8")))
    if code == 334:
        code, msg = smtp.docmd(b64(password.encode("utf-8")))
    return code, msg


def _auth_status(code: int) -> int:
    """A refused AUTH: 75 when the server says "later" (4xx, 421), else 77: these credentials will not do."""
    return EX_TEMPFAIL if 400 <= code < 500 else EX_NOPERM


def _scram(smtp: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """RFC 5802 as the client, with the server's signature checked before ETRN."""
    try:
        client = scram.Client(user, password)
    except scram.ScramError as exc:
        raise Failed(f"SCRAM-SHA-256 cannot use this user name or password ({exc}): try --mechanism PLAIN",
                      EX_CONFIG) from None
    code, msg = smtp.docmd("AUTH", "SCRAM-SHA-256 " + base64.b64encode(client.first().encode("utf-8")).decode())
    try:
        if code == 334:
            final = client.final(_decode_challenge(msg))
            code, msg = smtp.docmd(base64.b64encode(final.encode("utf-8")).decode())
        if code == 334:
            if not client.check(_decode_challenge(msg)):
                smtp.docmd("*")
                raise Failed("the server's SCRAM signature is wrong: it does not hold this user's secret "
                              "(not the backup MX it claims to be?)", EX_CONFIG)
            code, msg = smtp.docmd("")
    except scram.ScramError as exc:  # the password was checked in scram.Client(): the server is to blame
        smtp.docmd("*")
        raise Failed(f"server sent an unusable SCRAM message: {exc}", EX_UNAVAILABLE) from None
    return code, msg


def _decode_challenge(msg: bytes) -> str:
    try:
        return base64.b64decode(msg, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise scram.ScramError("the 334 text is not base64 UTF-8") from None


def where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_hosts(targets, domains, **options) -> int:
    """run() for each (host, port) in turn; the statuses made one by worse(). With
    several hosts each reply line starts with "<host>:<port>: " so the output says
    which backup MX answered."""
    status = EX_OK
    for host, port in targets:
        label = f"{where(host, port)}: " if len(targets) > 1 else ""
        status = worse(status, run(host, port, domains, label=label, **options))
    return status


# The usual implicit-TLS submission port (RFC 8314); 25 and 587 speak STARTTLS.
IMPLICIT_TLS_PORT = 465


def _tls_mismatch_hint(port: int, implicit_tls: bool) -> str:
    """A hint for a session that failed before TLS was up: the wrong kind of TLS port?"""
    if implicit_tls:
        return " (the server answered in plain text: for a STARTTLS port such as 25 or 587 leave out --tls)"
    if port == IMPLICIT_TLS_PORT:
        return f" (port {port} is usually implicit TLS: add --tls)"
    return " (no SMTP greeting: if this is an implicit-TLS port such as 465, add --tls)"


def failure(exc: BaseException, stage: str, port: int, implicit_tls: bool) -> tuple[str, int]:
    """(one line, exit status) for what ended a run."""
    before_tls = stage == "connect"
    if isinstance(exc, Failed):
        return str(exc), exc.status
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message or exc.reason}", EX_CONFIG
    if isinstance(exc, ssl.SSLError):
        if implicit_tls and before_tls and exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                                          "PACKET_LENGTH_TOO_LONG"):
            return f"TLS failed: {exc.reason}{_tls_mismatch_hint(port, True)}", EX_CONFIG
        return f"TLS failed: {exc.reason or exc}", EX_TEMPFAIL
    hint = _tls_mismatch_hint(port, False) if before_tls and not implicit_tls else ""
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{stage}: {reply_text(exc.smtp_code, exc.smtp_error)}", status_of_reply(exc.smtp_code)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"connection closed during {stage}: {exc}{hint}", EX_TEMPFAIL
    if isinstance(exc, smtplib.SMTPException):
        return f"{stage}: {exc}", EX_TEMPFAIL
    if isinstance(exc, socket.timeout):
        return f"timed out during {stage}{hint}", EX_TEMPFAIL
    if isinstance(exc, ConnectionRefusedError):
        hint = ""  # nobody listens there: not a question of TLS
    return f"{stage}: {getattr(exc, 'strerror', None) or exc}{hint}", EX_TEMPFAIL


class Progress:
    """Where a session with a backup MX is: the step a failure names ("connect", "EHLO", "STARTTLS", ...)."""

    def __init__(self):
        self.stage = "connect"


def _connect(host, port, *, helo, timeout, ctx, implicit_tls) -> smtplib.SMTP:
    if implicit_tls:
        return smtplib.SMTP_SSL(host, port, local_hostname=helo, timeout=timeout, context=ctx)
    return smtplib.SMTP(host, port, local_hostname=helo, timeout=timeout)


def authenticated_session(host, port, *, user, password, ctx, progress: Progress, implicit_tls=False, timeout=30,
                          mechanism=None, verified=True, note=lambda line: None, connect=_connect) -> smtplib.SMTP:
    """Connect, EHLO, STARTTLS (or implicit TLS), EHLO, AUTH: a session ready for ETRN (or ATRN,
    atrnclient.py, whose `connect` gives its own kind of smtplib.SMTP). Raises Failed, or what
    smtplib and ssl raise; `progress.stage` says where (failure() makes it one line).
    `verified` and `note` are _authenticate's."""
    # local_hostname: smtplib's default, getfqdn(), may wait on DNS.
    smtp = connect(host, port, helo=socket.gethostname() or "localhost", timeout=timeout, ctx=ctx,
                   implicit_tls=implicit_tls)
    try:
        progress.stage = "EHLO"
        code, msg = smtp.ehlo()
        if code != 250:
            raise Failed(f"EHLO refused: {reply_text(code, msg)}", status_of_reply(code))
        if not implicit_tls:
            if not smtp.has_extn("starttls"):
                raise Failed("server does not offer STARTTLS; not sending the password in clear text", EX_CONFIG)
            progress.stage = "STARTTLS"
            smtp.starttls(context=ctx)
            code, msg = smtp.ehlo()
            if code != 250:
                raise Failed(f"EHLO after STARTTLS refused: {reply_text(code, msg)}", status_of_reply(code))
        progress.stage = "AUTH"
        if not smtp.has_extn("auth"):
            raise Failed("server does not offer AUTH", EX_CONFIG)
        _authenticate(smtp, user, password, mechanism, verified=verified, note=note)
    except BaseException:
        smtp.close()
        raise
    return smtp


def run(host, port, domains, *, user, password, implicit_tls=False, cafile=None, insecure=False,
        timeout=30, out=None, err=None, label="", mechanism=None) -> int:
    """Send ETRN for each domain; returns the exit status (module docstring): 0 when
    every reply is 250/251/252/253.

    Prints "<label>ETRN <domain>: <reply>" for each on `out`; a connection, TLS
    or AUTH problem is one line on `err` (no traceback; it names the host).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    smtp, progress = None, Progress()
    try:
        smtp = authenticated_session(
            host, port, user=user, password=password, ctx=tls_context(cafile, insecure), progress=progress,
            implicit_tls=implicit_tls, timeout=timeout, mechanism=mechanism, verified=not insecure,
            note=lambda line: print(f"backupmx etrn: {where(host, port)}: {line}", file=err))
        progress.stage = "ETRN"
        status = EX_OK
        for domain in domains:
            code, msg = smtp.docmd("ETRN", domain)
            print(f"{label}ETRN {domain}: {reply_text(code, msg)}", file=out, flush=True)
            status = worse(status, status_of_reply(code))
            if code == 421:  # the server is closing the connection
                return status
        progress.stage = "QUIT"
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
        smtp = None
        return status
    except (Failed, smtplib.SMTPException, OSError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
        return report("etrn", exc, progress.stage, host, port, implicit_tls, err)
    finally:
        close_quietly(smtp)


def report(command: str, exc: BaseException, stage: str, host: str, port: int, implicit_tls: bool, err) -> int:
    """What ended a run of `backupmx <command>`, one line on `err` (failure()); the exit status."""
    message, status = failure(exc, stage, port, implicit_tls)
    print(f"backupmx {command}: {where(host, port)}: {message}", file=err)
    return status


def close_quietly(client: smtplib.SMTP | None, *, quit: bool = False) -> None:
    """QUIT (with `quit`) and close, whatever state the connection is in."""
    if client is None or client.sock is None:
        return
    try:
        if quit:
            client.quit()
    except (OSError, smtplib.SMTPException):
        pass
    try:
        client.close()
    except OSError:
        pass


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (bytes a UTF-8 locale could not decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def etrn_argument(text: str) -> str:
    """A DOMAIN argument as ETRN sends it: "@" (RFC 1985 section 3, the domain and its
    subdomains) kept, the name in A-labels (the command line is ASCII); Failed (64)
    for what is no domain name."""
    at = "@" if text.startswith("@") else ""
    try:
        return at + normalize_domain(text[len(at):])
    except ValueError as exc:
        raise Failed(str(exc), EX_USAGE) from None


def read_password(password_file: str | None, user: str) -> str:
    if password_file:
        try:
            if password_file == "-":
                line = sys.stdin.readline()
            else:
                with open(password_file, encoding="utf-8") as f:
                    line = f.readline()
        except OSError as exc:
            raise Failed(f"{password_file}: {exc.strerror or exc}", EX_CONFIG) from None
        except UnicodeDecodeError:
            raise Failed(f"{password_file}: not UTF-8", EX_CONFIG) from None
        password = line[:-1] if line.endswith("\n") else line
        if password.endswith("\r"):
            password = password[:-1]
        if not password:
            raise Failed(f"{password_file}: the first line (the password) is empty", EX_CONFIG)
        return password
    if sys.stdin is not None and sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
        if not password:
            raise Failed("empty password", EX_USAGE)
        return password
    raise Failed("no --password-file given and stdin is not a terminal to ask on", EX_USAGE)


def main(args) -> int:
    """Entry point from `backupmx etrn` (the argparse namespace of cli.build_parser).

    args.target is HOST[:PORT], or several, comma-separated.
    """
    try:
        try:
            targets = parse_targets(args.target, 465 if args.tls else 25)
        except ValueError as exc:
            raise Failed(str(exc), EX_USAGE) from None
        domains = [etrn_argument(domain) for domain in args.domains]
        if not _is_utf8(args.user):
            raise Failed("--user: not UTF-8 text", EX_USAGE)
        password = read_password(args.password_file, args.user)
        if not _is_utf8(password):
            raise Failed("the password is not UTF-8 text", EX_CONFIG)
    except Failed as exc:
        print(f"backupmx etrn: {exc}", file=sys.stderr)
        return exc.status
    return run_hosts(targets, domains, user=args.user, password=password, implicit_tls=args.tls,
                     cafile=args.cafile, insecure=args.insecure, timeout=args.timeout,
                     mechanism=getattr(args, "mechanism", None))
