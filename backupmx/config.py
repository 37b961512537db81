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

What one value may be (each key's parser and its reason) is config_values.py;
the warnings about the users' secrets and AUTH are config_auth.py.
"""

from __future__ import annotations

import configparser
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Callable, Mapping

from backupmx.addresses import fold_local_part, normalize_domain
from backupmx.config_auth import (DEFAULT_AUTH_MECHANISMS, default_auth_mechanisms, plain_secrets_exposure,
                                  unserved_mechanisms)
from backupmx.config_values import (abspath, auth_mechanisms, bounce_relay, bounce_size_limit, choice, hostname,
                                    integer, listen_list, log_level, log_target, mailbox, message_size, metrics_listen,
                                    networks, nonempty, optional_path, parse_duration, parse_hostport, parse_size,
                                    password, positive_duration, positive_size, recipient, split_list, tls_version,
                                    user_name, zones)

__all__ = [
    "Config",
    "ConfigError",
    "DomainConfig",
    "UserConfig",
    "load_config",
    "tuning",
    "DEFAULT_CONFIG_PATH",
]

DEFAULT_CONFIG_PATH = "/etc/backupmx/backupmx.ini"

PRIMARY_TLS_MODES = ("none", "opportunistic", "required")
VERIFY_UNREACHABLE = ("accept", "tempfail")
DNSBL_ACTIONS = ("reject", "tempfail")
ACCEPT_WHEN = ("always", "primary-unreachable")


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
# The keys: each one's parser (config_values.py) and default.

# key -> (parser, default). A default of _REQUIRED must be given.
_REQUIRED = object()

_GLOBAL_KEYS: dict[str, tuple[Callable[[str], object], object]] = {
    "hostname": (hostname, None),  # None: socket.getfqdn(), looked up only when needed
    "listen": (listen_list(25), (("0.0.0.0", 25),)),
    "listen_tls": (listen_list(465), ()),
    "listen_odmr": (listen_list(366), ()),
    "queue": (lambda t: abspath(nonempty(t)), "/var/spool/backupmx/queue.db"),
    "tls_cert": (optional_path, None),
    "tls_key": (optional_path, None),
    "workers": (integer(1), 4),
    "max_workers": (integer(1), 64),
    "flush_workers": (integer(1), 2),
    "max_message_size": (message_size, 52428800),
    "max_recipients": (integer(1), 100),
    "tls_min_version": (tls_version, "TLSv1.2"),
    "max_auth_failures": (integer(1), 3),
    "max_connections_per_client": (integer(1), 50),
    "timeout": (positive_duration, 300.0),
    "queue_lifetime": (positive_duration, 5 * 86400.0),
    "user": (user_name, None),
    "log": (log_target, None),
    "bounce_relay": (bounce_relay, None),
    "expired_retention": (parse_duration, 7 * 86400.0),
    "retry_interval": (parse_duration, 0.0),
    "min_free_space": (parse_size, 100 * 1024**2),
    "delay_warning": (parse_duration, 0.0),
    "bounce_size_limit": (bounce_size_limit, 50 * 1024),
    "auth_mechanisms": (auth_mechanisms, DEFAULT_AUTH_MECHANISMS),
    "log_level": (log_level, "info"),
    "metrics_listen": (metrics_listen, None),
    "max_session_time": (positive_duration, 30 * 60.0),
    "max_junk_commands": (integer(1), 100),
    "greet_pause": (parse_duration, 0.0),
    "max_auth_failures_per_client": (integer(1), 10),
    "auth_failure_window": (positive_duration, 3600.0),
    "auth_failure_delay": (parse_duration, 1.0),
    "greylist": (parse_duration, 0.0),
    "greylist_expire": (positive_duration, 86400.0),
    "greylist_exempt": (networks, ()),
    "dnsbl": (zones, ()),
    "dnsbl_action": (choice(DNSBL_ACTIONS), "reject"),
}


_primary_tls = choice(PRIMARY_TLS_MODES)


_INHERIT = object()  # per-domain value that falls back to the global one

# The recipients parser needs the domain name, so it is applied separately.
_DOMAIN_KEYS: dict[str, tuple[Callable[[str], object], object]] = {
    "primary": (lambda t: parse_hostport(t, default_port=25), _REQUIRED),
    "primary_tls": (_primary_tls, "opportunistic"),
    "recipients": (str, "*"),
    "primary_ca": (optional_path, None),
    "max_queue_messages": (integer(1), None),
    "max_queue_bytes": (positive_size, None),
    "queue_lifetime": (positive_duration, _INHERIT),
    "retry_interval": (parse_duration, _INHERIT),
    "notify": (mailbox, None),
    "notify_age": (parse_duration, 86400.0),
    "verify_positive_ttl": (positive_duration, 30 * 86400.0),
    "verify_negative_ttl": (positive_duration, 3 * 3600.0),
    "verify_unreachable": (choice(VERIFY_UNREACHABLE), "accept"),
    "accept_when": (choice(ACCEPT_WHEN), "always"),
    "primary_probe_interval": (positive_duration, 60.0),
}
# Keys that mean something only with recipients = verify (a warning otherwise).
_VERIFY_KEYS = ("verify_positive_ttl", "verify_negative_ttl", "verify_unreachable")


_USER_KEYS: dict[str, tuple[Callable[[str], object], object]] = {
    "password": (password, _REQUIRED),
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
            path = abspath(text[1:].strip())
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
                    found.add(recipient(line, domain))
                except ValueError as exc:
                    raise self.error(section, "recipients", f"{path} line {lineno}: {exc}") from None
            if not found:
                self.warnings.append(
                    f"{self.path}: [{section}] recipients: {path} lists no addresses: all mail for {domain} is refused"
                )
            return frozenset(found)
        items = split_list(text)
        if not items:
            raise self.error(section, "recipients", "empty list (use * for any local part)")
        try:
            return frozenset(recipient(item, domain) for item in items)
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
            items = split_list(u["domains"])
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


def load_config(path: str | os.PathLike = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate `path`; raise ConfigError (one line) on the first problem."""
    return _Loader(os.fspath(path)).load()
