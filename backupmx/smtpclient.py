"""The SMTP client backupmx speaks to a domain's primary, over smtplib.

PrimaryClient is smtplib.SMTP with a strict, bounded reply reader; DataEncoder
turns a stored body into the DATA stream; Primary opens a session to one
domain's configured primary (its pinned addresses, backupmx.primaries) ready
for MAIL, with the TLS its `primary_tls` asks for. The flusher (flusher.py)
delivers over these sessions; anything else that must talk to the primary
(a recipient callout, a probe) opens them the same way. Another source of
sessions for the flusher has Primary's open(), release(), relay and
single_session (odmr_connection.ReversedPeer: the connection an ATRN reversed).

The primary is a peer we do not control. Every reply is bounded: at most
MAX_REPLY_LINES lines, each at most MAX_REPLY_LINE bytes, a strict
three-digit code (Python's int("2_0") is 20), and one deadline for the whole
reply, so a server that drips one byte a second cannot hold a process past
the command timeout. A reply we cannot trust is a ReplyError: the caller
defers, never fails, the mail in flight -- smtplib itself reports an
over-long reply line as "500 Line too long", a 5xx the primary never sent.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import time

from backupmx import primaries, tls
from backupmx.config_values import format_hostport
from backupmx.log import log_event

MAX_REPLY_LINES = 100  # a longer reply is not a mail server talking
MAX_REPLY_LINE = 8192  # bytes including CRLF (smtplib's own _MAXLINE)
MAX_REPLY_TEXT = 512  # characters of a reply kept in the queue and the log

# RFC 5321 4.2: Reply-line = *( Reply-code "-" [ textstring ] CRLF )
#                            Reply-code [ SP textstring ] CRLF
# Reply-code = %x32-35 %x30-35 %x30-39. Nothing else is a reply.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.S)
_LINE_END = re.compile(rb"\r\n|\r|\n")


class ReplyError(smtplib.SMTPException):
    """The primary's reply broke a limit or the grammar: we cannot trust the session.

    The connection is closed; the mail in flight is deferred (never failed).
    """


class ReplyTimeout(ReplyError):
    """No complete reply within the command timeout."""


class PrimaryClient(smtplib.SMTP):
    """smtplib.SMTP with a bounded, strict reply reader.

    Replies are read from the socket directly (not through smtplib's buffered
    file) so that one deadline covers the whole reply however the bytes
    trickle in. Everything else -- connect, EHLO, STARTTLS -- is smtplib's.
    """

    def __init__(self, *, timeout: float, local_hostname: str):
        self._rbuf = bytearray()
        super().__init__(local_hostname=local_hostname, timeout=timeout)

    def connect(self, host="localhost", port=0, source_address=None, *, address=None):
        """Connect to `address` (one of the primary's pinned addresses) or else `host`.

        smtplib keeps the name for starttls's certificate check only when it
        was given to __init__; the configured primary is the name to verify
        (and to send as SNI), whichever of its addresses we connect to.
        """
        self._rbuf.clear()
        self._host = host
        return super().connect(address or host, port, source_address)

    def starttls(self, *args, **kwargs):
        result = super().starttls(*args, **kwargs)
        # Whatever arrived in plaintext after "220" must not be read as if it had
        # come over TLS (the CVE-2011-0411 class of injection; RFC 3207 4.2).
        self._rbuf.clear()
        return result

    def close(self):
        self._rbuf.clear()
        super().close()

    def send(self, s):
        """smtplib's send, but keeping the reason when the socket fails, and refusing to
        go on once the primary said more than it was asked: a reply read ahead of our
        next command answers none of ours, and would be taken for the next one's."""
        if not self.sock:
            raise smtplib.SMTPServerDisconnected("not connected")
        if self._rbuf:
            self.close()
            raise ReplyError(f"reply to no command: {bytes(self._rbuf[:40])!r}")
        if isinstance(s, str):
            s = s.encode(self.command_encoding)
        try:
            self.sock.sendall(s)
        except OSError as e:
            self.close()
            raise smtplib.SMTPServerDisconnected(os_reason(e)) from e

    def getreply(self):
        """Read one reply: (code, text lines joined by b"\\n"), or raise.

        Raises ReplyError (limits, grammar, deadline) or SMTPServerDisconnected;
        the connection is closed in both cases.
        """
        if not self.sock:
            raise smtplib.SMTPServerDisconnected("not connected")
        deadline = time.monotonic() + self.timeout
        code = None
        texts = []
        try:
            while True:
                line = self._read_line(deadline)
                if line.endswith(b"\r\n"):
                    line = line[:-2]
                else:
                    line = line[:-1]
                match = _REPLY_LINE.fullmatch(line)
                if match is None:
                    raise ReplyError(f"malformed reply line {line[:40]!r}")
                if code is not None and match.group(1) != code:
                    raise ReplyError("reply code changed within a multiline reply")
                code = match.group(1)
                texts.append((match.group(3) or b"").strip())
                if match.group(2) != b"-":
                    break
                if len(texts) >= MAX_REPLY_LINES:
                    raise ReplyError(f"reply longer than {MAX_REPLY_LINES} lines")
        except (ReplyError, smtplib.SMTPServerDisconnected):
            self.close()
            raise
        return int(code), b"\n".join(texts)

    def _read_line(self, deadline):
        while True:
            end = self._rbuf.find(b"\n")
            if end >= 0:
                if end + 1 > MAX_REPLY_LINE:
                    raise ReplyError(f"reply line longer than {MAX_REPLY_LINE} bytes")
                line = bytes(self._rbuf[: end + 1])
                del self._rbuf[: end + 1]
                return line
            if len(self._rbuf) > MAX_REPLY_LINE:
                raise ReplyError(f"reply line longer than {MAX_REPLY_LINE} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplyTimeout(f"timeout: no complete reply within {self.timeout:g} s")
            try:
                self.sock.settimeout(remaining)
                data = self.sock.recv(65536)
            except TimeoutError as e:
                raise ReplyTimeout(f"timeout: no complete reply within {self.timeout:g} s") from e
            except OSError as e:
                raise smtplib.SMTPServerDisconnected(os_reason(e)) from e
            finally:
                if self.sock:
                    try:
                        self.sock.settimeout(self.timeout)
                    except OSError:
                        pass
            if not data:
                raise smtplib.SMTPServerDisconnected("connection closed by the primary")
            self._rbuf += data


class DataEncoder:
    """Body bytes -> the DATA stream, chunk by chunk (RFC 5321 4.5.2).

    Lines end in CRLF (a bare CR or LF, which the server never queues, is
    made CRLF rather than passed on), a line starting with "." gets another
    ".", and end() closes with exactly one CRLF "." CRLF. State carried across
    chunks: whether the next byte starts a line, and a CR held back because
    its LF may be the first byte of the next chunk.
    """

    def __init__(self):
        self._at_line_start = True
        self._held_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        if chunk.count(b"\n") == chunk.count(b"\r") == chunk.count(b"\r\n"):
            out = chunk  # CRLF line ends only (what the server queues): nothing to mend
        else:
            out = _LINE_END.sub(b"\r\n", chunk)
        out = out.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        return out

    def end(self) -> bytes:
        if self._held_cr or not self._at_line_start:
            tail = b"\r\n.\r\n"
        else:
            tail = b".\r\n"
        self._held_cr = False
        self._at_line_start = True
        return tail


# XFORWARD (Postfix's XFORWARD_README): a primary behind us that offers it is
# told who the original client was, so that its own checks and logs see it.
XFORWARD_UNAVAILABLE = "[UNAVAILABLE]"
MAX_XFORWARD_VALUE = 255  # octets of one attribute's xtext (a host name's length): longer ones are cut
MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, with the CRLF
_XTEXT_AS_IS = re.compile(r"[!-*,-<>-~]*")  # "!".."~" but "+" and "=": xtext as it stands


def xtext(value: str, limit: int | None = None) -> str:
    """RFC 3461 4: "+" and "=", and anything outside "!".."~", as "+HH" (of its UTF-8 octets);
    cut after `limit` octets, never inside a character."""
    if (limit is None or len(value) <= limit) and _XTEXT_AS_IS.fullmatch(value):
        return value  # a host name, an address, a queue id: nothing to encode (per message, per attribute)
    out, size = [], 0
    for c in value:
        piece = c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode("utf-8"))
        if limit is not None and size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def xforward_commands(offered: str, attributes: dict[str, str | None]) -> list[str]:
    """The XFORWARD command lines (without CRLF) that pass `attributes` the primary names in
    its EHLO keyword (`offered`, e.g. "NAME ADDR PROTO HELO"), each line within 512 octets.
    A missing value is sent as [UNAVAILABLE]."""
    names = set(offered.upper().split())
    words = [f"{name}={xtext(value or XFORWARD_UNAVAILABLE, MAX_XFORWARD_VALUE)}"
             for name, value in attributes.items() if name in names]
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) + 2 > MAX_COMMAND_LINE:
            lines.append(line)
            line = ""
        line = f"{line} {word}" if line else f"XFORWARD {word}"
    return lines + ([line] if line else [])


def os_reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return exc.strerror or str(exc) or type(exc).__name__


def describe(exc: BaseException) -> str:
    """A one-line reason for an exception, for the queue row and the log."""
    if isinstance(exc, ReplyError):
        text = str(exc)
    elif isinstance(exc, (smtplib.SMTPServerDisconnected, ConnectionError, EOFError)):
        text = f"connection lost: {exc}" if str(exc) else "connection lost"
    elif isinstance(exc, TimeoutError):
        text = "timeout"
    elif isinstance(exc, ssl.SSLError):
        text = f"TLS error: {exc.reason or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text[:MAX_REPLY_TEXT]


def reply_text(code: int, text: bytes) -> str:
    line = f"{code} " + " ".join(text.decode("utf-8", "replace").split("\n"))
    return line.strip()[:MAX_REPLY_TEXT]


class PrimaryUnavailable(Exception):
    """No session could be opened: unreachable, greeting refused, TLS required and
    not possible. `reason` is what the mail waiting for it records."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def introduce(client: PrimaryClient, greeting: tuple[int, bytes], *, helo: bool = True) -> None:
    """After the server's greeting: it must be 220 (RFC 5321 3.1), then EHLO, and HELO when the
    server refuses EHLO (`helo`: not for LMTP, RFC 2033 4.1). PrimaryUnavailable (the reply) if not."""
    code, text = greeting
    if code != 220:
        raise PrimaryUnavailable(reply_text(code, text))
    code, text = client.ehlo()
    if code != 250 and helo:
        code, text = client.helo()
    if code != 250:
        raise PrimaryUnavailable(reply_text(code, text))


class Primary:
    """One domain's primary, as a place to open SMTP sessions to.

    Connects only to the addresses the primary was pinned to when the
    configuration was loaded (primaries.addresses_for): DNS cannot divert
    mail now. The client TLS context is built once, on first use.
    """

    single_session = False  # more sessions at once may be opened (the flusher's extra connection)

    def __init__(self, domain, *, hostname: str, timeout: float, log: logging.Logger):
        self.domain, self.hostname, self.timeout, self.log = domain, hostname, timeout, log
        self.host, self.port = domain.primary
        self.relay = format_hostport(self.host, self.port)
        # Resolved when the config was loaded, not now: DNS cannot divert a flush.
        self.addresses = primaries.addresses_for(domain)
        self._context = None
        self._context_built = False

    def open(self) -> tuple[PrimaryClient, str | None]:
        """A session ready for MAIL and its TLS version (None: plaintext); or PrimaryUnavailable."""
        client = PrimaryClient(timeout=self.timeout, local_hostname=self.hostname)
        try:
            introduce(client, self._connect_pinned(client))
            return client, self._start_tls(client)
        except PrimaryUnavailable:
            client.close()
            raise
        except (OSError, smtplib.SMTPException, ValueError) as e:
            client.close()
            raise PrimaryUnavailable(describe(e)) from e

    def greeting(self) -> str:
        """Connect, read the greeting, QUIT: the greeting's reply when it is 220 (RFC 5321 4.3.1),
        else PrimaryUnavailable (what a monitoring probe asks: is the primary taking mail?)."""
        client = PrimaryClient(timeout=self.timeout, local_hostname=self.hostname)
        try:
            code, text = self._connect_pinned(client)
            if code != 220:
                raise PrimaryUnavailable(reply_text(code, text))
            self.release(client)
            return reply_text(code, text)
        except (OSError, smtplib.SMTPException, ValueError) as e:
            raise PrimaryUnavailable(describe(e)) from e
        finally:
            client.close()

    def release(self, client: PrimaryClient) -> None:
        """A flush is done with `client`: QUIT, then close (whatever the primary answers)."""
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            pass
        client.close()

    def _connect_pinned(self, client: PrimaryClient) -> tuple[int, bytes]:
        """The greeting from the first of the primary's addresses that takes the connection."""
        if not self.addresses:
            raise PrimaryUnavailable(f"primary {self.host} did not resolve when the configuration was loaded; "
                                     "fix its DNS: it is looked up again (BACKUPMX_UNRESOLVED_RETRY) and at a reload")
        failures = []
        for address in self.addresses:
            try:
                return client.connect(self.host, self.port, address=address)
            except smtplib.SMTPException:
                raise  # the greeting, not the connection
            except OSError as e:
                failures.append(os_reason(e) if address == self.host else f"{address}: {os_reason(e)}")
        raise PrimaryUnavailable(f"connect to {self.relay} failed: {'; '.join(failures)}")

    def _start_tls(self, client: PrimaryClient) -> str | None:
        """STARTTLS as primary_tls asks (RFC 3207); the TLS version, or None for plaintext."""
        mode = self.domain.primary_tls
        if mode == "none":
            return None
        if not client.has_extn("starttls"):
            if mode == "required":
                raise PrimaryUnavailable("TLS is required but the primary does not offer STARTTLS")
            return None
        if not self._context_built:
            try:
                self._context = tls.client_context(mode, self.domain.primary_ca)
            except tls.TLSConfigError as e:
                raise PrimaryUnavailable(f"TLS configuration: {e}") from e
            self._context_built = True
        try:
            client.starttls(context=self._context)
        except smtplib.SMTPResponseException as e:
            if mode == "required" or e.smtp_code == 421:
                raise PrimaryUnavailable(reply_text(e.smtp_code, e.smtp_error)) from e
            # Opportunistic and refused (454 etc.): RFC 3207 lets us go on in plaintext.
            log_event(self.log, "starttls-refused", domain=self.domain.name, relay=self.relay,
                      reply=reply_text(e.smtp_code, e.smtp_error), level=logging.WARNING)
            return None
        except (ssl.SSLError, ssl.CertificateError) as e:
            raise PrimaryUnavailable(f"TLS handshake failed: {getattr(e, 'reason', None) or e}") from e
        version = client.sock.version()
        # RFC 3207 4.2: forget everything learnt before TLS, ask again.
        code, text = client.ehlo()
        if code != 250:
            raise PrimaryUnavailable(reply_text(code, text))
        return version
