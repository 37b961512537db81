"""ODMR, On-Demand Mail Relay (RFC 2645): the provider's session up to ATRN, with no I/O.

A primary that cannot take connections (a dynamic address, NAT) connects to a
`listen_odmr` port, says STARTTLS and AUTH, and sends ATRN; once we answer
250 the roles reverse on the same connection, and we deliver the user's
domains to it as an SMTP client (odmr_connection.py answers the event and
hands the connection over; odmr_sessions.py runs the delivery).

OdmrSession is smtp.Session with what differs on that port, and only that:

 1. Its command table (its smtp.Port) is ODMR_COMMANDS: the rows of
    smtp.COMMANDS for HELO, EHLO, STARTTLS, AUTH, NOOP, RSET, HELP and QUIT as
    they are, and ATRN.
    Every other command smtp.COMMANDS knows gets 502 (RFC 2645 5.4): no mail
    is taken on this port. BDAT, whose octets can no longer be told from
    commands once it is refused, ends the session.
 2. EHLO offers ENHANCEDSTATUSCODES, STARTTLS before TLS, and AUTH and ATRN
    after it (ATRN is only ever accepted there).
 3. ATRN needs HELO/EHLO, AUTH and TLS (530 before AUTH, RFC 2645 5.2.1) and
    names domains the user may ETRN (SessionSettings.flushable); with no
    argument, all of the user's domains. A domain the user may not flush
    refuses the whole request (450). The driver answers the AtrnRequest with
    atrn_started() -- 250, then the REVERSED phase: nothing more is read as
    a command -- or atrn_refused(reply): 451 (a flush of one of the domains
    runs), 453 (no mail).
 4. The peer waits for our 250 and then greets (RFC 2645 5.3): anything it
    sent after ATRN, before the 250, is 554 5.5.0 and the end of the session,
    never its greeting.
"""

from dataclasses import dataclass

from backupmx import addresses, replies
from backupmx.smtp import AUTHENTICATED, COMMANDS, HELO, TLS, Command, Phase, Port, Session, SessionSettings, ehlo_lines

# RFC 2645 5.4: what the ODMR port keeps of the SMTP command table, and of its EHLO keywords.
KEPT_COMMANDS = ("HELO", "EHLO", "STARTTLS", "AUTH", "NOOP", "RSET", "HELP", "QUIT")
KEPT_KEYWORDS = frozenset({"ENHANCEDSTATUSCODES", "STARTTLS", "AUTH"})


@dataclass(frozen=True)
class AtrnRequest:
    """ATRN for `domains` (configured, the user's): lease them and count their mail, then
    answer with `atrn_started()` or `atrn_refused(reply)`."""
    domains: tuple[str, ...]
    user: str


def parse_atrn(argument: str) -> tuple[str, ...] | None:
    """RFC 2645 5.2.1: atrn = "ATRN" [SP domain *("," domain)]. The domains, normalized and
    each once (() for none), or None when the argument is not that grammar."""
    if not argument:
        return ()
    names = []
    for item in argument.split(","):
        if not addresses.is_domain(item):
            return None
        try:
            name = addresses.normalize_domain(item)
        except ValueError:
            return None
        if name not in names:
            names.append(name)
    return tuple(names)


class OdmrSession(Session):
    """The session of a listen_odmr port (module docstring)."""

    @property
    def reversed(self) -> bool:
        """ATRN was accepted: the 250 is in the output, and the driver is the SMTP client now."""
        return self.phase is Phase.REVERSED

    def atrn_started(self) -> None:
        """The domains are leased and have mail: 250, and the roles reverse (rule 4 first)."""
        self._answer(AtrnRequest)
        if self._input:
            return self._close_with(replies.PROTOCOL_SYNCHRONIZATION)
        self._reply(replies.ATRN_STARTED)
        self.phase = Phase.REVERSED

    def atrn_refused(self, reply: replies.Reply) -> None:
        self._answer(AtrnRequest)
        self._reply(reply)
        self._process()

    def _cmd_atrn(self, argument: str) -> None:
        names = parse_atrn(argument)
        if names is None:
            return self._reply(replies.ATRN_SYNTAX)
        if not names:
            names = tuple(sorted(self.settings.etrn_domains.get(self.user, ())))
        domains = tuple(d for name in names for d in self.settings.flushable(self.user, name, False))
        if not domains or len(domains) != len(names):
            return self._reply(replies.ATRN_REFUSED)
        self._wait_for(AtrnRequest(domains, self.user))

    def _refuse_here(self, argument: str) -> None:
        self._reply(replies.ODMR_ONLY)

    def _refuse_bdat(self, argument: str) -> None:
        self._close_with(replies.ODMR_ONLY)


def odmr_ehlo_lines(settings: SessionSettings, tls_active: bool, auth_offered: bool) -> list[str]:
    """The SMTP port's EHLO lines this port keeps (STARTTLS before TLS, AUTH after it), and ATRN with AUTH."""
    name, *keywords = ehlo_lines(settings, tls_active, auth_offered)
    return [name, *(k for k in keywords if k.split()[0] in KEPT_KEYWORDS)] + (["ATRN"] if auth_offered else [])


ODMR_COMMANDS: dict[str, Command] = {
    # What smtp.COMMANDS has and this port does not: 502 (BDAT: and the end).
    **{verb: Command(OdmrSession._refuse_bdat if verb == "BDAT" else OdmrSession._refuse_here)
       for verb in COMMANDS},
    **{verb: COMMANDS[verb] for verb in KEPT_COMMANDS},
    # AUTH implies TLS (AUTH is offered only under TLS, and STARTTLS forgets the user);
    # TLS is checked all the same, after AUTH so that the reply before AUTH is 530.
    # RFC 2920 3.1: it changes the session's state, so it must end a pipelined group.
    "ATRN": Command(OdmrSession._cmd_atrn, (HELO, AUTHENTICATED, TLS), last=True),
}
OdmrSession.port = Port(ODMR_COMMANDS, odmr_ehlo_lines)
