"""SCRAM-SHA-256 (RFC 5802, RFC 7677): the key arithmetic and the message grammar, no I/O.

Both sides use it: the server's SASL exchange (auth.py) and the client of
`backupmx etrn` (etrnclient.py). Pure functions over bytes and str; the only
randomness is a nonce from `secrets`.

  SaltedPassword  = PBKDF2-HMAC-SHA-256(Normalize(password), salt, i)
  ClientKey       = HMAC(SaltedPassword, "Client Key")
  StoredKey       = H(ClientKey)
  ServerKey       = HMAC(SaltedPassword, "Server Key")
  AuthMessage     = client-first-message-bare "," server-first-message ","
                    client-final-message-without-proof
  ClientSignature = HMAC(StoredKey, AuthMessage)
  ClientProof     = ClientKey XOR ClientSignature
  ServerSignature = HMAC(ServerKey, AuthMessage)

The server keeps (salt, i, StoredKey, ServerKey): enough to check a proof
and to prove itself, not enough to log in as the user (RFC 5802 section 9).
The stored form is Dovecot's, so a secret from `doveadm pw -s SCRAM-SHA-256`
works as it is:

  {SCRAM-SHA-256}<iterations>,<salt base64>,<StoredKey base64>,<ServerKey base64>

Channel binding (the -PLUS variant) is not offered: a client sends the
gs2 header "n,," (no binding) or "y,," (it could bind but the server does
not offer it, RFC 5802 section 6); "p=" is refused.
"""

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

PREFIX = "{SCRAM-SHA-256}"
MECHANISM = "SCRAM-SHA-256"
# RFC 7677 section 4 asks for at least 4096; a default that costs about as much
# as a {SCRYPT} check (~30 ms here) makes a leaked secret as slow to attack.
DEFAULT_ITERATIONS = 100_000
MIN_ITERATIONS = 4096
# A typo in a config must not make each check cost seconds.
MAX_ITERATIONS = 1_000_000
SALT_BYTES = 16
KEY_BYTES = 32  # SHA-256 output
NONCE_BYTES = 18  # 24 base64 characters

_STORED = re.compile(r"([0-9]{1,8}),([A-Za-z0-9+/]+={0,2}),([A-Za-z0-9+/]+={0,2}),([A-Za-z0-9+/]+={0,2})")
# RFC 5802 section 7: printable = %x21-2B / %x2D-7E ; Printable ASCII except ","
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
# saslname = 1*(value-safe-char / "=2C" / "=3D"); value-safe-char excludes NUL, "," and "="
_SASLNAME = re.compile(r"(?:[^\x00,=]|=2C|=3D)+")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# The server's iteration count "i=" (RFC 5802 section 7 posit-number), at most MAX_ITERATIONS' digits.
_COUNT = re.compile(r"[0-9]{1,7}")


class ScramError(ValueError):
    """A SCRAM message that is not the grammar of RFC 5802 section 7, or a value
    (a password, a stored secret) that SCRAM cannot use."""


@dataclass(frozen=True)
class StoredSecret:
    """What the server keeps for a user (RFC 5802 section 3)."""
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
        return f"{PREFIX}{self.iterations},{b64(self.salt)},{b64(self.stored_key)},{b64(self.server_key)}"


# ---------------------------------------------------------------------------
# Normalize() (RFC 5802 2.2): SASLprep, RFC 4013, with the stdlib's stringprep tables


_PROHIBITED = (stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
               stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
               stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
               stringprep.in_table_c9, stringprep.in_table_a1)


def saslprep(text: str) -> str:
    """RFC 4013 as a "stored string" (unassigned code points refused): ScramError when refused.

    Section 2.1: non-ASCII spaces become a space, "commonly mapped to nothing"
    characters go; 2.2: NFKC; 2.3: prohibited output; 2.4: RFC 3454 section 6 bidi.
    """
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    normal = unicodedata.normalize("NFKC", mapped)
    if not normal:
        raise ScramError("empty after SASLprep")
    for char in normal:
        if any(table(char) for table in _PROHIBITED):
            raise ScramError(f"SASLprep prohibits U+{ord(char):04X}")
    if any(stringprep.in_table_d1(c) for c in normal):
        if any(stringprep.in_table_d2(c) for c in normal) or not (
                stringprep.in_table_d1(normal[0]) and stringprep.in_table_d1(normal[-1])):
            raise ScramError("SASLprep: mixed or badly placed right-to-left text")
    return normal


# ---------------------------------------------------------------------------
# Keys


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """Hi(Normalize(password), salt, i) = PBKDF2-HMAC-SHA-256 (RFC 5802 2.2). CPU-bound."""
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)


def client_key(salted: bytes) -> bytes:
    return _hmac(salted, b"Client Key")


def make_secret(password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> StoredSecret:
    """The stored secret for `password` (random salt unless one is given)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    salted = salted_password(password, salt, iterations)
    return StoredSecret(salt, iterations, hashlib.sha256(client_key(salted)).digest(), _hmac(salted, b"Server Key"))


def _b64decode(text: str, what: str) -> bytes:
    if not _BASE64.fullmatch(text):
        raise ScramError(f"{what} is not base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError(f"{what} is not base64") from None


def parse_secret(value: str) -> StoredSecret:
    """A {SCRAM-SHA-256} value from the config; ScramError (one line) when malformed."""
    m = _STORED.fullmatch(value[len(PREFIX):]) if value.startswith(PREFIX) else None
    if m is None:
        raise ScramError("malformed {SCRAM-SHA-256} value (expected {SCRAM-SHA-256}iterations,salt,StoredKey,ServerKey)")
    iterations = int(m[1])
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ScramError(f"{{SCRAM-SHA-256}} iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}")
    salt, stored, server = (_b64decode(m[n], "{SCRAM-SHA-256} field") for n in (2, 3, 4))
    if not salt or len(stored) != KEY_BYTES or len(server) != KEY_BYTES:
        raise ScramError("{SCRAM-SHA-256} salt is empty or a key is not 32 bytes")
    return StoredSecret(salt, iterations, stored, server)


def matches_password(secret: StoredSecret, password: str) -> bool:
    """Does `password` (from PLAIN or LOGIN) derive this secret's StoredKey? Constant time."""
    try:
        salted = salted_password(password, secret.salt, secret.iterations)
    except ScramError:
        return False
    return hmac.compare_digest(hashlib.sha256(client_key(salted)).digest(), secret.stored_key)


def new_nonce() -> str:
    """A fresh nonce: printable, no ",", from `secrets` (RFC 5802 section 5.1 "r=")."""
    return base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode("ascii")


# ---------------------------------------------------------------------------
# Messages (RFC 5802 section 7)


def encode_saslname(name: str) -> str:
    """"," and "=" in a user name are written "=2C" and "=3D"."""
    return name.replace("=", "=3D").replace(",", "=2C")


def decode_saslname(text: str) -> str:
    if not _SASLNAME.fullmatch(text):
        raise ScramError("bad saslname")
    return text.replace("=2C", ",").replace("=3D", "=")


def _attributes(text: str, names: str) -> list[str]:
    """The values of comma-separated "x=value" attributes that must come in the order `names`."""
    parts = text.split(",")
    if len(parts) != len(names):
        raise ScramError(f"expected the attributes {','.join(names)}")
    values = []
    for part, name in zip(parts, names):
        if part[:2] != name + "=":
            raise ScramError(f"expected {name}= (extensions such as m= are not supported)")
        values.append(part[2:])
    return values


@dataclass(frozen=True)
class ClientFirst:
    gs2_header: str  # "n,," or "y,," with an optional "a=authzid" between the commas
    authzid: str
    username: str
    nonce: str
    bare: str  # client-first-message-bare, as sent (part of AuthMessage)


def parse_client_first(message: str) -> ClientFirst:
    """gs2-header client-first-message-bare; channel binding ("p=") is refused."""
    flag, sep, rest = message.partition(",")
    if not sep:
        raise ScramError("no gs2 header")
    if flag.startswith("p="):
        raise ScramError("channel binding is not offered (no SCRAM-SHA-256-PLUS)")
    if flag not in ("n", "y"):
        raise ScramError("bad gs2 channel binding flag")
    authzid_part, sep, bare = rest.partition(",")
    if not sep:
        raise ScramError("no gs2 header")
    authzid = ""
    if authzid_part:
        if not authzid_part.startswith("a="):
            raise ScramError("bad gs2 authzid")
        authzid = decode_saslname(authzid_part[2:])
    name, nonce = _attributes(bare, "nr")
    if not _NONCE.fullmatch(nonce):
        raise ScramError("bad client nonce")
    return ClientFirst(f"{flag},{authzid_part},", authzid, decode_saslname(name), nonce, bare)


def server_first(nonce: str, salt: bytes, iterations: int) -> str:
    return f"r={nonce},s={base64.b64encode(salt).decode('ascii')},i={iterations}"


@dataclass(frozen=True)
class ClientFinal:
    channel_binding: str  # the "c=" value: base64 of the gs2 header when nothing is bound
    nonce: str
    proof: bytes
    without_proof: str  # client-final-message-without-proof (part of AuthMessage)


def parse_client_final(message: str) -> ClientFinal:
    head, sep, proof = message.rpartition(",p=")
    if not sep:
        raise ScramError("no proof")
    binding, nonce = _attributes(head, "cr")
    raw = _b64decode(proof, "proof")
    if len(raw) != KEY_BYTES:
        raise ScramError("the proof is not 32 bytes")
    return ClientFinal(binding, nonce, raw, head)


def auth_message(client_first_bare: str, server_first_message: str, client_final_without_proof: str) -> bytes:
    return f"{client_first_bare},{server_first_message},{client_final_without_proof}".encode("utf-8")


def verify_proof(secret: StoredSecret, message: bytes, proof: bytes) -> bool:
    """RFC 5802 section 3: ClientKey = ClientProof XOR ClientSignature; H(ClientKey) must be StoredKey."""
    signature = _hmac(secret.stored_key, message)
    key = bytes(a ^ b for a, b in zip(proof, signature))
    return hmac.compare_digest(hashlib.sha256(key).digest(), secret.stored_key)


def server_final(secret: StoredSecret, message: bytes) -> str:
    return "v=" + base64.b64encode(_hmac(secret.server_key, message)).decode("ascii")


# ---------------------------------------------------------------------------
# The client side (backupmx etrn)


class Client:
    """One SCRAM-SHA-256 exchange as the client: first(), final(server_first), check(server_final)."""

    def __init__(self, username: str, password: str, nonce: str | None = None, authzid: str = ""):
        """ScramError here for a user name or password SASLprep refuses: a local
        problem (the password file), never blamed on the server's messages."""
        self.username = saslprep(username)
        self.password = saslprep(password)
        self.nonce = nonce or new_nonce()
        self._gs2_header = f"n,a={encode_saslname(authzid)}," if authzid else "n,,"
        self._bare = f"n={encode_saslname(self.username)},r={self.nonce}"
        self._message = None
        self._server_key = None

    def first(self) -> str:
        return self._gs2_header + self._bare

    def final(self, server_first_message: str) -> str:
        """The client-final message; ScramError when the server's message is not usable."""
        nonce, salt_text, iterations_text = _attributes(server_first_message, "rsi")
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce) or not _NONCE.fullmatch(nonce):
            raise ScramError("the server's nonce does not extend ours")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if not _COUNT.fullmatch(iterations_text) or not MIN_ITERATIONS <= int(iterations_text) <= MAX_ITERATIONS:
            raise ScramError(f"unreasonable iteration count {iterations_text[:12]!r}")
        salt = _b64decode(salt_text, "salt")
        salted = salted_password(self.password, salt, int(iterations_text))
        without_proof = f"c={base64.b64encode(self._gs2_header.encode('utf-8')).decode('ascii')},r={nonce}"
        self._message = auth_message(self._bare, server_first_message, without_proof)
        key = client_key(salted)
        proof = bytes(a ^ b for a, b in zip(key, _hmac(hashlib.sha256(key).digest(), self._message)))
        self._server_key = _hmac(salted, b"Server Key")
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}"

    def check(self, server_final_message: str) -> bool:
        """True when the server proved it holds this user's secret (its "v=" signature)."""
        if self._message is None or not server_final_message.startswith("v="):
            return False
        expected = _hmac(self._server_key, self._message)
        try:
            got = _b64decode(server_final_message[2:], "server signature")
        except ScramError:
            return False
        return hmac.compare_digest(got, expected)
