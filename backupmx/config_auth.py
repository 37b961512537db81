"""What the [user:...] secrets mean for AUTH, said when the config is loaded:
the mechanisms EHLO offers when auth_mechanisms is not set, the users whose
secret cannot serve one it offers, and {PLAIN} secrets in a file everyone
may read. Each is a warning line the loader adds to Config.warnings (`serve`
logs them, `check` prints them; `check` fails on the last).
"""

from __future__ import annotations

import os
import stat

from backupmx.auth import secret_serves

DEFAULT_AUTH_MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")


def default_auth_mechanisms(path: str, users) -> tuple[tuple[str, ...], str | None]:
    """auth_mechanisms when the file does not set it, and the warning that explains it.

    DEFAULT_AUTH_MECHANISMS, without SCRAM-SHA-256 while any user holds a secret
    that cannot serve it ({SCRYPT}, the only scheme before SCRAM came, and still
    `backupmx passwd`'s default): a client that prefers SCRAM-SHA-256 (`backupmx
    etrn` from before its PLAIN retry, or any other) would otherwise get 535
    for a right password, and the mail would wait for an ETRN that never works.
    """
    unable = sorted(user.name for user in users if "SCRAM-SHA-256" not in secret_serves(user.password))
    if not unable:
        return DEFAULT_AUTH_MECHANISMS, None
    mechanisms = tuple(m for m in DEFAULT_AUTH_MECHANISMS if m != "SCRAM-SHA-256")
    who = " ".join(f"[user:{name}]" for name in unable[:5]) + (f" and {len(unable) - 5} more" if len(unable) > 5 else "")
    return mechanisms, (f"{path}: [backupmx] auth_mechanisms: not set, and the {{SCRYPT}} secret of {who} cannot"
                        f" serve SCRAM-SHA-256, so EHLO offers {' '.join(mechanisms)}: write it with"
                        " `backupmx passwd --scheme scram-sha-256` to have SCRAM-SHA-256 offered, or set"
                        " auth_mechanisms")


def unserved_mechanisms(path: str, users, mechanisms: tuple[str, ...]) -> list[str]:
    """One line per user whose stored secret cannot serve a mechanism EHLO offers.

    A client that picks such a mechanism (fetchmail takes CRAM-MD5 whenever it
    is offered; `backupmx etrn` prefers SCRAM-SHA-256) fails with 535 however
    right its password is: an operator should know before that happens.
    """
    lines = []
    for user in users:
        missing = [m for m in mechanisms if m not in secret_serves(user.password)]
        if missing:
            scheme = user.password[:user.password.index("}") + 1]
            lines.append(f"{path}: [user:{user.name}] password: a {scheme} secret cannot serve "
                         f"{' '.join(missing)} (listed in auth_mechanisms): a client that chooses it gets 535; "
                         + _REMEDY.get(scheme, ""))
    return lines


_REMEDY = {
    "{SCRYPT}": "write it with `backupmx passwd --scheme scram-sha-256`, or run `backupmx etrn --mechanism PLAIN`",
    "{SCRAM-SHA-256}": "CRAM-MD5 needs a {PLAIN} secret; better leave CRAM-MD5 out of auth_mechanisms",
}


def plain_secrets_exposure(path: str, users) -> str | None:
    """One line when the file at `path` holds {PLAIN} secrets and everyone may read it, else None.

    Everyone (world-readable) is refused, the group is not: the README's
    privilege setup makes the config group-readable by `user`'s group so a
    SIGHUP can re-read it, as the TLS key (tls.check_key_file) and as
    OpenSSH's "permissions are too open" do for world access. `check` fails on
    it; `serve` logs it as a warning.
    """
    plain = sorted(u.name for u in users if u.password.startswith("{PLAIN}"))
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not plain or not mode & stat.S_IROTH:
        return None
    who = f"[user:{plain[0]}]" + (f" and {len(plain) - 1} more" if len(plain) > 1 else "")
    return (f"{path}: readable by everyone (mode {stat.S_IMODE(mode):04o}) but holds {{PLAIN}} secrets ({who}): "
            "chmod o-r it, or use {SCRYPT} values from `backupmx passwd`")
