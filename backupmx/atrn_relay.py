"""The customer's side of an ODMR connection once ATRN turned it round: each message on to the local MTA.

After `250 OK now reversing the connection` (RFC 2645 5.3) we are the SMTP
server on the same TLS connection: we greet, the backup MX says EHLO and
delivers. The session is smtp.Session -- the same framing, limits and
refusals as the server's -- with a port of its own (RELAY_PORT): the
commands a relaying server needs (no ETRN, AUTH, STARTTLS or BDAT), and
EHLO keywords that mirror what the local MTA offers, so that the backup
sends nothing the MTA cannot take (SMTPUTF8, DSN, 8BITMIME; SIZE is the
MTA's limit).

Each question of the session is answered by the MTA, at once, over one
connection (LocalMTA: SMTP, or LMTP over TCP or a Unix socket):

  MAIL FROM   MAIL FROM to the MTA, the parameters passed on; its refusal is ours
  RCPT TO     RCPT TO to the MTA; its refusal (550 user unknown, ...) is ours,
              and the backup records it for that recipient alone
  DATA        DATA to the MTA (after our Received: line), the content
              streamed to it as it arrives
  end of data the MTA's final reply (LMTP: one per recipient, RFC 2033 4.2)
              decides ours (final_reply): 250 only once the MTA accepted the
              message for every recipient

Nothing is lost if either side dies: the backup deletes a message only after
our 250, which only ever follows the MTA's own. If we die first the backup
still has it; if the MTA took it and our 250 never reached the backup, the
backup delivers it again (a duplicate, never a loss). A local MTA that
fails mid-way gets the session a 421: the backup keeps the rest queued.
"""

from __future__ import annotations

import re
import secrets
import smtplib
import socket
import time
from collections import Counter
from dataclasses import dataclass

from backupmx import replies
from backupmx.config_values import MAX_MESSAGE_SIZE_LIMIT, format_hostport, parse_hostport
from backupmx.envelope import Envelope, Recipient
from backupmx.replies import Reply
from backupmx.smtp import (COMMANDS, MailAdmission, MessageAborted, MessageData, MessageReceived, MessageStarted,
                           Port, RecipientAdmission, Session, SessionSettings)
from backupmx.smtpclient import (DataEncoder, PrimaryClient, PrimaryUnavailable, describe, introduce, os_reason,
                                 reply_text)
from backupmx.trace_header import received_header

# What a relaying SMTP server needs of the command table (RFC 5321 4.5.1's minimum, and RSET, NOOP, HELP, VRFY).
RELAY_COMMANDS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP")
# The local MTA's EHLO keywords the backup may use through us (passed on as offered).
MIRRORED = ("8BITMIME", "DSN", "SMTPUTF8")
MAX_RECIPIENTS = 1000  # per message; the backup sends at most its own max_recipients
MTA_REPLY_TEXT = 400  # characters of the MTA's reply passed on in ours


@dataclass(frozen=True)
class Destination:
    """Where --deliver-to points: an SMTP or LMTP server on TCP, or an LMTP Unix socket."""
    lmtp: bool
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """ "HOST:PORT" (SMTP), "lmtp:HOST:PORT", "/path" or "lmtp:/path" (LMTP); ValueError (one line)."""
        lmtp = text.startswith("lmtp:")
        rest = text[5:] if lmtp else text
        if rest.startswith("/"):
            return cls(lmtp=True, path=rest)
        host, port = parse_hostport(rest)  # ValueError: no port, bad port, bad host
        return cls(lmtp=lmtp, host=host, port=port)

    def __str__(self) -> str:
        where = self.path or format_hostport(self.host, self.port)
        return f"lmtp:{where}" if self.lmtp else where


class LocalMTA(PrimaryClient):
    """The local MTA, spoken to with smtpclient's bounded, strict reply reader (SMTP or LMTP)."""

    def __init__(self, destination: Destination, *, timeout: float, local_hostname: str):
        super().__init__(timeout=timeout, local_hostname=local_hostname)
        self.destination = destination
        if destination.lmtp:
            self.ehlo_msg = "lhlo"  # RFC 2033 4.1

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def open(self) -> None:
        """Greeting and EHLO (LHLO); PrimaryUnavailable (the reason) if it does not answer 220 and 250."""
        try:
            introduce(self, self.connect(self.destination.host or "localhost", self.destination.port or 0),
                      helo=not self.destination.lmtp)
        except PrimaryUnavailable:
            self.close()
            raise
        except smtplib.SMTPException as exc:
            self.close()
            raise PrimaryUnavailable(describe(exc)) from exc
        except OSError as exc:
            self.close()
            raise PrimaryUnavailable(f"cannot connect: {os_reason(exc)}") from exc

    def _get_socket(self, host, port, timeout):
        if self.destination.path is None:
            sock = super()._get_socket(host, port, timeout)
            # A message goes out as several small writes (the Received line, the data, the
            # end of data) before we wait for the MTA's reply: with Nagle's algorithm the
            # last one waited for the MTA's delayed ACK, ~40 ms a message.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.destination.path)
        except OSError:
            sock.close()
            raise
        return sock

    def limit(self) -> int:
        """The size it takes (RFC 1870 SIZE), or ours when it says none."""
        size = self.esmtp_features.get("size", "").strip()
        return int(size) if size.isdigit() and 0 < int(size) < MAX_MESSAGE_SIZE_LIMIT else MAX_MESSAGE_SIZE_LIMIT

    def mail(self, envelope: Envelope) -> tuple[int, bytes]:
        """MAIL FROM with the envelope's parameters that the MTA offers (the backup should use no
        other: our EHLO mirrors the MTA's; one that did anyway loses them, as the flusher does)."""
        utf8 = envelope.smtputf8 and self.has_extn("smtputf8")
        self.command_encoding = "utf-8" if utf8 else "ascii"
        params = [f"SIZE={envelope.declared_size}"] if envelope.declared_size and self.has_extn("size") else []
        params += ["BODY=8BITMIME"] if envelope.body_type == "8BITMIME" and self.has_extn("8bitmime") else []
        params += ["SMTPUTF8"] if utf8 else []
        params += self._dsn(("RET", envelope.ret), ("ENVID", envelope.envid))
        return self.docmd("MAIL", " ".join([f"FROM:<{envelope.sender}>", *params]))

    def rcpt(self, recipient: Recipient) -> tuple[int, bytes]:
        params = self._dsn(("NOTIFY", recipient.notify), ("ORCPT", recipient.orcpt))
        return self.docmd("RCPT", " ".join([f"TO:<{recipient.address}>", *params]))

    def _dsn(self, *pairs) -> list[str]:
        """RFC 3461's parameters, passed on to an MTA that offers DSN."""
        return [f"{key}={value}" for key, value in pairs if value] if self.has_extn("dsn") else []


def mta_reply(code: int, text: bytes) -> Reply:
    """The MTA's reply as ours: its code and words (one line, bounded); a code that is no
    final answer where one is due is a 451 (RFC 5321 4.2.1: anything but 2yz/4yz/5yz)."""
    said = reply_text(code, text)
    if not 400 <= code < 600:
        return Reply(451, "4.3.0", _literal(f"local MTA: unexpected reply {said[:80]}"))
    return Reply(code, "", _literal(said[4:MTA_REPLY_TEXT]))


def final_reply(answers: list[tuple[int, bytes]]) -> Reply | None:
    """One reply to the backup for the MTA's answers to the end of data (one, or LMTP's one
    per recipient): None when all are 2yz (our 250). All refused: the first temporary refusal
    if any (nothing a retry may deliver fails), else the first. Some accepted and some not:
    451, so that the backup tries them all again (a duplicate for those accepted, never a
    loss; SMTP has one reply for all of a message's recipients)."""
    refused = [(code, text) for code, text in answers if not 200 <= code < 300]
    if not refused:
        return None
    if len(refused) < len(answers):
        said = reply_text(*refused[0])[:MTA_REPLY_TEXT]
        return Reply(451, "4.3.0", _literal(f"local MTA took the message for some recipients only; refused: {said}"))
    return mta_reply(*next((a for a in refused if 400 <= a[0] < 500), refused[0]))


def _literal(text: str) -> str:
    """Text for a Reply's template: its braces are the MTA's words, not fields."""
    return text.replace("{", "{{").replace("}", "}}")


def relay_port(mta: LocalMTA) -> Port:
    """The reversed session's port: RELAY_COMMANDS, and EHLO keywords the MTA has."""
    def ehlo_lines(settings: SessionSettings, tls_active: bool, auth_offered: bool) -> list[str]:
        mirrored = [keyword for keyword in MIRRORED if mta.has_extn(keyword)]
        return [settings.hostname, "PIPELINING", f"SIZE {settings.max_message_size}", "ENHANCEDSTATUSCODES",
                *mirrored]
    return Port({verb: COMMANDS[verb] for verb in RELAY_COMMANDS}, ehlo_lines)


class AnyDomain(dict):
    """No domain named on the command line: every domain is taken (the MTA's relay control decides)."""

    def get(self, name, default=None):
        return RelayedDomain(name)


@dataclass(frozen=True)
class RelayedDomain:
    """A domain the reversed session takes mail for: any local part (the MTA says which exist)."""
    name: str

    def accepts(self, address: str) -> bool:
        return True


class Relay:
    """One reversed session: smtp.Session over the TLS socket, its questions answered by the MTA."""

    def __init__(self, sock, mta: LocalMTA, *, domains: list[str], hostname: str, peer: str, out=None):
        self.sock, self.mta, self.peer, self.out = sock, mta, peer, out
        settings = SessionSettings(
            hostname=hostname, domains={d: RelayedDomain(d) for d in domains} if domains else AnyDomain(),
            etrn_domains={}, max_message_size=mta.limit(), max_recipients=MAX_RECIPIENTS, max_auth_failures=1,
            tls_active=True, client_limits=False)
        self.session = Session(settings)
        self.session.port = relay_port(mta)
        self.accepted: list[str] = []  # the recipients the MTA took in this transaction
        self.refusal: Reply | None = None  # the MTA's answer to DATA when it would not take the content
        self.encoder: DataEncoder | None = None
        self.broken: str | None = None  # why the MTA cannot go on (then the session ends with a 421)
        self.counts = Counter()

    def serve(self) -> bool:
        """Until the backup's QUIT (True), or until the connection, the backup or the MTA fails (False)."""
        self._send()
        while not self.session.closed and self.broken is None:
            try:
                data = self.sock.recv(64 * 1024)
            except TimeoutError:
                self.session.timeout()
                data = None
            if data == b"":
                return False  # the backup went away without QUIT
            if data:
                self.session.receive_data(data)
            self._send()
        return self.broken is None and "quit" in self.session.commands.counts

    def _send(self) -> None:
        while True:
            while (event := self.session.next_event()) is not None:
                self._answer(event)
            self.sock.sendall(self.session.data_to_send())
            if not self.session.backlogged:
                return
            self.session.resume()

    # -- the session's questions, the MTA's answers ---------------------------------------

    def _answer(self, event) -> None:
        try:
            if self.broken is not None:
                return self._refuse_all(event)
            handler = self._HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
        except PrimaryUnavailable as exc:
            self._mta_failed(exc.reason, event)
        except (OSError, smtplib.SMTPException) as exc:
            self._mta_failed(describe(exc), event)

    def _mail(self, event: MailAdmission) -> None:
        if not self.mta.connected:
            self.mta.open()
        self.accepted, self.refusal, self.encoder = [], None, None
        code, text = self.mta.mail(event.envelope)
        self.session.mail_admitted(None if 200 <= code < 300 else mta_reply(code, text))

    def _rcpt(self, event: RecipientAdmission) -> None:
        code, text = self.mta.rcpt(event.recipient)
        if 200 <= code < 300:
            self.accepted.append(event.recipient.address)
            return self.session.recipient_admitted()
        refusal = mta_reply(code, text)
        self._say(f"refused to=<{event.recipient.address}>: {refusal.render().decode('ascii').strip()}")
        self.session.recipient_admitted(refusal)

    def _start(self, event: MessageStarted) -> None:
        code, text = self.mta.docmd("DATA")
        if code != 354:
            self.refusal = mta_reply(code, text)
            return
        self.encoder = DataEncoder()
        self.mta.send(self.encoder.feed(self._received_line(event.envelope)))

    def _data(self, event: MessageData) -> None:
        if self.encoder is not None:
            self.mta.send(self.encoder.feed(event.data))

    def _aborted(self, event: MessageAborted) -> None:
        """Our session refused the content (too big, a bare LF): the MTA must not keep its part."""
        if self.encoder is not None:
            self.mta.close()  # mid-DATA: the MTA discards what it has; the next MAIL reconnects
        self.encoder = None

    def _received(self, event: MessageReceived) -> None:
        envelope = event.envelope
        if self.encoder is None:
            self.mta.rset()
            return self._answered(envelope, self.refusal or replies.QUEUE_UNAVAILABLE)
        self.mta.send(self.encoder.end())
        self.encoder = None
        answers = [self.mta.getreply() for _ in (self.accepted if self.mta.destination.lmtp else [None])]
        refusal = final_reply(answers)
        if refusal is not None:
            return self._answered(envelope, refusal)
        queued = re.search(rb"queued as ([!-~]+)", answers[-1][1])
        self._answered(envelope, None, queued.group(1).decode() if queued else "local")

    def _answered(self, envelope: Envelope, refusal: Reply | None, queue_id: str = "") -> None:
        outcome = "relayed" if refusal is None else "refused"
        self.counts[outcome] += 1
        said = f"250 queued as {queue_id}" if refusal is None else refusal.render().decode("ascii").strip()
        self._say(f"{outcome} from=<{envelope.sender}> to={','.join(f'<{a}>' for a in self.accepted)}: {said}")
        if refusal is None:
            return self.session.message_queued(queue_id)
        self.session.message_refused(refusal)

    def _received_line(self, envelope: Envelope) -> bytes:
        """RFC 5321 4.4: our trace line, as any SMTP server that passes mail on adds one."""
        tls = f"using {self.sock.version()} with cipher {self.sock.cipher()[0]}" if hasattr(self.sock, "cipher") else None
        return received_header(helo=self.session.helo, client_ip=self.peer, hostname=self.session.settings.hostname,
                               queue_id=secrets.token_hex(7).upper(), esmtp=self.session.esmtp, tls=tls,
                               authenticated=False, recipients=[r.address for r in envelope.recipients],
                               timestamp=time.time(), utf8=envelope.smtputf8)

    def _mta_failed(self, reason: str, event) -> None:
        """The MTA is gone or talks nonsense: 421 to what waits, and the session ends (the backup
        keeps the message in flight and the rest)."""
        self.broken = reason
        self.mta.close()
        self._say(f"local MTA {self.mta.destination}: {reason}")
        self._refuse_all(event)

    def _say(self, line: str) -> None:
        """One line of what happened, for the person (or the timer's journal) that ran `backupmx atrn`."""
        if self.out is not None:
            print(line, file=self.out, flush=True)

    def _refuse_all(self, event) -> None:
        refusal = Reply(421, "4.3.0", "local MTA unavailable, try again later")
        if isinstance(event, MailAdmission):
            self.session.mail_admitted(refusal)
        elif isinstance(event, RecipientAdmission):
            self.session.recipient_admitted(refusal)
        elif isinstance(event, MessageReceived):
            self.session.message_refused(refusal)

    # Refused and PipeliningViolation need no answer: the session says what it has to itself.
    _HANDLERS = {MailAdmission: _mail, RecipientAdmission: _rcpt, MessageStarted: _start, MessageData: _data,
                 MessageAborted: _aborted, MessageReceived: _received}
