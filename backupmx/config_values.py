"""What one config value may be: each parser takes the text of one key and
returns its value, or raises ValueError with a short reason, which the loader
(config.py) turns into the one-line error naming the file, the section and
the key. The loader's key tables name these parsers; parse_duration,
parse_size, parse_hostport, format_hostport and humanize_age also serve the
CLI and the drivers.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from typing import Callable

from backupmx.addresses import fold_local_part, normalize_domain
from backupmx.auth import MECHANISMS, validate_password_value

TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
PASSWORD_SCHEMES = ("{SCRYPT}", "{SCRAM-SHA-256}", "{PLAIN}")

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _number_with_unit(text: str, pattern: re.Pattern, units: dict, what: str, hint: str) -> float:
    m = pattern.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad {what} {text!r} ({hint})")
    value = float(m.group(1)) * units[m.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"bad {what} {text!r}")
    return value


def parse_duration(text: str) -> float:
    """ "90" -> 90.0, "5m" -> 300.0, "1.5h" -> 5400.0, "5d" -> 432000.0 (seconds)."""
    return _number_with_unit(text, _DURATION, _DURATION_UNITS, "duration",
                             "a number with an optional s, m, h or d suffix")


def humanize_age(seconds: float) -> str:
    """45 -> "45s", 300 -> "5m0s", 11520 -> "3h12m", 190000 -> "2d4h" (for people, not for parse_duration)."""
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


def parse_size(text: str) -> int:
    """ "512" -> 512, "100M" -> 104857600, "5G" -> 5368709120 (1024-based)."""
    return int(_number_with_unit(text, _SIZE, _SIZE_UNITS, "size", "bytes with an optional K, M or G suffix"))


def _check_host(host: str) -> str:
    """An IP address (v4 or v6) or a DNS host name; returned as written (names lower-cased)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return host
        except (OSError, ValueError):
            pass
    if ":" in host:
        raise ValueError(f"bad IPv6 address {host!r}")
    return normalize_domain(host)


def parse_hostport(
    text: str, *, default_port: int | None = None, allow_zero: bool = False, allow_wildcard: bool = False
) -> tuple[str, int]:
    """ "[::1]:2525" -> ("::1", 2525); "127.0.0.1:25"; "mail.example.com" -> default port.

    "*" as the host means every IPv4 address ("0.0.0.0") where allow_wildcard.
    An IPv6 address must be in brackets when a port follows (else "::1:25" is ambiguous).
    """
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    port_text: str | None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {text!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}")
        port_text = rest[1:] if rest else None
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            raise ValueError(f"bad address {text!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") > 1:
        raise ValueError(f"bad address {text!r}: write IPv6 addresses in brackets, e.g. [::1]:25")
    else:
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if host == "*" and allow_wildcard:
            host = "0.0.0.0"
        elif not host:
            raise ValueError(f"bad address {text!r}: missing host")
        else:
            try:
                host = _check_host(host)
            except ValueError as exc:
                raise ValueError(f"bad address {text!r}: {exc}") from None
    if port_text is None:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: missing port")
        return host, default_port
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"bad port {port_text!r} in {text!r}")
    port = int(port_text)
    if not ((0 if allow_zero else 1) <= port <= 65535):
        raise ValueError(f"bad port {port} in {text!r} (1..65535)")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """("::1", 25) -> "[::1]:25"; ("mx.example", 25) -> "mx.example:25" (parse_hostport's inverse)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise ValueError(f"must be at least 1 byte, not {text!r}")
    return value


# SQLite stores a blob of at most 1,000,000,000 bytes (SQLITE_MAX_LENGTH); the
# body is one blob, with our Received header and some room on top.
MAX_MESSAGE_SIZE_LIMIT = 999_000_000
# The ceiling of the bounce_size_limit setting: a DSN is built in memory, and a
# forged sender must not be able to turn a bounce into a large reflection.
MAX_BOUNCE_SIZE_LIMIT = 10 * 1024 * 1024


def message_size(text: str) -> int:
    value = positive_size(text)
    if value > MAX_MESSAGE_SIZE_LIMIT:
        raise ValueError(f"must be at most {MAX_MESSAGE_SIZE_LIMIT} bytes (SQLite's blob limit), not {text!r}")
    return value


def bounce_size_limit(text: str) -> int:
    value = positive_size(text)
    if value > MAX_BOUNCE_SIZE_LIMIT:
        raise ValueError(f"must be at most 10M, not {text.strip()!r} (a bounce must not reflect big mail)")
    return value


def positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be more than 0, not {text!r}")
    return value


def nonempty(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("empty value")
    return text


def optional_path(text: str) -> str | None:
    text = text.strip()
    return abspath(text) if text else None


def hostname(text: str) -> str:
    text = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.v]+\]", text):
        raise ValueError(f"bad host name {text!r}")
    return text.rstrip(".")


def listen_list(default_port: int) -> Callable[[str], tuple[tuple[str, int], ...]]:
    def parse(text: str) -> tuple[tuple[str, int], ...]:
        return tuple(
            parse_hostport(item, default_port=default_port, allow_zero=True, allow_wildcard=True)
            for item in split_list(text)
        )

    return parse


def tls_version(text: str) -> str:
    for version in TLS_VERSIONS:
        if text.strip().lower() == version.lower():
            return version
    raise ValueError(f"must be one of {', '.join(TLS_VERSIONS)}, not {text.strip()!r}")


def log_target(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if text in ("stderr", "syslog"):
        return text
    return abspath(text)


def bounce_relay(text: str) -> tuple[str, int] | None:
    text = text.strip()
    return parse_hostport(text, default_port=25) if text else None


def auth_mechanisms(text: str) -> tuple[str, ...]:
    names = [name.upper() for name in re.split(r"[\s,]+", text.strip()) if name]
    if not names:
        raise ValueError(f"empty list (choose from {' '.join(MECHANISMS)})")
    for name in names:
        if name not in MECHANISMS:
            raise ValueError(f"unknown mechanism {name!r} (choose from {' '.join(MECHANISMS)})")
    if len(set(names)) != len(names):
        raise ValueError("a mechanism is listed twice")
    return tuple(names)
def metrics_listen(text: str) -> tuple[str, int] | None:
    text = text.strip()
    return parse_hostport(text, allow_zero=True) if text and text.lower() != "none" else None


LOG_LEVELS = ("debug", "info", "warning", "error")  # backupmx.log.LEVELS


def log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {text.strip()!r}")
    return value


def mailbox(text: str) -> str | None:
    """An address to send to (local@domain, no <>), or None for an empty value."""
    text = text.strip()
    if not text:
        return None
    local, at, where = text.rpartition("@")
    if not at or not local or not text.isascii() or any(c.isspace() or c in '<>,;"' or ord(c) < 32 for c in text):
        raise ValueError(f"bad address {text!r} (local@domain, without <>)")
    try:
        normalize_domain(where)
    except ValueError:
        raise ValueError(f"bad address {text!r}") from None
    return text


def networks(text: str) -> tuple:
    """ "192.0.2.0/24, 2001:db8::/32, 198.51.100.7" -> ip_network objects (host bits must be 0)."""
    networks = []
    for item in split_list(text):
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"bad network {item!r}: {exc}") from None
    return tuple(networks)


def zones(text: str) -> tuple[str, ...]:
    """ "zen.spamhaus.org, bl.example" -> the zones, lower-case, no trailing dot."""
    zones = []
    for item in split_list(text):
        try:
            zones.append(normalize_domain(item))
        except ValueError as exc:
            raise ValueError(f"bad zone {item!r}: {exc}") from None
    return tuple(dict.fromkeys(zones))


def user_name(text: str) -> str | None:
    return text.strip() or None


def choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {text.strip()!r}")
        return value

    return parse


def password(text: str) -> str:
    # Only surrounding whitespace goes: the rest of the value is the secret, as written.
    text = text.strip()
    if not text.startswith(PASSWORD_SCHEMES):
        raise ValueError("must start with {SCRYPT} or {SCRAM-SHA-256} (from `backupmx passwd`) or {PLAIN}")
    if text in PASSWORD_SCHEMES:
        raise ValueError("empty password")
    validate_password_value(text)  # a mangled {SCRYPT} value is found now, not at the first AUTH
    return text


def recipient(item: str, domain: str) -> str:
    """A recipients entry: a bare local part gets "@domain"; a full address must be in the domain."""
    item = item.strip()
    local, at, where = item.rpartition("@")
    if not at:
        local, where = item, domain
    if not local or any(c.isspace() or ord(c) < 32 or c in "<>," for c in local):
        raise ValueError(f"bad address {item!r}")
    try:
        where = normalize_domain(where)
    except ValueError:
        raise ValueError(f"bad address {item!r}") from None
    if where != domain:
        raise ValueError(f"{item} is not in domain {domain}")
    return f"{fold_local_part(local)}@{domain}"
