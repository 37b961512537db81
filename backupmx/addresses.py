"""The RFC 5321 address grammar: paths, mailboxes, domains and ESMTP parameters.

Pure functions over `str`; no I/O. Each regex sits under the RFC text it
implements. Parsing is strict where a mistake could open a relay and lenient
only where common clients are sloppy in harmless ways (a space after the colon
in `MAIL FROM: <a@b>`, a trailing dot on a domain).
"""

import ipaddress
import re
from dataclasses import dataclass

from backupmx import idn

# RFC 5321 4.1.2:
#   Let-dig = ALPHA / DIGIT ; Ldh-str = *( ALPHA / DIGIT / "-" ) Let-dig
#   sub-domain = Let-dig [Ldh-str] ; Domain = sub-domain *("." sub-domain)
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DOMAIN_RE = re.compile(rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*")

# RFC 5321 4.1.2: atext per RFC 5322 3.2.3; Dot-string = Atom *("." Atom)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
DOT_STRING_RE = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# Quoted-string = DQUOTE *QcontentSMTP DQUOTE
#   qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = %d92 %d32-126
QUOTED_STRING_RE = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
# RFC 6531 3.3: with SMTPUTF8, atext and qtextSMTP also take UTF8-non-ascii (RFC 6532 3.1);
# idn.check_local_part then refuses the invisible and misleading ones.
_UTF8_NON_ASCII = r"[^\x00-\x7f]"
DOT_STRING_UTF8_RE = re.compile(rf"(?:{_ATEXT}|{_UTF8_NON_ASCII})+(?:\.(?:{_ATEXT}|{_UTF8_NON_ASCII})+)*")
QUOTED_STRING_UTF8_RE = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"')
# address-literal = "[" ( IPv4 / IPv6 / General-address-literal ) "]"; we only need
# to recognise one, never to deliver to it.
ADDRESS_LITERAL_RE = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
# A-d-l = At-domain *( "," At-domain ) ; At-domain = "@" Domain   (a source route)
SOURCE_ROUTE_RE = re.compile(rf"@(?:{DOMAIN_RE.pattern}|{ADDRESS_LITERAL_RE.pattern})"
                             rf"(?:,@(?:{DOMAIN_RE.pattern}|{ADDRESS_LITERAL_RE.pattern}))*:")

# Characters a client-chosen HELO name may not bring into a Received: header
# (RFC 5322 3.2.2 comments, 3.4 angle addresses, quoted strings, and the ";"
# before the date): Postfix's smtpd shows each of them, like anything that is
# not printable ASCII, as "?".
_UNSAFE_IN_RECEIVED = re.compile(r'[^\x21-\x7e]|[;()<>"\\@]')

# RFC 5321 2.4 and 4.5.3.1.1-3: size limits.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
#                 esmtp-value   = 1*(%d33-60 / %d62-126)
ESMTP_PARAM_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
# RFC 3461 4: xtext = *( xchar / hexchar ); hexchar = "+" 2(HEX);
#   xchar = any ASCII CHAR between "!" (33) and "~" (126) except "+" and "=".
XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# Strict decimal: RFC 1870 "size-value ::= 1*20DIGIT" (so "1_000" or "+5" is not a number).
DIGITS_RE = re.compile(r"[0-9]{1,20}")


class AddressError(ValueError):
    """The text is not a valid RFC 5321 path or mailbox."""


class NonASCIIAddress(AddressError):
    """The address has non-ASCII characters and SMTPUTF8 was not negotiated (RFC 6531 3.5)."""


@dataclass(frozen=True)
class Mailbox:
    """A parsed mailbox: `local_part@domain`, as the client wrote it.

    `domain` is kept as written (it is part of what the primary receives);
    normalize_domain gives the form configured domains are matched in.
    """

    local_part: str
    domain: str
    is_literal: bool = False

    @property
    def address(self) -> str:
        """local@domain as written, but for a trailing dot on the domain.

        `bob@example.com.` is the same mailbox as `bob@example.com`; the dot
        is dropped so the primary is not handed a form it may refuse.
        """
        domain = self.domain[:-1] if self.domain.endswith(".") else self.domain
        return f"{self.local_part}@{domain}"

    @property
    def bare_local_part(self) -> str:
        """The local part without quoting: `"a b"` -> `a b`."""
        text = self.local_part
        if text.startswith('"'):
            text = re.sub(r"\\(.)", r"\1", text[1:-1])
        return text


def normalize_domain(name: str) -> str:
    """The one form domains are compared in: lower case, no trailing dot, A-labels.

    U-labels become A-labels and "xn--" labels are checked, by IDNA 2008's
    rules as far as the stdlib allows (idn.py says how, and why not with the
    stdlib's IDNA 2003 codec); raises ValueError for anything that is not a
    DNS name. The configuration, the CLI and relay control all use it.
    """
    try:
        return idn.to_a_domain(name.strip())
    except idn.IDNError as exc:
        raise ValueError(f"bad domain name {name.strip()!r}: {exc}") from None


def is_domain(text: str) -> bool:
    """True for an LDH domain name (a trailing dot allowed), within RFC 5321 size limits."""
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= MAX_DOMAIN and DOMAIN_RE.fullmatch(name) is not None


def is_address_literal(text: str) -> bool:
    """True for "[IPv4]" or "[IPv6:address]" (RFC 5321 4.1.3), the address checked.

    A General-address-literal ("[tag:anything]") is not counted: no other tag is
    registered, and its content may hold any character a Received: header fears.
    """
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if "%" in inner:  # ipaddress takes "fe80::1%<any text>" (a scope id): not RFC 5321
        return False
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def received_helo(name: str) -> str:
    """The HELO/EHLO name as our Received: header shows it (RFC 5321 4.4 From-domain).

    A valid domain or address literal appears as the client sent it; anything
    else in a neutered form, each unsafe character replaced by "?" as Postfix
    does, so that `EHLO a;b(c)<d>@e"` becomes `a?b?c??d??e?` and cannot end the
    clause, open a comment or forge an address for a primary that parses it.
    """
    if is_domain(name) or is_address_literal(name):
        return name
    return _UNSAFE_IN_RECEIVED.sub("?", name) or "?"


def parse_mailbox(text: str, *, utf8: bool = False) -> Mailbox:
    """Mailbox = Local-part "@" ( Domain / address-literal ); with `utf8` (the
    SMTPUTF8 parameter, RFC 6531 3.3) UTF-8 local parts and U-label domains too."""
    if not text.isascii() and not utf8:
        raise NonASCIIAddress(text)
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("missing domain")
    local_part, domain = text[:at], text[at + 1:]
    if local_part.isascii():
        if not (DOT_STRING_RE.fullmatch(local_part) or QUOTED_STRING_RE.fullmatch(local_part)):
            raise AddressError("bad local part")
    elif not (DOT_STRING_UTF8_RE.fullmatch(local_part) or QUOTED_STRING_UTF8_RE.fullmatch(local_part)):
        raise AddressError("bad local part")
    else:
        try:
            idn.check_local_part(local_part)
        except idn.IDNError as exc:
            raise AddressError(str(exc)) from None
    if len(local_part.encode("utf-8")) > MAX_LOCAL_PART:  # RFC 6531 3.3: octets
        raise AddressError("local part too long")
    if ADDRESS_LITERAL_RE.fullmatch(domain):
        return Mailbox(local_part, domain, is_literal=True)
    if domain.isascii():
        if not is_domain(domain):
            raise AddressError("bad domain")
    else:
        try:
            idn.to_a_domain(domain)
        except idn.IDNError as exc:
            raise AddressError(f"bad domain: {exc}") from None
    return Mailbox(local_part, domain)


def parse_path(text: str, *, allow_null: bool, utf8: bool = False) -> Mailbox | None:
    """Reverse-path / Forward-path: `<[A-d-l:]Mailbox>`; `<>` (None) only if allow_null.

    The source route is dropped, as RFC 5321 4.1.1.3 and appendix C ask: the
    mail goes to the mailbox's domain, never via the listed hosts. Angle
    brackets are required only when the path has a space in it, as many
    clients omit them. `utf8`: the transaction has SMTPUTF8 (RFC 6531).
    """
    if not text.isascii() and not utf8:
        raise NonASCIIAddress(text)
    if not text:
        raise AddressError("empty path")
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    elif "<" in text or ">" in text or " " in text:
        raise AddressError("bad path")
    if len(text) > MAX_PATH:
        raise AddressError("path too long")
    if text == "":
        if allow_null:
            return None
        raise AddressError("null path")
    route = SOURCE_ROUTE_RE.match(text)
    if route:
        text = text[route.end():]
    return parse_mailbox(text, utf8=utf8)


def utf8_path(text: str) -> str:
    """A path the session read as Latin-1 (one character per octet), as the UTF-8 the
    client sent with SMTPUTF8; AddressError when it is not well-formed UTF-8."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise AddressError("not well-formed UTF-8") from None


def fold_local_part(local: str) -> str:
    """The form local parts are compared in (a recipients list): ASCII letters lower-cased,
    nothing else changed, so "\u212a" (KELVIN SIGN) never matches "k"."""
    if local.isascii():
        return local.lower()  # the same, in C
    return "".join(c.lower() if c.isascii() else c for c in local)


def split_path_and_parameters(argument: str) -> tuple[str, list[str]]:
    """Split `<path> KEY=VALUE ...`; the path may contain quoted spaces."""
    argument = argument.strip(" ")
    if argument.startswith("<"):
        end = _end_of_bracketed_path(argument)
        path, rest = argument[:end + 1], argument[end + 1:]
        if rest and not rest.startswith(" "):
            raise AddressError("bad path")
    else:
        path, _, rest = argument.partition(" ")
    return path, [p for p in rest.split(" ") if p]


def _end_of_bracketed_path(text: str) -> int:
    """Index of the `>` that closes the path, skipping quoted local parts."""
    if '"' not in text:  # nothing quoted (nearly every path): the first `>`, found in C
        end = text.find(">")
        if end < 0:
            raise AddressError("unterminated path")
        return end
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    raise AddressError("unterminated path")


def parse_parameters(parameters: list[str]) -> dict[str, str | None]:
    """ESMTP parameters as {UPPER-KEYWORD: value or None}; duplicates are an error."""
    result: dict[str, str | None] = {}
    for parameter in parameters:
        match = ESMTP_PARAM_RE.fullmatch(parameter)
        if not match:
            raise AddressError(f"bad parameter {parameter!r}")
        keyword = match.group(1).upper()
        if keyword in result:
            raise AddressError(f"duplicate parameter {keyword}")
        result[keyword] = match.group(2)
    return result


def is_routing_trick(mailbox: Mailbox) -> bool:
    """Local parts that some MTA behind us could read as a route elsewhere.

    `a%b@ours`, `b!a@ours` and `"a@b"@ours` are the percent hack, bang paths
    and a nested address: a primary that honours them would relay for us, so
    we refuse them like Postfix's allow_untrusted_routing=no does.
    """
    local = mailbox.bare_local_part
    return "%" in local or "!" in local or "@" in local
