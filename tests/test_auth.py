"""backupmx.auth (passwords, SASL decoding, constant-time checks) and
backupmx.etrnclient against a tiny threaded SMTP server speaking real TLS.
"""

import base64
import hashlib
import hmac
import io
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from backupmx import auth, etrnclient, tls
from backupmx.auth import Authenticator, SASLSyntaxError
from backupmx.cli import build_parser

CERTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "certs")
CA = os.path.join(CERTS, "ca.pem")


@dataclass(frozen=True)
class User:
    """Stands in for backupmx.config.UserConfig (same fields)."""

    name: str
    password: str
    domains: frozenset = frozenset()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# ---------------------------------------------------------------------------
# Stored passwords


@pytest.fixture(scope="module")
def scrypt_value():
    return auth.hash_password("correct horse")


def test_hash_round_trip(scrypt_value):
    assert re.fullmatch(r"\{SCRYPT\}n=16384,r=8,p=1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}", scrypt_value)
    assert auth.verify_password("correct horse", scrypt_value)
    assert not auth.verify_password("correct horsE", scrypt_value)
    assert not auth.verify_password("", scrypt_value)
    auth.validate_password_value(scrypt_value)


def test_hash_is_salted():
    assert auth.hash_password("same") != auth.hash_password("same")


def test_hash_is_scrypt_as_documented(scrypt_value):
    _, params, salt, key = re.split(r"[}$]", scrypt_value)
    expected = hashlib.scrypt(b"correct horse", salt=base64.b64decode(salt), n=2**14, r=8, p=1, dklen=32)
    assert base64.b64decode(key) == expected


def test_non_ascii_password():
    value = auth.hash_password("pässwörd ✓")
    assert auth.verify_password("pässwörd ✓", value)
    assert auth.verify_password("pässwörd ✓", "{PLAIN}pässwörd ✓")
    assert not auth.verify_password("passwort", "{PLAIN}pässwörd ✓")


def test_plain_values():
    assert auth.verify_password("s3cret", "{PLAIN}s3cret")
    assert not auth.verify_password("s3cre", "{PLAIN}s3cret")
    assert not auth.verify_password("", "{PLAIN}")  # an empty secret never matches
    assert auth.verify_password("a;b#c $%", "{PLAIN}a;b#c $%")


@pytest.mark.parametrize("value", [
    "", "secret", "{SHA}abc", "{PLAIN}", "{SCRYPT}", "{SCRYPT}n=16384,r=8,p=1$abc",
    "{SCRYPT}n=1000,r=8,p=1$c2FsdA==$" + "A" * 43 + "=",  # n not a power of two
    "{SCRYPT}n=33554432,r=8,p=1$c2FsdA==$" + "A" * 43 + "=",  # absurd cost
    "{SCRYPT}n=16384,r=8,p=1$c2Fsd!==$" + "A" * 43 + "=",  # not base64
])
def test_malformed_stored_values(value):
    with pytest.raises(ValueError):
        auth.validate_password_value(value)
    assert not auth.verify_password("", value)
    assert not auth.verify_password("secret", value)


# ---------------------------------------------------------------------------
# Authenticator


@pytest.fixture(scope="module")
def users(scrypt_value):
    return {
        "alice": User("alice", scrypt_value, frozenset({"example.com"})),
        "bob": User("bob", "{PLAIN}bobs secret", frozenset({"example.org"})),
    }


def test_check_password(users):
    a = Authenticator(users)
    assert a.check_password("alice", "correct horse") is users["alice"]
    assert a.check_password("alice", "wrong") is None
    assert a.check_password("bob", "bobs secret") is users["bob"]
    assert a.check_password("bob", "bobs secreT") is None
    assert a.check_password("mallory", "correct horse") is None
    assert a.check_password("Alice", "correct horse") is None  # names match exactly
    assert a.check_password("", "") is None


def kdf_runs(call):
    """The KDF runs (scrypt, PBKDF2 with its count) `call` makes: the real hashlib
    functions, watched with sys.setprofile, not replaced."""
    import sys

    runs = []

    def watch(frame, event, arg):
        if event == "c_call" and arg in (hashlib.scrypt, hashlib.pbkdf2_hmac):
            runs.append("scrypt" if arg is hashlib.scrypt else f"pbkdf2-{frame.f_locals.get('iterations')}")

    sys.setprofile(watch)
    try:
        call()
    finally:
        sys.setprofile(None)
    return runs


def test_one_kdf_run_per_password_check():
    """review-1 m8: a PLAIN/LOGIN guess costs one KDF, the user's own or its name's decoy,
    and made-up names cost what the configured secrets cost, each name always the same.
    (A cheap scrypt cost here: the decoys cost what the configured secrets do.)"""
    salt = b"0123456789abcdef"
    key = hashlib.scrypt(b"correct horse", salt=salt, n=1024, r=8, p=1, dklen=32)
    scrypt_value = f"{{SCRYPT}}n=1024,r=8,p=1${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"
    users = {"alice": User("alice", scrypt_value, frozenset({"example.com"})),
             "sam": User("sam", auth.scram.make_secret("pw", iterations=4096).encode(), frozenset({"example.com"})),
             "bob": User("bob", "{PLAIN}bobs secret", frozenset({"example.org"}))}
    a = Authenticator(users)
    assert kdf_runs(lambda: a.check_password("alice", "wrong")) == ["scrypt"]
    assert kdf_runs(lambda: a.check_password("alice", "correct horse")) == ["scrypt"]
    assert kdf_runs(lambda: a.check_password("sam", "wrong")) == ["pbkdf2-4096"]
    for name in ("bob", "nobody", "Alice", ""):
        runs = kdf_runs(lambda: a.check_password(name, "bobs secret"))
        assert len(runs) == 1 and runs[0] in ("scrypt", "pbkdf2-4096"), (name, runs)
        assert kdf_runs(lambda: a.check_password(name, "other")) == runs  # stable per name
    made_up = {kdf_runs(lambda: a.check_password(f"user{i}", "x"))[0] for i in range(30)}
    assert made_up == {"scrypt", "pbkdf2-4096"}
    assert a.check_password("bob", "bobs secret") is users["bob"] and a.check_password("nobody", "") is None
    # Without a KDF secret configured, hash_password's scrypt is the decoy.
    lone = Authenticator({"bob": users["bob"]})
    assert kdf_runs(lambda: lone.check_password("nobody", "x")) == ["scrypt"]


def test_unknown_user_costs_about_the_same(users):
    a = Authenticator(users)

    def cost(user, password, rounds=5):
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            a.check_password(user, password)
            best = min(best, time.perf_counter() - t)
        return best

    wrong = cost("alice", "wrong password")
    unknown = cost("nobody", "wrong password")
    plain_wrong = cost("bob", "wrong password")
    print(f"wrong={wrong:.4f}s unknown={unknown:.4f}s plain-wrong={plain_wrong:.4f}s")
    assert 1 / 3 < unknown / wrong < 3
    assert 1 / 3 < plain_wrong / wrong < 3


def _cram(secret: str, challenge: bytes) -> str:
    return hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest()


def test_cram_md5(users):
    a = Authenticator(users)
    challenge = auth.cram_md5_challenge("mx2.test")
    assert a.check_cram_md5("bob", challenge, _cram("bobs secret", challenge)) is users["bob"]
    assert a.check_cram_md5("bob", challenge, _cram("bobs secret", challenge).upper()) is users["bob"]
    assert a.check_cram_md5("bob", challenge, _cram("bobs secreT", challenge)) is None
    other = auth.cram_md5_challenge("mx2.test")
    assert a.check_cram_md5("bob", other, _cram("bobs secret", challenge)) is None  # replay
    # {SCRYPT} users cannot use CRAM-MD5, even with the right password.
    assert a.check_cram_md5("alice", challenge, _cram("correct horse", challenge)) is None
    assert a.check_cram_md5("nobody", challenge, _cram("", challenge)) is None
    assert a.check_cram_md5("bob", challenge, "not hex ü") is None


def test_cram_md5_known_vector():
    # The exchange from curl's IMAP CRAM-MD5 test (user "user", secret "secret"),
    # checked byte for byte as it crosses the wire.
    challenge = base64.b64decode("PDE5NzIuOTg3NjU0MzIxQGN1cmw+")
    assert challenge == b"<1972.987654321@curl>"
    a = Authenticator({"user": User("user", "{PLAIN}secret")})
    name, digest = auth.decode_cram_md5_response("dXNlciA3MDMxNzI1NTk5ZmRiYjVkNDEyNjg5YWEzMjNlM2UwYg==")
    assert (name, digest) == ("user", "7031725599fdbb5d412689aa323e3e0b")
    assert a.check_cram_md5(name, challenge, digest) is not None


def test_challenges_are_fresh():
    seen = {auth.cram_md5_challenge("mx2.example.net") for _ in range(200)}
    assert len(seen) == 200
    for c in seen:
        assert re.fullmatch(rb"<\d+\.\d+@mx2\.example\.net>", c)


# ---------------------------------------------------------------------------
# SASL decoding


def test_decode_sasl_plain():
    assert auth.decode_sasl_plain(b64(b"\0user\0pass")) == ("", "user", "pass")
    assert auth.decode_sasl_plain(b64(b"user\0user\0pass").decode()) == ("user", "user", "pass")
    assert auth.decode_sasl_plain(b64("\0ü\0p w".encode())) == ("", "ü", "p w")


@pytest.mark.parametrize("payload", [
    b"", b"=", b"!!!!", b"AGZvbwBiYXI", b"AGZvbwBiYXI= ", b" AGZvbwBiYXI=", b"AGZv\nbwBiYXI=",
    b64(b"user\0pass"), b64(b"\0\0pass"), b64(b"\0user\0"), b64(b"a\0b\0c\0d"), b64(b"\0us\xffer\0pass"),
    "AGZvbwBiYXI=\u00e9",
])
def test_decode_sasl_plain_rejects(payload):
    with pytest.raises(SASLSyntaxError):
        auth.decode_sasl_plain(payload)


def test_authzid_rule():
    assert auth.authzid_acceptable("", "alice")
    assert auth.authzid_acceptable("alice", "alice")
    assert not auth.authzid_acceptable("bob", "alice")
    assert not auth.authzid_acceptable("Alice", "alice")


def test_decode_base64_strict():
    assert auth.decode_base64_strict("=") == b""
    assert auth.decode_base64_strict(b"") == b""
    assert auth.decode_base64_strict("dXNlcg==") == b"user"
    for bad in ("dXNlcg=", "dXNlcg", "dXN lcg==", "dXNlcg==\r\n", "*", "dXNlcg==x", "ü"):
        with pytest.raises(SASLSyntaxError):
            auth.decode_base64_strict(bad)


def test_decode_login_and_cram_response():
    assert auth.decode_sasl_login(b64("jürgen".encode())) == "jürgen"
    with pytest.raises(SASLSyntaxError):
        auth.decode_sasl_login(b64(b"\xff"))
    assert auth.decode_cram_md5_response(b64(b"a user " + b"0" * 32)) == ("a user", "0" * 32)
    for bad in (b64(b"user"), b64(b" " + b"0" * 32), b64(b"user " + b"0" * 31), b64(b"user " + b"g" * 32)):
        with pytest.raises(SASLSyntaxError):
            auth.decode_cram_md5_response(bad)


def test_random_garbage_never_escapes_as_another_error():
    seed = random.randrange(2**32)
    print("seed", seed)
    rng = random.Random(seed)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \0\r\n\xff"
    for _ in range(2000):
        payload = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for fn in (auth.decode_sasl_plain, auth.decode_sasl_login, auth.decode_cram_md5_response):
            try:
                fn(payload)
            except SASLSyntaxError:
                pass


# ---------------------------------------------------------------------------
# etrnclient against a tiny SMTP server (real sockets, real TLS via TLSLayer)


class Conn:
    """Blocking line I/O over a socket, through a TLSLayer once TLS is on."""

    def __init__(self, sock):
        self.sock = sock
        self.layer = None
        self.buf = b""

    def start_tls(self, ctx):
        self.buf = b""  # RFC 3207: plaintext pipelined after STARTTLS is dropped
        self.layer = tls.TLSLayer(ctx)

    def send(self, data: bytes):
        if self.layer is None:
            self.sock.sendall(data)
        else:
            self.layer.send(data)
            self.sock.sendall(self.layer.outgoing())

    def readline(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if self.layer is None:
                if not data:
                    return None
                self.buf += data
            else:
                self.buf += self.layer.receive(data)
                out = self.layer.outgoing()
                if out:
                    self.sock.sendall(out)
                if self.layer.closed and b"\r\n" not in self.buf:
                    return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode("utf-8", "replace")


class TinySMTP:
    """Just enough of the backup MX for `backupmx etrn`: one connection at a time."""

    def __init__(self, users, *, ctx, implicit_tls=False, starttls=True, mechs="PLAIN LOGIN CRAM-MD5",
                 queued=None):
        self.auth = Authenticator(users)
        self.ctx, self.implicit_tls, self.starttls, self.mechs = ctx, implicit_tls, starttls, mechs
        self.queued = queued or {}
        self.lines = []  # every command line, as received (plaintext or decrypted)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        with sock:
            sock.settimeout(10)
            try:
                self._session(Conn(sock))
            except (OSError, tls.TLSError):
                pass

    def _session(self, c):
        if self.implicit_tls:
            c.start_tls(self.ctx)
        c.send(b"220 tiny ESMTP\r\n")
        user = None
        while True:
            line = c.readline()
            if line is None:
                return
            self.lines.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                caps = ["tiny", "ETRN"]
                if self.starttls and c.layer is None:
                    caps.append("STARTTLS")
                if c.layer is not None:
                    caps.append("AUTH " + self.mechs)
                c.send("".join(f"250{'-' if i < len(caps) - 1 else ' '}{cap}\r\n"
                               for i, cap in enumerate(caps)).encode())
            elif verb == "STARTTLS":
                c.send(b"220 2.0.0 Ready to start TLS\r\n")
                c.start_tls(self.ctx)
            elif verb == "AUTH":
                user = self._auth(c, arg) or user
            elif verb == "ETRN":
                if user is None:
                    c.send(b"530 5.7.0 Authentication required\r\n")
                elif arg.lstrip("@") not in user.domains:
                    c.send(f"459 4.7.1 {arg} not allowed\r\n".encode())
                elif self.queued.get(arg):
                    c.send(f"253 {self.queued[arg]} pending messages for node {arg} started\r\n".encode())
                else:
                    c.send(b"251 OK no messages waiting for node " + arg.encode() + b"\r\n")
            elif verb == "QUIT":
                c.send(b"221 2.0.0 Bye\r\n")
                return
            else:
                c.send(b"502 5.5.2 Error: command not recognized\r\n")

    def _auth(self, c, arg):
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        ok = None
        try:
            if mech == "PLAIN":
                authzid, authcid, password = auth.decode_sasl_plain(initial)
                if auth.authzid_acceptable(authzid, authcid):
                    ok = self.auth.check_password(authcid, password)
            elif mech == "LOGIN":
                c.send(b"334 " + b64(b"Username:") + b"\r\n")
                name = auth.decode_sasl_login(c.readline())
                c.send(b"334 " + b64(b"Password:") + b"\r\n")
                ok = self.auth.check_password(name, auth.decode_sasl_login(c.readline()))
            elif mech == "CRAM-MD5":
                challenge = auth.cram_md5_challenge("tiny")
                c.send(b"334 " + b64(challenge) + b"\r\n")
                name, digest = auth.decode_cram_md5_response(c.readline())
                ok = self.auth.check_cram_md5(name, challenge, digest)
            else:
                c.send(b"504 5.5.4 Unrecognized authentication type\r\n")
                return None
        except SASLSyntaxError:
            c.send(b"501 5.5.2 Cannot decode response\r\n")
            return None
        c.send(b"235 2.7.0 Authentication successful\r\n" if ok else b"535 5.7.8 Authentication failed\r\n")
        return ok

    def close(self):
        self.listener.close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def etrn_users():
    return {
        "primary": User("primary", auth.hash_password("pw ü;#"), frozenset({"example.com", "example.net"})),
        "plainuser": User("plainuser", "{PLAIN}plain pw", frozenset({"example.com"})),
    }


@pytest.fixture(scope="module")
def good_ctx():
    return tls.server_context(os.path.join(CERTS, "server.pem"), os.path.join(CERTS, "server.key"))


@pytest.fixture
def tiny(etrn_users, good_ctx):
    servers = []

    def make(**kw):
        s = TinySMTP(etrn_users, ctx=kw.pop("ctx", good_ctx), **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def _run(server, domains, user="primary", password="pw ü;#", **kw):
    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("cafile", CA)
    kw.setdefault("timeout", 10)
    rc = etrnclient.run("127.0.0.1", server.port, domains, user=user, password=password,
                        out=out, err=err, **kw)
    return rc, out.getvalue(), err.getvalue()


def test_etrn_starttls_scrypt_user_uses_plain(tiny):
    # CRAM-MD5 is offered (another user has a {PLAIN} secret) but this user's is
    # {SCRYPT}: the client goes straight to PLAIN and spends no failed attempt.
    s = tiny(queued={"example.com": 3})
    rc, out, err = _run(s, ["example.com", "example.net"])
    assert (rc, err) == (0, ""), err
    assert out.splitlines() == [
        "ETRN example.com: 253 3 pending messages for node example.com started",
        "ETRN example.net: 251 OK no messages waiting for node example.net",
    ]
    verbs = [line.split()[0].upper() for line in s.lines if line.split()]
    assert verbs[:2] == ["EHLO", "STARTTLS"]
    assert "AUTH" in verbs and verbs.index("AUTH") > verbs.index("STARTTLS")
    assert verbs.count("AUTH") == 1


def test_etrn_cram_md5_when_it_is_the_only_mechanism(tiny):
    s = tiny(mechs="CRAM-MD5")
    rc, out, err = _run(s, ["example.com"], user="plainuser", password="plain pw")
    assert rc == 0, err
    auths = [line for line in s.lines if line.upper().startswith("AUTH")]
    assert auths == ["AUTH CRAM-MD5"]
    assert not any("plain pw" in line for line in s.lines)


def test_etrn_login_only(tiny):
    s = tiny(mechs="LOGIN")
    rc, out, err = _run(s, ["example.com"])
    assert rc == 0, err


def test_etrn_implicit_tls(tiny):
    s = tiny(implicit_tls=True)
    rc, out, err = _run(s, ["example.com"], implicit_tls=True)
    assert rc == 0, err
    assert "STARTTLS" not in [line.upper() for line in s.lines]


def test_etrn_not_allowed_is_ex_noperm(tiny):
    s = tiny()
    rc, out, err = _run(s, ["example.com", "example.org"])
    assert rc == 77  # EX_NOPERM: 459, the user may not flush example.org
    assert "ETRN example.org: 459" in out and "ETRN example.com: 251" in out


def test_etrn_wrong_password(tiny):
    s = tiny()
    rc, out, err = _run(s, ["example.com"], password="nope")
    assert rc == 77 and out == ""  # EX_NOPERM: retrying will not help
    assert err.count("\n") == 1 and "authentication failed" in err and "535" in err
    assert not any(line.upper().startswith("ETRN") for line in s.lines)


def test_etrn_untrusted_certificate(tiny):
    other = tls.server_context(os.path.join(CERTS, "other.pem"), os.path.join(CERTS, "other.key"))
    s = tiny(ctx=other)
    rc, out, err = _run(s, ["example.com"])
    assert rc == 78 and err.count("\n") == 1 and "certificate" in err  # EX_CONFIG
    assert not any(line.upper().startswith("AUTH") for line in s.lines)
    s2 = tiny(ctx=other)
    rc, out, err = _run(s2, ["example.com"], insecure=True, cafile=None)
    assert rc == 0, err


def test_etrn_refuses_server_without_starttls(tiny):
    s = tiny(starttls=False)
    rc, out, err = _run(s, ["example.com"])
    assert rc == 78 and "STARTTLS" in err and err.count("\n") == 1  # EX_CONFIG
    assert not any(line.upper().startswith("AUTH") for line in s.lines)


def test_etrn_connection_refused():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    err = io.StringIO()
    rc = etrnclient.run("127.0.0.1", port, ["example.com"], user="u", password="p", cafile=CA,
                        timeout=5, out=io.StringIO(), err=err)
    assert rc == 75  # EX_TEMPFAIL: try again later
    assert err.getvalue().startswith(f"backupmx etrn: 127.0.0.1:{port}: ")
    assert err.getvalue().count("\n") == 1


def test_etrn_starttls_against_an_implicit_tls_port_hints_at_tls(tiny):
    s = tiny(implicit_tls=True)  # it waits for a TLS ClientHello; the client for a greeting
    rc, out, err = _run(s, ["example.com"], timeout=0.2)  # never greeted: the client gives up at its timeout
    assert rc == 75 and err.count("\n") == 1, err  # EX_TEMPFAIL: nothing certain yet
    assert "add --tls" in err


def test_etrn_implicit_tls_against_a_plain_port_hints_at_starttls(tiny):
    s = tiny()  # its plaintext 220 is no TLS record
    rc, out, err = _run(s, ["example.com"], implicit_tls=True)
    assert rc == 78 and err.count("\n") == 1, err  # EX_CONFIG: it will never work like this
    assert "leave out --tls" in err


@pytest.mark.parametrize("codes, status", [
    ([250, 251, 253], 0), ([253, 458], 75), ([458, 459], 77), ([459, 458], 77), ([421], 75),
    ([501], 64), ([502], 69), ([530], 77), ([535, 458], 77),
])
def test_etrn_statuses_combine_with_the_one_needing_a_person_first(codes, status):
    combined = 0
    for code in codes:
        combined = etrnclient.worse(combined, etrnclient.status_of_reply(code))
    assert combined == status


@pytest.mark.parametrize("target,default,expected", [
    ("mx2.example.net", 25, ("mx2.example.net", 25)),
    ("mx2.example.net:2525", 25, ("mx2.example.net", 2525)),
    ("[::1]:2525", 25, ("::1", 2525)),
    ("[::1]", 465, ("::1", 465)),
    ("::1", 25, ("::1", 25)),
    ("127.0.0.1:465", 25, ("127.0.0.1", 465)),
])
def test_parse_target(target, default, expected):
    assert etrnclient.parse_target(target, default) == expected


@pytest.mark.parametrize("target", ["host:", "host:0", "host:99999", "host:x", "[::1", "[::1]x", ":25"])
def test_parse_target_bad(target):
    with pytest.raises(ValueError):
        etrnclient.parse_target(target, 25)


def test_main_reads_password_file(tiny, tmp_path, capsys):
    s = tiny()
    pwfile = tmp_path / "pw"
    pwfile.write_text("pw ü;#\nsecond line ignored\n", encoding="utf-8")
    args = etrn_args(f"127.0.0.1:{s.port}", "--password-file", str(pwfile), "--cafile", CA)
    assert etrnclient.main(args) == 0
    assert "ETRN example.com: 251" in capsys.readouterr().out


def etrn_args(target, *options):
    """`backupmx etrn TARGET example.com --user primary OPTIONS...` as the CLI parses it."""
    return build_parser().parse_args(["etrn", target, "example.com", "--user", "primary", *options])


def test_main_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a tty: no prompt
    for target, options, needle, status in [
        ("127.0.0.1:1", [], "password-file", 64),  # EX_USAGE: no password source
        ("127.0.0.1:1", ["--password-file", str(tmp_path / "missing")], "missing", 78),  # EX_CONFIG
        ("127.0.0.1:x", ["--password-file", str(tmp_path)], "bad port", 64),
    ]:
        assert etrnclient.main(etrn_args(target, *options)) == status
        err = capsys.readouterr().err
        assert err.startswith("backupmx etrn: ") and err.count("\n") == 1 and needle in err, err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert etrnclient.main(etrn_args("127.0.0.1:1", "--password-file", str(empty))) == 78
    assert "empty" in capsys.readouterr().err


# -- the SASL exchanges the driver runs (auth.sasl_exchange) ---------------------------


def test_sasl_exchanges_step_by_step():
    plain = auth.sasl_exchange("PLAIN", "mx2.test")
    assert plain.step(None) == b""  # no initial response: an empty challenge (RFC 4954 4)
    assert plain.step(base64.b64encode(b"\0prim\0pw").decode()) == auth.Credentials("PLAIN", "prim", password="pw")
    login = auth.sasl_exchange("LOGIN", "mx2.test")
    assert login.step(None) == b"Username:"
    assert login.step(base64.b64encode(b"prim").decode()) == b"Password:"
    assert login.step(base64.b64encode(b"pw").decode()) == auth.Credentials("LOGIN", "prim", password="pw")
    cram = auth.sasl_exchange("CRAM-MD5", "mx2.test")
    challenge = cram.step(None)
    assert challenge.startswith(b"<") and challenge.endswith(b"@mx2.test>")
    digest = hmac.new(b"pw", challenge, hashlib.md5).hexdigest()
    credentials = cram.step(base64.b64encode(b"prim " + digest.encode()).decode())
    assert (credentials.username, credentials.challenge, credentials.digest) == ("prim", challenge, digest)
    assert auth.sasl_exchange("CRAM-MD5", "mx2.test").step(None) != challenge  # fresh each AUTH
    with pytest.raises(SASLSyntaxError):
        auth.sasl_exchange("PLAIN", "mx2.test").step("!!")


def test_verify_checks_what_the_exchange_ended_with(users):
    a = Authenticator(users)
    assert a.verify(auth.Credentials("PLAIN", "bob", password="bobs secret"))
    assert not a.verify(auth.Credentials("PLAIN", "bob", password="bobs secret", authzid="alice"))
    assert not a.verify(auth.Credentials("LOGIN", "bob", password="wrong"))


def test_offload_hands_results_back_through_its_descriptor():
    import select

    from backupmx.offload import Offload

    offload = Offload(2, "test")
    try:
        got = []
        offload.submit("session", lambda x: x * 2, 21, then=lambda future: got.append(future.result()))
        assert select.select([offload], [], [], 5)[0] == [offload]  # the loop wakes: nobody polls
        [(owner, then, future)] = offload.completed()
        then(future)
        assert (owner, got) == ("session", [42])
        assert offload.completed() == []
    finally:
        offload.close()
