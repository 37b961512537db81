"""SCRAM-SHA-256 (RFC 5802, RFC 7677): the arithmetic, the server exchange, the client, a real server."""

import base64
import io
import os
import signal
import smtplib
import ssl
import subprocess
import sys

import pytest

from backupmx import auth, etrnclient, scram
from backupmx.auth import Authenticator, SASLSyntaxError
from conftest import CERTS, REPO, start_server

# RFC 7677 section 3: user "user", password "pencil".
VECTOR = {
    "client_first": "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_first": "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "client_final": "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    "server_final": "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}


class User:
    def __init__(self, name, password, domains=frozenset({"example.com"})):
        self.name, self.password, self.domains = name, password, domains


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def unb64(data: bytes) -> str:
    return data.decode("utf-8")


def test_rfc7677_vector_client_side():
    client = scram.Client("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == VECTOR["client_first"]
    assert client.final(VECTOR["server_first"]) == VECTOR["client_final"]
    assert client.check(VECTOR["server_final"])
    assert not client.check("v=" + base64.b64encode(b"\0" * 32).decode())


def test_rfc7677_vector_server_side():
    secret = scram.make_secret("pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), iterations=4096)
    assert scram.parse_secret(secret.encode()) == secret  # the stored form round-trips
    final = scram.parse_client_final(VECTOR["client_final"])
    message = scram.auth_message(VECTOR["client_first"][3:], VECTOR["server_first"], final.without_proof)
    assert scram.verify_proof(secret, message, final.proof)
    assert scram.server_final(secret, message) == VECTOR["server_final"]
    assert not scram.verify_proof(secret, message, bytes(32))


@pytest.mark.parametrize("text, expected", [
    ("I\u00adX", "IX"),  # RFC 4013 section 3 examples: soft hyphen mapped to nothing
    ("user", "user"),
    ("USER", "USER"),  # case preserved
    ("\u00aa", "a"),  # NFKC
    ("\u2168", "IX"),
    ("a\u00a0b", "a b"),  # non-ASCII space mapped to space
    ("\u0007", None),  # prohibited control character
    ("\u0627\u0031", None),  # RandALCat must start and end the string
    ("", None),
])
def test_saslprep(text, expected):
    if expected is None:
        with pytest.raises(scram.ScramError):
            scram.saslprep(text)
    else:
        assert scram.saslprep(text) == expected


@pytest.fixture(scope="module")
def users():
    return {
        "scram": User("scram", auth.hash_password("right pw", "scram-sha-256")),
        "plain": User("plain", "{PLAIN}right pw"),
        "scrypt": User("scrypt", auth.hash_password("right pw")),
    }


def run_exchange(authenticator, user, password, *, authzid=""):
    """The server's exchange against our client: (Verified, server-final text or None)."""
    exchange = auth.sasl_exchange("SCRAM-SHA-256", "mx2.test", authenticator)
    client = scram.Client(user, password, authzid=authzid)
    assert exchange.step(None) == b""  # no initial response: an empty 334 (client-first mechanism)
    server_first = unb64(exchange.step(b64(client.first())))
    credentials = exchange.step(b64(client.final(server_first)))
    assert credentials.authzid == authzid
    verified = authenticator.verify(credentials)
    if verified:
        assert client.check(verified.final.decode())
        ack = auth.after_verification(credentials)
        assert ack.step("") == auth.Accepted(credentials)
    return verified, server_first


def test_scram_exchange_for_each_kind_of_secret(users):
    authenticator = Authenticator(users)
    assert run_exchange(authenticator, "scram", "right pw")[0]
    assert run_exchange(authenticator, "plain", "right pw")[0]  # a {PLAIN} secret serves SCRAM too
    assert not run_exchange(authenticator, "scram", "wrong pw")[0]
    assert not run_exchange(authenticator, "scrypt", "right pw")[0]  # {SCRYPT} cannot serve it
    assert not run_exchange(authenticator, "nobody", "right pw")[0]


def test_unknown_user_looks_like_a_real_one(users):
    a, again = Authenticator(users), Authenticator(dict(users))
    salt, iterations = a.scram_parameters("nobody")
    # Stable (another worker, a restart: the same answer), per name, at the default count.
    assert again.scram_parameters("nobody") == (salt, iterations)
    assert a.scram_parameters("nobody2")[0] != salt
    assert iterations == scram.DEFAULT_ITERATIONS == a.scram_parameters("plain")[1] == a.scram_parameters("scrypt")[1]
    assert len(salt) == len(a.scram_parameters("scram")[0])
    # Not computable without the configuration's secrets.
    other = Authenticator({"scram": User("scram", auth.hash_password("x", "scram-sha-256"))})
    assert other.scram_parameters("nobody")[0] != salt


def test_made_up_answers_use_the_usual_iteration_count():
    """review-1 m5: with doveadm's 4096 the usual count here, an unknown name, a {SCRYPT}
    and a {PLAIN} user answer i=4096 as the real SCRAM users do."""
    def at(count):
        return auth.scram.make_secret("pw", iterations=count).encode()

    users = {"a": User("a", at(4096)), "b": User("b", at(4096)), "c": User("c", at(100_000)),
             "s": User("s", auth.hash_password("pw")), "p": User("p", "{PLAIN}pw")}
    a = Authenticator(users)
    assert {name: a.scram_parameters(name)[1] for name in ("a", "b", "nobody", "s", "p", "c")} == \
        {"a": 4096, "b": 4096, "nobody": 4096, "s": 4096, "p": 4096, "c": 100_000}
    exchange = auth.sasl_exchange("SCRAM-SHA-256", "mx2.test", a)
    exchange.step(None)
    assert unb64(exchange.step(b64(scram.Client("nobody", "x").first()))).endswith(",i=4096")
    assert not run_exchange(a, "nobody", "pw")[0] and run_exchange(a, "p", "pw")[0]
    assert Authenticator({"s": users["s"]}).scram_parameters("nobody")[1] == scram.DEFAULT_ITERATIONS


def test_authzid_for_another_user_fails(users):
    authenticator = Authenticator(users)
    assert run_exchange(authenticator, "scram", "right pw", authzid="scram")[0]  # the user itself is fine
    assert not run_exchange(authenticator, "scram", "right pw", authzid="plain")[0]


def _client_first_step(users, first):
    exchange = auth.sasl_exchange("SCRAM-SHA-256", "mx2.test", Authenticator(users))
    return exchange.step(b64(first))


@pytest.mark.parametrize("first", [
    "p=tls-unique,,n=scram,r=abc",  # channel binding: not offered (no -PLUS)
    "x,,n=scram,r=abc",
    "n,,m=ext,n=scram,r=abc",  # mandatory extension
    "n,,n=scram",
    "n,,n=sc=ram,r=abc",  # "=" must be =3D
    "n,,n=scram,r=a,b",
    "n,,n=scram,r=",
])
def test_malformed_client_first_is_a_syntax_error(users, first):
    with pytest.raises(SASLSyntaxError):
        _client_first_step(users, first)


def test_y_flag_is_accepted_because_no_binding_is_offered(users):
    assert _client_first_step(users, "y,,n=scram,r=abc").startswith(b"r=abc")


@pytest.mark.parametrize("tamper", [
    lambda final: final.replace("c=biws", "c=eSws"),  # "y,," while the first said "n,,"
    lambda final: final.replace(",r=", ",r=X", 1),  # another nonce
    lambda final: final.replace(",p=", ",m=x,p=", 1),
    lambda final: final[:final.index(",p=")] + ",p=AAAA",  # short proof
])
def test_malformed_client_final_is_a_syntax_error(users, tamper):
    exchange = auth.sasl_exchange("SCRAM-SHA-256", "mx2.test", Authenticator(users))
    client = scram.Client("scram", "right pw")
    final = client.final(unb64(exchange.step(b64(client.first()))))
    with pytest.raises(SASLSyntaxError):
        exchange.step(b64(tamper(final)))


def test_after_the_server_final_only_an_empty_response_is_taken():
    ack = auth.after_verification(auth.Credentials("SCRAM-SHA-256", "u"))
    with pytest.raises(SASLSyntaxError):
        ack.step(b64("v=x"))


def test_plain_and_login_check_a_scram_secret(users):
    authenticator = Authenticator(users)
    assert authenticator.check_password("scram", "right pw") is users["scram"]
    assert authenticator.check_password("scram", "wrong pw") is None


def test_stored_values_are_validated():
    good = auth.hash_password("pw", "scram-sha-256")
    auth.validate_password_value(good)
    iterations, salt, stored, server = good[len("{SCRAM-SHA-256}"):].split(",")
    for bad in (f"{{SCRAM-SHA-256}}100,{salt},{stored},{server}",  # below RFC 7677's 4096
                f"{{SCRAM-SHA-256}}99999999,{salt},{stored},{server}",
                f"{{SCRAM-SHA-256}}{iterations},{salt},{stored[:-4]},{server}",
                f"{{SCRAM-SHA-256}}{iterations},{salt},{stored}"):
        with pytest.raises(ValueError):
            auth.validate_password_value(bad)


def test_passwd_scheme_scram(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "passwd", "--scheme", "scram-sha-256"],
                          input="pencil ü\n", capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    value = proc.stdout.strip()
    secret = scram.parse_secret(value)
    assert secret.iterations == scram.DEFAULT_ITERATIONS and len(secret.salt) == 16
    assert scram.matches_password(secret, "pencil ü")
    proc = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "passwd", "--scheme", "scram-sha-256"],
                          input="bell\x07\n", capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "SASLprep" in proc.stderr


# --- a real server, `backupmx etrn` and a hand-written client ------------------------


def forged_secret(password):
    """The right StoredKey (the proof passes) with a ServerKey that is not the user's:
    a server that does not really hold the secret, as the client must notice."""
    real = scram.make_secret(password)
    return scram.StoredSecret(real.salt, real.iterations, real.stored_key, os.urandom(32)).encode()


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("scram"), tls=True, auth_failure_delay="0.05s",
        auth_mechanisms="SCRAM-SHA-256 PLAIN LOGIN",  # offered although [user:scrypt] cannot serve SCRAM
        users={"scram": (auth.hash_password("scram pw", "scram-sha-256"), "example.com"),
               "plain": ("{PLAIN}plain pw", "example.com"),
               "scrypt": (auth.hash_password("scrypt pw"), "example.com"),
               "forged": (forged_secret("forged pw"), "example.com")})
    yield server
    try:
        server.stop(signal.SIGTERM)
    finally:
        server.kill_group()


NO_MAIL = "ETRN example.com: 251 2.0.0 No messages waiting for node example.com\n"


def etrn(server, user, password, **kw):
    out, err = io.StringIO(), io.StringIO()
    rc = etrnclient.run("localhost", server.port, ["example.com"], user=user, password=password,
                        cafile=str(CERTS / "ca.pem"), timeout=10, out=out, err=err, **kw)
    return rc, out.getvalue(), err.getvalue()


def test_backupmx_etrn_prefers_scram_and_checks_the_server(mx):
    assert etrn(mx, "scram", "scram pw") == (0, "ETRN example.com: 251 2.0.0 No messages waiting for node example.com\n", "")
    assert etrn(mx, "plain", "plain pw")[0] == 0
    log = mx.log()
    assert "auth client=127.0.0.1 user=scram mechanism=SCRAM-SHA-256" in log
    assert "auth client=127.0.0.1 user=plain mechanism=SCRAM-SHA-256" in log


def test_backupmx_etrn_refuses_a_server_with_a_wrong_signature(mx):
    rc, out, err = etrn(mx, "forged", "forged pw")
    assert rc != 0 and out == ""  # no ETRN sent
    assert "SCRAM signature is wrong" in err and err.count("\n") == 1


def test_scrypt_user_is_retried_with_plain_once_and_told_why(mx):
    """review-1 M2: an upgraded `backupmx etrn` against a {SCRYPT} user still hands the mail over."""
    rc, out, err = etrn(mx, "scrypt", "scrypt pw")
    assert (rc, out) == (0, NO_MAIL)
    assert err.count("\n") == 1 and "SCRAM-SHA-256 refused (535 5.7.8" in err and "trying PLAIN once" in err
    assert "passwd --scheme scram-sha-256" in err and "--mechanism PLAIN" in err
    assert "user=scrypt mechanism=PLAIN" in mx.log()
    # A wrong password fails both ways (77); one chosen with --mechanism is tried alone.
    rc, out, err = etrn(mx, "scrypt", "wrong pw")
    assert (rc, out) == (77, "") and err.count("\n") == 2 and "authentication failed: 535" in err
    rc, out, err = etrn(mx, "scrypt", "scrypt pw", mechanism="SCRAM-SHA-256")
    assert rc == 77 and "trying PLAIN" not in err
    assert etrn(mx, "scrypt", "scrypt pw", mechanism="PLAIN") == (0, NO_MAIL, "")


def test_no_plain_retry_over_an_unverified_session(mx):
    """With --insecure a man in the middle could answer 535 to get the password in PLAIN."""
    out, err = io.StringIO(), io.StringIO()
    rc = etrnclient.run("localhost", mx.port, ["example.com"], user="scrypt", password="scrypt pw", insecure=True,
                        timeout=10, out=out, err=err)
    assert rc == 77 and out.getvalue() == "" and "passwd --scheme scram-sha-256" in err.getvalue()
    assert err.getvalue().count("\n") == 1


def test_a_password_saslprep_refuses_is_a_local_problem(mx):
    """review-1 m6: the password file is to blame (78), not the server (69)."""
    with pytest.raises(scram.ScramError, match="U\\+0007"):
        scram.Client("scram", "bell\x07")
    rc, out, err = etrn(mx, "scram", "bell\x07")
    assert (rc, out) == (78, "") and "SASLprep prohibits U+0007" in err and "server" not in err


def _starttls(server):
    client = smtplib.SMTP("localhost", server.port, timeout=10)
    client.starttls(context=ssl.create_default_context(cafile=str(CERTS / "ca.pem")))
    client.ehlo("primary.test")
    return client


def test_scram_by_hand_over_the_wire(mx):
    """Each reply of the exchange as RFC 4954 and RFC 5802 give it: 334 server-first,
    334 server-final, 235 after the empty response; p= gets 501; a wrong proof 535."""
    with _starttls(mx) as client:
        assert client.esmtp_features["auth"].split() == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
        assert client.docmd("AUTH", "SCRAM-SHA-256 " + b64("p=tls-unique,,n=scram,r=abc"))[0] == 501
        assert client.docmd("AUTH", "SCRAM-SHA-256") == (334, b"")
        scram_client = scram.Client("scram", "wrong")
        code, text = client.docmd(b64(scram_client.first()))
        assert code == 334
        assert client.docmd(b64(scram_client.final(unb64(base64.b64decode(text)))))[0] == 535
        scram_client = scram.Client("scram", "scram pw")
        code, text = client.docmd("AUTH", "SCRAM-SHA-256 " + b64(scram_client.first()))
        code, text = client.docmd(b64(scram_client.final(unb64(base64.b64decode(text)))))
        assert code == 334 and scram_client.check(unb64(base64.b64decode(text)))
        assert client.docmd("")[0] == 235
        assert client.docmd("ETRN", "example.com")[0] == 251


# --- a server whose SCRAM messages are hostile: `backupmx etrn` blames it, with 69 ------------


class ScriptedBackupMX:
    """A fake backup MX on 127.0.0.1 over real TLS (tests/certs): STARTTLS, then AUTH
    SCRAM-SHA-256 answered with `answers` (each a function of the client's nonce giving
    the text to base64 into a 334, or a raw reply line); "*" gets 501, QUIT 221."""

    def __init__(self, answers):
        import socket
        import threading

        self.answers = list(answers)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(CERTS / "server.pem"), str(CERTS / "server.key"))
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        reader = conn.makefile("rb")
        conn.sendall(b"220 fake ESMTP\r\n")
        nonce = None
        try:
            while line := reader.readline():
                command = line.decode().strip()
                if command.upper().startswith("EHLO"):
                    extension = "AUTH SCRAM-SHA-256 PLAIN" if isinstance(conn, ssl.SSLSocket) else "STARTTLS"
                    conn.sendall(f"250-fake\r\n250 {extension}\r\n".encode())
                elif command.upper() == "STARTTLS":
                    conn.sendall(b"220 go ahead\r\n")
                    conn = context.wrap_socket(conn, server_side=True)
                    reader = conn.makefile("rb")
                elif command.upper().startswith("AUTH SCRAM-SHA-256 "):
                    first = base64.b64decode(command.split()[2]).decode()
                    nonce = first.rsplit("r=", 1)[1]
                    self._answer(conn, nonce)
                elif command == "*":
                    conn.sendall(b"501 5.7.0 cancelled\r\n")
                elif command.upper() == "QUIT":
                    conn.sendall(b"221 bye\r\n")
                    break
                elif nonce is not None and self.answers:
                    self._answer(conn, nonce)
                else:
                    conn.sendall(b"535 5.7.8 no\r\n")
        finally:
            conn.close()
            self.listener.close()

    def _answer(self, conn, nonce):
        answer = self.answers.pop(0)(nonce)
        conn.sendall(answer if isinstance(answer, bytes) else b"334 " + b64(answer).encode() + b"\r\n")


@pytest.mark.parametrize("answers, blame", [
    ([lambda nonce: f"r={nonce}xyz,s=c2FsdHNhbHQ=,i=\u00b2"], "unreasonable iteration count"),
    ([lambda nonce: f"r={nonce}xyz,s=c2FsdHNhbHQ=,i=99999999"], "unreasonable iteration count"),
    ([lambda nonce: f"r={nonce}xyz,s=c2FsdHNhbHQ=,i=4096", lambda nonce: b"334 !not base64!\r\n"], "not base64"),
], ids=["unicode-digit", "huge", "final-not-base64"])
def test_a_server_with_unusable_scram_messages_is_blamed(answers, blame):
    """review-1 m6: never `internal error` (exit 1), always 69 with the server named."""
    server = ScriptedBackupMX(answers)
    out, err = io.StringIO(), io.StringIO()
    rc = etrnclient.run("localhost", server.port, ["example.com"], user="u", password="pw",
                        cafile=str(CERTS / "ca.pem"), timeout=10, out=out, err=err)
    server.thread.join(10)
    assert (rc, out.getvalue()) == (69, "")
    assert "server sent an unusable SCRAM message" in err.getvalue() and blame in err.getvalue()


def test_etrn_arguments_that_are_not_ascii_are_never_an_internal_error(mx, tmp_path, capsys):
    from backupmx.cli import main

    password_file = tmp_path / "pw"
    password_file.write_text("scram pw\n")
    common = ["--password-file", str(password_file), "--cafile", str(CERTS / "ca.pem"), "--timeout", "10"]
    assert main(["etrn", f"localhost:{mx.port}", "Bücher.example", "@example.com", "--user", "scram", *common]) == 77
    out, err = capsys.readouterr()
    assert out.startswith("ETRN xn--bcher-kva.example: 459") and "ETRN @example.com: 25" in out and err == ""
    assert main(["etrn", f"localhost:{mx.port}", "exa\u00admple.com", "--user", "scram", *common]) == 64
    assert main(["etrn", f"localhost:{mx.port}", "example.com", "--user", "\udcff", "--mechanism", "PLAIN",
                 *common]) == 64
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 2 and "internal error" not in err
