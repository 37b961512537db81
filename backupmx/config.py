"""The INI configuration, read once into frozen dataclasses.

Everything an operator can get wrong is found here, before anything forks or
binds, and reported as ONE line naming the file, the section and the key:

    /etc/backupmx/backupmx.ini: [domain:example.com] primary: missing primary

Rules the reader keeps (docs/SPEC.md, "Configuration"):
- configparser with interpolation=None: values are literal, a password may hold "%".
- ";" or "#" after whitespace starts an inline comment; a full line starting with
  either is a comment.
- Unknown sections and unknown keys are errors (a typo must not silently fall back
  to a default). A "[DEFAULT]" section is an unknown section too, not configparser's
  magic defaults.
- Relative paths (queue, tls_cert, tls_key, primary_ca, log file, recipients file)
  are relative to the current directory when the config is loaded; they are stored
  absolute so a later chdir cannot change their meaning.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from typing import Callable, Mapping

from backupmx.addresses import fold_local_part, normalize_domain
from backupmx.auth import MECHANISMS, secret_serves, validate_password_value

__all__ = [
    "Config",
    "ConfigError",
    "DomainConfig",
    "UserConfig",
    "humanize_age",
    "load_config",
    "parse_duration",
    "format_hostport",
    "parse_hostport",
    "parse_size",
    "tuning",
    "plain_secrets_exposure",
    "DEFAULT_CONFIG_PATH",
]

DEFAULT_CONFIG_PATH = "/etc/backupmx/backupmx.ini"

PRIMARY_TLS_MODES = ("none", "opportunistic", "required")
VERIFY_UNREACHABLE = ("accept", "tempfail")
DNSBL_ACTIONS = ("reject", "tempfail")
ACCEPT_WHEN = ("always", "primary-unreachable")
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
PASSWORD_SCHEMES = ("{SCRYPT}", "{SCRAM-SHA-256}", "{PLAIN}")
DEFAULT_AUTH_MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")


class ConfigError(Exception):
    """A configuration problem, as one line: "<file>: [section] key: problem"."""

    def __init__(self, message: str):
        # One line, whatever the parser or the OS told us.
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class DomainConfig:
    """One [domain:NAME] section: a domain we are backup MX for."""

    name: str  # lower-case, no trailing dot, A-labels (IDNA) only
    primary: tuple[str, int]  # the only host this domain's mail is delivered to
    primary_tls: str  # "none" | "opportunistic" | "required"
    recipients: frozenset[str] | None  # None = any local part; else "local@domain", ASCII lower-cased
    primary_ca: str | None
    max_queue_messages: int | None
    max_queue_bytes: int | None
    queue_lifetime: float  # seconds; the global value unless overridden
    retry_interval: float  # seconds, 0 = deliver only on ETRN / flush
    # The primary's addresses, resolved once (backupmx.primaries.pin): None until
    # then, () when its host name did not resolve.
    primary_addresses: tuple[str, ...] | None = None
    notify: str | None = None  # told (through bounce_relay) when the domain starts queueing ...
    notify_age: float = 86400.0  # ... and when its oldest waiting mail is older than this (0 = not)
    # recipients = verify: the primary is asked about each address (verify.py);
    # `recipients` is None then (the session lets every local part through to the callout).
    verify: bool = False
    verify_positive_ttl: float = 30 * 86400.0  # seconds an accepted address is remembered
    verify_negative_ttl: float = 3 * 3600.0  # seconds a refused address is remembered
    verify_unreachable: str = "accept"  # "accept" | "tempfail": the primary unreachable, nothing cached
    # accept_when = primary-unreachable: RCPT gets 450 while the primary answers its banner
    # (prober.py probes it every primary_probe_interval seconds).
    accept_when: str = "always"
    primary_probe_interval: float = 60.0

    def accepts(self, address: str) -> bool:
        """True if `address` ("local@domain", ASCII letters in any case) may be queued for this domain
        as far as the configuration knows (recipients = verify: the callout decides)."""
        local, _, domain = address.rpartition("@")
        return self.recipients is None or f"{fold_local_part(local)}@{domain.lower()}" in self.recipients


@dataclass(frozen=True)
class UserConfig:
    """One [user:NAME] section: who may authenticate and ETRN which domains."""

    name: str
    password: str  # "{SCRYPT}..." or "{PLAIN}..." exactly as written
    domains: frozenset[str]


@dataclass(frozen=True)
class Config:
    """The whole configuration. Built only by load_config()."""

    path: str
    hostname: str
    listen: tuple[tuple[str, int], ...]
    listen_tls: tuple[tuple[str, int], ...]
    listen_odmr: tuple[tuple[str, int], ...]  # ODMR (RFC 2645): STARTTLS, AUTH, ATRN; port 366 by convention
    queue: str
    tls_cert: str | None
    tls_key: str | None
    workers: int
    max_workers: int
    flush_workers: int
    max_message_size: int
    max_recipients: int
    tls_min_version: str
    max_auth_failures: int
    max_connections_per_client: int
    timeout: float
    queue_lifetime: float
    user: str | None
    log: str | None  # None = the mode's default: stderr for serve, syslog under --inetd
    bounce_relay: tuple[str, int] | None
    expired_retention: float
    retry_interval: float
    min_free_space: int
    delay_warning: float  # 0 = off; else warn the sender once mail has waited this long
    bounce_size_limit: int  # bytes of the original a DSN may return; beyond: its header only
    auth_mechanisms: tuple[str, ...]  # SASL mechanisms EHLO offers under TLS, in this order
    log_level: str  # debug | info | warning | error (backupmx.log.LEVELS)
    metrics_listen: tuple[str, int] | None  # where the metrics process serves GET /metrics; None = not at all
    max_session_time: float  # seconds a session may last in all, whatever it does
    max_junk_commands: int  # commands that move no mail (NOOP, RSET, ..., smtp.py rule 6) per session before 421
    greet_pause: float  # seconds the 220 is held back; input before it ends the session (0 = off)
    max_auth_failures_per_client: int  # failed AUTHs from one client (IPv6: its /64) within auth_failure_window
    auth_failure_window: float  # seconds
    auth_failure_delay: float  # seconds a failed AUTH's reply waits, times the session's failures so far
    greylist: float  # seconds a new (network, sender, recipient) must wait before its retry passes; 0 = off
    greylist_expire: float  # seconds a first attempt waits for its retry before it is forgotten
    greylist_exempt: tuple  # ipaddress networks never greylisted
    dnsbl: tuple[str, ...]  # DNS blocklist zones, looked up at connect (client_dns)
    dnsbl_action: str  # "reject" (554 5.7.1) | "tempfail" (450 4.7.1) for a listed client's RCPT
    domains: Mapping[str, DomainConfig]
    users: Mapping[str, UserConfig]
    warnings: tuple[str, ...] = field(default=())  # lines `check` and the server log print

    def domain(self, name: str) -> DomainConfig | None:
        """The configured domain `name` (any case, trailing dot allowed), or None."""
        try:
            return self.domains.get(normalize_domain(name))
        except ValueError:
            return None



# The BACKUPMX_* tuning knobs set in this process's environment: name -> (the text
# given, the default, whether it was used). `serve` logs one line for each at start.
TUNED: dict[str, tuple[str, object, bool]] = {}


def tuning(name: str, default, kind=float):
    """A BACKUPMX_* tuning knob from the environment, not the INI file: an internal
    timing or bound that an operator rarely has a reason to change (README, "Tuning
    through the environment", lists them; the test suite shortens them). Never
    silent: each one set is recorded in TUNED, which `serve` logs at start; a
    value that is no number, or is negative, is ignored (and logged as such).
    What guards against abuse (the AUTH failure delay) is a config key instead."""
    text = os.environ.get(name)
    if text is None:
        return kind(default)
    try:
        value = kind(text)
        usable = math.isfinite(value) and value >= 0
    except ValueError:
        usable = False
    TUNED[name] = (text, default, usable)
    return value if usable else kind(default)


# --------------------------------------------------------------------------
# Value parsers. Each raises ValueError with a short reason; the loader adds
# the file, section and key.

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


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# --------------------------------------------------------------------------
# The loader


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _positive_size(text: str) -> int:
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


def _message_size(text: str) -> int:
    value = _positive_size(text)
    if value > MAX_MESSAGE_SIZE_LIMIT:
        raise ValueError(f"must be at most {MAX_MESSAGE_SIZE_LIMIT} bytes (SQLite's blob limit), not {text!r}")
    return value


def _bounce_size_limit(text: str) -> int:
    value = _positive_size(text)
    if value > MAX_BOUNCE_SIZE_LIMIT:
        raise ValueError(f"must be at most 10M, not {text.strip()!r} (a bounce must not reflect big mail)")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be more than 0, not {text!r}")
    return value


def _nonempty(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("empty value")
    return text


def _optional_path(text: str) -> str | None:
    text = text.strip()
    return _abspath(text) if text else None


def _hostname(text: str) -> str:
    text = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.v]+\]", text):
        raise ValueError(f"bad host name {text!r}")
    return text.rstrip(".")


def _listen_list(default_port: int) -> Callable[[str], tuple[tuple[str, int], ...]]:
    def parse(text: str) -> tuple[tuple[str, int], ...]:
        return tuple(
            parse_hostport(item, default_port=default_port, allow_zero=True, allow_wildcard=True)
            for item in _split_list(text)
        )

    return parse


def _tls_version(text: str) -> str:
    for version in TLS_VERSIONS:
        if text.strip().lower() == version.lower():
            return version
    raise ValueError(f"must be one of {', '.join(TLS_VERSIONS)}, not {text.strip()!r}")


def _log_target(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if text in ("stderr", "syslog"):
        return text
    return _abspath(text)


def _bounce_relay(text: str) -> tuple[str, int] | None:
    text = text.strip()
    return parse_hostport(text, default_port=25) if text else None


def _auth_mechanisms(text: str) -> tuple[str, ...]:
    names = [name.upper() for name in re.split(r"[\s,]+", text.strip()) if name]
    if not names:
        raise ValueError(f"empty list (choose from {' '.join(MECHANISMS)})")
    for name in names:
        if name not in MECHANISMS:
            raise ValueError(f"unknown mechanism {name!r} (choose from {' '.join(MECHANISMS)})")
    if len(set(names)) != len(names):
        raise ValueError("a mechanism is listed twice")
    return tuple(names)
def _metrics_listen(text: str) -> tuple[str, int] | None:
    text = text.strip()
    return parse_hostport(text, allow_zero=True) if text and text.lower() != "none" else None


LOG_LEVELS = ("debug", "info", "warning", "error")  # backupmx.log.LEVELS


def _log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {text.strip()!r}")
    return value


def _mailbox(text: str) -> str | None:
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


def _networks(text: str) -> tuple:
    """ "192.0.2.0/24, 2001:db8::/32, 198.51.100.7" -> ip_network objects (host bits must be 0)."""
    networks = []
    for item in _split_list(text):
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(f"bad network {item!r}: {exc}") from None
    return tuple(networks)


def _zones(text: str) -> tuple[str, ...]:
    """ "zen.spamhaus.org, bl.example" -> the zones, lower-case, no trailing dot."""
    zones = []
    for item in _split_list(text):
        try:
            zones.append(normalize_domain(item))
        except ValueError as exc:
            raise ValueError(f"bad zone {item!r}: {exc}") from None
    return tuple(dict.fromkeys(zones))


def _user_name(text: str) -> str | None:
    return text.strip() or None


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {text.strip()!r}")
        return value

    return parse


# key -> (parser, default). A default of _REQUIRED must be given.
_REQUIRED = object()

_GLOBAL_KEYS: dict[str, tuple[Callable[[str], object], object]] = {
    "hostname": (_hostname, None),  # None: socket.getfqdn(), looked up only when needed
    "listen": (_listen_list(25), (("0.0.0.0", 25),)),
    "listen_tls": (_listen_list(465), ()),
    "listen_odmr": (_listen_list(366), ()),
    "queue": (lambda t: _abspath(_nonempty(t)), "/var/spool/backupmx/queue.db"),
    "tls_cert": (_optional_path, None),
    "tls_key": (_optional_path, None),
    "workers": (_integer(1), 4),
    "max_workers": (_integer(1), 64),
    "flush_workers": (_integer(1), 2),
    "max_message_size": (_message_size, 52428800),
    "max_recipients": (_integer(1), 100),
    "tls_min_version": (_tls_version, "TLSv1.2"),
    "max_auth_failures": (_integer(1), 3),
    "max_connections_per_client": (_integer(1), 50),
    "timeout": (_positive_duration, 300.0),
    "queue_lifetime": (_positive_duration, 5 * 86400.0),
    "user": (_user_name, None),
    "log": (_log_target, None),
    "bounce_relay": (_bounce_relay, None),
    "expired_retention": (parse_duration, 7 * 86400.0),
    "retry_interval": (parse_duration, 0.0),
    "min_free_space": (parse_size, 100 * 1024**2),
    "delay_warning": (parse_duration, 0.0),
    "bounce_size_limit": (_bounce_size_limit, 50 * 1024),
    "auth_mechanisms": (_auth_mechanisms, DEFAULT_AUTH_MECHANISMS),
    "log_level": (_log_level, "info"),
    "metrics_listen": (_metrics_listen, None),
    "max_session_time": (_positive_duration, 30 * 60.0),
    "max_junk_commands": (_integer(1), 100),
    "greet_pause": (parse_duration, 0.0),
    "max_auth_failures_per_client": (_integer(1), 10),
    "auth_failure_window": (_positive_duration, 3600.0),
    "auth_failure_delay": (parse_duration, 1.0),
    "greylist": (parse_duration, 0.0),
    "greylist_expire": (_positive_duration, 86400.0),
    "greylist_exempt": (_networks, ()),
    "dnsbl": (_zones, ()),
    "dnsbl_action": (_choice(DNSBL_ACTIONS), "reject"),
}


_primary_tls = _choice(PRIMARY_TLS_MODES)


_INHERIT = object()  # per-domain value that falls back to the global one

# The recipients parser needs the domain name, so it is applied separately.
_DOMAIN_KEYS: dict[str, tuple[Callable[[str], object], object]] = {
    "primary": (lambda t: parse_hostport(t, default_port=25), _REQUIRED),
    "primary_tls": (_primary_tls, "opportunistic"),
    "recipients": (str, "*"),
    "primary_ca": (_optional_path, None),
    "max_queue_messages": (_integer(1), None),
    "max_queue_bytes": (_positive_size, None),
    "queue_lifetime": (_positive_duration, _INHERIT),
    "retry_interval": (parse_duration, _INHERIT),
    "notify": (_mailbox, None),
    "notify_age": (parse_duration, 86400.0),
    "verify_positive_ttl": (_positive_duration, 30 * 86400.0),
    "verify_negative_ttl": (_positive_duration, 3 * 3600.0),
    "verify_unreachable": (_choice(VERIFY_UNREACHABLE), "accept"),
    "accept_when": (_choice(ACCEPT_WHEN), "always"),
    "primary_probe_interval": (_positive_duration, 60.0),
}
# Keys that mean something only with recipients = verify (a warning otherwise).
_VERIFY_KEYS = ("verify_positive_ttl", "verify_negative_ttl", "verify_unreachable")


def _password(text: str) -> str:
    # Only surrounding whitespace goes: the rest of the value is the secret, as written.
    text = text.strip()
    if not text.startswith(PASSWORD_SCHEMES):
        raise ValueError("must start with {SCRYPT} or {SCRAM-SHA-256} (from `backupmx passwd`) or {PLAIN}")
    if text in PASSWORD_SCHEMES:
        raise ValueError("empty password")
    validate_password_value(text)  # a mangled {SCRYPT} value is found now, not at the first AUTH
    return text


_USER_KEYS: dict[str, tuple[Callable[[str], object], object]] = {
    "password": (_password, _REQUIRED),
    "domains": (str, _REQUIRED),
}


class _Loader:
    def __init__(self, path: str):
        self.path = path
        self.warnings: list[str] = []

    def error(self, section: str | None, key: str | None, problem: str) -> ConfigError:
        where = self.path
        if section is not None:
            where += f": [{section}]"
            if key is not None:
                where += f" {key}"
        return ConfigError(f"{where}: {problem}")

    def read(self) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(
            interpolation=None,
            inline_comment_prefixes=(";", "#"),
            strict=True,
            empty_lines_in_values=False,
            # No magic [DEFAULT]: such a section is reported as unknown like any other.
            default_section="\0none",
        )
        try:
            with open(self.path, encoding="utf-8") as f:
                parser.read_file(f, source=self.path)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.path}: cannot read: not UTF-8 text ({exc.reason})") from None
        except configparser.DuplicateSectionError as exc:
            raise ConfigError(f"{self.path}: [{exc.section}]: duplicate section (line {exc.lineno})") from None
        except configparser.DuplicateOptionError as exc:
            raise ConfigError(
                f"{self.path}: [{exc.section}] {exc.option}: duplicate key (line {exc.lineno})"
            ) from None
        except configparser.MissingSectionHeaderError as exc:
            raise ConfigError(
                f"{self.path}: line {exc.lineno}: text before the first [section]: {exc.line.strip()!r}"
            ) from None
        except configparser.ParsingError as exc:
            lineno, line = exc.errors[0]
            raise ConfigError(f"{self.path}: line {lineno}: cannot parse {line.strip()!r}") from None
        except configparser.Error as exc:
            raise ConfigError(f"{self.path}: {exc.message}") from None
        return parser

    def values(self, parser, section: str, keys: dict) -> dict[str, object]:
        """Parse every key of `section` with its table entry; unknown keys are errors."""
        raw = parser[section]
        out: dict[str, object] = {}
        for key in raw:
            if key not in keys:
                raise self.error(section, key, "unknown key")
        for key, (parse, default) in keys.items():
            if key in raw:
                try:
                    out[key] = parse(raw[key])
                except ValueError as exc:
                    raise self.error(section, key, str(exc)) from None
            elif default is _REQUIRED:
                raise self.error(section, key, f"missing {key}")
            else:
                out[key] = default
        return out

    def recipients(self, section: str, domain: str, text: str) -> frozenset[str] | None:
        text = text.strip()
        if text == "*":
            return None
        if text.startswith("@"):
            path = _abspath(text[1:].strip())
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise self.error(section, "recipients", f"cannot read {path}: {reason}") from None
            found = set()
            for lineno, line in enumerate(lines, 1):
                line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
                if not line:
                    continue
                try:
                    found.add(_recipient(line, domain))
                except ValueError as exc:
                    raise self.error(section, "recipients", f"{path} line {lineno}: {exc}") from None
            if not found:
                self.warnings.append(
                    f"{self.path}: [{section}] recipients: {path} lists no addresses: all mail for {domain} is refused"
                )
            return frozenset(found)
        items = _split_list(text)
        if not items:
            raise self.error(section, "recipients", "empty list (use * for any local part)")
        try:
            return frozenset(_recipient(item, domain) for item in items)
        except ValueError as exc:
            raise self.error(section, "recipients", str(exc)) from None

    def domain(self, parser, section: str, g: dict) -> DomainConfig:
        """One [domain:NAME] section, the [backupmx] values `g` filling in what it inherits."""
        try:
            name = normalize_domain(section.partition(":")[2])
        except ValueError as exc:
            raise self.error(section, None, str(exc)) from None
        d = self.values(parser, section, _DOMAIN_KEYS)
        for key in ("queue_lifetime", "retry_interval"):
            if d[key] is _INHERIT:
                d[key] = g[key]
        d["verify"] = d["recipients"].strip().lower() == "verify"
        d["recipients"] = None if d["verify"] else self.recipients(section, name, d["recipients"])
        for key in _VERIFY_KEYS:
            if key in parser[section] and not d["verify"]:
                self.warnings.append(f"{self.path}: [{section}] {key}: only used with recipients = verify")
        if d["notify"] and not g["bounce_relay"]:
            self.warnings.append(f"{self.path}: [{section}] notify: needs bounce_relay in [backupmx]; "
                                 "no notice is sent")
        if "primary_probe_interval" in parser[section] and d["accept_when"] == "always":
            self.warnings.append(f"{self.path}: [{section}] primary_probe_interval: only used with "
                                 "accept_when = primary-unreachable")
        if d["primary_ca"] and d["primary_tls"] != "required":
            self.warnings.append(f"{self.path}: [{section}] primary_ca: only used with primary_tls = required")
        return DomainConfig(name=name, **d)

    def global_values(self, parser) -> dict[str, object]:
        """[backupmx], each key parsed, then the checks that involve two keys."""
        g = self.values(parser, "backupmx", _GLOBAL_KEYS)
        if g["hostname"] is None:
            g["hostname"] = socket.getfqdn()
        if g["max_workers"] < g["workers"]:
            raise self.error("backupmx", "max_workers", f"must be at least workers ({g['workers']})")
        if bool(g["tls_cert"]) != bool(g["tls_key"]):
            missing = "tls_key" if g["tls_cert"] else "tls_cert"
            present = "tls_cert" if g["tls_cert"] else "tls_key"
            raise self.error("backupmx", present, f"needs {missing} as well")
        if g["listen_tls"] and not g["tls_cert"]:
            raise self.error("backupmx", "listen_tls", "listen_tls needs tls_cert and tls_key")
        if g["listen_odmr"] and not g["tls_cert"]:
            raise self.error("backupmx", "listen_odmr",
                             "listen_odmr needs tls_cert and tls_key (ATRN is only offered after STARTTLS)")
        if g["greet_pause"] >= g["timeout"]:
            raise self.error("backupmx", "greet_pause", f"must be shorter than timeout ({g['timeout']:g}s)")
        if g["greylist"] and g["greylist"] >= g["greylist_expire"]:
            raise self.error("backupmx", "greylist", f"must be shorter than greylist_expire ({g['greylist_expire']:g}s): "
                             "a retry after the delay must still find its first attempt")
        return g

    def load(self) -> Config:
        parser = self.read()
        sections = parser.sections()
        domain_sections, user_sections = [], []
        for section in sections:
            kind, colon, name = section.partition(":")
            if section == "backupmx":
                continue
            if colon and kind.strip() == "domain" and name.strip():
                domain_sections.append(section)
            elif colon and kind.strip() == "user" and name.strip():
                user_sections.append(section)
            else:
                raise self.error(
                    section, None, "unknown section (expected [backupmx], [domain:NAME] or [user:NAME])"
                )
        if "backupmx" not in sections:
            raise ConfigError(f"{self.path}: [backupmx]: missing section")
        if not domain_sections:
            raise ConfigError(f"{self.path}: [domain:NAME]: no domain configured (at least one is needed)")

        g = self.global_values(parser)

        domains: dict[str, DomainConfig] = {}
        for section in domain_sections:
            domain = self.domain(parser, section, g)
            if domain.name in domains:
                raise self.error(section, None, f"duplicate domain {domain.name}")
            domains[domain.name] = domain

        users: dict[str, UserConfig] = {}
        for section in user_sections:
            name = section.partition(":")[2].strip()
            u = self.values(parser, section, _USER_KEYS)
            allowed = set()
            items = _split_list(u["domains"])
            if not items:
                raise self.error(section, "domains", "empty list")
            for item in items:
                try:
                    domain = normalize_domain(item)
                except ValueError as exc:
                    raise self.error(section, "domains", str(exc)) from None
                if domain not in domains:
                    raise self.error(section, "domains", f"{domain} is not a configured [domain:...]")
                allowed.add(domain)
            if name in users:
                raise self.error(section, None, f"duplicate user {name}")
            users[name] = UserConfig(name=name, password=u["password"], domains=frozenset(allowed))

        if "auth_mechanisms" not in parser["backupmx"]:
            g["auth_mechanisms"], reason = default_auth_mechanisms(self.path, users.values())
            self.warnings += [reason] if reason else []
        self.warnings += unserved_mechanisms(self.path, users.values(), g["auth_mechanisms"])
        exposure = plain_secrets_exposure(self.path, users.values())
        if exposure is not None:
            self.warnings.append(exposure)
        if users and g["auth_failure_delay"] == 0:
            self.warnings.append(f"{self.path}: [backupmx] auth_failure_delay = 0: failed AUTH replies are not"
                                 " slowed down (only max_auth_failures and max_auth_failures_per_client limit"
                                 " password guessing)")
        if users and not g["tls_cert"]:
            self.warnings.append(
                f"{self.path}: [backupmx] tls_cert: users are configured but there is no certificate: "
                "AUTH, and so ETRN, is never offered"
            )
        if g["listen_odmr"] and not users:
            self.warnings.append(f"{self.path}: [backupmx] listen_odmr: no [user:...] is configured: nobody can ATRN")
        if not g["listen"] and not g["listen_tls"]:
            self.warnings.append(
                f"{self.path}: [backupmx] listen: no addresses to listen on: only `serve --inetd` can accept mail"
            )

        return Config(
            path=os.path.abspath(self.path), domains=domains, users=users, warnings=tuple(self.warnings), **g
        )


def _recipient(item: str, domain: str) -> str:
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


def default_auth_mechanisms(path: str, users) -> tuple[tuple[str, ...], str | None]:
    """auth_mechanisms when the file does not set it, and the warning that explains it.

    DEFAULT_AUTH_MECHANISMS, without SCRAM-SHA-256 while any user holds a secret
    that cannot serve it ({SCRYPT}, the only scheme before SCRAM came, and still
    `backupmx passwd`'s default): a client that prefers SCRAM-SHA-256 (`backupmx
    etrn` from before its PLAIN retry, or any other) would otherwise get 535
    for a right password, and the mail would wait for an ETRN that never works.
    """
    unable = sorted(user.name for user in users if "SCRAM-SHA-256" not in secret_serves(user.password))
    if not unable:
        return DEFAULT_AUTH_MECHANISMS, None
    mechanisms = tuple(m for m in DEFAULT_AUTH_MECHANISMS if m != "SCRAM-SHA-256")
    who = " ".join(f"[user:{name}]" for name in unable[:5]) + (f" and {len(unable) - 5} more" if len(unable) > 5 else "")
    return mechanisms, (f"{path}: [backupmx] auth_mechanisms: not set, and the {{SCRYPT}} secret of {who} cannot"
                        f" serve SCRAM-SHA-256, so EHLO offers {' '.join(mechanisms)}: write it with"
                        " `backupmx passwd --scheme scram-sha-256` to have SCRAM-SHA-256 offered, or set"
                        " auth_mechanisms")


def unserved_mechanisms(path: str, users, mechanisms: tuple[str, ...]) -> list[str]:
    """One line per user whose stored secret cannot serve a mechanism EHLO offers.

    A client that picks such a mechanism (fetchmail takes CRAM-MD5 whenever it
    is offered; `backupmx etrn` prefers SCRAM-SHA-256) fails with 535 however
    right its password is: an operator should know before that happens.
    """
    lines = []
    for user in users:
        missing = [m for m in mechanisms if m not in secret_serves(user.password)]
        if missing:
            scheme = user.password[:user.password.index("}") + 1]
            lines.append(f"{path}: [user:{user.name}] password: a {scheme} secret cannot serve "
                         f"{' '.join(missing)} (listed in auth_mechanisms): a client that chooses it gets 535; "
                         + _REMEDY.get(scheme, ""))
    return lines


_REMEDY = {
    "{SCRYPT}": "write it with `backupmx passwd --scheme scram-sha-256`, or run `backupmx etrn --mechanism PLAIN`",
    "{SCRAM-SHA-256}": "CRAM-MD5 needs a {PLAIN} secret; better leave CRAM-MD5 out of auth_mechanisms",
}


def plain_secrets_exposure(path: str, users) -> str | None:
    """One line when the file at `path` holds {PLAIN} secrets and everyone may read it, else None.

    Everyone (world-readable) is refused, the group is not: the README's
    privilege setup makes the config group-readable by `user`'s group so a
    SIGHUP can re-read it, as the TLS key (tls.check_key_file) and as
    OpenSSH's "permissions are too open" do for world access. `check` fails on
    it; `serve` logs it as a warning.
    """
    plain = sorted(u.name for u in users if u.password.startswith("{PLAIN}"))
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not plain or not mode & stat.S_IROTH:
        return None
    who = f"[user:{plain[0]}]" + (f" and {len(plain) - 1} more" if len(plain) > 1 else "")
    return (f"{path}: readable by everyone (mode {stat.S_IMODE(mode):04o}) but holds {{PLAIN}} secrets ({who}): "
            "chmod o-r it, or use {SCRYPT} values from `backupmx passwd`")


def load_config(path: str | os.PathLike = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate `path`; raise ConfigError (one line) on the first problem."""
    return _Loader(os.fspath(path)).load()
