"""Where each domain's primary is: host-name primaries resolved once, not per connection.

A `primary = mail.example.com:25` is looked up in DNS when the configuration
is loaded -- at start, at each SIGHUP reload (in a child of the master, with
a deadline: getaddrinfo has none, and the master must go on handing
connections to workers meanwhile), and when a `backupmx flush` or inetd
flusher process starts -- and the flusher then connects only to those
addresses, so a DNS answer forged later cannot send a domain's mail
elsewhere. TLS still names the primary by its host name (SNI, and the
certificate check of `primary_tls = required`).

Rules:
- `pin` never raises: a name that does not resolve keeps the addresses it had
  before the reload (`previous`), or gets none (primary_addresses == ()), and
  its mail is deferred with a reason until a lookup resolves it: the master
  looks such names -- and only those (`unresolved`) -- up again every
  UNRESOLVED_RETRY seconds and pins what now answers (`pin_resolved`); a name
  once pinned stays pinned until a reload. Accepting mail never depends on DNS.
- One log line per domain with a host-name primary says what it is pinned to.
- An IP-literal primary needs no lookup and is its own address.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable

from backupmx.config import tuning
from backupmx.log import log_event

__all__ = ["addresses_for", "answered", "decode_lookups", "encode_lookups", "host_primaries", "is_ip_literal",
           "look_up", "pin", "pin_resolved", "resolve", "resolve_within", "unresolved", "LOOKUP_TIMEOUT"]

# getaddrinfo has no deadline of its own (a resolver that never answers holds it
# for resolv.conf's timeout x attempts x servers): every lookup gets this long.
LOOKUP_TIMEOUT = tuning("BACKUPMX_LOOKUP_TIMEOUT", 10.0)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str, port: int) -> tuple[str, ...]:
    """The TCP addresses of `host`, in the resolver's order, each once; OSError if none."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise OSError(f"{host}: no addresses")
    return addresses


def resolve_within(seconds: float, resolver: Callable[[str, int], tuple[str, ...]] = resolve
                   ) -> Callable[[str, int], tuple[str, ...]]:
    """`resolver` bounded to `seconds` per name, for a short-lived process (`backupmx
    check`, the inetd flusher): a lookup still running when time is up raises
    OSError and is left to a daemon thread that ends with the process. (The
    master, which lives on, looks up in a child it can kill instead.)"""
    def bounded(host: str, port: int) -> tuple[str, ...]:
        outcome: list = []

        def look_up_one() -> None:
            try:
                outcome.append(resolver(host, port))
            except (OSError, UnicodeError) as exc:
                outcome.append(exc)

        thread = threading.Thread(target=look_up_one, name=f"lookup {host}", daemon=True)
        thread.start()
        thread.join(seconds)
        if not outcome:
            raise OSError(f"no answer within {seconds:g} s")
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]
    return bounded


def pin(config, logger: logging.Logger, *, previous=None,
        resolver: Callable[[str, int], tuple[str, ...]] = resolve):
    """`config` with DomainConfig.primary_addresses filled in for every host-name primary.

    The same `config` when no primary is a host name (nothing to look up).

    previous: the configuration in force before a reload; a name that does
    not resolve now keeps the addresses it had there (same host and port).
    resolver: resolve, or another callable with its signature (tests).
    """
    looked_up: dict[tuple[str, int], tuple[str, ...] | str] = {}
    domains = {}
    for name, domain in config.domains.items():
        host, port = domain.primary
        if is_ip_literal(host):
            continue  # its own address (addresses_for): nothing to look up, nothing to log
        if (host, port) not in looked_up:
            try:
                looked_up[host, port] = resolver(host, port)
            except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
                looked_up[host, port] = str(exc) or type(exc).__name__
        found = looked_up[host, port]
        if isinstance(found, tuple):
            addresses = found
            log_event(logger, "primary-pinned", domain=name, primary=f"{host}:{port}",
                      addresses=",".join(addresses))
        else:
            addresses = _previous_addresses(previous, name, domain.primary)
            log_event(logger, "primary-unresolved", domain=name, primary=f"{host}:{port}", error=found,
                      kept=",".join(addresses) if addresses else None,
                      effect="previous addresses kept" if addresses else "mail stays queued until the name resolves",
                      level=logging.WARNING)
        domains[name] = dataclasses.replace(domain, primary_addresses=addresses)
    if not domains:
        return config
    return dataclasses.replace(config, domains={**config.domains, **domains})


# -- looking up apart from pinning (the master looks up in a child at reload) -----------


def host_primaries(config) -> list[tuple[str, int]]:
    """The (host, port) of every host-name primary: what pin() looks up."""
    return sorted({d.primary for d in config.domains.values() if not is_ip_literal(d.primary[0])})


def unresolved(config) -> list[tuple[str, int]]:
    """The (host, port) of every primary pin() left without an address: its domain's mail waits."""
    return sorted({d.primary for d in config.domains.values() if d.primary_addresses == ()})


def pin_resolved(config, found: dict, logger: logging.Logger) -> tuple:
    """(config, domains): `config` with the unresolved() primaries that `found` (look_up's
    answers) now resolves pinned, one primary-resolved line each, and those domains.

    Only names without an address are touched: a pinned one stays as it is
    (a later DNS answer must not move mail; README, "DNS and the primary").
    """
    domains = {}
    for name, domain in config.domains.items():
        answer = found.get(domain.primary)
        if domain.primary_addresses == () and isinstance(answer, tuple):
            domains[name] = dataclasses.replace(domain, primary_addresses=answer)
            log_event(logger, "primary-resolved", domain=name, primary=f"{domain.primary[0]}:{domain.primary[1]}",
                      addresses=",".join(answer))
    if not domains:
        return config, []
    return dataclasses.replace(config, domains={**config.domains, **domains}), list(domains.values())


def look_up(names, resolver: Callable[[str, int], tuple[str, ...]] | None = None) -> dict:
    """{(host, port): addresses, or the error as text} for each of `names` (resolve() by default)."""
    resolver = resolver or resolve
    found = {}
    for host, port in names:
        try:
            found[host, port] = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            found[host, port] = str(exc) or type(exc).__name__
    return found


def encode_lookups(found: dict) -> bytes:
    return json.dumps([[host, port, list(a) if isinstance(a, tuple) else a]
                       for (host, port), a in found.items()]).encode("utf-8")


def decode_lookups(data: bytes) -> dict:
    """encode_lookups' inverse; ValueError for anything else."""
    found = {}
    for host, port, answer in json.loads(data.decode("utf-8")):
        found[str(host), int(port)] = tuple(map(str, answer)) if isinstance(answer, list) else str(answer)
    return found


def answered(found: dict) -> Callable[[str, int], tuple[str, ...]]:
    """A resolver for pin() that gives what look_up found: a name without an answer is an error."""
    def resolver(host: str, port: int) -> tuple[str, ...]:
        answer = found.get((host, port), "no answer in time")
        if isinstance(answer, str):
            raise OSError(answer)
        return answer
    return resolver


def _previous_addresses(previous, name: str, primary: tuple[str, int]) -> tuple[str, ...]:
    old = previous.domains.get(name) if previous is not None else None
    if old is None or old.primary != primary or not old.primary_addresses:
        return ()
    return old.primary_addresses


def addresses_for(domain, resolver: Callable[[str, int], tuple[str, ...]] = resolve) -> tuple[str, ...]:
    """The addresses to connect to for `domain`'s primary; () when its name did not resolve.

    A DomainConfig that went through `pin` carries them. One that did not (built
    by hand) is resolved now, once for the caller's whole flush.
    """
    if domain.primary_addresses is not None:
        return domain.primary_addresses
    host, port = domain.primary
    if is_ip_literal(host):
        return (host,)
    try:
        return resolver(host, port)
    except (OSError, UnicodeError):
        return ()

