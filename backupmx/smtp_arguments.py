"""What an SMTP command's argument says: pure functions, each the value or a (Reply, fields) refusal.

MAIL FROM's path and ESMTP parameters make a new transaction's Envelope
(parse_sender), RCPT TO's a Recipient of a configured domain, after relay
control and the recipient limit (parse_recipient); BDAT's chunk size
(bdat_size); ETRN's domains that the user may flush (etrn_request). The
session (smtp.py) calls them per command and decides nothing here: these only
read the argument against the settings.
"""

from typing import TYPE_CHECKING

from backupmx import addresses, replies
from backupmx.addresses import AddressError, NonASCIIAddress
from backupmx.envelope import Envelope, Recipient
from backupmx.replies import Reply
from backupmx.smtp_events import EtrnRequest

if TYPE_CHECKING:
    from backupmx.config import DomainConfig
    from backupmx.smtp import SessionSettings


def bdat_size(argument: str) -> tuple[int, bool] | None:
    """RFC 3030 2: bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ]: (octets, last), or None."""
    words = argument.split(" ")
    if not 1 <= len(words) <= 2 or not addresses.DIGITS_RE.fullmatch(words[0]) or (
            len(words) == 2 and words[1].upper() != "LAST"):
        return None
    return int(words[0]), len(words) == 2


def client_path(path: str, *, allow_null: bool, utf8: bool) -> "addresses.Mailbox | None":
    """The path as the client meant it: Latin-1 as read, or its UTF-8 with SMTPUTF8 (RFC 6531)."""
    if utf8 and not path.isascii():
        path = addresses.utf8_path(path)
    return addresses.parse_path(path, allow_null=allow_null, utf8=utf8)


def mail_parameters(envelope: Envelope, parameters: dict, *, esmtp: bool, max_size: int):
    """Fill the envelope from MAIL parameters; a (Reply, fields) problem or None."""
    if parameters and not esmtp:
        return replies.UNKNOWN_PARAMETER, {"detail": "parameters need EHLO"}
    for keyword, value in parameters.items():
        if keyword == "SIZE":  # RFC 1870
            if value is None or not addresses.DIGITS_RE.fullmatch(value):
                return replies.BAD_PARAMETER, {"detail": "SIZE"}
            if int(value) > max_size:
                return replies.MESSAGE_TOO_BIG, {}
            envelope.declared_size = int(value)
        elif keyword == "BODY":  # RFC 6152
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return replies.BAD_PARAMETER, {"detail": "BODY"}
            envelope.body_type = value.upper()
        elif keyword == "RET":  # RFC 3461 4.3
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return replies.BAD_PARAMETER, {"detail": "RET"}
            envelope.ret = value.upper()
        elif keyword == "ENVID":  # RFC 3461 4.4
            if not value or len(value) > 100 or not addresses.XTEXT_RE.fullmatch(value):
                return replies.BAD_PARAMETER, {"detail": "ENVID"}
            envelope.envid = value
        elif keyword == "AUTH":  # RFC 4954 5: accepted, not passed on
            if not value:
                return replies.BAD_PARAMETER, {"detail": "AUTH"}
        elif keyword == "SMTPUTF8":  # RFC 6531 3.4: no value
            if value is not None:
                return replies.BAD_PARAMETER, {"detail": "SMTPUTF8"}
            envelope.smtputf8 = True
        else:
            return replies.UNKNOWN_PARAMETER, {"detail": keyword}
    return None


def recipient_parameters(mailbox: addresses.Mailbox, domain: str, parameters: dict, *, esmtp: bool):
    """A Recipient of the configured `domain`, or a (Reply, fields) problem with its RFC 3461 parameters."""
    notify = orcpt = None
    if parameters and not esmtp:
        return replies.UNKNOWN_PARAMETER, {"detail": "parameters need EHLO"}
    for keyword, value in parameters.items():
        if keyword == "NOTIFY":  # RFC 3461 4.1
            words = (value or "").upper().split(",")
            if not value or not set(words) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                    "NEVER" in words and len(words) > 1):
                return replies.BAD_PARAMETER, {"detail": "NOTIFY"}
            notify = ",".join(words)
        elif keyword == "ORCPT":  # RFC 3461 4.2: addr-type ";" xtext
            addr_type, _, xtext = (value or "").partition(";")
            if not addr_type or not xtext or not addresses.XTEXT_RE.fullmatch(xtext) or len(value) > 500:
                return replies.BAD_PARAMETER, {"detail": "ORCPT"}
            orcpt = value
        else:
            return replies.UNKNOWN_PARAMETER, {"detail": keyword}
    return Recipient(address=mailbox.address, domain=domain, notify=notify, orcpt=orcpt)


def parse_sender(settings: "SessionSettings", path_and_parameters: str, *, esmtp: bool):
    """MAIL FROM's argument after "FROM:": the new transaction's Envelope, or a (Reply, fields) refusal."""
    path, utf8 = path_and_parameters, False
    try:
        path, raw_parameters = addresses.split_path_and_parameters(path_and_parameters)
        parameters = addresses.parse_parameters(raw_parameters)
        utf8 = "SMTPUTF8" in parameters and esmtp
        sender = client_path(path, allow_null=True, utf8=utf8)
    except NonASCIIAddress:
        return replies.NON_ASCII_ADDRESS, {}
    except AddressError as exc:
        if utf8 and not path.isascii():  # a SMTPUTF8 address we refuse: say why
            return replies.BAD_UTF8_ADDRESS, {"detail": str(exc)}
        return replies.BAD_SENDER, {}
    envelope = Envelope(sender=sender.address if sender else "")
    problem = mail_parameters(envelope, parameters, esmtp=esmtp, max_size=settings.max_message_size)
    return problem if problem is not None else envelope


def parse_recipient(settings: "SessionSettings", envelope: Envelope, path_and_parameters: str, *, esmtp: bool):
    """RCPT TO's argument after "TO:": a Recipient of a configured domain, or a (Reply, fields)
    refusal (syntax, relay control, the recipient limit, parameters)."""
    path = path_and_parameters.strip(" ")
    utf8 = envelope.smtputf8
    try:
        path, raw_parameters = addresses.split_path_and_parameters(path_and_parameters)
        mailbox = client_path(path, allow_null=False, utf8=utf8)
        parameters = addresses.parse_parameters(raw_parameters)
    except NonASCIIAddress:
        return replies.NON_ASCII_ADDRESS, {}
    except AddressError as exc:
        if path.strip("<>").lower() == "postmaster":
            return replies.UNKNOWN_USER, {"address": path.strip("<>")}
        if utf8 and not path.isascii():  # a SMTPUTF8 address we refuse: say why
            return replies.BAD_UTF8_ADDRESS, {"detail": str(exc)}
        return replies.BAD_ADDRESS, {}
    domain = None if mailbox.is_literal else settings.domain(mailbox.domain)
    refusal = _relay_refusal(mailbox, domain)
    if refusal is not None:
        return refusal, {"address": mailbox.address}
    if len(envelope.recipients) >= settings.max_recipients:
        return replies.TOO_MANY_RECIPIENTS, {}
    return recipient_parameters(mailbox, domain.name, parameters, esmtp=esmtp)


def etrn_request(settings: "SessionSettings", user: str | None, argument: str):
    """ETRN's argument (RFC 1985): the EtrnRequest for the configured domains it names that
    `user` may flush, or a (Reply, fields) refusal."""
    if not argument or " " in argument:
        return replies.ETRN_SYNTAX, {}
    if argument.startswith("#"):  # RFC 1985 queue names: we only have domains
        return replies.ETRN_UNABLE, {"domain": argument}
    subdomains = argument.startswith("@")
    name = argument[1:] if subdomains else argument
    try:
        if not addresses.is_domain(name):
            raise ValueError(name)
        name = addresses.normalize_domain(name)
    except ValueError:
        return replies.ETRN_SYNTAX, {}
    domains = settings.flushable(user, name, subdomains)
    if not domains:
        return replies.ETRN_NOT_ALLOWED, {"domain": argument}
    return EtrnRequest(domains, argument)


def _relay_refusal(mailbox: addresses.Mailbox, domain: "DomainConfig | None") -> Reply | None:
    """Relay control: only configured domains, only listed local parts, no routing tricks."""
    if domain is None or addresses.is_routing_trick(mailbox):
        return replies.RELAY_DENIED
    if not domain.accepts(f"{mailbox.bare_local_part}@{domain.name}"):
        return replies.UNKNOWN_USER
    return None
