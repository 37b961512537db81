"""The trace header backupmx prepends to a message it queues (RFC 5321 4.4), and the
protocol name it and XFORWARD PROTO give (RFC 3848, RFC 6531 4.3).

The drivers build it when a message's content is about to be spooled
(connection.py for SMTP, atrn_relay.py for the mail an ATRN hands back); the
session (smtp.py) never does. No I/O: the time is an argument.
"""

from datetime import datetime, timezone
from email.utils import format_datetime

from backupmx import addresses, replies


def protocol_name(*, esmtp: bool, tls: bool, authenticated: bool, utf8: bool = False) -> str:
    """The protocol a message came in with, as Received: "with" and XFORWARD PROTO name it:
    RFC 3848's ESMTP, ESMTPA, ESMTPS, ESMTPSA (SMTP after HELO), and RFC 6531 4.3's
    UTF8SMTP... for a SMTPUTF8 transaction."""
    return ("UTF8SMTP" if utf8 else "ESMTP" if esmtp else "SMTP") + ("S" if tls else "") + (
        "A" if authenticated else "")


_last_date: tuple[int, str] = (-1, "")  # received_date's last (second, text): many messages share a second


def received_date(timestamp: float) -> str:
    """RFC 5322 3.3 date-time of `timestamp`, in UTC, to the second."""
    global _last_date
    second = int(timestamp)
    if timestamp - second >= 0.999999:  # its microseconds may round up to the next second
        return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))
    if _last_date[0] != second:
        _last_date = (second, format_datetime(datetime.fromtimestamp(timestamp, timezone.utc)))
    return _last_date[1]


def received_header(*, helo: str | None, client_ip: str, hostname: str, queue_id: str,
                    esmtp: bool, tls: str | None, authenticated: bool,
                    recipients: list[str], timestamp: float, utf8: bool = False,
                    client_name: str | None = None) -> bytes:
    """The trace header we prepend (RFC 5321 4.4; protocol names per protocol_name,
    and for a SMTPUTF8 transaction a "for" address that may be UTF-8 as the
    client sent it, RFC 6532). `client_name` is the client's verified DNS name
    (client_dns: "unknown" when it has none), shown before its address
    as Postfix does; `tls` the session's TLS, e.g. "using TLSv1.3 with cipher ...".

    Everything the client chose is cleaned so it cannot add lines to the header,
    and the HELO name is shown only in a safe form (addresses.received_helo).
    """
    protocol = protocol_name(esmtp=esmtp, tls=bool(tls), authenticated=authenticated, utf8=utf8)
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    name = f"{replies.clean(client_name)} " if client_name else ""
    lines = [f"Received: from {addresses.received_helo(helo) if helo else 'unknown'} ({name}[{literal}])",
             f"\tby {hostname} (backupmx) with {protocol} id {queue_id}"]
    if tls:
        lines.append(f"\t({replies.clean(tls)})")
    when = received_date(timestamp)
    if len(recipients) == 1:
        recipient = recipients[0] if utf8 and recipients[0].isprintable() else replies.clean(recipients[0])
        lines.append(f"\tfor <{recipient}>; {when}")
    else:
        lines.append(f"\t; {when}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8" if utf8 else "ascii")
