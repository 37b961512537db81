"""backupmx.tls: contexts, their errors, and the I/O-free TLSLayer.

Real TLS throughout: the committed certificates in tests/certs/, two
TLSLayers talking through memory, a TLSLayer against a real ssl socket, and
STARTTLS through the worker's connection driver on 127.0.0.1.
"""

import logging
import os
import pathlib
import random
import re
import select
import selectors
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from backupmx import tls
from backupmx.config import load_config
from backupmx.connection import SMTPConnection
from backupmx.connection_context import ConnectionContext
from backupmx.tls import TLSConfigError, TLSError, TLSLayer
from conftest import read_line
from test_xforward import TableResolver

CERTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs")
CA = os.path.join(CERTS, "ca.pem")
SERVER_PEM = os.path.join(CERTS, "server.pem")
SERVER_KEY = os.path.join(CERTS, "server.key")
OTHER_PEM = os.path.join(CERTS, "other.pem")
OTHER_KEY = os.path.join(CERTS, "other.key")


@pytest.fixture(scope="module")
def server_ctx():
    return tls.server_context(SERVER_PEM, SERVER_KEY)


@pytest.fixture(scope="module")
def verifying_ctx():
    return tls.client_context("required", CA)


# ---------------------------------------------------------------------------
# The committed certificates


def test_certificates_are_long_lived_and_named_for_localhost(verifying_ctx):
    # ssl's own parser, via a real handshake below; here the basic promises.
    for name in ("ca.pem", "server.pem", "server.key", "other.pem", "other.key", "make-certs.sh"):
        assert os.path.exists(os.path.join(CERTS, name)), name
    with open(SERVER_PEM) as f:
        assert f.read().count("BEGIN CERTIFICATE") == 1  # leaf only, documented in make-certs.sh


# ---------------------------------------------------------------------------
# server_context


def test_server_context_settings(server_ctx):
    ctx = server_ctx
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    for opt in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION, ssl.OP_CIPHER_SERVER_PREFERENCE,
                ssl.OP_SINGLE_DH_USE, ssl.OP_SINGLE_ECDH_USE):
        assert ctx.options & opt == opt, opt
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for c in tls12:
        assert c["aead"], c["name"]
        assert c["kea"] in ("kx-ecdhe", "kx-dhe"), c["name"]


def test_server_context_min_version_13():
    ctx = tls.server_context(SERVER_PEM, SERVER_KEY, "TLSv1.3")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def test_server_context_bad_min_version():
    with pytest.raises(TLSConfigError, match="tls_min_version"):
        tls.server_context(SERVER_PEM, SERVER_KEY, "TLSv1.0")


def _one_line_naming(exc_info, path):
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert msg.startswith(path + ": "), msg
    return msg


def test_server_context_missing_files(tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(missing, SERVER_KEY)
    assert "certificate" in _one_line_naming(ei, missing)
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(SERVER_PEM, missing)
    assert "key" in _one_line_naming(ei, missing)


def test_server_context_directory_instead_of_file(tmp_path):
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(SERVER_PEM, str(tmp_path))
    assert "cannot read private key" in _one_line_naming(ei, str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_server_context_unreadable_key(tmp_path):
    key = tmp_path / "key.pem"
    shutil.copy(SERVER_KEY, key)
    key.chmod(0)
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(SERVER_PEM, str(key))
    _one_line_naming(ei, str(key))


def test_server_context_garbage_cert_and_key(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(str(junk), SERVER_KEY)
    assert "certificate" in _one_line_naming(ei, str(junk))
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(SERVER_PEM, str(junk))
    assert "key" in _one_line_naming(ei, str(junk))
    # A certificate given where the key belongs.
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(SERVER_PEM, CA)
    _one_line_naming(ei, CA)


def test_server_context_key_mismatch():
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(SERVER_PEM, OTHER_KEY)
    assert "does not match" in _one_line_naming(ei, OTHER_KEY)


def test_server_context_cert_and_key_in_one_file(tmp_path):
    both = tmp_path / "both.pem"
    both.write_bytes(pathlib.Path(SERVER_PEM).read_bytes() + pathlib.Path(SERVER_KEY).read_bytes())
    tls.server_context(str(both), str(both))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_server_context_encrypted_key_is_refused_without_prompting(tmp_path):
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", SERVER_KEY, "-aes256", "-passout", "pass:secret",
                    "-out", str(enc)], check=True, capture_output=True, timeout=30)
    with pytest.raises(TLSConfigError) as ei:
        tls.server_context(SERVER_PEM, str(enc))
    assert "encrypted" in _one_line_naming(ei, str(enc))


# ---------------------------------------------------------------------------
# check_key_file


@pytest.mark.parametrize("mode,ok", [(0o600, True), (0o640, True), (0o400, True), (0o644, False), (0o604, False)])
def test_check_key_file_modes(tmp_path, mode, ok):
    key = tmp_path / "key.pem"
    shutil.copy(SERVER_KEY, key)
    key.chmod(mode)
    if ok:
        tls.check_key_file(str(key))
    else:
        with pytest.raises(TLSConfigError) as ei:
            tls.check_key_file(str(key))
        assert "readable by everyone" in _one_line_naming(ei, str(key))


def test_check_key_file_missing(tmp_path):
    with pytest.raises(TLSConfigError) as ei:
        tls.check_key_file(str(tmp_path / "nope"))
    _one_line_naming(ei, str(tmp_path / "nope"))


# ---------------------------------------------------------------------------
# client_context


def test_client_context_modes():
    assert tls.client_context("none") is None
    opp = tls.client_context("opportunistic")
    assert opp.verify_mode == ssl.CERT_NONE and not opp.check_hostname
    assert opp.minimum_version == ssl.TLSVersion.TLSv1_2
    req = tls.client_context("required", CA)
    assert req.verify_mode == ssl.CERT_REQUIRED and req.check_hostname
    assert req.minimum_version == ssl.TLSVersion.TLSv1_2
    system = tls.client_context("required")  # the system CAs
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    with pytest.raises(TLSConfigError):
        tls.client_context("maybe")


def test_client_context_bad_cafile(tmp_path):
    with pytest.raises(TLSConfigError) as ei:
        tls.client_context("required", str(tmp_path / "nope.pem"))
    _one_line_naming(ei, str(tmp_path / "nope.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    with pytest.raises(TLSConfigError) as ei:
        tls.client_context("required", str(junk))
    _one_line_naming(ei, str(junk))


def _socket_handshake(server_ctx, client_ctx, server_hostname, client_kwargs=None):
    """Real sockets: ssl server socket in a thread, ssl client here. Returns (version, error)."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    server_error = []

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(b"hello")
        except (ssl.SSLError, OSError) as exc:
            server_error.append(exc)
        finally:
            a.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_hostname) as c:
            assert c.recv(5) == b"hello"
            return c.version(), None
    except ssl.SSLError as exc:
        return None, exc
    finally:
        b.close()
        t.join(10)
        assert not t.is_alive()


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1"])
def test_required_verifies_the_test_ca(server_ctx, verifying_ctx, name):
    version, error = _socket_handshake(server_ctx, verifying_ctx, name)
    assert error is None and version in ("TLSv1.2", "TLSv1.3")


def test_required_rejects_untrusted_and_wrong_name(verifying_ctx, server_ctx):
    other_ctx = tls.server_context(OTHER_PEM, OTHER_KEY)
    _, error = _socket_handshake(other_ctx, verifying_ctx, "localhost")
    assert isinstance(error, ssl.SSLCertVerificationError)
    _, error = _socket_handshake(server_ctx, verifying_ctx, "mail.example.com")
    assert isinstance(error, ssl.SSLCertVerificationError)


def test_opportunistic_accepts_untrusted():
    other_ctx = tls.server_context(OTHER_PEM, OTHER_KEY)
    version, error = _socket_handshake(other_ctx, tls.client_context("opportunistic"), "whatever")
    assert error is None and version


def test_server_refuses_old_versions_and_weak_ciphers(server_ctx):
    only12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    only12.check_hostname = False
    only12.verify_mode = ssl.CERT_NONE
    only12.maximum_version = ssl.TLSVersion.TLSv1_2
    version, error = _socket_handshake(server_ctx, only12, None)
    assert version == "TLSv1.2" and error is None
    # Server wants 1.3, client stops at 1.2.
    _, error = _socket_handshake(tls.server_context(SERVER_PEM, SERVER_KEY, "TLSv1.3"), only12, None)
    assert error is not None
    # No forward secrecy (static RSA key exchange) is refused.
    static_rsa = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    static_rsa.check_hostname = False
    static_rsa.verify_mode = ssl.CERT_NONE
    static_rsa.maximum_version = ssl.TLSVersion.TLSv1_2
    static_rsa.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384")
    _, error = _socket_handshake(server_ctx, static_rsa, None)
    assert error is not None


# ---------------------------------------------------------------------------
# TLSLayer in memory: two layers, bytes moved by hand


class Pipe:
    """Moves bytes between a client and a server TLSLayer, optionally in random chunks."""

    def __init__(self, client, server, rng=None):
        self.client, self.server = client, server
        self.rng = rng
        self.got = {id(client): bytearray(), id(server): bytearray()}

    def _feed(self, layer, data):
        if not data:
            return
        if self.rng is None:
            self.got[id(layer)] += layer.receive(data)
            return
        i = 0
        while i < len(data):
            n = self.rng.randint(1, 700)
            self.got[id(layer)] += layer.receive(data[i:i + n])
            i += n

    def pump(self, rounds=50):
        for _ in range(rounds):
            c_out, s_out = self.client.outgoing(), self.server.outgoing()
            if not c_out and not s_out:
                return
            self._feed(self.server, c_out)
            self._feed(self.client, s_out)
        raise AssertionError("TLS exchange did not settle")

    def take(self, layer):
        data = bytes(self.got[id(layer)])
        self.got[id(layer)].clear()
        return data


def _layers(server_ctx, client_ctx=None, hostname="localhost"):
    client_ctx = client_ctx or tls.client_context("required", CA)
    server = TLSLayer(server_ctx, server_side=True)
    client = TLSLayer(client_ctx, server_side=False, server_hostname=hostname)
    return client, server


def test_layer_handshake_and_data(server_ctx):
    client, server = _layers(server_ctx)
    assert not server.handshake_complete and server.version() is None and server.cipher() is None
    assert client.has_outgoing  # the ClientHello is ready at once
    p = Pipe(client, server)
    p.pump()
    assert client.handshake_complete and server.handshake_complete
    assert server.version() in ("TLSv1.2", "TLSv1.3")
    assert server.version() == client.version()
    assert server.cipher() and server.cipher() == client.cipher()
    assert server.cipher_bits() >= 128
    assert client.peer_certificate()["subject"]
    client.send(b"EHLO x\r\n")
    p.pump()
    assert p.take(server) == b"EHLO x\r\n"
    server.send(b"250 ok\r\n")
    p.pump()
    assert p.take(client) == b"250 ok\r\n"


def tickets_received(client_ctx):
    """A list that grows by one for each NewSessionTicket the client context reads
    (ssl's message callback: what goes over the wire, not what the session keeps)."""
    tickets = []

    def seen(conn, direction, version, content_type, msg_type, data):
        if direction == "read" and getattr(msg_type, "name", "") == "NEWSESSION_TICKET":
            tickets.append(msg_type)

    client_ctx._msg_callback = seen
    return tickets


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_layer_sends_one_ticket_when_the_handshake_completes(server_ctx, version):
    """One ticket per handshake (as Postfix; OpenSSL's default is two), written as soon as the
    handshake completes (TLS 1.2: inside it; TLS 1.3: right after the client's Finished)."""
    client_ctx = tls.client_context("required", CA)
    client_ctx.maximum_version = tls.TLS_VERSIONS[version]
    tickets = tickets_received(client_ctx)
    client, server = _layers(server_ctx, client_ctx)
    p = Pipe(client, server)
    p.pump()
    assert client.handshake_complete and server.version() == version
    assert len(tickets) == 1
    client.send(b"EHLO x\r\n")
    p.pump()
    server.send(b"250 ok\r\n")
    p.pump()
    assert p.take(server) == b"EHLO x\r\n" and p.take(client) == b"250 ok\r\n" and len(tickets) == 1


def test_layer_send_before_handshake_is_buffered(server_ctx):
    client, server = _layers(server_ctx)
    server.send(b"220 banner\r\n")  # implicit TLS: the banner is queued before the handshake
    client.send(b"EHLO early\r\n")
    p = Pipe(client, server)
    p.pump()
    assert p.take(client) == b"220 banner\r\n"
    assert p.take(server) == b"EHLO early\r\n"


def test_layer_random_chunks_and_large_data(server_ctx):
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    client, server = _layers(server_ctx)
    p = Pipe(client, server, rng)
    p.pump()
    payload = rng.randbytes(300_000)
    sent = 0
    while sent < len(payload):
        n = rng.randint(1, 40_000)
        client.send(payload[sent:sent + n])
        sent += n
        p.pump(rounds=200)
    assert p.take(server) == payload
    reply = rng.randbytes(70_000)
    server.send(reply)
    p.pump(rounds=200)
    assert p.take(client) == reply


def test_layer_close_notify_and_eof(server_ctx):
    client, server = _layers(server_ctx)
    p = Pipe(client, server)
    p.pump()
    client.send(b"QUIT\r\n")
    client.close()
    with pytest.raises(TLSError):
        client.send(b"more")
    p.pump()
    assert p.take(server) == b"QUIT\r\n"  # data before close_notify still arrives
    assert server.closed
    assert server.receive(b"anything") == b""

    client, server = _layers(server_ctx)
    p = Pipe(client, server)
    p.pump()
    client.send(b"last words")
    server_data = server.receive(client.outgoing())
    assert server_data == b"last words"
    assert server.receive(b"") == b""  # socket EOF without close_notify
    assert server.closed


def test_layer_eof_during_handshake(server_ctx):
    client, server = _layers(server_ctx)
    server.receive(client.outgoing())
    with pytest.raises(TLSError):
        server.receive(b"")
    assert server.closed


def test_layer_garbage_is_a_tls_error(server_ctx):
    server = TLSLayer(server_ctx)
    with pytest.raises(TLSError) as ei:
        server.receive(b"EHLO this is plaintext, not TLS\r\n")
    assert "\n" not in str(ei.value)
    assert server.closed


def test_layer_untrusted_server_fails_both_sides():
    other_ctx = tls.server_context(OTHER_PEM, OTHER_KEY)
    client, server = _layers(other_ctx)
    server.receive(client.outgoing())
    with pytest.raises(TLSError, match="certificate"):
        client.receive(server.outgoing())
    alert = client.outgoing()  # the client tells the server why
    if alert:
        with pytest.raises(TLSError):
            server.receive(alert)


def test_layer_many_sessions_in_one_thread(server_ctx):
    # What a worker does: many independent sessions from one context.
    pairs = [_layers(server_ctx) for _ in range(20)]
    pipes = [Pipe(c, s) for c, s in pairs]
    for i, (pipe, (c, s)) in enumerate(zip(pipes, pairs)):
        pipe.pump()
        c.send(b"session %d\r\n" % i)
    for i, (pipe, (c, s)) in enumerate(zip(pipes, pairs)):
        pipe.pump()
        assert pipe.take(s) == b"session %d\r\n" % i


# ---------------------------------------------------------------------------
# TLSLayer (server) against a real ssl client socket, STARTTLS style


def _serve_with_layer(sock, server_ctx, deadline_s=10):
    """A blocking STARTTLS-style echo server on `sock` driven through a TLSLayer.

    Plaintext: reads "STARTTLS\\r\\n", answers "220 go ahead\\r\\n"; then TLS:
    echoes each line upper-cased until "QUIT\\r\\n", answers "221 bye" and closes.
    """
    sock.settimeout(deadline_s)
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk
        buf += chunk
    line, _, rest = buf.partition(b"\r\n")
    assert line == b"STARTTLS"
    assert rest == b""  # nothing pipelined in this test
    sock.sendall(b"220 go ahead\r\n")
    layer = TLSLayer(server_ctx)
    plain = b""
    while not layer.closed:
        data = sock.recv(65536)
        plain += layer.receive(data)
        while b"\r\n" in plain:
            line, _, plain = plain.partition(b"\r\n")
            if line == b"QUIT":
                layer.send(b"221 bye\r\n")
                layer.close()
            else:
                layer.send(line.upper() + b"\r\n")
        sock.sendall(layer.outgoing())
        if layer.closing:
            break
    return layer


def test_layer_against_real_ssl_socket(server_ctx, verifying_ctx):
    a, b = socket.socketpair()
    result = {}

    def serve():
        try:
            result["layer"] = _serve_with_layer(a, server_ctx)
        except BaseException as exc:  # reported in the main thread
            result["error"] = exc
        finally:
            a.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        b.settimeout(10)
        b.sendall(b"STARTTLS\r\n")
        assert b.recv(100) == b"220 go ahead\r\n"
        with verifying_ctx.wrap_socket(b, server_hostname="localhost") as c:
            f = c.makefile("rwb")
            for word in (b"hello", b"x" * 20000, b"mail from:<a@b>"):
                f.write(word + b"\r\n")
                f.flush()
                assert f.readline() == word.upper() + b"\r\n"
            f.write(b"QUIT\r\n")
            f.flush()
            assert f.readline() == b"221 bye\r\n"
            version = c.version()
            f.close()
    finally:
        b.close()
        t.join(10)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    assert result["layer"].version() == version


# ---------------------------------------------------------------------------
# STARTTLS through the worker's connection driver (SMTPConnection), on 127.0.0.1


class StartTLSClient:
    """A client on a real TCP socket whose server side is an SMTPConnection this test drives
    by hand (on_readable once the socket has input), so what the server wrote after each
    step is known; the client's TLS is an SSLObject over memory buffers."""

    def __init__(self, listener, context):
        self.sock = socket.create_connection(listener.getsockname(), timeout=5)
        server_sock, peer = listener.accept()
        self.conn = SMTPConnection(server_sock, peer, context)
        self.conn.on_writable()  # the loop's first writable event: the banner
        self.tls = None
        assert read_line(self.sock).startswith(b"220 ")

    def step(self):
        """The server reads what the client sent (the loop's readable event) and answers."""
        assert select.select([self.conn.sock], [], [], 5)[0]
        self.conn.on_readable()

    def server_wrote(self):
        return bool(select.select([self.sock], [], [], 0)[0])

    def plain(self, command):
        self.sock.sendall(command + b"\r\n")
        self.step()
        lines = [read_line(self.sock)]
        while lines[-1][3:4] == b"-":
            lines.append(read_line(self.sock))
        return lines

    def starttls(self, client_ctx, session=None):
        assert self.plain(b"STARTTLS")[0].startswith(b"220 ")
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost", session=session)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.step()
                self.incoming.write(self.sock.recv(65536))
        self.sock.sendall(self.outgoing.read())  # our Finished
        self.step()

    def command(self, line):
        self.tls.write(line + b"\r\n")
        self.sock.sendall(self.outgoing.read())
        self.step()
        text = b""
        while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", text):
            try:
                text += self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                assert data
                self.incoming.write(data)
        return text

    def close(self):
        self.sock.close()
        self.conn.close()


def test_starttls_sends_one_ticket_at_once_and_it_resumes(tmp_path, server_ctx):
    """The server writes its one TLS 1.3 session ticket as soon as the client's Finished is in:
    that write also acknowledges the Finished, which a client without TCP_NODELAY waits for
    (Nagle) before its EHLO goes out (held for the EHLO's reply instead, it cost such a client
    ~40 ms: the kernel delays a bare ACK). A second connection resumes with the ticket."""
    config_path = tmp_path / "c.ini"
    config_path.write_text(f"[backupmx]\nhostname = mx2.test\nqueue = {tmp_path}/q.db\n"
                           "[domain:example.com]\nprimary = 127.0.0.1:25\nprimary_tls = none\n")
    context = ConnectionContext(config=load_config(config_path), ssl_context=server_ctx,
                                logger=logging.getLogger("test-tls-tickets"), resolver=TableResolver())
    client_ctx = tls.client_context("required", CA)
    tickets = tickets_received(client_ctx)
    session = None
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            for resumed in (False, True):
                client = StartTLSClient(listener, context)
                try:
                    assert b"STARTTLS" in b"".join(client.plain(b"EHLO client.test"))
                    client.starttls(client_ctx, session)
                    assert client.tls.version() == "TLSv1.3" and client.tls.session_reused == resumed
                    assert client.server_wrote()
                    assert client.command(b"EHLO client.test").endswith(b"250 CHUNKING\r\n")
                    assert len(tickets) == 1 + resumed
                    session = client.tls.session
                    assert client.command(b"QUIT").startswith(b"221 ")
                finally:
                    client.close()
    finally:
        context.close()


class LoopClient:
    """A client of a SessionLoop that the test turns round by round; STARTTLS with an SSLObject
    over memory buffers, so the test decides when each handshake message goes out."""

    def __init__(self, listener, loop):
        self.sock = socket.create_connection(listener.getsockname(), timeout=5)
        server_sock, peer = listener.accept()
        self.conn = loop.add_session(server_sock, peer, implicit_tls=False)
        assert read_line(self.sock).startswith(b"220 ")
        self.tls = None
        self.text = b""  # plaintext the server sent under TLS

    def send(self, line):
        self.sock.sendall(line + b"\r\n")

    def answered(self):
        return bool(select.select([self.sock], [], [], 0)[0])

    def hello(self, client_ctx):
        """STARTTLS said and answered: the ClientHello goes out (the server's next step signs)."""
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.handshake()

    def reply(self):
        """The plaintext the server sent under TLS so far, None while there is none."""
        while self.answered():
            data = self.sock.recv(65536)
            assert data
            self.incoming.write(data)
        try:
            self.text += self.tls.read(65536)
        except ssl.SSLWantReadError:
            pass
        return self.text or None

    def handshake(self):
        """The client's next handshake step with what the server wrote; True once it is done."""
        if self.answered():
            self.incoming.write(self.sock.recv(65536))
        try:
            self.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        self.sock.sendall(self.outgoing.read())
        return done


class BudgetLoop:
    """A SessionLoop with no handshake budget (exactly one handshake step a round), which the test
    turns, and LoopClients of it that reach STARTTLS's ClientHello together."""

    def __init__(self, tmp_path, server_ctx, monkeypatch, logger):
        from backupmx import worker

        monkeypatch.setattr(worker, "HANDSHAKE_BUDGET", 0.0)
        config_path = tmp_path / "c.ini"
        config_path.write_text(f"[backupmx]\nhostname = mx2.test\nqueue = {tmp_path}/q.db\n"
                               "[domain:example.com]\nprimary = 127.0.0.1:25\nprimary_tls = none\n")
        self.context = ConnectionContext(config=load_config(config_path), ssl_context=server_ctx,
                                         logger=logger, resolver=TableResolver())
        self.loop = worker.SessionLoop(None, self.context, logger)
        self.client_ctx = tls.client_context("required", CA)

    def close(self):
        self.loop.close_all()
        self.context.close()

    def turns_until(self, done, most=50):
        for _ in range(most):
            if done():
                return
            self.loop.turn()
        raise AssertionError("the loop did not get there")

    def clients(self, listener, n):
        clients = [LoopClient(listener, self.loop) for _ in range(n)]
        for client in clients:
            client.send(b"EHLO client.test")
            self.turns_until(client.answered)
            assert read_line(client.sock).startswith(b"250-")
            while not read_line(client.sock).startswith(b"250 "):
                pass
        return clients

    def hellos(self, clients):
        """STARTTLS for each, then every ClientHello out at once."""
        for client in clients:
            client.send(b"STARTTLS")
            self.turns_until(client.answered)
            assert read_line(client.sock).startswith(b"220 ")
        for client in clients:
            client.hello(self.client_ctx)

    def watched_for_input(self):
        """The sessions whose sockets the loop's selector watches for input."""
        return {key.data for key in self.loop.selector.get_map().values() if key.events & selectors.EVENT_READ}


def wait_readable(socks):
    for _ in range(100):
        if len(select.select(socks, [], [], 0.05)[0]) == len(socks):
            return
    raise AssertionError("the clients' input did not arrive")


def test_a_loop_round_serves_plain_commands_first_and_handshake_steps_within_a_budget(tmp_path, server_ctx,
                                                                                      monkeypatch):
    """Twelve ClientHellos (RSA-2048: a signature each, ~1.5 ms) and a plain client's MAIL ready in
    the same round: the round answers the MAIL and, with no budget left, serves one handshake step;
    the others keep their places and get one each in the next rounds, oldest first, none
    waiting for the clock. While a session waits its turn its socket is not watched for input
    (else each zero-wait round would get all the waiting ones back from select()); once served it
    is again. Every handshake then completes through the loop."""
    budget = BudgetLoop(tmp_path, server_ctx, monkeypatch, logging.getLogger("test-tls-budget"))
    loop = budget.loop
    try:
        with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
            plain, *starting = budget.clients(listener, 13)
            budget.hellos(starting)
            plain.send(b"MAIL FROM:<a@sender.test>")
            wait_readable([c.conn.sock for c in [plain] + starting])

            loop.turn()
            assert read_line(plain.sock).startswith(b"250 ")
            assert [c.answered() for c in starting].count(True) == 1
            waiting = [c for c in starting if not c.answered()]
            assert set(loop.handshakes) == {c.conn for c in waiting}
            assert not budget.watched_for_input() & set(loop.handshakes)
            assert plain.conn in budget.watched_for_input()
            order = list(loop.handshakes)
            assert loop.wait_time(0.0) == 0.0  # what is left does not wait for the clock
            for served, conn in enumerate(order, 2):
                loop.turn()
                assert [c.answered() for c in starting].count(True) == served
                assert next(c for c in starting if c.conn is conn).answered()  # the oldest first
                assert conn in budget.watched_for_input()  # its next step is read when it comes
                assert not budget.watched_for_input() & set(loop.handshakes)
            assert not loop.handshakes

            pending = set(starting)
            while pending:
                for client in list(pending):
                    if client.answered() and client.handshake():
                        pending.discard(client)
                budget.turns_until(lambda: all(c.answered() for c in pending))
            for client in starting:
                client.tls.write(b"NOOP\r\n")
                client.sock.sendall(client.outgoing.read())
            for client in starting:
                budget.turns_until(lambda: client.reply() is not None)
                assert client.reply().startswith(b"250 ")
    finally:
        budget.close()


def test_a_session_waiting_its_handshake_turn_still_ends_when_its_peer_goes_or_at_its_deadline(
        tmp_path, server_ctx, monkeypatch, caplog):
    """Not watched for input while it waits, a session still ends: a peer that closed meanwhile is
    read when its step is served; the handshake deadline closes sessions whose turn has not come,
    with one log line each."""
    from backupmx import connection

    budget = BudgetLoop(tmp_path, server_ctx, monkeypatch, logging.getLogger("test-tls-budget-end"))
    loop = budget.loop
    try:
        with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
            clients = budget.clients(listener, 3)
            budget.hellos(clients)
            wait_readable([c.conn.sock for c in clients])
            loop.turn()
            gone = next(c for c in clients if c.conn in loop.handshakes)
            gone.sock.close()
            budget.turns_until(lambda: gone.conn.closed, most=5)
            assert gone.conn not in loop.sessions

            monkeypatch.setattr(connection, "HANDSHAKE_TIMEOUT", 0.2)
            clients = budget.clients(listener, 3)
            budget.hellos(clients)
            wait_readable([c.conn.sock for c in clients])
            with caplog.at_level(logging.INFO, logger="test-tls-budget-end"):
                loop.turn()
                waiting = [c for c in clients if c.conn in loop.handshakes]
                assert len(waiting) == 2 and not budget.watched_for_input() & set(loop.handshakes)
                deadline = max(c.conn.deadline for c in clients)
                time.sleep(max(0.0, deadline - time.monotonic()))  # the deadline is the condition
                loop.check_deadlines(time.monotonic())
                assert all(c.conn.closed for c in clients)
            assert not loop.handshakes and not loop.sessions  # nothing left for a round to serve
            for client in waiting:  # ended before their turn: not a byte of a handshake
                try:
                    assert client.sock.recv(65536) == b""
                except ConnectionResetError:
                    pass
            timeouts = [r for r in caplog.records if r.getMessage().startswith("tls-failed")]
            assert len(timeouts) == 3 and all("handshake timeout" in r.getMessage() for r in timeouts)
    finally:
        budget.close()
