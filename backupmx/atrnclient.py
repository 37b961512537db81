"""`backupmx atrn`: the primary's side of On-Demand Mail Relay (RFC 2645).

For a primary that cannot take connections (a dynamic address, NAT): it
connects to the backup MX's ODMR port (366), says STARTTLS, verifies the
certificate, authenticates (etrnclient's code: SCRAM-SHA-256 when offered)
and sends `ATRN [domain,...]`. On `250` the connection turns round: we are
the SMTP server now and each message goes on to the local MTA
(`--deliver-to`), answered 250 only after that MTA took it (atrn_relay.py).
The local MTA is asked first: with it down, no mail is fetched.

Exit status (sysexits.h, as `backupmx etrn`):
   0  the backup delivered and said QUIT, or had no mail (453)
  75  EX_TEMPFAIL  connection trouble (either side), 451, the local MTA unavailable
  77  EX_NOPERM    530, 535, or 450 (a domain that is not this user's)
  64  EX_USAGE     bad arguments
  78  EX_CONFIG    certificate or password-file trouble, a server with no STARTTLS or AUTH
  69  EX_UNAVAILABLE  any other 5xx (a server without ATRN: 502)
"""

import smtplib
import socket
import sys

from backupmx.addresses import normalize_domain
from backupmx.atrn_relay import Destination, LocalMTA, Relay
from backupmx.etrnclient import (EX_NOPERM, EX_OK, EX_TEMPFAIL, EX_USAGE, Failed, Progress, authenticated_session,
                                 close_quietly, parse_target, read_password, reply_text, report, status_of_reply,
                                 tls_context, where)
from backupmx.smtpclient import PrimaryClient, PrimaryUnavailable

__all__ = ["main", "run", "status_of_atrn"]

ODMR_PORT = 366  # RFC 2645 section 4


def status_of_atrn(code: int) -> int:
    """RFC 2645 section 7: 250 (reversing) and 453 (no mail) are fine; 450 (refused) is this
    user's business; the rest as etrn's statuses (451: later; 530: not permitted; 502: no ATRN)."""
    if code in (250, 453):
        return EX_OK
    return EX_NOPERM if code == 450 else status_of_reply(code)


def _connect(host, port, *, helo, timeout, ctx, implicit_tls) -> PrimaryClient:
    """smtpclient's client: every reply of the backup bounded, and what it sent ahead visible."""
    client = PrimaryClient(timeout=timeout, local_hostname=helo)
    code, text = client.connect(host, port)
    if code != 220:
        client.close()
        raise smtplib.SMTPConnectError(code, text)
    return client


def run(host, port, domains, *, user, password, deliver_to: Destination, cafile=None, insecure=False,
        timeout=300.0, mechanism=None, out=None, err=None) -> int:
    """ATRN for `domains` (none: all the user's); the mail relayed to `deliver_to`. The exit status.

    Prints the ATRN reply and one line per message on `out`; a problem is one line on `err`.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    progress, smtp, mta = Progress(), None, None
    helo = socket.gethostname() or "localhost"
    try:
        ctx = tls_context(cafile, insecure)
        progress.stage = f"the local MTA {deliver_to}"
        mta = LocalMTA(deliver_to, timeout=timeout, local_hostname=helo)
        mta.open()
        progress.stage = "connect to the ODMR port"
        smtp = authenticated_session(
            host, port, user=user, password=password, ctx=ctx, progress=progress, timeout=timeout,
            mechanism=mechanism, verified=not insecure, connect=_connect,
            note=lambda line: print(f"backupmx atrn: {where(host, port)}: {line}", file=err))
        progress.stage = "ATRN"
        code, text = smtp.docmd("ATRN", ",".join(domains))
        print(f"ATRN {','.join(domains) or '(all of the user`s domains)'}: {reply_text(code, text)}",
              file=out, flush=True)
        if code != 250:
            return status_of_atrn(code)
        if smtp._rbuf:  # RFC 2645 5.3: after the 250 we speak first
            raise Failed("the backup spoke before our greeting; not taking its mail", EX_TEMPFAIL)
        progress.stage = "the reversed session"
        relay = Relay(smtp.sock, mta, domains=list(domains), hostname=helo, peer=smtp.sock.getpeername()[0],
                      out=out)
        ended = relay.serve()
        print(f"{relay.counts['relayed']} relayed, {relay.counts['refused']} refused"
              + ("" if ended else f"; the session ended early{': ' + relay.broken if relay.broken else ''}"),
              file=out, flush=True)
        return EX_OK if ended else EX_TEMPFAIL
    except PrimaryUnavailable as exc:  # the local MTA: nothing was fetched
        print(f"backupmx atrn: local MTA {deliver_to}: {exc.reason}", file=err)
        return EX_TEMPFAIL
    except (Failed, smtplib.SMTPException, OSError) as exc:  # ssl.SSLError and socket.timeout are OSErrors
        return report("atrn", exc, progress.stage, host, port, False, err)
    finally:
        close_quietly(smtp)
        close_quietly(mta, quit=True)


def main(args) -> int:
    """Entry point from `backupmx atrn` (the argparse namespace of cli.build_parser)."""
    try:
        try:
            host, port = parse_target(args.target, ODMR_PORT)
            deliver_to = Destination.parse(args.deliver_to)
            domains = [normalize_domain(domain) for domain in args.domains]
        except ValueError as exc:
            raise Failed(str(exc), EX_USAGE) from None
        password = read_password(args.password_file, args.user)
    except Failed as exc:
        print(f"backupmx atrn: {exc}", file=sys.stderr)
        return exc.status
    return run(host, port, domains, user=args.user, password=password, deliver_to=deliver_to,
               cafile=args.cafile, insecure=args.insecure, timeout=args.timeout, mechanism=args.mechanism)
