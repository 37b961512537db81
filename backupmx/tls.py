"""TLS for backupmx: the server and client SSL contexts, and an I/O-free TLS layer.

Only the stdlib `ssl` module is used.  Three things live here:

* `server_context()` builds the one context the master creates before forking
  (docs/DESIGN.md, "Processes": validate before forking, build the TLS context once).  Errors are a
  single `TLSConfigError("<path>: <reason>")` line for the operator.
* `client_context()` is what the flusher uses towards a domain's primary, per
  its `primary_tls` setting.
* `TLSLayer` does TLS on buffers with two `ssl.MemoryBIO`s and
  `SSLContext.wrap_bio` (the way asyncio's sslproto.py does it).  It never
  touches a socket, so a worker can drive many TLS sessions from one
  `selectors` loop, and STARTTLS (RFC 3207) is just this layer inserted between
  the socket and the SMTP session.
* `TLSStream` carries on a TLSLayer's session over a blocking socket, with
  the calls smtplib makes (sendall, recv, settimeout, close): an ODMR
  connection whose TLS was set up by the session loop is handed to a
  blocking SMTP client once the roles reverse (RFC 2645), and TLS state
  cannot be moved to another object, let alone another process.
"""

import os
import ssl
import stat

__all__ = [
    "TLSConfigError",
    "TLSError",
    "TLSLayer",
    "TLSStream",
    "SERVER_CIPHERS",
    "TLS_VERSIONS",
    "check_key_file",
    "client_context",
    "server_context",
]

# TLS 1.2 cipher suites the server accepts: forward secret (ECDHE/DHE key
# exchange) and AEAD (AES-GCM, ChaCha20-Poly1305) only, as RFC 7525 section 4.2
# recommends.  TLS 1.3 suites are all of that kind and are not affected by this
# string.  (DHE suites are only usable if the OpenSSL build provides DH
# parameters; ECDHE is what clients get in practice.)
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"

# The accepted spellings of the `tls_min_version` setting.
TLS_VERSIONS = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

# How much plaintext one SSLObject.read() call may return: more than a
# record can hold (2^14 octets, RFC 8446 5.1 and RFC 5246 6.2.1), so one
# read takes a whole record and OpenSSL never keeps part of one decrypted
# (SSL_pending() stays 0: only the incoming buffer can hold more).
_READ_SIZE = 64 * 1024


class TLSConfigError(Exception):
    """A certificate, key or TLS setting the server cannot use.

    The message is one line, "<path>: <reason>", fit for the operator.
    """


class TLSError(Exception):
    """A TLS handshake failure or protocol error on one connection (one line)."""


# ---------------------------------------------------------------------------
# Contexts


def _min_version(min_version: str) -> ssl.TLSVersion:
    try:
        return TLS_VERSIONS[min_version]
    except KeyError:
        raise TLSConfigError(
            f"tls_min_version: {min_version!r} is not one of {', '.join(TLS_VERSIONS)}"
        ) from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    """A short one-line reason for an ssl.SSLError."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).replace("_", " ").lower()
    return " ".join(str(exc).split())


def _check_readable(path: str, what: str) -> None:
    """Raise TLSConfigError naming `path` when it cannot be opened for reading."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TLSConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def _no_passphrase() -> bytes:
    # Called by OpenSSL only for an encrypted key.  Without this callback it
    # would prompt on the terminal, which a server (or --inetd) must never do.
    raise _EncryptedKey()


class _EncryptedKey(Exception):
    pass


def server_context(cert: str, key: str, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """The server's SSL context for STARTTLS and implicit-TLS listeners.

    `cert` is a PEM file with the certificate chain (leaf first), `key` the PEM
    private key (may be the same file).  Raises TLSConfigError with a one-line
    "<path>: <reason>" for an unreadable file, a file that is not PEM, an
    encrypted key or a key that does not match the certificate, and for an
    unknown `min_version`.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _min_version(min_version)
    ctx.set_ciphers(SERVER_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION  # CRIME
        | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a DoS lever
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_SINGLE_ECDH_USE
    )
    # SMTP servers do not ask clients for certificates (PROTOCOL_TLS_SERVER's
    # default, stated for the reader).
    ctx.verify_mode = ssl.CERT_NONE
    # One TLS 1.3 session ticket per handshake, as Postfix sends (OpenSSL's
    # default is two, RFC 8446 4.6.1 leaves it to the server): an MTA client
    # opens one connection at a time per destination, so it resumes with one
    # ticket, and each ticket more is ~30 us of the server's CPU per handshake.
    ctx.num_tickets = 1

    _check_readable(cert, "certificate")
    _check_readable(key, "private key")
    # Load the certificate alone first, so that a bad certificate file is
    # named as such rather than reported as a key problem.
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{cert}: not a PEM certificate ({_ssl_reason(exc)})") from None
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        raise TLSConfigError(f"{key}: private key is encrypted; an unencrypted key is needed") from None
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"{key}: private key does not match the certificate in {cert}") from None
        raise TLSConfigError(f"{key}: not a PEM private key ({_ssl_reason(exc)})") from None
    except OSError as exc:  # e.g. the file vanished between the checks
        raise TLSConfigError(f"{exc.filename or key}: {exc.strerror or exc}") from None
    return ctx


def check_key_file(path: str) -> None:
    """Raise TLSConfigError when the key file is readable by everyone.

    Group-readable keys are allowed (the common ssl-cert group setup); a
    world-readable one is refused like OpenSSH refuses a loose private key.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TLSConfigError(f"{path}: cannot read private key: {exc.strerror or exc}") from None
    if mode & stat.S_IROTH:
        raise TLSConfigError(
            f"{path}: private key is readable by everyone (mode {stat.S_IMODE(mode):04o}); chmod o-r it"
        )


def client_context(primary_tls: str, cafile: str | None = None) -> ssl.SSLContext | None:
    """The context for delivering to a domain's primary, per `primary_tls`.

    "none" -> None (no STARTTLS at all).
    "opportunistic" -> TLS 1.2+ without verification (RFC 7435: encrypt when
    possible; an unverified certificate is still better than plaintext, and
    refusing it would only push the mail back to plaintext).
    "required" -> TLS 1.2+, certificate verified against `cafile` (when given,
    it alone is trusted) or the system CAs, and the host name checked.
    """
    if primary_tls == "none":
        return None
    if primary_tls == "opportunistic":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif primary_tls == "required":
        if cafile is not None:
            _check_readable(cafile, "CA file")
            try:
                ctx = ssl.create_default_context(cafile=cafile)
            except ssl.SSLError as exc:
                raise TLSConfigError(f"{cafile}: not a PEM CA file ({_ssl_reason(exc)})") from None
        else:
            ctx = ssl.create_default_context()
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        raise TLSConfigError(f"primary_tls: {primary_tls!r} is not none, opportunistic or required")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


# ---------------------------------------------------------------------------
# I/O-free TLS


class TLSLayer:
    """TLS over memory buffers: socket bytes in, plaintext out, and back.

    The caller owns the socket.  It feeds what it reads to `receive()`, which
    drives the handshake and returns any plaintext now available; it writes
    whatever `outgoing()` returns (call it after every `receive()`, `send()`
    and `close()`).  `send()` before the handshake is done is buffered and
    encrypted once it completes.

    End of file from the socket is `receive(b"")` (as `socket.recv` reports
    it); after the handshake that just sets `closed` (an SMTP client that drops
    the connection without close_notify is not an error worth more than that),
    during the handshake it raises TLSError.

    Every ssl error comes out as TLSError with a one-line message.

    A TLS 1.3 server's session ticket (RFC 8446 4.6.1) is in `outgoing()`
    as soon as the handshake completes, and must be written then: it also
    acknowledges the client's Finished at once. Held back for the first
    reply (one write fewer), it left a client without TCP_NODELAY (smtplib,
    most MTAs) waiting ~40 ms for its EHLO: Nagle keeps the EHLO until the
    Finished is acknowledged, and the kernel delays a bare ACK.
    """

    def __init__(self, context: ssl.SSLContext, *, server_side: bool = True, server_hostname: str | None = None):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
        )
        self._pending = bytearray()  # plaintext sent before the handshake completed
        # What was negotiated, read from OpenSSL once when the handshake completes:
        # the "tls" log line and each message's Received: header ask for it.
        self._version: str | None = None
        self._cipher: tuple | None = None  # (name, protocol, secret bits), as SSLObject.cipher()
        self.handshake_complete = False
        self.closed = False  # peer sent close_notify or EOF, or we failed
        self._closing = False  # we started close_notify
        if not server_side:
            # A client speaks first: put its ClientHello in the outgoing buffer now.
            # (A server has nothing to say before the ClientHello: no call, no SSLWantReadError.)
            self._do_handshake()

    # -- the three buffer operations

    def receive(self, encrypted: bytes) -> bytes:
        """Feed bytes read from the socket; return plaintext now available (may be b"").

        b"" means end of file on the socket.
        """
        if self.closed:
            return b""
        if not encrypted:
            return self.receive_eof()
        self._incoming.write(encrypted)
        if not self.handshake_complete:
            self._do_handshake()
            if not self.handshake_complete or not self._incoming.pending:
                return b""  # no records after the handshake's last message (most often it came alone)
        return self._read_plaintext()

    def receive_eof(self) -> bytes:
        """The socket reached end of file."""
        if self.closed:
            return b""
        self._incoming.write_eof()
        if not self.handshake_complete:
            self.closed = True
            raise TLSError("connection closed during TLS handshake")
        data = self._read_plaintext(to_the_end=True)
        self.closed = True
        return data

    def send(self, plaintext: bytes) -> None:
        """Queue application data; encrypted now, or once the handshake is done."""
        if self.closed or self._closing:
            raise TLSError("send on a closed TLS connection")
        if not plaintext:
            return
        if not self.handshake_complete:
            self._pending += plaintext
            return
        self._write(plaintext)

    def outgoing(self) -> bytes:
        """Encrypted bytes to write to the socket now (drains the buffer)."""
        return self._outgoing.read()

    @property
    def has_outgoing(self) -> bool:
        """True when `outgoing()` would return something (for selector interest)."""
        return self._outgoing.pending > 0

    @property
    def closing(self) -> bool:
        """True once close() was called (write what outgoing() still holds, then close the socket)."""
        return self._closing

    def close(self) -> None:
        """Start the TLS close: queue our close_notify (then write `outgoing()`)."""
        if self._closing:
            return
        self._closing = True
        self._pending.clear()
        if not self.handshake_complete or self.closed:
            return
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is queued; the peer's answer is not awaited
        except (ssl.SSLError, ValueError):
            pass  # broken already: there is nothing more to say to the peer

    # -- what the session may want to know (Received header, RFC 8314 logging)

    def version(self) -> str | None:
        """The negotiated protocol, e.g. "TLSv1.3"; None before the handshake."""
        return self._version

    def cipher(self) -> str | None:
        """The negotiated cipher suite name, e.g. "TLS_AES_256_GCM_SHA384"."""
        return self._cipher[0] if self._cipher else None

    def cipher_bits(self) -> int | None:
        """The secret bits of the negotiated cipher, e.g. 256."""
        return self._cipher[2] if self._cipher else None

    def peer_certificate(self) -> dict | None:
        """The verified peer certificate as `SSLSocket.getpeercert()` gives it."""
        return self._ssl.getpeercert() if self.handshake_complete else None

    # -- internals

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self.closed = True
            raise TLSError(f"TLS handshake failed: {_ssl_reason(exc)}") from None
        self.handshake_complete = True
        self._version, self._cipher = self._ssl.version(), self._ssl.cipher()
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            self._write(pending)

    def _write(self, plaintext: bytes) -> None:
        # Into a memory BIO OpenSSL takes it all in one call, as records of
        # up to 16 KB (without SSL_MODE_ENABLE_PARTIAL_WRITE, which the ssl
        # module does not set); the loop is for the case it ever did not.
        try:
            n = self._ssl.write(plaintext)
            if n < len(plaintext):
                view = memoryview(plaintext)[n:]
                while view:
                    view = view[self._ssl.write(view):]
        except ssl.SSLError as exc:
            self.closed = True
            raise TLSError(f"TLS error: {_ssl_reason(exc)}") from None

    def _read_plaintext(self, to_the_end: bool = False) -> bytes:
        """The plaintext of the records received so far.

        It stops once the incoming buffer is empty (a read takes a whole
        record, _READ_SIZE, so nothing is left to decrypt) rather than on the
        SSLWantReadError a further read would raise. `to_the_end`: read on until OpenSSL says why it stops (after
        EOF: close_notify or not).
        """
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify from the peer
                self.closed = True
                break
            except ssl.SSLEOFError:  # EOF without close_notify ("ragged" close)
                self.closed = True
                break
            except ssl.SSLError as exc:
                self.closed = True
                raise TLSError(f"TLS error: {_ssl_reason(exc)}") from None
            if not chunk:
                self.closed = True
                break
            chunks.append(chunk)
            if not to_the_end and not self._incoming.pending:
                break
        return b"".join(chunks)


class TLSStream:
    """A blocking, socket-like object over a connected socket and its TLSLayer.

    What smtplib (smtpclient.PrimaryClient) calls: sendall, recv, settimeout,
    gettimeout, fileno, close. The socket's timeout bounds each call: recv
    raises TimeoutError when nothing decryptable arrives in time, sendall
    when the peer stops taking data (its whole duration, since Python 3.5).
    A TLS failure is a ConnectionError, so callers treat it as any lost
    connection. recv returns b"" once the peer closed (close_notify or EOF).
    """

    def __init__(self, sock, layer: TLSLayer, timeout: float | None):
        self._sock, self._layer = sock, layer
        self._plaintext = bytearray()
        sock.settimeout(timeout)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def fileno(self) -> int:
        return self._sock.fileno()

    def version(self) -> str | None:
        return self._layer.version()

    def sendall(self, data: bytes) -> None:
        try:
            self._layer.send(bytes(data))
        except TLSError as exc:
            raise ConnectionError(str(exc)) from None
        self._flush()

    def recv(self, size: int) -> bytes:
        while not self._plaintext and not self._layer.closed:
            encrypted = self._sock.recv(64 * 1024)
            try:
                self._plaintext += self._layer.receive(encrypted)
            except TLSError as exc:
                raise ConnectionError(str(exc)) from None
            self._flush()  # what TLS itself has to say (alerts, TLS 1.3 key updates)
        data = bytes(self._plaintext[:size])
        del self._plaintext[:size]
        return data

    def close(self) -> None:
        """close_notify when the session is still up (at most a short wait), then close the socket."""
        try:
            if not self._layer.closing and not self._layer.closed:
                self._layer.close()
                self._sock.settimeout(min(self._sock.gettimeout() or 1.0, 1.0))
                self._flush()
        except OSError:
            pass
        finally:
            self._sock.close()

    def _flush(self) -> None:
        data = self._layer.outgoing()
        if data:
            self._sock.sendall(data)
