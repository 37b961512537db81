"""One ODMR connection (RFC 2645): the SMTP driver up to ATRN, then the same connection turned round.

OdmrConnection is connection.SMTPConnection with odmr.OdmrSession and one
more event answered, AtrnRequest: the leases of the domains (store
claim_domains, shared with the flushers: a domain is never delivered twice
at once) and their mail. With both, the session says 250 and the connection
leaves the session loop without being closed: `handoff()` gives its socket,
its TLS layer and what of the 250 is not written yet to the delivery
(odmr_sessions.py). Until AUTH, a connection has LOGIN_TIME, then 421: the
ODMR port is a process per connection, and nobody may hold one unknown.

ReversedPeer is that connection as flusher.deliver_domain's `primary`: the
customer greets (220), we EHLO, and every domain's flush borrows the one
session in turn; only then is it QUIT. ReversedClient is the reply reader of
smtpclient.PrimaryClient (bounded lines, bounded replies, one deadline per
reply, strict grammar), and it refuses a peer that speaks unasked: in the
reversed role the customer only answers (a command, or anything, sent
before we ask ends the connection, and the mail in flight is deferred).
"""

import logging
import smtplib
import socket
from dataclasses import dataclass

from backupmx import replies
from backupmx.config import tuning
from backupmx.config_values import format_hostport
from backupmx.connection import SMTPConnection
from backupmx.log import log_event
from backupmx.odmr import AtrnRequest, OdmrSession
from backupmx.smtpclient import PrimaryClient, PrimaryUnavailable, ReplyError, describe, introduce
from backupmx.store import QueueUnavailable
from backupmx.tls import TLSLayer, TLSStream

# Seconds an ODMR connection may stay unauthenticated (it holds a process).
LOGIN_TIME = tuning("BACKUPMX_ODMR_LOGIN_TIME", 60.0)


def lease_owner(hostname: str, pid: int) -> str:
    """The name an ATRN's leases are taken under: one process serves one ODMR connection."""
    return f"{hostname}:{pid}:atrn"


def release_domains(store, domains, owner: str, logger: logging.Logger) -> None:
    """Give the leases of `domains` back (should this fail, they run out by themselves)."""
    for domain in domains:
        try:
            store.release_flush(domain, owner)
        except QueueUnavailable as exc:
            log_event(logger, "atrn-release-failed", domain=domain, error=str(exc), level=logging.WARNING)


@dataclass
class Reversal:
    """An accepted ATRN: the connection, turned round, and what to deliver over it."""
    sock: socket.socket
    tls: TLSLayer
    unsent: bytes  # what of our 250 the socket has not taken yet: TLS records, encrypted already
    client: str  # host:port of the customer
    user: str
    waiting: dict  # {domain: queued rows}, each domain leased to `owner`
    owner: str


class OdmrConnection(SMTPConnection):
    """The connection of a listen_odmr port, up to the reversal (module docstring)."""

    session_class = OdmrSession

    def __init__(self, sock, peer, ctx, *, implicit_tls=False, owner: str, lease_seconds: float):
        self.owner, self.lease_seconds = owner, lease_seconds
        self.reversal: Reversal | None = None
        self._peer = peer
        self._login_deadline = ctx.clock() + LOGIN_TIME
        super().__init__(sock, peer, ctx, implicit_tls=implicit_tls)

    @property
    def deadline(self) -> float:
        if self.session.user is None and not self.session.closed:
            return min(super().deadline, self._login_deadline)
        return super().deadline

    def on_timeout(self) -> None:
        if self.session.user is None and not self.session.closed and self.ctx.clock() >= self._login_deadline:
            log_event(self.ctx.logger, "odmr-login-timeout", client=self.client_ip)
            self.session.timeout()
            self._after_session()
            return self.on_writable()
        super().on_timeout()

    def handoff(self) -> Reversal:
        """The reversed connection, once the session loop let go of it (its socket stays open)."""
        self.reversal.unsent = bytes(self._out.data)  # Unsent's octets, not the object
        return self.reversal

    def _pump(self) -> None:
        super()._pump()
        if self.reversal is not None and not self.closed:
            # Out of the session loop, but not closed: the delivery takes the socket over.
            self.closed = True

    def _atrn(self, event: AtrnRequest) -> None:
        """Lease the domains and count their mail (one transaction), then 250 or the refusal."""
        try:
            waiting = self.ctx.store.claim_domains(event.domains, self.owner, self.lease_seconds)
        except QueueUnavailable as exc:
            log_event(self.ctx.logger, "atrn-failed", client=self.client_ip, user=event.user, error=str(exc),
                      level=logging.WARNING)
            return self.session.atrn_refused(replies.ATRN_UNABLE)
        if not waiting:  # the session's refusal is logged as every other (a `reject` line)
            return self.session.atrn_refused(replies.ATRN_NO_MAIL if waiting is not None else replies.ATRN_UNABLE)
        self.session.atrn_started()
        if not self.session.reversed:  # it sent ahead of our 250 (odmr.py, rule 4)
            return release_domains(self.ctx.store, waiting, self.owner, self.ctx.logger)
        self.reversal = Reversal(self.sock, self._tls, bytearray(), format_hostport(*self._peer[:2]),
                                 event.user, waiting, self.owner)
        log_event(self.ctx.logger, "atrn", client=self.client_ip, user=event.user, domains=",".join(waiting),
                  messages=sum(waiting.values()))

    _EVENTS = {**SMTPConnection._EVENTS, AtrnRequest: _atrn}


class ReversedClient(PrimaryClient):
    """PrimaryClient over a reversed connection: the customer speaks only when asked.

    Bytes that wait unread when we are about to send were sent unasked (a
    command, a reply to nothing): the connection ends there (ReplyError),
    before they could be taken for the answer to what we send next.
    """

    def send(self, s):
        if self._rbuf:
            self.close()
            raise ReplyError(f"the customer sent {bytes(self._rbuf[:40])!r} unasked")
        super().send(s)


class ReversedPeer:
    """The customer of an accepted ATRN, as flusher.deliver_domain's source of sessions.

    start() reads its greeting and says EHLO (RFC 2645 5.3); every domain's
    flush then opens the same session (open), leaves it open for the next one
    (release), and quit() ends it. A session that broke cannot be opened
    again: the connection it was is gone.
    """

    single_session = True

    def __init__(self, reversal: Reversal, *, hostname: str, timeout: float, log: logging.Logger):
        self.reversal, self.hostname, self.timeout, self.log = reversal, hostname, timeout, log
        self.relay = f"atrn:{reversal.user}@{reversal.client}"
        self.tls_version = reversal.tls.version()
        self._client: ReversedClient | None = None

    @property
    def alive(self) -> bool:
        return self._client is not None and self._client.sock is not None

    def start(self) -> None:
        """The customer's 220 and our EHLO (HELO if it refuses EHLO); PrimaryUnavailable if it will not."""
        client = ReversedClient(timeout=self.timeout, local_hostname=self.hostname)
        client.sock = TLSStream(self.reversal.sock, self.reversal.tls, self.timeout)
        try:
            if self.reversal.unsent:  # records already: to the socket as they are (TLSStream set its timeout)
                self.reversal.sock.sendall(self.reversal.unsent)
            introduce(client, client.getreply())
        except PrimaryUnavailable:
            client.close()
            raise
        except (OSError, smtplib.SMTPException) as exc:
            client.close()
            raise PrimaryUnavailable(describe(exc)) from exc
        self._client = client

    def open(self) -> tuple[PrimaryClient, str | None]:
        if not self.alive:
            raise PrimaryUnavailable("the reversed connection is closed")
        return self._client, self.tls_version

    def release(self, client: PrimaryClient) -> None:
        """One domain is done: the session stays open for the next one."""

    def quit(self) -> None:
        """The end of the ATRN: QUIT (its answer waited for at most `timeout`), then close."""
        if self._client is None:
            self.reversal.sock.close()
            return
        if self.alive:
            try:
                self._client.quit()
            except (OSError, smtplib.SMTPException):
                pass
        self._client.close()
