"""backupmx.config: the INI file -> frozen dataclasses, and one-line errors naming file, section, key."""

import dataclasses
import os
import random
import socket

import pytest

from backupmx.addresses import normalize_domain
from backupmx.config import Config, ConfigError, load_config
from backupmx.config_values import parse_duration, parse_hostport, parse_size

GLOBAL = """\
[backupmx]
hostname = mx2.example.net
listen = 127.0.0.1:0
queue = {tmp}/queue.db
"""
DOMAIN = """\
[domain:example.com]
primary = 127.0.0.1:2526
"""


def write(tmp_path, text, name="backupmx.ini"):
    path = tmp_path / name
    path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    return path


def config_text(globals_extra="", domain_extra="", extra=""):
    return GLOBAL + globals_extra + "\n" + DOMAIN + domain_extra + "\n" + extra


def with_listen(value, **kw):
    return config_text(**kw).replace("listen = 127.0.0.1:0", f"listen = {value}")


def load(tmp_path, **kw):
    return load_config(write(tmp_path, config_text(**kw)))


# --------------------------------------------------------------------------
# Errors: (id, config text, the "[section] key" that must be named, a piece of the problem)

ERRORS = [
    ("unknown global key", config_text(globals_extra="bogus = 1\n"), "[backupmx] bogus", "unknown key"),
    ("unknown domain key", config_text(domain_extra="relay = x\n"), "[domain:example.com] relay", "unknown key"),
    ("unknown user key", config_text(extra="[user:u]\npassword = {PLAIN}x\ndomains = example.com\nfoo = 1\n"),
     "[user:u] foo", "unknown key"),
    ("workers not int", config_text(globals_extra="workers = many\n"), "[backupmx] workers", "not an integer"),
    ("workers zero", config_text(globals_extra="workers = 0\n"), "[backupmx] workers", "at least 1"),
    ("max_workers < workers", config_text(globals_extra="workers = 8\nmax_workers = 4\n"),
     "[backupmx] max_workers", "at least workers"),
    ("flush_workers empty", config_text(globals_extra="flush_workers =\n"), "[backupmx] flush_workers", "integer"),
    ("bad duration", config_text(globals_extra="timeout = 5x\n"), "[backupmx] timeout", "bad duration"),
    ("greet_pause not below timeout", config_text(globals_extra="timeout = 30s\ngreet_pause = 30s\n"),
     "[backupmx] greet_pause", "shorter than timeout"),
    ("max_session_time zero", config_text(globals_extra="max_session_time = 0\n"),
     "[backupmx] max_session_time", "more than 0"),
    ("max_junk_commands zero", config_text(globals_extra="max_junk_commands = 0\n"),
     "[backupmx] max_junk_commands", "at least 1"),
    ("auth_failure_window zero", config_text(globals_extra="auth_failure_window = 0\n"),
     "[backupmx] auth_failure_window", "more than 0"),
    ("negative duration", config_text(globals_extra="expired_retention = -1d\n"),
     "[backupmx] expired_retention", "bad duration"),
    ("zero timeout", config_text(globals_extra="timeout = 0\n"), "[backupmx] timeout", "more than 0"),
    ("zero lifetime", config_text(globals_extra="queue_lifetime = 0s\n"), "[backupmx] queue_lifetime", "more than 0"),
    ("bad size", config_text(globals_extra="min_free_space = 10Q\n"), "[backupmx] min_free_space", "bad size"),
    ("zero message size", config_text(globals_extra="max_message_size = 0\n"), "[backupmx] max_message_size",
     "at least 1"),
    ("message size beyond SQLite", config_text(globals_extra="max_message_size = 1G\n"),
     "[backupmx] max_message_size", "blob limit"),
    ("zero bounce_size_limit", config_text(globals_extra="bounce_size_limit = 0\n"),
     "[backupmx] bounce_size_limit", "at least 1"),
    ("huge bounce_size_limit", config_text(globals_extra="bounce_size_limit = 2G\n"),
     "[backupmx] bounce_size_limit", "at most 10M"),
    ("bad listen port", with_listen("127.0.0.1:99999"), "[backupmx] listen", "bad port"),
    ("bad listen port text", with_listen("127.0.0.1:smtp"), "[backupmx] listen", "bad port"),
    ("ipv6 without brackets", with_listen("::1:25"), "[backupmx] listen", "brackets"),
    ("unclosed bracket", with_listen("[::1:25"), "[backupmx] listen", "]"),
    ("not ipv6 in brackets", with_listen("[example.com]:25"), "[backupmx] listen",
     "IPv6"),
    ("bad listen host", with_listen("bad_host!:25"), "[backupmx] listen", "bad address"),
    ("tls version", config_text(globals_extra="tls_min_version = TLSv1.1\n"), "[backupmx] tls_min_version",
     "TLSv1.2"),
    ("listen_tls without cert", config_text(globals_extra="listen_tls = 127.0.0.1:0\n"), "[backupmx] listen_tls",
     "listen_tls needs tls_cert and tls_key"),
    ("cert without key", config_text(globals_extra="tls_cert = /x/cert.pem\n"), "[backupmx] tls_cert",
     "needs tls_key"),
    ("key without cert", config_text(globals_extra="tls_key = /x/key.pem\n"), "[backupmx] tls_key",
     "needs tls_cert"),
    ("bounce_relay port 0", config_text(globals_extra="bounce_relay = 127.0.0.1:0\n"), "[backupmx] bounce_relay",
     "bad port"),
    ("empty hostname", config_text(globals_extra="").replace("mx2.example.net", ""), "[backupmx] hostname",
     "bad host name"),
    ("hostname with space", config_text().replace("mx2.example.net", "mx2 example"), "[backupmx] hostname",
     "bad host name"),
    ("empty queue", config_text().replace("{tmp}/queue.db", ""), "[backupmx] queue", "empty"),
    ("missing primary", GLOBAL + "[domain:example.com]\nprimary_tls = none\n", "[domain:example.com] primary",
     "missing primary"),
    ("bad primary port", GLOBAL + "[domain:example.com]\nprimary = mail.example.com:0\n",
     "[domain:example.com] primary", "bad port"),
    ("wildcard primary", GLOBAL + "[domain:example.com]\nprimary = *:25\n", "[domain:example.com] primary",
     "bad address"),
    ("primary_tls", config_text(domain_extra="primary_tls = maybe\n"), "[domain:example.com] primary_tls",
     "opportunistic"),
    ("recipient other domain", config_text(domain_extra="recipients = bob@example.org\n"),
     "[domain:example.com] recipients", "not in domain example.com"),
    ("recipient subdomain", config_text(domain_extra="recipients = bob@sub.example.com\n"),
     "[domain:example.com] recipients", "not in domain"),
    ("recipients empty", config_text(domain_extra="recipients = ,\n"), "[domain:example.com] recipients",
     "use * for any"),
    ("recipients bad entry", config_text(domain_extra="recipients = <bob>\n"), "[domain:example.com] recipients",
     "bad address"),
    ("recipients file missing", config_text(domain_extra="recipients = @{tmp}/nope.txt\n"),
     "[domain:example.com] recipients", "cannot read"),
    ("quota", config_text(domain_extra="max_queue_messages = -5\n"), "[domain:example.com] max_queue_messages",
     "at least 1"),
    ("quota bytes", config_text(domain_extra="max_queue_bytes = lots\n"), "[domain:example.com] max_queue_bytes",
     "bad size"),
    ("domain lifetime", config_text(domain_extra="queue_lifetime = forever\n"),
     "[domain:example.com] queue_lifetime", "bad duration"),
    ("bad domain name", config_text(extra="[domain:bad_name.com]\nprimary = 127.0.0.1\n"), "[domain:bad_name.com]",
     "bad domain name"),
    ("label too long", config_text(extra=f"[domain:{'a' * 64}.com]\nprimary = 127.0.0.1\n"), "[domain:aaaa",
     "bad domain name"),
    ("duplicate domain", config_text(extra="[domain:Example.COM.]\nprimary = 127.0.0.1\n"),
     "[domain:Example.COM.]", "duplicate domain example.com"),
    ("user no password", config_text(extra="[user:u]\ndomains = example.com\n"), "[user:u] password",
     "missing password"),
    ("user password no scheme", config_text(extra="[user:u]\npassword = secret\ndomains = example.com\n"),
     "[user:u] password", "{SCRYPT}"),
    ("user empty plain", config_text(extra="[user:u]\npassword = {PLAIN}\ndomains = example.com\n"),
     "[user:u] password", "empty"),
    ("user no domains", config_text(extra="[user:u]\npassword = {PLAIN}x\n"), "[user:u] domains", "missing domains"),
    ("user unknown domain", config_text(extra="[user:u]\npassword = {PLAIN}x\ndomains = example.com, other.org\n"),
     "[user:u] domains", "other.org is not a configured"),
    ("user empty domains", config_text(extra="[user:u]\npassword = {PLAIN}x\ndomains = ,\n"), "[user:u] domains",
     "empty"),
    ("unknown section", config_text(extra="[mystery]\nx = 1\n"), "[mystery]", "unknown section"),
    ("DEFAULT section", config_text(extra="[DEFAULT]\nworkers = 1\n"), "[DEFAULT]", "unknown section"),
    ("section domain without name", config_text(extra="[domain:]\nprimary = 127.0.0.1\n"), "[domain:]",
     "unknown section"),
    ("no backupmx section", DOMAIN, "[backupmx]", "missing section"),
    ("no domain", GLOBAL, "[domain:NAME]", "no domain configured"),
    ("duplicate key", config_text(globals_extra="workers = 2\nworkers = 3\n"), "[backupmx] workers",
     "duplicate key"),
    ("duplicate key case", config_text(globals_extra="workers = 2\nWorkers = 3\n"), "[backupmx] workers",
     "duplicate key"),
    ("duplicate section", config_text(extra="[backupmx]\nworkers = 1\n"), "[backupmx]", "duplicate section"),
]


@pytest.mark.parametrize("text, where, problem", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_names_file_section_and_key(tmp_path, text, where, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert where in message, message
    assert problem in message, message
    assert "\n" not in message and "\r" not in message


PARSE_ERRORS = [
    ("text before section", "workers = 1\n" + config_text(), "line 1"),
    ("line without =", config_text(globals_extra="just some words\n"), "line 5"),
]


@pytest.mark.parametrize("text, problem", [e[1:] for e in PARSE_ERRORS], ids=[e[0] for e in PARSE_ERRORS])
def test_syntax_errors_name_file_and_line(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^/nonexistent/backupmx\.ini: cannot read: No such file"):
        load_config("/nonexistent/backupmx.ini")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    path = tmp_path / "latin1.ini"
    path.write_bytes(config_text().encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read: not UTF-8"):
        load_config(path)


def test_password_never_in_error(tmp_path):
    text = config_text(extra="[user:u]\npassword = hunter2-secret\ndomains = example.com\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "hunter2" not in str(info.value)


# --------------------------------------------------------------------------
# Successful loads


def test_defaults(tmp_path):
    config = load(tmp_path)
    assert isinstance(config, Config)
    assert config.path == str(tmp_path / "backupmx.ini")
    assert config.hostname == "mx2.example.net"
    assert config.listen == (("127.0.0.1", 0),)
    assert config.listen_tls == ()
    assert config.queue == str(tmp_path / "queue.db")
    assert (config.tls_cert, config.tls_key) == (None, None)
    assert (config.workers, config.max_workers, config.flush_workers) == (4, 64, 2)
    assert config.max_message_size == 52428800
    assert config.max_recipients == 100
    assert config.tls_min_version == "TLSv1.2"
    assert config.max_auth_failures == 3
    assert config.max_connections_per_client == 50
    assert (config.max_auth_failures_per_client, config.auth_failure_window) == (10, 3600.0)
    assert config.auth_failure_delay == 1.0
    assert (config.max_session_time, config.max_junk_commands, config.greet_pause) == (1800.0, 100, 0.0)
    assert config.timeout == 300.0
    assert config.queue_lifetime == 5 * 86400.0
    assert config.user is None and config.log is None and config.bounce_relay is None
    assert config.expired_retention == 7 * 86400.0
    assert config.retry_interval == 0.0
    assert config.min_free_space == 100 * 1024 * 1024
    assert config.bounce_size_limit == 50 * 1024
    assert config.users == {}
    assert config.warnings == ()
    d = config.domains["example.com"]
    assert d.name == "example.com"
    assert d.primary == ("127.0.0.1", 2526)
    assert d.primary_tls == "opportunistic"
    assert d.recipients is None and d.accepts("Anyone@Example.com")
    assert d.primary_ca is None and d.max_queue_messages is None and d.max_queue_bytes is None
    assert (d.queue_lifetime, d.retry_interval) == (config.queue_lifetime, config.retry_interval)
    assert config.auth_mechanisms == ("SCRAM-SHA-256", "PLAIN", "LOGIN")  # SPEC: CRAM-MD5 only when listed


def test_default_hostname_and_listen(tmp_path):
    text = "[backupmx]\n" + DOMAIN
    config = load_config(write(tmp_path, text))
    assert config.hostname == socket.getfqdn()
    assert config.listen == (("0.0.0.0", 25),)
    assert config.queue == "/var/spool/backupmx/queue.db"


def test_frozen(tmp_path):
    config = load(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.domains["example.com"].primary = ("evil", 25)


def test_every_key(tmp_path):
    (tmp_path / "cert.pem").write_text("x")
    globals_extra = """\
listen_tls = [::1]:0, 127.0.0.1
tls_cert = cert.pem
tls_key = {tmp}/key.pem
workers = 2
max_workers = 2
flush_workers = 1
max_message_size = 10M
max_recipients = 7
tls_min_version = tlsv1.3
max_auth_failures = 1
max_connections_per_client = 9
timeout = 1.5m
queue_lifetime = 2d
user = backupmx
log = syslog
bounce_relay = [::1]
expired_retention = 0
retry_interval = 10m
min_free_space = 1G
bounce_size_limit = 10M
"""
    domain_extra = """\
primary_tls = REQUIRED
primary_ca = {tmp}/ca.pem
max_queue_messages = 1000
max_queue_bytes = 5G
queue_lifetime = 3h
"""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        text = with_listen("127.0.0.1:2525, [::1]:2525 , *:25", globals_extra=globals_extra, domain_extra=domain_extra)
        config = load_config(write(tmp_path, text))
    finally:
        os.chdir(cwd)
    assert config.listen == (("127.0.0.1", 2525), ("::1", 2525), ("0.0.0.0", 25))
    assert config.listen_tls == (("::1", 0), ("127.0.0.1", 465))
    assert config.tls_cert == str(tmp_path / "cert.pem")  # relative to the cwd, stored absolute
    assert config.tls_key == str(tmp_path / "key.pem")
    assert (config.workers, config.max_workers, config.flush_workers) == (2, 2, 1)
    assert config.max_message_size == 10 * 1024 * 1024
    assert config.max_recipients == 7
    assert config.tls_min_version == "TLSv1.3"
    assert config.max_auth_failures == 1
    assert config.max_connections_per_client == 9
    assert config.timeout == 90.0
    assert config.queue_lifetime == 2 * 86400.0
    assert config.user == "backupmx"
    assert config.log == "syslog"
    assert config.bounce_relay == ("::1", 25)
    assert config.expired_retention == 0.0
    assert config.retry_interval == 600.0
    assert config.min_free_space == 1024**3
    assert config.bounce_size_limit == 10 * 1024**2
    d = config.domains["example.com"]
    assert d.primary_tls == "required"
    assert d.primary_ca == str(tmp_path / "ca.pem")
    assert (d.max_queue_messages, d.max_queue_bytes) == (1000, 5 * 1024**3)
    assert d.queue_lifetime == 3 * 3600.0  # overridden
    assert d.retry_interval == 600.0  # inherited


def test_inline_comments_and_literal_values(tmp_path):
    text = config_text(
        globals_extra="workers = 2 ; two\nflush_workers = 1 # one\nlog = {tmp}/a;b#c.log\n",
        extra="; a comment line\n# another\n[user:u]\npassword = {PLAIN}p%w%%d(x)s;#x ; the secret\n"
        "domains = example.com\n",
    )
    config = load_config(write(tmp_path, text))
    assert config.workers == 2 and config.flush_workers == 1
    assert config.log == f"{tmp_path}/a;b#c.log"  # no whitespace before ; or #: part of the value
    assert config.users["u"].password == "{PLAIN}p%w%%d(x)s;#x"  # no % interpolation


def test_scrypt_password_from_auth(tmp_path):
    auth = pytest.importorskip("backupmx.auth")
    value = auth.hash_password("pw")
    text = config_text(extra=f"[user:primary]\npassword = {value}\ndomains = Example.COM.\n")
    config = load_config(write(tmp_path, text))
    user = config.users["primary"]
    assert user.password == value and user.domains == frozenset({"example.com"})
    # A {SCRYPT} secret cannot serve SCRAM-SHA-256: the default leaves it out, and says so once.
    assert config.auth_mechanisms == ("PLAIN", "LOGIN")
    [line] = [w for w in config.warnings if "SCRAM" in w]
    assert "auth_mechanisms: not set" in line and "[user:primary]" in line and "--scheme scram-sha-256" in line
    # No certificate: allowed, but AUTH is never offered, so say so.
    assert any("tls_cert" in w and "AUTH" in w for w in config.warnings)
    mangled = config_text(extra="[user:primary]\npassword = {SCRYPT}garbage\ndomains = example.com\n")
    with pytest.raises(ConfigError, match=r"\[user:primary\] password: .*SCRYPT"):
        load_config(write(tmp_path, mangled))


def test_default_auth_mechanisms_leave_scram_out_while_a_secret_cannot_serve_it(tmp_path):
    """An upgrade must not break ETRN for the {SCRYPT} users an older backupmx wrote (review-1 M2)."""
    auth = pytest.importorskip("backupmx.auth")
    scrypt, scram_value = auth.hash_password("pw"), auth.hash_password("pw", "scram-sha-256")
    users = "".join(f"[user:{name}]\npassword = {value}\ndomains = example.com\n"
                    for name, value in (("old1", scrypt), ("new", scram_value), ("old2", scrypt)))
    config = load_config(write(tmp_path, config_text(extra=users)))
    assert config.auth_mechanisms == ("PLAIN", "LOGIN")
    [line] = [w for w in config.warnings if "SCRAM" in w]  # one line names them all
    assert "[user:old1] [user:old2] cannot serve SCRAM-SHA-256" in line and "[user:new]" not in line
    # An explicit setting wins, with the warning per user that cannot serve it.
    explicit = load_config(write(tmp_path, config_text("auth_mechanisms = SCRAM-SHA-256 PLAIN\n", extra=users)))
    assert explicit.auth_mechanisms == ("SCRAM-SHA-256", "PLAIN")
    assert sum("a {SCRYPT} secret cannot serve SCRAM-SHA-256" in w for w in explicit.warnings) == 2
    # Only SCRAM and {PLAIN} secrets: the whole default.
    modern = load_config(write(tmp_path, config_text(
        extra=f"[user:new]\npassword = {scram_value}\ndomains = example.com\n"
              "[user:p]\npassword = {PLAIN}x\ndomains = example.com\n")))
    assert modern.auth_mechanisms == ("SCRAM-SHA-256", "PLAIN", "LOGIN")
    assert not [w for w in modern.warnings if "SCRAM" in w]


def test_auth_failure_delay_is_a_config_key_and_zero_is_said(tmp_path):
    """review-1 m9: what slows password guessing is set where an operator looks, and
    switching it off is one warning, never silent (the environment cannot touch it)."""
    users = "[user:u]\npassword = {PLAIN}x\ndomains = example.com\n"
    assert load_config(write(tmp_path, config_text("auth_failure_delay = 2s\n", extra=users))).auth_failure_delay == 2
    off = load_config(write(tmp_path, config_text("auth_failure_delay = 0\n", extra=users)))
    assert off.auth_failure_delay == 0 and any("auth_failure_delay = 0" in w for w in off.warnings)
    with pytest.raises(ConfigError, match="auth_failure_delay"):
        load_config(write(tmp_path, config_text("auth_failure_delay = -1\n", extra=users)))


def test_domain_names_normalised(tmp_path):
    text = GLOBAL + "[domain:Example.COM.]\nprimary = [::1]:2526\n[domain:bücher.de]\nprimary = mail.Bücher.de\n"
    config = load_config(write(tmp_path, text))
    assert set(config.domains) == {"example.com", "xn--bcher-kva.de"}
    assert config.domains["example.com"].primary == ("::1", 2526)
    assert config.domains["xn--bcher-kva.de"].primary == ("mail.xn--bcher-kva.de", 25)
    assert config.domain("EXAMPLE.com.") is config.domains["example.com"]
    assert config.domain("Bücher.de") is config.domains["xn--bcher-kva.de"]
    assert config.domain("example.org") is None
    assert config.domain("bad name") is None


def test_recipients_list(tmp_path):
    config = load(tmp_path, domain_extra="recipients = Bob, alice@EXAMPLE.com., postmaster ,\n")
    d = config.domains["example.com"]
    assert d.recipients == frozenset({"bob@example.com", "alice@example.com", "postmaster@example.com"})
    assert d.accepts("BOB@example.com") and not d.accepts("carol@example.com")


def test_recipients_file(tmp_path, monkeypatch):
    (tmp_path / "rcpts.txt").write_text(
        "# the mailboxes\n\nbob\n  Alice@example.com   # inline\nx#y@example.com\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)  # "@rcpts.txt" is relative to the current directory
    config = load(tmp_path, domain_extra="recipients = @rcpts.txt\n")
    assert config.domains["example.com"].recipients == frozenset(
        {"bob@example.com", "alice@example.com", "x#y@example.com"}
    )
    (tmp_path / "bad.txt").write_text("bob\nmallory@example.org\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, domain_extra=f"recipients = @{tmp_path}/bad.txt\n")
    assert "[domain:example.com] recipients" in str(info.value) and "line 2" in str(info.value)
    (tmp_path / "empty.txt").write_text("# nobody yet\n", encoding="utf-8")
    config = load(tmp_path, domain_extra="recipients = @empty.txt\n")
    assert config.domains["example.com"].recipients == frozenset()
    assert any("lists no addresses" in w for w in config.warnings)


def test_listen_tls_with_cert(tmp_path):
    config = load(tmp_path, globals_extra="tls_cert = /c.pem\ntls_key = /k.pem\nlisten_tls = 127.0.0.1:0\n")
    assert config.listen_tls == (("127.0.0.1", 0),)


def test_empty_listen_warns(tmp_path):
    config = load_config(write(tmp_path, with_listen("")))
    assert config.listen == ()
    assert any("serve --inetd" in w for w in config.warnings)


def test_user_domains_and_cram(tmp_path):
    extra = (
        "[domain:example.org]\nprimary = 127.0.0.1\n"
        "[user:a]\npassword = {PLAIN}s\ndomains = example.com,example.org\n"
        "[user:b]\npassword = {PLAIN}t\ndomains = example.org\n"
    )
    path = write(tmp_path, config_text(extra=extra, globals_extra="tls_cert = /c\ntls_key = /k\n"))
    path.chmod(0o640)
    config = load_config(path)
    assert config.users["a"].domains == frozenset({"example.com", "example.org"})
    assert config.users["b"].domains == frozenset({"example.org"})
    assert config.warnings == ()
    path.chmod(0o644)  # {PLAIN} secrets everyone can read: a warning here, `check` refuses it
    assert load_config(path).warnings == (
        f"{path}: readable by everyone (mode 0644) but holds {{PLAIN}} secrets ([user:a] and 1 more): "
        "chmod o-r it, or use {SCRYPT} values from `backupmx passwd`",)


# --------------------------------------------------------------------------
# Value parsers


@pytest.mark.parametrize(
    "text, seconds",
    [("0", 0.0), ("90", 90.0), ("10s", 10.0), ("1.5m", 90.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0),
     (" 3 H ", 10800.0), (".5m", 30.0)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5 minutes", "-1", "1e3", "5w", "nan", "inf", "1..2"])
def test_parse_duration_bad(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, size",
    [("0", 0), ("512", 512), ("1K", 1024), ("1k", 1024), ("100M", 104857600), ("5G", 5368709120),
     ("1.5K", 1536), ("10MB", 10485760)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "-5", "5T", "five", "1e6"])
def test_parse_size_bad(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "text, kw, result",
    [
        ("[::1]:2525", {}, ("::1", 2525)),
        ("127.0.0.1:2525", {}, ("127.0.0.1", 2525)),
        ("Mail.Example.COM:587", {}, ("mail.example.com", 587)),
        ("mail.example.com", {"default_port": 25}, ("mail.example.com", 25)),
        ("[::1]", {"default_port": 25}, ("::1", 25)),
        ("*:25", {"allow_wildcard": True}, ("0.0.0.0", 25)),
        ("127.0.0.1:0", {"allow_zero": True}, ("127.0.0.1", 0)),
        ("[2001:db8::1]:65535", {}, ("2001:db8::1", 65535)),
    ],
)
def test_parse_hostport(text, kw, result):
    assert parse_hostport(text, **kw) == result


@pytest.mark.parametrize(
    "text, kw",
    [("127.0.0.1", {}), ("127.0.0.1:0", {}), ("127.0.0.1:65536", {}), (":25", {}), ("*:25", {}),
     ("::1", {"default_port": 25}), ("[::1]x", {}), ("[::1]:", {}), ("host:-1", {}), ("host:２５", {}),
     ("", {"default_port": 25})],
)
def test_parse_hostport_bad(text, kw):
    with pytest.raises(ValueError):
        parse_hostport(text, **kw)


@pytest.mark.parametrize(
    "name, result",
    [("Example.COM.", "example.com"), ("xn--bcher-kva.de", "xn--bcher-kva.de"), ("bücher.de", "xn--bcher-kva.de"),
     ("a-b.c0", "a-b.c0"), ("localhost", "localhost")],
)
def test_normalize_domain(name, result):
    assert normalize_domain(name) == result


@pytest.mark.parametrize("name", ["", ".", "a..b", "-a.com", "a-.com", "a_b.com", "[1.2.3.4]", "a b", "x." * 130])
def test_normalize_domain_bad(name):
    with pytest.raises(ValueError):
        normalize_domain(name)


def test_random_durations_and_sizes_round_trip():
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    sizes = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    for _ in range(500):
        n = rng.randrange(0, 10**6)
        unit = rng.choice(list(units))
        assert parse_duration(f"{n}{unit}") == n * units[unit]
        unit = rng.choice(list(sizes))
        assert parse_size(f"{n}{unit.lower() if rng.random() < 0.5 else unit}") == n * sizes[unit]
