"""Delivery status notifications (RFC 3464) for failed, expired and delayed mail.

Pure: builds bytes from what the queue knows; no sockets, no SQLite, no clock
(the caller passes `now`). backupmx/lifecycle.py decides when, and sends them.

The shape (RFC 3464 section 2, RFC 6522 multipart/report):

    multipart/report; report-type=delivery-status
      1. text/plain              what happened, for a human
      2. message/delivery-status per-message fields, then one block per recipient
      3. message/rfc822          the original message (RET=FULL or no RET, and no bigger
                                 than bounce_size_limit)
         or text/rfc822-headers  only its header, itself cut to bounce_size_limit
                                 (RET=HDRS, bigger mail, delay warnings; RFC 6522 section 4)

What must hold:
  - The null sender never gets a DSN (RFC 5321 4.5.5: that is how loops are
    prevented); build_dsn refuses to make one.
  - NOTIFY (RFC 3461 4.1) is honoured: NEVER means no DSN at all, and a list
    without FAILURE (or DELAY) means no failure (or delay) DSN.
  - Every generated line ends in CRLF and stays far below 998 octets; text that
    came from a peer (replies) is stripped of control characters first. The
    original message is embedded byte for byte (it is CRLF-only: the SMTP side
    refuses bare CR and LF).
  - Auto-Submitted: auto-replied (RFC 3834 5) so auto-responders stay quiet.
  - An internationalised message (SMTPUTF8 with a UTF-8 address or header)
    gets RFC 6533's form: report-type=global-delivery-status, the status in
    message/global-delivery-status (UTF-8 addresses as they are, type
    "utf-8"), the original as message/global or message/global-headers.
    Such a DSN is itself sent with SMTPUTF8 (lifecycle.send_dsn).
"""

from __future__ import annotations

import datetime
import re
import secrets

__all__ = [
    "FAILED",
    "DELAYED",
    "build_dsn",
    "cut_headers",
    "diagnostic",
    "is_international",
    "notify_wants",
    "returns_full",
    "split_headers",
    "status_for",
    "xtext_decode",
]

FAILED, DELAYED = "failed", "delayed"  # RFC 3464 2.3.3 Action values we send

MAX_TEXT = 900  # characters of a reply put on one DSN line (RFC 5322 2.1.1: 998 octets)

SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
}

_CRLF = b"\r\n"
_REPLY = re.compile(r"^([2-5][0-9][0-9])(?:[ -](.*))?$", re.S)
# RFC 3463 2: status-code = class "." subject "." detail
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


def xtext_decode(text: str) -> str:
    """RFC 3461 4: "+XX" is the octet XX (hex); everything else stands for itself.

    ENVID and the address of ORCPT travel as xtext; a DSN shows them decoded
    (RFC 3464 2.2.1, 2.3.1). Decoded octets that are not printable ASCII are
    shown as "?" so a DSN field can never be split or spoofed by them.
    """
    def octet(match: re.Match) -> str:
        value = int(match.group(1), 16)
        return chr(value) if 0x21 <= value <= 0x7E or value == 0x20 else "?"

    return _clean(_XTEXT_HEX.sub(octet, text))


def notify_wants(notify: str | None, action: str) -> bool:
    """Does a recipient with this NOTIFY= want a DSN of this action? (RFC 3461 4.1)

    No NOTIFY: failures and delays are reported (the MTA's default, 4.1).
    NOTIFY=NEVER: nothing. Otherwise only the listed kinds.
    """
    if not notify:
        return True
    kinds = {k.strip().upper() for k in notify.split(",")}
    if "NEVER" in kinds:
        return False
    return ("FAILURE" if action == FAILED else "DELAY") in kinds


def returns_full(ret: str | None, size: int, action: str, limit: int) -> bool:
    """Is the whole original returned (message/rfc822), or only its header?

    The whole message only when it is no bigger than `limit` (the config's
    bounce_size_limit), whatever RET=FULL asked: a bounce to a forged sender
    must not reflect a big message at a victim (Postfix's bounce_size_limit
    does the same). RET=HDRS: the header. A delay warning carries the header
    only: the message is still on its way (RFC 3461 4.3 asks for the content
    in failure DSNs).
    """
    if action != FAILED:
        return False
    if ret is not None and ret.upper() == "HDRS":
        return False
    return size <= limit


def cut_headers(headers: bytes, limit: int) -> bytes:
    """The header section cut at the last line end within `limit` octets.

    RFC 6522 section 4 allows a text/rfc822-headers part to hold fewer
    headers than the original; a header longer than the limit is not split.
    """
    if len(headers) <= limit:
        return headers
    end = headers.rfind(b"\r\n", 0, limit)
    return headers[:end + 2] if end >= 0 else b""


def split_headers(data: bytes) -> tuple[bytes, bytes]:
    """(header section with its final CRLF, body) of a message; the empty line
    between them belongs to neither. A message without a body is all header."""
    if data.startswith(_CRLF):
        return b"", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data if data.endswith(_CRLF) or not data else data + _CRLF, b""
    return data[:end + 2], data[end + 4:]


def _clean(text: str) -> str:
    """A peer's text made safe for one header line: no control characters, bounded."""
    text = _CONTROL.sub(" ", text).strip()
    return text[:MAX_TEXT]


def _is_smtp_reply(reply: str | None) -> bool:
    return bool(reply) and _REPLY.match(reply) is not None


def status_for(recipient, action: str) -> str:
    """RFC 3463 status code for one recipient in a DSN of `action`.

    failed + 5xx reply: the reply's enhanced code if it has one of class 5, else 5.0.0.
    failed + expired:   4.4.7 "delivery time expired" (RFC 3463 3.5). The class is
                        4 because the cause was transient; Action: failed says it ended.
    delayed:            the last reply's class-4 code if any, else 4.4.1 (no answer
                        from the primary: a backup MX holds mail because it is down).
    """
    reply = recipient.last_reply or ""
    match = _REPLY.match(reply) if reply else None
    # An SMTP reply's enhanced code, or one our own reason starts with ("5.6.7 SMTPUTF8 is required ...").
    text = (match.group(2) or "") if match else reply
    enhanced = _ENHANCED.match(text.strip())
    if action == FAILED:
        if recipient.state == "expired":
            return "4.4.7"
        if enhanced and enhanced.group(1) == "5":
            return enhanced.group(0)
        return "5.0.0"
    if enhanced and enhanced.group(1) == "4":
        return enhanced.group(0)
    return "4.4.1"


def diagnostic(reply: str | None) -> str | None:
    """The Diagnostic-Code value (RFC 3464 2.3.6): "smtp; <reply>" for an SMTP
    reply, "X-Backupmx; <text>" for a connection error, None without a reply."""
    if not reply:
        return None
    text = _clean(reply)
    if _is_smtp_reply(text):
        return f"smtp; {text}"
    return f"X-Backupmx; {text}"


def _date(ts: float) -> str:
    """RFC 5322 3.3 date-time in UTC ("+0000": the zone is known)."""
    moment = datetime.datetime.fromtimestamp(int(ts), datetime.timezone.utc)
    return moment.strftime("%a, %d %b %Y %H:%M:%S +0000")


def _ascii(text: str) -> str:
    """Header-safe text: control characters gone, non-ASCII as "?"."""
    return _clean(text).encode("ascii", "replace").decode("ascii")


def _address_field(address: str) -> str:
    """ "rfc822; a@b" (RFC 3464 2.3.2); "utf-8; ..." for a non-ASCII address (RFC 6533)."""
    address = _clean(address)
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {address}"


def _original_recipient(orcpt: str) -> str | None:
    """ORCPT "type;xtext-address" -> "type; address" decoded, or None if malformed."""
    kind, sep, address = orcpt.partition(";")
    if not sep or not kind.strip() or not address:
        return None
    return f"{_ascii(kind.strip())}; {xtext_decode(address)}"


def _human_text(bounce, recipients, *, action: str, reporting_mta: str, arrival_date: float,
                will_retry_until: float | None) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if action == FAILED:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            f"This host is a backup mail server for {bounce.domain}. It keeps",
            "mail for that domain while the domain's own mail server is",
            "unreachable, and hands it over when that server asks for it.",
            "",
        ]
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet: it is kept by this backup",
            f"mail server until the mail server of {bounce.domain} takes it.",
            f"It was received {_date(arrival_date)}.",
        ]
        if will_retry_until is not None:
            lines.append(f"It will be kept until {_date(will_retry_until)}.")
        lines.append("")
    for r in recipients:
        if action == FAILED and r.state == "expired":
            reason = "the message was not picked up by the domain's mail server in time and expired"
            if r.last_reply:
                reason += f"; last error: {_clean(r.last_reply)}"
        elif r.last_reply:
            reason = f"the domain's mail server said: {_clean(r.last_reply)}"
        else:
            reason = "the domain's mail server has not taken it yet"
        lines.append(f"<{_clean(r.address)}>: {reason}")
    return "\r\n".join(lines) + "\r\n"


def _delivery_status(bounce, recipients, *, action: str, reporting_mta: str, arrival_date: float,
                     remote_mta: str | None, will_retry_until: float | None) -> str:
    """The message/delivery-status body (RFC 3464 2.1): per-message fields, then
    one block per recipient, blocks separated by an empty line."""
    fields = [f"Reporting-MTA: dns; {_ascii(reporting_mta)}", f"X-Backupmx-Queue-ID: {_ascii(bounce.queue_id)}"]
    if bounce.envid:
        fields.append(f"Original-Envelope-Id: {xtext_decode(bounce.envid)}")
    fields.append(f"Arrival-Date: {_date(arrival_date)}")
    blocks = ["\r\n".join(fields)]
    last_attempt = bounce.last_attempt
    for r in recipients:
        block = []
        if r.orcpt:
            original = _original_recipient(r.orcpt)
            if original:
                block.append(f"Original-Recipient: {original}")
        block.append(f"Final-Recipient: {_address_field(r.address)}")
        block.append(f"Action: {action}")
        block.append(f"Status: {status_for(r, action)}")
        code = diagnostic(r.last_reply)
        if code is not None:
            if remote_mta and code.startswith("smtp;"):
                block.append(f"Remote-MTA: dns; {_ascii(remote_mta)}")
            block.append(f"Diagnostic-Code: {code}")
        if last_attempt:
            block.append(f"Last-Attempt-Date: {_date(last_attempt)}")
        if action == DELAYED and will_retry_until is not None:
            block.append(f"Will-Retry-Until: {_date(will_retry_until)}")
        blocks.append("\r\n".join(block))
    return "\r\n\r\n".join(blocks) + "\r\n"


def _transfer_encoding(data: bytes) -> list[bytes]:
    """A Content-Transfer-Encoding line for 8-bit content (RFC 2046 5.2.1: 7bit,
    8bit or binary only, for message/rfc822); none for 7-bit."""
    return [] if data.isascii() else [b"Content-Transfer-Encoding: 8bit"]


def is_international(bounce) -> bool:
    """Does this DSN take RFC 6533's form (and need SMTPUTF8 to be sent)?"""
    return getattr(bounce, "smtputf8", 0) == 2 or not bounce.sender.isascii() or any(
        not r.address.isascii() for r in bounce.recipients)


def _original(headers: bytes, body: bytes | None, action: str, international: bool) -> tuple[bytes, bytes, bytes]:
    """(Content-Type, Content-Description, content) of the returned original: whole, or its header only."""
    if body is None:
        description = b"Undelivered Message Headers" if action == FAILED else b"Delayed Message Headers"
        attachment_type = b"message/global-headers" if international else b"text/rfc822-headers"
        attachment = headers
    else:
        description = b"Undelivered Message"
        attachment_type = b"message/global" if international else b"message/rfc822"
        attachment = headers + _CRLF + body
    if attachment and not attachment.endswith(_CRLF):
        attachment += _CRLF
    return attachment_type, description, attachment


def _boundary(given: str | None, queue_id: str, parts: tuple[bytes, ...]) -> str:
    """A MIME boundary that occurs in none of the parts (RFC 2046 5.1.1)."""
    for _ in range(10):  # a clash with 96 random bits will not happen ten times
        boundary = given or f"{_ascii(queue_id)}.{secrets.token_hex(12)}/DSN"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary
        if given:
            raise ValueError("the given boundary occurs in the content")
    raise ValueError("no boundary found that is not in the content")  # pragma: no cover


def build_dsn(
    bounce,
    *,
    reporting_mta: str,
    original_headers: bytes,
    original_body: bytes | None,
    action: str,
    arrival_date: float,
    now: float,
    remote_mta: str | None = None,
    will_retry_until: float | None = None,
    boundary: str | None = None,
    message_id: str | None = None,
) -> bytes:
    """One RFC 3464 DSN for the recipients of `bounce` (a store.Bounce), as bytes.

    bounce:           its sender gets the DSN; every recipient in it is reported
                      (the caller leaves out those whose NOTIFY does not want it:
                      see notify_wants()).
    original_headers: the original message's header section (split_headers()).
    original_body:    the body after the empty line, or None to return the header
                      only (text/rfc822-headers); see returns_full().
    action:           FAILED ("failed": 5xx or expired) or DELAYED ("delayed").
    arrival_date:     when we received the message; now: the DSN's Date.
    remote_mta:       the primary's host name, shown with an SMTP diagnostic.
    will_retry_until: for a delay warning: when the message will expire.
    boundary, message_id: fixed values for tests; random by default.

    Raises ValueError for the null sender, no recipients, or an unknown action.
    """
    if action not in SUBJECTS:
        raise ValueError(f"unknown DSN action {action!r}")
    if not bounce.sender:
        raise ValueError("no DSN to the null sender (RFC 5321 4.5.5)")
    recipients = list(bounce.recipients)
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    host = _ascii(reporting_mta)
    international = is_international(bounce)  # RFC 6533
    report_type = "global-delivery-status" if international else "delivery-status"
    attachment_type, description, attachment = _original(original_headers, original_body, action, international)
    text = _human_text(bounce, recipients, action=action, reporting_mta=host, arrival_date=arrival_date,
                       will_retry_until=will_retry_until).encode("ascii", "replace")
    status = _delivery_status(bounce, recipients, action=action, reporting_mta=host, arrival_date=arrival_date,
                              remote_mta=remote_mta, will_retry_until=will_retry_until)
    status_bytes = status.encode("utf-8")  # UTF-8 only in a "utf-8;" address, and then global (RFC 6533)

    b = _boundary(boundary, bounce.queue_id, (text, status_bytes, attachment))
    marker = b"--" + b.encode("ascii")
    mid = message_id or f"<{int(now)}.{bounce.queue_id}.{secrets.token_hex(6)}@{host}>"

    sender = _clean(bounce.sender)
    head = [
        f"From: MAILER-DAEMON@{host} (Mail Delivery System)",
        f"To: <{sender}>",
        f"Subject: {SUBJECTS[action]}",
        f"Date: {_date(now)}",
        f"Message-ID: {mid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report_type};\r\n\tboundary="{b}"',
    ]

    def part(headers: list[bytes], content: bytes) -> bytes:
        # content ends with CRLF; the CRLF before the next "--boundary" belongs
        # to that delimiter (RFC 2046 5.1.1), hence the extra one.
        return marker + _CRLF + _CRLF.join(headers) + _CRLF + _CRLF + content + _CRLF

    return b"".join([
        _CRLF.join(line.encode("utf-8") for line in head), _CRLF, _CRLF,
        b"This is a MIME-encapsulated message.", _CRLF, _CRLF,
        part([b"Content-Description: Notification", b"Content-Type: text/plain; charset=us-ascii"], text),
        part([b"Content-Description: Delivery report", b"Content-Type: message/" + report_type.encode("ascii"),
              *_transfer_encoding(status_bytes)], status_bytes),
        part([b"Content-Description: " + description, b"Content-Type: " + attachment_type,
              *_transfer_encoding(attachment)], attachment),
        marker, b"--", _CRLF,
    ])
