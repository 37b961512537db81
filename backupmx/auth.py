"""Passwords and SASL checks for AUTH (RFC 4954): pure functions, no I/O.

Stored password formats (the `password` key of a [user:...] section):

  {SCRYPT}n=16384,r=8,p=1$<salt base64>$<hash base64>
      from `backupmx passwd` (hash_password); hashlib.scrypt, 16-byte random
      salt, 32-byte key, standard base64 with padding.  The cost parameters
      live in the value so they can be raised later without breaking old ones.
  {SCRAM-SHA-256}<iterations>,<salt>,<StoredKey>,<ServerKey>
      from `backupmx passwd --scheme scram-sha-256` (scram.py; Dovecot's form).
  {PLAIN}<secret>
      the secret as written; the only format CRAM-MD5 (RFC 2195) can use,
      because the server needs the secret itself to compute the HMAC.

Which secret serves which mechanism (SECRET_SERVES): {PLAIN} every one;
{SCRAM-SHA-256} SCRAM-SHA-256, PLAIN and LOGIN (a password given in clear
derives the StoredKey); {SCRYPT} PLAIN and LOGIN.

Mechanisms: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login),
CRAM-MD5 (RFC 2195) and SCRAM-SHA-256 (RFC 5802, RFC 7677).  The SMTP session frames the exchange (334 lines, "*",
line limits) and counts failures; the session's driver runs one SASL
exchange per AUTH (sasl_exchange: each response in, a challenge or the
Credentials out) and checks the Credentials off the event loop
(Authenticator.verify).  This module decodes and checks, in constant time,
and does no I/O.
"""

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from backupmx import scram

__all__ = [
    "MECHANISMS",
    "SECRET_SERVES",
    "Accepted",
    "Authenticator",
    "Credentials",
    "Verified",
    "SASLSyntaxError",
    "authzid_acceptable",
    "cram_md5_challenge",
    "decode_base64_strict",
    "decode_cram_md5_response",
    "decode_sasl_login",
    "decode_sasl_plain",
    "hash_password",
    "sasl_exchange",
    "secret_serves",
    "validate_password_value",
    "verify_password",
]

SCRYPT_PREFIX = "{SCRYPT}"
PLAIN_PREFIX = "{PLAIN}"
SCRAM_PREFIX = scram.PREFIX

# The SASL mechanisms the server can offer (auth_mechanisms lists a subset).
MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5")
# What each kind of stored secret can check.
SECRET_SERVES = {
    PLAIN_PREFIX: frozenset(MECHANISMS),
    SCRAM_PREFIX: frozenset({"SCRAM-SHA-256", "PLAIN", "LOGIN"}),
    SCRYPT_PREFIX: frozenset({"PLAIN", "LOGIN"}),
}

# hash_password's cost: about 16 MiB and a few tens of ms per check.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_KEY_BYTES = 32

# Bounds on parameters read from a config, so a typo cannot make every AUTH
# take minutes or gigabytes.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_MAX_MEM = 1024 * 1024 * 1024 + 1024 * 1024

_SCRYPT_RE = re.compile(
    r"n=(?P<n>[0-9]{1,8}),r=(?P<r>[0-9]{1,3}),p=(?P<p>[0-9]{1,3})"
    r"\$(?P<salt>[A-Za-z0-9+/]+={0,2})\$(?P<hash>[A-Za-z0-9+/]+={0,2})"
)

# What an unknown user (or a {PLAIN} one) is checked against when no user has a
# secret that costs a KDF run (Authenticator._decoys): hash_password's cost.
# No password hashes to this value (the "hash" is not the output of scrypt).
_DUMMY_HASH = (
    "{SCRYPT}n=16384,r=8,p=1$YmFja3VwbXgtZHVtbXktc2FsdA==$"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
_DECOY_SALT = b"backupmx decoy salt"


class SASLSyntaxError(ValueError):
    """An AUTH payload that is not valid base64 or not the mechanism's format.

    RFC 4954 section 4: the server answers 501 5.5.2 and the exchange ends.
    """


# ---------------------------------------------------------------------------
# Stored passwords


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """The value to put in the config for `password`: {SCRYPT} (the default) or
    {SCRAM-SHA-256} (scheme "scram-sha-256"); ValueError for a password SCRAM's
    SASLprep refuses (a control character, say)."""
    if scheme == "scram-sha-256":
        try:
            return scram.make_secret(password).encode()
        except scram.ScramError as exc:
            raise ValueError(f"SCRAM-SHA-256 cannot use this password: {exc}") from None
    if scheme != "scrypt":
        raise ValueError(f"unknown password scheme {scheme!r}")
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEY_BYTES)
    return (
        f"{SCRYPT_PREFIX}n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}"
        f"${base64.b64encode(salt).decode('ascii')}${base64.b64encode(key).decode('ascii')}"
    )


def secret_serves(stored: str) -> frozenset[str]:
    """The mechanisms a stored value can check (SECRET_SERVES by its scheme)."""
    for prefix, mechanisms in SECRET_SERVES.items():
        if stored.startswith(prefix):
            return mechanisms
    return frozenset()


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # maxmem must cover 128*r*n (and then some) or OpenSSL refuses.
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_MAX_MEM)


def _parse_scrypt(value: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, key) of a {SCRYPT} value; ValueError when malformed."""
    m = _SCRYPT_RE.fullmatch(value[len(SCRYPT_PREFIX):]) if value.startswith(SCRYPT_PREFIX) else None
    if m is None:
        raise ValueError("malformed {SCRYPT} value (expected {SCRYPT}n=N,r=R,p=P$salt$hash)")
    n, r, p = int(m["n"]), int(m["r"]), int(m["p"])
    if n < 2 or n & (n - 1) or n > _MAX_N:
        raise ValueError(f"{{SCRYPT}} n={n} must be a power of two between 2 and {_MAX_N}")
    if not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P or 128 * r * n > _MAX_MEM // 2:
        raise ValueError("{SCRYPT} parameters out of range")
    try:
        salt = base64.b64decode(m["salt"], validate=True)
        key = base64.b64decode(m["hash"], validate=True)
    except binascii.Error:
        raise ValueError("{SCRYPT} salt or hash is not valid base64") from None
    if len(key) < 16:
        raise ValueError("{SCRYPT} hash is too short")
    return n, r, p, salt, key


def validate_password_value(value: str) -> None:
    """Raise ValueError (one line) unless `value` is a usable stored password.

    For config validation: "{SCRYPT}..." well formed, or "{PLAIN}" with a
    non-empty secret.
    """
    if value.startswith(PLAIN_PREFIX):
        if len(value) == len(PLAIN_PREFIX):
            raise ValueError("{PLAIN} secret is empty")
        return
    if value.startswith(SCRYPT_PREFIX):
        _parse_scrypt(value)
        return
    if value.startswith(SCRAM_PREFIX):
        scram.parse_secret(value)
        return
    raise ValueError("password must start with {SCRYPT} or {SCRAM-SHA-256} (from `backupmx passwd`) or {PLAIN}")


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches the stored value ({SCRYPT}, {SCRAM-SHA-256} or {PLAIN}).

    Constant-time comparison; a malformed or unknown stored value never
    matches.  Note {PLAIN} is cheap and the others are not: Authenticator
    evens that out, this function does not.
    """
    if stored.startswith(SCRAM_PREFIX):
        try:
            return scram.matches_password(scram.parse_secret(stored), password)
        except scram.ScramError:
            return False
    if stored.startswith(PLAIN_PREFIX):
        secret = stored[len(PLAIN_PREFIX):]
        # Compare bytes: compare_digest on str accepts ASCII only.
        return bool(secret) and hmac.compare_digest(password.encode("utf-8"), secret.encode("utf-8"))
    try:
        n, r, p, salt, key = _parse_scrypt(stored)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(password.encode("utf-8"), salt, n, r, p, len(key)), key)


# ---------------------------------------------------------------------------
# The checks the SMTP session calls


@dataclass(frozen=True)
class Verified:
    """Authenticator.verify's answer: true when the credentials are right.

    `final` is what the server must still send in a 334 before its 235
    (RFC 4954 section 4): SCRAM's server-final message "v=...", which proves
    to the client that we hold its secret.
    """
    ok: bool
    final: bytes | None = None

    def __bool__(self) -> bool:
        return self.ok


class Authenticator:
    """Checks credentials against the configured [user:...] sections.

    `users` maps user name -> backupmx.config.UserConfig (anything with a
    `password` attribute holding the stored value works).  User names are
    matched exactly.  Every check returns the UserConfig on success, else None;
    the caller decides what the user may ETRN (UserConfig.domains).

    One KDF run per check, and nothing in its time or its answers that tells
    whether the user exists. A PLAIN or LOGIN check runs the user's own KDF
    (scrypt for {SCRYPT}, PBKDF2 at its count for {SCRAM-SHA-256}); a user
    without one (unknown, {PLAIN}) runs a decoy: the KDF of one configured
    secret, chosen by a keyed hash of the name, so the same name always costs
    the same and the costs of made-up names are spread as the real ones are
    (the way its SCRAM salt is made up). A SCRAM check runs one PBKDF2 at the
    count made-up answers give (a {PLAIN} user's keys are derived at it; for
    everyone else it runs on dummy input).
    """

    def __init__(self, users: Mapping[str, object]):
        self._users = dict(users)
        # A key only this configuration knows (its stored secrets), for the
        # SCRAM salts of users that have no SCRAM secret of their own: an
        # unknown user, a {SCRYPT} one, a {PLAIN} one. Stable across workers
        # and restarts, so asking twice shows nothing; unguessable, so a
        # salt cannot be computed to tell a real user from a made-up one.
        material = "\0".join(f"{name}\0{getattr(user, 'password', '')}" for name, user in sorted(self._users.items()))
        self._salt_key = hashlib.sha256(b"backupmx scram salts\0" + material.encode("utf-8")).digest()
        stored = [user.password for _, user in sorted(self._users.items())]
        self._decoys = [decoy for decoy in map(_decoy_of, stored) if decoy is not None] or [_DUMMY_HASH]
        # Made-up SCRAM answers give the count most SCRAM secrets here have
        # (doveadm writes 4096, `backupmx passwd` 100,000): a user whose count
        # is the usual one then looks like any name (RFC 5802 section 9).
        counts = Counter(secret.iterations for secret in map(_scram_of, stored) if secret is not None)
        self._made_up_iterations = max(counts, key=lambda n: (counts[n], n)) if counts else scram.DEFAULT_ITERATIONS

    def _stored(self, username: str) -> str | None:
        user = self._users.get(username)
        return user.password if user is not None else None

    def check_password(self, username: str, password: str):
        """The UserConfig when the password is right, else None (PLAIN and LOGIN).

        Exactly one KDF run per call: the user's own, or the name's decoy.
        """
        user = self._users.get(username)
        stored = user.password if user is not None else ""
        if _decoy_of(stored) is not None:
            return user if verify_password(password, stored) else None
        verify_password(password, self._decoy(username))  # never matches: for the time it takes
        return user if stored.startswith(PLAIN_PREFIX) and verify_password(password, stored) else None

    def _decoy(self, username: str) -> str:
        """The made-up secret a name without a KDF of its own is checked against: stable
        per name, unguessable without the configuration."""
        pick = hmac.new(self._salt_key, b"decoy\0" + username.encode("utf-8", "replace"), hashlib.sha256).digest()
        return self._decoys[int.from_bytes(pick[:8], "big") % len(self._decoys)]

    def check_cram_md5(self, username: str, challenge: bytes, digest_hex: str):
        """The UserConfig when `digest_hex` is HMAC-MD5(secret, challenge), else None.

        RFC 2195: only a {PLAIN} secret can be checked; other users and
        unknown users fail (after the same amount of work).
        """
        user = self._users.get(username)
        secret = None
        if user is not None and user.password.startswith(PLAIN_PREFIX):
            secret = user.password[len(PLAIN_PREFIX):]
        key = secret.encode("utf-8") if secret else secrets.token_bytes(16)
        expected = hmac.new(key, challenge, hashlib.md5).hexdigest()
        # RFC 2195 says lower-case hex; accept upper case too.
        ok = hmac.compare_digest(expected.encode("ascii"), digest_hex.lower().encode("utf-8", "replace"))
        return user if (ok and secret) else None

    # --- SCRAM-SHA-256 ------------------------------------------------------

    def scram_parameters(self, username: str) -> tuple[bytes, int]:
        """(salt, iterations) for the server-first message: cheap, no I/O.

        A user with a {SCRAM-SHA-256} secret gets its own; everyone else a salt
        derived from the name with a key only this configuration knows, and the
        count most SCRAM secrets here use: the answer looks the same for a user
        that exists, one that does not, and one whose secret cannot serve SCRAM
        (RFC 5802 section 9 leaves this to the server). Only a SCRAM secret
        whose count is not the usual one here stands out.
        """
        secret = self._scram_secret(username)
        if secret is not None:
            return secret.salt, secret.iterations
        salt = hmac.new(self._salt_key, username.encode("utf-8"), hashlib.sha256).digest()[:scram.SALT_BYTES]
        return salt, self._made_up_iterations

    def _scram_secret(self, username: str) -> "scram.StoredSecret | None":
        stored = self._stored(username)
        return None if stored is None else _scram_of(stored)

    def check_scram(self, credentials: "Credentials") -> bytes | None:
        """The server-final message when the SCRAM proof is right, else None. Slow:
        one PBKDF2 run per call whatever the user, at the made-up answers' count (a
        {PLAIN} user's keys are derived now; for everyone else it runs on dummy
        input, for the time it takes)."""
        username = credentials.username
        stored = self._stored(username)
        secret = self._scram_secret(username)
        if stored is not None and stored.startswith(PLAIN_PREFIX):
            salt, iterations = self.scram_parameters(username)
            try:
                secret = scram.make_secret(stored[len(PLAIN_PREFIX):], salt=salt, iterations=iterations)
            except scram.ScramError:  # a {PLAIN} secret SASLprep refuses: SCRAM cannot serve it
                secret = None
                _dummy_pbkdf2(username, self._made_up_iterations)
        else:
            _dummy_pbkdf2(username, self._made_up_iterations)
        if secret is None or not scram.verify_proof(secret, credentials.auth_message, credentials.proof):
            return None
        return scram.server_final(secret, credentials.auth_message).encode("ascii")

    def verify(self, credentials: "Credentials") -> Verified:
        """Whether the credentials an exchange ended with are right (slow: scrypt, PBKDF2)."""
        # Acting for another user is not offered (RFC 4616 and RFC 5802 authzid).
        if not authzid_acceptable(credentials.authzid, credentials.username):
            self.check_password(credentials.username, "")  # the same time as a real check
            return Verified(False)
        if credentials.mechanism == "CRAM-MD5":
            return Verified(self.check_cram_md5(credentials.username, credentials.challenge,
                                                credentials.digest) is not None)
        if credentials.mechanism == scram.MECHANISM:
            final = self.check_scram(credentials)
            return Verified(final is not None, final)
        return Verified(self.check_password(credentials.username, credentials.password) is not None)


def _dummy_pbkdf2(text: str, iterations: int) -> None:
    """One PBKDF2 run, for the time it takes."""
    hashlib.pbkdf2_hmac("sha256", text.encode("utf-8", "replace"), b"backupmx dummy salt", iterations)


def _scram_of(stored: str) -> "scram.StoredSecret | None":
    """The SCRAM secret of a stored value, or None (another scheme)."""
    if not stored.startswith(SCRAM_PREFIX):
        return None
    try:
        return scram.parse_secret(stored)
    except scram.ScramError:
        return None


def _decoy_of(stored: str) -> str | None:
    """A secret of the same scheme and cost as `stored` that no password matches (zero
    keys): what a name without a KDF of its own is checked against. None for {PLAIN}
    (no KDF) and for what is not a valid {SCRYPT} or {SCRAM-SHA-256} value."""
    secret = _scram_of(stored)
    if secret is not None:
        return scram.StoredSecret(_DECOY_SALT, secret.iterations, bytes(scram.KEY_BYTES),
                                  bytes(scram.KEY_BYTES)).encode()
    if not stored.startswith(SCRYPT_PREFIX):
        return None
    try:
        n, r, p, _, key = _parse_scrypt(stored)
    except ValueError:
        return None
    return (f"{SCRYPT_PREFIX}n={n},r={r},p={p}${base64.b64encode(_DECOY_SALT).decode('ascii')}"
            f"${base64.b64encode(bytes(len(key))).decode('ascii')}")


def authzid_acceptable(authzid: str, authcid: str) -> bool:
    """RFC 4616 authorization identity rule: empty, or the same as the user.

    Acting on behalf of another user is not supported; the caller treats a
    False here as a failed AUTH (535), not a syntax error.
    """
    return authzid == "" or authzid == authcid


# ---------------------------------------------------------------------------
# SASL payload decoding


_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def decode_base64_strict(text) -> bytes:
    """Decode one base64 AUTH line (str or bytes); SASLSyntaxError on anything else.

    Strict: only the base64 alphabet with correct padding; no whitespace, no
    line breaks.  "=" alone (RFC 4954: an empty initial response) is b"".
    """
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise SASLSyntaxError("not base64") from None
    text = bytes(text)
    if text == b"=":
        return b""
    # RFC 4648 4 exactly: b64decode(validate=True) would still take surplus "=".
    if not _BASE64.fullmatch(text):
        raise SASLSyntaxError("not base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLSyntaxError("not base64") from None


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLSyntaxError(f"{what} is not UTF-8") from None


def decode_sasl_plain(payload) -> tuple[str, str, str]:
    """(authzid, authcid, password) from a base64 PLAIN response (RFC 4616).

    The message is authzid NUL authcid NUL passwd; exactly two NULs, a
    non-empty authcid and password, UTF-8.  SASLSyntaxError otherwise.  Apply
    `authzid_acceptable` to the result.
    """
    raw = decode_base64_strict(payload)
    parts = raw.split(b"\x00")
    if len(parts) != 3:
        raise SASLSyntaxError("PLAIN response is not authzid NUL authcid NUL password")
    authzid, authcid, password = (_utf8(p, "PLAIN response") for p in parts)
    if not authcid or not password:
        raise SASLSyntaxError("PLAIN response has an empty user name or password")
    return authzid, authcid, password


def decode_sasl_login(payload) -> str:
    """The user name or password from one base64 LOGIN response line.

    A NUL is refused, as RFC 4616 refuses it inside PLAIN's fields: no user
    name or password holds one, and it must not reach a log line or a check.
    """
    text = _utf8(decode_base64_strict(payload), "LOGIN response")
    if "\0" in text:
        raise SASLSyntaxError("LOGIN response holds a NUL")
    return text


def decode_cram_md5_response(payload) -> tuple[str, str]:
    """(username, digest_hex) from a base64 CRAM-MD5 response (RFC 2195).

    The response is "user SP digest", the digest 32 hex digits; the user name
    is everything before the last space.
    """
    text = _utf8(decode_base64_strict(payload), "CRAM-MD5 response")
    username, sep, digest = text.rpartition(" ")
    if not sep or not username or "\0" in username or not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
        raise SASLSyntaxError("CRAM-MD5 response is not 'user digest'")
    return username, digest


def cram_md5_challenge(hostname: str) -> bytes:
    """A fresh CRAM-MD5 challenge, "<random.timestamp@hostname>" (RFC 2195 section 2).

    The caller base64-encodes it in its 334 reply and keeps the raw bytes for
    check_cram_md5.
    """
    return f"<{secrets.randbelow(10**12)}.{int(time.time())}@{hostname}>".encode("ascii", "replace")


# ---------------------------------------------------------------------------
# SASL exchanges: one per AUTH command, driven by the session's driver


@dataclass(frozen=True)
class Credentials:
    """What a SASL exchange ends with, for Authenticator.verify.

    PLAIN and LOGIN carry `password`; CRAM-MD5 carries `challenge` and `digest`;
    SCRAM-SHA-256 the AuthMessage and the client's proof (RFC 5802 section 3).
    """

    mechanism: str
    username: str
    password: str | None = None
    challenge: bytes | None = None
    digest: str | None = None
    authzid: str = ""  # the authorization identity (RFC 4616, RFC 5802 gs2 "a=")
    auth_message: bytes | None = None
    proof: bytes | None = None


@dataclass(frozen=True)
class Accepted:
    """The exchange is over and `credentials` were verified: answer 235."""

    credentials: Credentials


class _Plain:
    """RFC 4616: one response, "authzid NUL authcid NUL password"."""

    def step(self, response: str | None) -> "bytes | Credentials":
        if response is None:
            return b""  # RFC 4954 4: no initial response, so an empty challenge
        authzid, username, password = decode_sasl_plain(response)
        return Credentials("PLAIN", username, password=password, authzid=authzid)


class _Login:
    """draft-murchison-sasl-login: the user name, then the password, each asked for."""

    def __init__(self):
        self.username = None

    def step(self, response: str | None) -> "bytes | Credentials":
        if response is None:
            return b"Username:"
        if self.username is None:
            self.username = decode_sasl_login(response)
            return b"Password:"
        return Credentials("LOGIN", self.username, password=decode_sasl_login(response))


class _CramMD5:
    """RFC 2195: the server speaks first, a fresh challenge; the client answers "user digest"."""

    def __init__(self, hostname: str):
        self.challenge = cram_md5_challenge(hostname)

    def step(self, response: str | None) -> "bytes | Credentials":
        if response is None:
            return self.challenge
        username, digest = decode_cram_md5_response(response)
        return Credentials("CRAM-MD5", username, challenge=self.challenge, digest=digest)


class _ScramSHA256:
    """RFC 5802 / RFC 7677, server side: client-first, our server-first (salt and
    count from `parameters`, cheap); client-final, which ends in Credentials. Once
    verified (Authenticator.check_scram), `after_verification` sends the
    server-final message and waits for the client's empty response."""

    def __init__(self, parameters):
        self.parameters = parameters  # username -> (salt, iterations): Authenticator.scram_parameters
        self.first = None
        self.server_first = None

    def step(self, response: str | None) -> "bytes | Credentials":
        if response is None:
            return b""  # RFC 4954 4: the client speaks first
        text = _utf8(decode_base64_strict(response), "SCRAM message")
        try:
            if self.first is None:
                return self._client_first(text)
            return self._client_final(text)
        except scram.ScramError as exc:
            raise SASLSyntaxError(f"SCRAM: {exc}") from None

    def _client_first(self, text: str) -> bytes:
        self.first = scram.parse_client_first(text)
        if "\0" in self.first.username:
            raise scram.ScramError("NUL in the user name")
        salt, iterations = self.parameters(self.first.username)
        self.server_first = scram.server_first(self.first.nonce + scram.new_nonce(), salt, iterations)
        return self.server_first.encode("ascii")

    def _client_final(self, text: str) -> Credentials:
        final = scram.parse_client_final(text)
        binding = base64.b64encode(self.first.gs2_header.encode("utf-8")).decode("ascii")
        if final.channel_binding != binding:
            raise scram.ScramError("c= is not the gs2 header of the first message")
        if final.nonce != self.server_first[2:self.server_first.index(",")]:
            raise scram.ScramError("the nonce is not the one we sent")
        message = scram.auth_message(self.first.bare, self.server_first, final.without_proof)
        return Credentials(scram.MECHANISM, self.first.username, authzid=self.first.authzid,
                           auth_message=message, proof=final.proof)


class _AfterServerFinal:
    """RFC 4954 4: additional data after success goes in a 334, and the client
    answers with an empty response; only then 235."""

    def __init__(self, credentials: Credentials):
        self.credentials = credentials

    def step(self, response: str | None) -> Accepted:
        if response is None or decode_base64_strict(response) != b"":
            raise SASLSyntaxError("expected an empty response to the server's final message")
        return Accepted(self.credentials)


def after_verification(credentials: Credentials):
    """The exchange that waits for the client's answer to a Verified.final."""
    return _AfterServerFinal(credentials)


def sasl_exchange(mechanism: str, hostname: str, authenticator: "Authenticator | None" = None):
    """The exchange for one AUTH: `step(response)` takes each client response (base64
    text; None when AUTH came without an initial response) and returns the next
    challenge (bytes), the Credentials to verify, or Accepted; SASLSyntaxError for a
    malformed response. SCRAM-SHA-256 needs the `authenticator` (for the salt)."""
    if mechanism == scram.MECHANISM:
        return _ScramSHA256(authenticator.scram_parameters)
    if mechanism == "PLAIN":
        return _Plain()
    if mechanism == "LOGIN":
        return _Login()
    if mechanism == "CRAM-MD5":
        return _CramMD5(hostname)
    raise ValueError(f"no SASL mechanism {mechanism!r}")
