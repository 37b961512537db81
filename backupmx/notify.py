"""The short notices to a domain's `notify` address (housekeeping sends them through bounce_relay).

Two kinds, each at most once per queueing period of the domain (store_status
claims them): "queueing" when the domain starts queueing (its primary did not
take its mail, or has not asked for it yet), and "age" when its oldest waiting
mail is older than `notify_age`. A plain-text message, no attachment: what
waits, since when, the primary's last ETRN and delivery, what to do.
"""

from __future__ import annotations

import email.utils

from backupmx.config_values import humanize_age

KINDS = ("queueing", "age")


def _when(unix: int | None, now: float) -> str:
    if unix is None:
        return "never"
    return f"{email.utils.formatdate(unix, localtime=False, usegmt=True)} ({humanize_age(now - unix)} ago)"


def build_notice(notice, *, hostname: str, to: str, now: float, notify_age: float) -> bytes:
    """The RFC 5322 message for a store_status.Notice, CRLF line ends, ASCII."""
    domain = notice.domain
    if notice.kind == "queueing":
        subject = f"mail for {domain} is queueing on {hostname}"
        first = (f"{hostname}, a backup MX for {domain}, has mail for it that its primary has not taken yet.")
    else:
        subject = f"mail for {domain} has waited over {humanize_age(notify_age)} on {hostname}"
        first = (f"The oldest mail for {domain} on {hostname} has waited longer than {humanize_age(notify_age)};"
                 f" it expires after queue_lifetime.")
    body = [
        first,
        "",
        f"  waiting messages:   {notice.messages} ({notice.bytes} bytes)",
        f"  queueing since:     {_when(notice.since, now)}",
        f"  oldest message:     {_when(notice.oldest, now)}",
        f"  last ETRN:          {_when(notice.last_etrn, now)}",
        f"  last delivery:      {_when(notice.last_delivery, now)}",
        "",
        "Once the primary is reachable it collects the mail with ETRN (for example",
        f"`backupmx etrn {hostname} {domain} --user ...`); on {hostname},",
        f"`backupmx queue` shows the queue and `backupmx flush {domain}` delivers it.",
        "",
        "-- ",
        f"backupmx on {hostname}. This notice is sent once per queueing period.",
    ]
    headers = [
        f"From: backupmx <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: backupmx: {subject}",
        f"Date: {email.utils.formatdate(now, localtime=False, usegmt=True)}",
        f"Message-ID: {email.utils.make_msgid('notice', domain=hostname)}",
        "Auto-Submitted: auto-generated",  # RFC 3834: no auto-replies to it
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
    ]
    text = "\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body) + "\r\n"
    return text.encode("ascii", "replace")
