"""What DNS says about an SMTP client, looked up once at connect, off the worker's loop.

- Its verified name (forward-confirmed reverse DNS, as Postfix's smtpd
  does): the PTR name of its address whose own addresses include it, else
  "unknown". It goes into our Received: header and into XFORWARD NAME.
- Its listings on the `dnsbl` zones (RFC 5782): an A record for the
  reversed address (IPv4 octets, IPv6 nibbles) under the zone. Only answers
  in 127.0.0.0/8 count: 127.255.255.0/24 is what a list answers when it
  refuses the query (Spamhaus: through a public resolver, over quota), and
  anything else is a resolver that makes up answers for NXDOMAIN. Either is
  logged and lists nobody. RCPT then answers from the facts (policy.py).

The lookups run on the Offload's "dns" lane with the system resolver
(getaddrinfo / gethostbyaddr: /etc/hosts, nsswitch, resolv.conf). The first
RCPT waits for them (policy.py); they are given up after LOOKUP_WAIT seconds
(a broken resolver must not hold mail for ever), the name then being
"unknown". A worker keeps what it learnt of a client for FACTS_SECONDS
(at most FACTS_KEPT clients): a sender's next connections within that
minute cost no lookup, no thread and no wait (Postfix leaves that to a
caching resolver; most hosts have none in front of the C library). A
lookup that failed or was given up is not kept. The resolver is one explicit parameter (ConnectionContext's
`resolver`): tests hand in one that answers from a table.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from backupmx.addresses import is_domain
from backupmx.config import tuning
from backupmx.log import log_event
from backupmx.offload import Offload

LANE = "dns"
DNS_THREADS = 8  # lookups at once per worker
LOOKUP_WAIT = tuning("BACKUPMX_LOOKUP_WAIT", 10.0)  # seconds after connect the lookups are given up
MAX_PTR_NAMES = 3  # PTR names of one address that are forward-checked
FACTS_SECONDS = tuning("BACKUPMX_CLIENT_FACTS_SECONDS", 60.0)  # a client's facts are reused this long
FACTS_KEPT = 4096  # clients whose facts a worker keeps (the oldest go first)
UNKNOWN = "unknown"  # Postfix's word for a client without a verified name


class TemporaryLookupError(Exception):
    """The resolver could not answer now (SERVFAIL, timeout): neither yes nor no."""


class SystemResolver:
    """The system resolver, as the C library sees it. Every method may block: call it off the loop."""

    def addresses(self, name: str, family: int = socket.AF_UNSPEC) -> list[str]:
        """The addresses of `name` (IPv4 and IPv6, or of `family`); [] when it has none (NXDOMAIN, NODATA)."""
        try:
            infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return []
            raise TemporaryLookupError(str(exc)) from exc
        except UnicodeError:  # a label too long for the IDNA codec: no such name
            return []
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def names(self, address: str) -> list[str]:
        """The PTR names of `address`; [] when it has none."""
        try:
            name, aliases, _ = socket.gethostbyaddr(address)
        except socket.herror:
            return []
        except (socket.gaierror, OSError) as exc:
            raise TemporaryLookupError(str(exc)) from exc
        return [name, *aliases]


@dataclass(frozen=True)
class Listing:
    """A DNSBL's "yes": the zone and its answer (e.g. 127.0.0.2: a test entry, RFC 5782 5)."""

    zone: str
    answer: str


@dataclass
class ClientFacts:
    """What DNS said about one client (filled in from the loop, once)."""

    address: str
    deadline: float  # monotonic: given up then
    name: str | None = None  # verified name or UNKNOWN; None while looking
    listings: dict = field(default_factory=dict)  # zone -> Listing, of the zones that list the client
    pending: int = 0  # lookups not answered yet
    done: bool = False
    troubled: bool = False  # a lookup failed or was given up: these facts are not kept for the next time
    _waiting: list[Callable[[], None]] = field(default_factory=list)

    def listing(self, zones: tuple[str, ...]) -> Listing | None:
        """The first of `zones` (in configuration order) that lists the client."""
        return next((self.listings[zone] for zone in zones if zone in self.listings), None)

    def when_known(self, then: Callable[[], None]) -> None:
        """Call `then()` once the lookups are done (at once when they are)."""
        if self.done:
            then()
        else:
            self._waiting.append(then)

    def _finish(self) -> None:
        self.done = True
        waiting, self._waiting = self._waiting, []
        for then in waiting:
            then()


def verified_name(resolver, address: str) -> str:
    """The forward-confirmed PTR name of `address`, or UNKNOWN (RFC 1912 2.1; Postfix's smtpd)."""
    try:
        for name in resolver.names(address)[:MAX_PTR_NAMES]:
            name = name.rstrip(".")
            # A PTR record may hold any octets: only a host name goes into Received: and XFORWARD.
            if is_domain(name) and _same_addresses(resolver.addresses(name), address):
                return name.lower()
    except TemporaryLookupError:
        pass
    return UNKNOWN


def dnsbl_query(address: str, zone: str) -> str:
    """RFC 5782 2.1 and 2.4: 192.0.2.1 -> "1.2.0.192.<zone>"; IPv6 as 32 reversed nibbles."""
    pointer = ipaddress.ip_address(address).reverse_pointer  # "...in-addr.arpa" / "...ip6.arpa"
    return f"{pointer.rsplit('.', 2)[0]}.{zone}"


def dnsbl_answers(resolver, address: str, zone: str) -> list[str]:
    """The zone's A records for `address` (on a pool thread); [] when it does not list it."""
    return resolver.addresses(dnsbl_query(address, zone), socket.AF_INET)


_LISTED = ipaddress.ip_network("127.0.0.0/8")
_REFUSED = ipaddress.ip_network("127.255.255.0/24")


def _same_addresses(found: list[str], address: str) -> bool:
    wanted = ipaddress.ip_address(address)
    for candidate in found:
        try:
            if ipaddress.ip_address(candidate.split("%", 1)[0]) == wanted:
                return True
        except ValueError:
            continue
    return False


class ClientDNS:
    """The connect-time lookups of one SMTP worker process (ConnectionContext)."""

    def __init__(self, config, offload: Offload, logger: logging.Logger, resolver=None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.offload, self.logger, self.clock = config, offload, logger, clock
        self.resolver = resolver if resolver is not None else SystemResolver()
        offload.add_lane(LANE, DNS_THREADS)
        # id(facts) -> (owner, facts) not done yet, oldest first. Keyed so that an answer or a
        # session's end removes its entry in O(1): a worker meets up to 256 new clients at once.
        self._looking: dict[int, tuple[object, ClientFacts]] = {}
        self._known: dict[str, tuple[float, ClientFacts]] = {}  # address -> (kept until, facts): FACTS_SECONDS

    def look_up(self, owner, address: str) -> ClientFacts:
        """Start the lookups for a client that just connected; its facts fill in later
        (or are there at once, when this worker learnt them less than FACTS_SECONDS ago)."""
        now = self.clock()
        kept = self._known.get(address)
        if kept is not None:
            if now < kept[0]:
                facts = ClientFacts(address, now, name=kept[1].name, listings=dict(kept[1].listings))
                facts._finish()
                return facts
            del self._known[address]
        facts = ClientFacts(address, now + LOOKUP_WAIT)
        try:
            ipaddress.ip_address(address)
        except ValueError:  # not an IP client (inetd on a pipe): nothing to ask
            facts.name = UNKNOWN
            facts._finish()
            return facts
        self._looking[id(facts)] = (owner, facts)
        zones = self.config.dnsbl
        facts.pending = 1 + len(zones)
        self.offload.submit(owner, verified_name, self.resolver, address, lane=LANE,
                            then=lambda future: self._answered(facts, future, self._named))
        for zone in zones:  # at once, each on its own thread: one slow list does not hold up the others
            self.offload.submit(owner, dnsbl_answers, self.resolver, address, zone, lane=LANE,
                                then=lambda future, zone=zone: self._answered(
                                    facts, future, lambda facts, answers: self._listed(facts, zone, answers)))
        return facts

    def _answered(self, facts: ClientFacts, future: Future, record: Callable) -> None:
        """In the loop: one lookup is done; the facts are, once all are (or they were given up)."""
        if facts.done:
            return
        try:
            record(facts, future.result())
        except Exception as exc:  # TemporaryLookupError, or a resolver that broke: no answer
            facts.troubled = True
            log_event(self.logger, "lookup-failed", client=facts.address, error=f"{type(exc).__name__}: {exc}",
                      level=logging.WARNING)
        facts.pending -= 1
        if facts.pending <= 0:
            if facts.name is None:
                facts.name = UNKNOWN
            self._looking.pop(id(facts), None)
            facts._finish()
            self._keep(facts)

    def _keep(self, facts: ClientFacts) -> None:
        if facts.troubled:
            return
        self._known.pop(facts.address, None)
        while len(self._known) >= FACTS_KEPT:
            del self._known[next(iter(self._known))]  # the oldest
        self._known[facts.address] = (self.clock() + FACTS_SECONDS, facts)

    @staticmethod
    def _named(facts: ClientFacts, name: str) -> None:
        facts.name = name

    def _listed(self, facts: ClientFacts, zone: str, answers: list[str]) -> None:
        for answer in answers:
            try:
                ip = ipaddress.ip_address(answer)
            except ValueError:
                continue
            if ip in _REFUSED or ip not in _LISTED:
                log_event(self.logger, "dnsbl-error", client=facts.address, zone=zone, answer=answer,
                          reason="the list refused the query" if ip in _REFUSED else "not a 127.0.0.0/8 answer",
                          level=logging.WARNING)
                continue
            facts.listings[zone] = Listing(zone, answer)
            log_event(self.logger, "dnsbl-listed", client=facts.address, zone=zone, answer=answer)
            return

    def next_deadline(self) -> float | None:
        """When the earliest lookup still running is to be given up (None: none runs); the
        worker loop wakes for it, so that a client waits LOOKUP_WAIT, not up to a loop tick more."""
        oldest = self._oldest()
        return None if oldest is None else oldest[1].deadline

    def upkeep(self) -> None:
        """From the worker loop: give up the lookups past their deadline (their waiters go on)."""
        now = self.clock()
        while (oldest := self._oldest()) is not None and now >= oldest[1].deadline:
            owner, facts = oldest
            log_event(self.logger, "lookup-timeout", client=facts.address, seconds=f"{LOOKUP_WAIT:g}",
                      level=logging.WARNING)
            if facts.name is None:
                facts.name = UNKNOWN
            facts.troubled = True
            del self._looking[id(facts)]
            self.offload.deliver(owner, lambda done, facts=facts: facts._finish(), None)

    def _oldest(self) -> tuple[object, ClientFacts] | None:
        """The lookup started first, so the first due: each waits LOOKUP_WAIT from its start on
        the one clock, and _looking keeps start order (both look-ups are per loop round)."""
        return next(iter(self._looking.values()), None)

    def forget(self, facts: ClientFacts) -> None:
        """The session ended: nobody waits for these any more."""
        self._looking.pop(id(facts), None)
