"""The `backupmx` command line, run for real: `python3 backupmx.py ...` in a subprocess."""

import io
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from backupmx.cli import humanize_age
from conftest import queue_one

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "backupmx.py"
CERTS = ROOT / "tests" / "certs"


def run(*args, cwd, stdin="", timeout=60, launcher=LAUNCHER):
    env = {k: v for k, v in os.environ.items() if k not in ("BACKUPMX_DEBUG", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, str(launcher), *map(str, args)],
        cwd=cwd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env,
    )


def write_config(tmp_path, extra_global="", extra="", name="backupmx.ini"):
    path = tmp_path / name
    path.write_text(
        "[backupmx]\n"
        "hostname = mx2.example.net\n"
        "listen = 127.0.0.1:0\n"
        f"queue = {tmp_path}/queue.db\n"
        f"{extra_global}"
        "[domain:example.com]\n"
        "primary = 127.0.0.1:2526\n"
        "[domain:sub.example.com]\n"
        "primary = 127.0.0.1:2526\n"
        f"{extra}",
        encoding="utf-8",
    )
    return path


def assert_one_error_line(proc, code=1, contains=""):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("backupmx: "), lines[0]
    assert contains in lines[0], lines[0]


@pytest.mark.parametrize(
    "command", [["check"], ["serve"], ["queue"], ["queue", "list"], ["flush", "example.com"], ["show", "ABC"]]
)
@pytest.mark.parametrize("problem", ["missing", "unknown key", "bad port"])
def test_bad_config_is_one_line_exit_1(tmp_path, command, problem):
    if problem == "missing":
        path, expect = tmp_path / "nope.ini", "cannot read"
    elif problem == "unknown key":
        path, expect = write_config(tmp_path, extra_global="colour = blue\n"), "[backupmx] colour: unknown key"
    else:
        path, expect = write_config(tmp_path, extra="[domain:x.org]\nprimary = x.org:70000\n"), "[domain:x.org] primary"
    proc = run(*command, "-c", path, cwd=tmp_path)
    assert_one_error_line(proc, contains=expect)
    assert str(path) in proc.stderr
    assert proc.stdout == ""


def test_check_contrib_config(tmp_path):
    proc = run("check", "-c", ROOT / "contrib" / "backupmx.ini", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "ok: config" in proc.stdout
    assert f"{tmp_path}/backupmx-queue.db" in proc.stdout  # relative to the current directory
    assert not (tmp_path / "backupmx-queue.db").exists()  # check never creates the database


def test_config_option_before_or_after_the_command(tmp_path):
    good = write_config(tmp_path)
    for args in (["-c", good, "check"], ["check", "-c", good], ["--config", good, "check"],
                 ["-c", tmp_path / "nope.ini", "check", "--config", good],  # the later one wins
                 ["queue", "list", "-c", good], ["queue", "-c", good, "list"], ["-c", good, "queue"]):
        proc = run(*args, cwd=tmp_path)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_default_config_path(tmp_path):
    if os.path.exists("/etc/backupmx/backupmx.ini"):
        pytest.skip("a real /etc/backupmx/backupmx.ini exists")
    assert_one_error_line(run("check", cwd=tmp_path), contains="/etc/backupmx/backupmx.ini: cannot read")


@pytest.mark.parametrize("args, status", [
    ([], 2), (["bogus"], 2), (["flush"], 2), (["queue", "list", "--state", "lost"], 2),
    (["queue", "list", "--json", "--ids"], 2),
    (["etrn", "h"], 64),  # EX_USAGE: every etrn status is a sysexits.h one
    (["health", "--max-messages", "many"], 3),  # a plugin's mistake is UNKNOWN, never WARNING
])
def test_usage_errors(tmp_path, args, status):
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == status
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_serve_tls_needs_inetd(tmp_path):
    assert_one_error_line(run("serve", "--tls", "-c", write_config(tmp_path), cwd=tmp_path), contains="--inetd")


def test_inetd_errors_never_reach_stdout_or_stderr(tmp_path):
    """Under --inetd stdout is the client's socket: a broken config gives the client a 421, nothing else."""
    for path in (tmp_path / "nope.ini", write_config(tmp_path, extra_global="colour = blue\n")):
        proc = subprocess.run([sys.executable, LAUNCHER, "serve", "--inetd", "-c", path], cwd=tmp_path,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert proc.returncode == 1
        assert proc.stderr == b""
        assert proc.stdout == b"421 4.3.0 Service not available, closing transmission channel\r\n"


def test_passwd_from_stdin(tmp_path):
    auth = pytest.importorskip("backupmx.auth")
    proc = run("passwd", cwd=tmp_path, stdin="correct horse % battery\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("{SCRYPT}")
    assert auth.verify_password("correct horse % battery", lines[0])
    assert not auth.verify_password("correct horse % battery\n", lines[0])
    # The printed value is accepted by the config.
    config = write_config(tmp_path, extra=f"[user:p]\npassword = {lines[0]}\ndomains = example.com\n")
    assert run("check", "-c", config, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_passwd_refuses_empty(tmp_path, stdin):
    pytest.importorskip("backupmx.auth")
    assert_one_error_line(run("passwd", cwd=tmp_path, stdin=stdin), contains="empty")


# --------------------------------------------------------------------------
# check: certificate, key, database


def tls_config(tmp_path, key="server.key", mode=0o600):
    shutil.copy(CERTS / "server.pem", tmp_path / "cert.pem")
    shutil.copy(CERTS / key, tmp_path / "key.pem")
    os.chmod(tmp_path / "key.pem", mode)
    return write_config(tmp_path, extra_global=f"tls_cert = {tmp_path}/cert.pem\ntls_key = {tmp_path}/key.pem\n")


def test_check_good_certificate(tmp_path):
    proc = run("check", "-c", tls_config(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok: tls certificate" in proc.stdout


@pytest.mark.parametrize(
    "key, mode, expect",
    [("other.key", 0o600, "key.pem"), ("server.key", 0o644, "key.pem"), ("server.pem", 0o600, "key.pem")],
    ids=["mismatched key", "world-readable key", "not a key"],
)
def test_check_bad_key(tmp_path, key, mode, expect):
    proc = run("check", "-c", tls_config(tmp_path, key, mode), cwd=tmp_path)
    assert_one_error_line(proc, contains=expect)


def test_check_missing_cert(tmp_path):
    config = write_config(tmp_path, extra_global=f"tls_cert = {tmp_path}/no.pem\ntls_key = {tmp_path}/no.key\n")
    assert_one_error_line(run("check", "-c", config, cwd=tmp_path), contains="no.")


def test_check_database(tmp_path):
    config = write_config(tmp_path)
    db = tmp_path / "queue.db"
    # A real SQLite database that is fine.
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    proc = run("check", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "integrity_check ok" in proc.stdout
    # Garbage where the database should be.
    db.write_bytes(b"this is not a database" * 100)
    proc = run("check", "-c", config, cwd=tmp_path)
    assert proc.returncode == 1 and "queue.db" in proc.stderr and "Traceback" not in proc.stderr


def test_check_quick_leaves_out_the_read_of_the_whole_database(tmp_path):
    """integrity_check reads every page (minutes at a million messages, cold): `check --quick`, the
    systemd unit's ExecStartPre, keeps the config, key and schema checks and leaves that read out."""
    from backupmx.store import QueueStore

    config = write_config(tmp_path)
    db = tmp_path / "queue.db"
    QueueStore(str(db)).close()
    with sqlite3.connect(db) as con:  # a table spread over pages of its own, one of them damaged below
        con.execute("CREATE TABLE filler (x)")
        con.executemany("INSERT INTO filler VALUES (?)", [("y" * 500,) for _ in range(200)])
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'filler'").fetchone()[0]
    con.close()
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[(root - 1) * page: root * page] = b"\xa5" * page
    db.write_bytes(bytes(data))
    whole = run("check", "-c", config, cwd=tmp_path)
    assert whole.returncode == 1 and "queue.db" in whole.stderr and "Traceback" not in whole.stderr
    quick = run("check", "--quick", "-c", config, cwd=tmp_path)
    assert quick.returncode == 0, quick.stderr
    assert "not read whole (--quick" in quick.stdout
    assert "check --quick" in (Path(__file__).parent.parent / "contrib/systemd/backupmx.service").read_text()


def test_check_finds_queue_rows_the_reclaim_cannot_see(tmp_path):
    """The reclaim deletes a message unless message_domains names one of its waiting rows
    (schema 15): a row whose name was deleted by hand loses its mail once the message's other
    rows go. `check` counts such rows in one line, with the statement that names them again."""
    from backupmx.envelope import Envelope, Recipient
    from backupmx.store import QueueStore

    config = write_config(tmp_path)
    db = tmp_path / "queue.db"
    with QueueStore(str(db)) as store:
        body = b"Subject: x\r\n\r\nx\r\n"
        envelope = Envelope("s@example.org", [Recipient("u@example.com", "example.com"),
                                              Recipient("v@sub.example.com", "sub.example.com")])
        queue_one(store, "Q1", envelope, io.BytesIO(body), len(body), client="192.0.2.1", helo="c.example.org")
    proc = run("check", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0 and "every queue row in message_domains" in proc.stdout, proc.stderr
    with sqlite3.connect(db) as shell:  # an operator's "clean-up" of the table, past its guard
        shell.execute("DROP TRIGGER message_domains_kept")
        shell.execute("DELETE FROM message_domains WHERE domain = 'sub.example.com'")
    shell.close()
    assert_one_error_line(run("check", "-c", config, cwd=tmp_path),
                          contains="1 queue row(s) missing from message_domains: their mail can be lost")
    repair = run("check", "-c", config, cwd=tmp_path).stderr.split("run: sqlite3 ", 1)[1].strip()
    path, statement = repair.split(" ", 1)
    with sqlite3.connect(path) as shell:
        shell.execute(statement.strip("'"))
    shell.close()
    assert run("check", "-c", config, cwd=tmp_path).returncode == 0


def test_check_database_directory_missing(tmp_path):
    config = tmp_path / "c.ini"
    config.write_text(write_config(tmp_path).read_text().replace("/queue.db", "/missing/queue.db"))
    assert_one_error_line(run("check", "-c", config, cwd=tmp_path), contains="missing")


def test_check_unknown_user_and_warnings(tmp_path):
    config = write_config(tmp_path, extra_global="user = no-such-user-backupmx\n",
                          extra="[user:p]\npassword = {PLAIN}x\ndomains = example.com\n")
    proc = run("check", "-c", config, cwd=tmp_path)
    assert proc.returncode == 1
    assert "no-such-user-backupmx" in proc.stderr
    assert "warning:" in proc.stderr and "AUTH" in proc.stderr  # users but no certificate


@pytest.mark.parametrize("password, mode, refused", [
    ("{PLAIN}s3cret", 0o644, True),
    ("{PLAIN}s3cret", 0o604, True),
    ("{PLAIN}s3cret", 0o640, False),  # group-readable: `user`'s group reads it to reload on SIGHUP
    ("{PLAIN}s3cret", 0o600, False),
    ("{SCRYPT}n=16384,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=", 0o644, False),
], ids=["plain-0644", "plain-0604", "plain-0640", "plain-0600", "scrypt-0644"])
def test_check_refuses_plain_secrets_that_everyone_can_read(tmp_path, password, mode, refused):
    config = tls_config(tmp_path)
    config.write_text(config.read_text() + f"[user:prim]\npassword = {password}\ndomains = example.com\n")
    config.chmod(mode)
    proc = run("check", "-c", config, cwd=tmp_path)
    if not refused:
        # ({SCRYPT} draws the warning that it cannot serve SCRAM-SHA-256, nothing else)
        assert proc.returncode == 0 and "readable by everyone" not in proc.stderr, proc.stderr
        return
    assert_one_error_line(proc, contains=f"{config}: readable by everyone (mode {mode:04o}) but holds {{PLAIN}} secrets")
    assert "[user:prim]" in proc.stderr and "chmod o-r" in proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout


def test_serve_with_world_readable_plain_secrets_starts_but_warns(server_factory):
    old_umask = os.umask(0o022)  # the config is written 0644
    try:
        server = server_factory(users={"prim": ("{PLAIN}s3cret", "example.com")})
    finally:
        os.umask(old_umask)
    assert os.stat(server.config_path).st_mode & 0o777 == 0o644
    [line] = [line for line in server.log().splitlines() if "config-warning" in line and "{PLAIN}" in line]
    assert "readable by everyone" in line and line.endswith("level=warning")
    assert "s3cret" not in server.log()


# --------------------------------------------------------------------------
# The queue commands, against a real store


@pytest.fixture
def queued(tmp_path):
    store_mod = pytest.importorskip("backupmx.store")
    from backupmx.envelope import Envelope, Recipient

    config = write_config(tmp_path)
    store = store_mod.QueueStore(str(tmp_path / "queue.db"))
    try:
        body = b"Subject: hello\r\n\r\nbody \xff bytes\r\n"
        queue_id = store.new_queue_id()
        envelope = Envelope(
            sender="alice@example.org",
            recipients=[Recipient("bob@example.com", "example.com"), Recipient("carol@sub.example.com", "sub.example.com")],
        )
        queue_one(store, queue_id, envelope, io.BytesIO(body), len(body), client="192.0.2.1", helo="client.example.org")
    finally:
        store.close()
    return config, queue_id, body


def test_queue_summary_and_list(tmp_path, queued):
    config, queue_id, body = queued
    proc = run("queue", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:4] == ["domain", "messages", "bytes", "oldest"]
    assert [r.split()[:3] for r in rows] == [["example.com", "1", str(len(body))], ["sub.example.com", "1", str(len(body))]]
    assert rows[0].split()[4] == "1"  # the "<1h" histogram column

    proc = run("queue", "list", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    fields = lines[0].split()
    assert fields[0] == queue_id and fields[1] == "example.com" and fields[2] == "queued"
    assert "<alice@example.org>" in lines[0] and "bob@example.com" in lines[0] and "attempts=0" in lines[0]

    proc = run("queue", "list", "sub.example.com", "-c", config, cwd=tmp_path)
    assert proc.stdout.splitlines()[0].split()[1] == "sub.example.com" and len(proc.stdout.splitlines()) == 1
    proc = run("queue", "list", "--state", "held", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == ""


def test_show_hold_release_delete(tmp_path, queued):
    config, queue_id, body = queued
    proc = subprocess.run([sys.executable, LAUNCHER, "show", queue_id, "-c", config], cwd=tmp_path,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(b"\n\n" + body)  # the message, byte for byte, after the envelope
    assert f"queue_id: {queue_id}".encode() in proc.stdout

    proc = run("hold", queue_id.lower(), "-c", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    held = run("queue", "list", "--state", "held", "-c", config, cwd=tmp_path).stdout.splitlines()
    assert len(held) == 2
    proc = run("release", "sub.example.com", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    held = run("queue", "list", "--state", "held", "-c", config, cwd=tmp_path).stdout.splitlines()
    assert [line.split()[1] for line in held] == ["example.com"]

    proc = run("delete", queue_id, "-c", config, cwd=tmp_path)  # stdin is not a tty: needs --yes
    assert_one_error_line(proc, contains="--yes")
    assert len(run("queue", "list", "-c", config, cwd=tmp_path).stdout.splitlines()) == 2
    proc = run("delete", queue_id, "--yes", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert run("queue", "list", "-c", config, cwd=tmp_path).stdout == ""
    shown = run("show", queue_id, "-c", config, cwd=tmp_path)  # gone, but its history is kept
    assert shown.returncode == 0 and f"queue_id: {queue_id} (no longer in the queue: deleted)" in shown.stdout
    assert_one_error_line(run("show", "ZZZZZZZZZZZZZZ", "-c", config, cwd=tmp_path), contains="no such message")
    proc = run("hold", queue_id, "-c", config, cwd=tmp_path)
    assert proc.returncode == 1 and "nothing matched" in proc.stderr


def test_flush(tmp_path, queued):
    config, queue_id, body = queued
    proc = run("flush", "Example.COM.", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "253 OK, 1 pending messages for node example.com started\n"
    proc = run("flush", "@example.com", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert_one_error_line(run("flush", "example.org", "-c", config, cwd=tmp_path), contains="example.org")
    run("delete", "sub.example.com", "--yes", "-c", config, cwd=tmp_path)
    proc = run("flush", "sub.example.com", "-c", config, cwd=tmp_path)
    assert proc.stdout == "251 OK, no messages waiting for node sub.example.com\n"


def test_queue_without_database(tmp_path):
    config = write_config(tmp_path)
    proc = run("queue", "-c", config, cwd=tmp_path)
    assert proc.returncode == 0 and "no mail queued" in proc.stdout
    assert run("queue", "list", "-c", config, cwd=tmp_path).stdout == ""
    assert not (tmp_path / "queue.db").exists()


# --------------------------------------------------------------------------
# etrn and bundle


def test_etrn_needs_no_config_and_fails_in_one_line(tmp_path):
    pytest.importorskip("backupmx.etrnclient")
    (tmp_path / "pw").write_text("secret\n")
    proc = run("etrn", "127.0.0.1:1", "example.com", "--user", "u", "--password-file", tmp_path / "pw",
               cwd=tmp_path)
    assert proc.returncode == 75  # EX_TEMPFAIL: nobody listens there, try again later
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_bundle_runs_from_anywhere(tmp_path):
    if not (ROOT / "schema.sql").exists():
        pytest.skip("schema.sql not written yet")
    bundle = tmp_path / "out" / "backupmx.pyz"
    bundle.parent.mkdir()
    proc = run("bundle", "-o", bundle, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(bundle) as z:
        names = set(z.namelist())
        assert z.read("backupmx/schema.sql") == (ROOT / "schema.sql").read_bytes()
    assert {"__main__.py", "backupmx/__init__.py", "backupmx/cli.py", "backupmx/config.py"} <= names
    assert not any(n.endswith(".pyc") or "__pycache__" in n or n.startswith("tests/") for n in names)
    assert bundle.read_bytes().startswith(b"#!/usr/bin/env python3\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = write_config(elsewhere)
    proc = run("check", "-c", config, cwd=elsewhere, launcher=bundle)
    assert proc.returncode == 0, proc.stderr
    assert "ok: config" in proc.stdout
    # A bundle can bundle itself (the package is read through importlib.resources).
    proc = run("bundle", "-o", elsewhere / "again.pyz", cwd=elsewhere, launcher=bundle)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(elsewhere / "again.pyz") as z:
        assert set(z.namelist()) == names


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (45, "45s"), (300, "5m0s"), (3 * 3600 + 12 * 60 + 5, "3h12m"), (2 * 86400 + 4 * 3600, "2d4h"), (-5, "0s")],
)
def test_humanize_age(seconds, text):
    assert humanize_age(seconds) == text


def run_on_tty(args, answers, timeout=30):
    """Run the launcher on a pseudo-terminal, answering each prompt in turn; return (status, output)."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal, as getpass needs
        try:
            os.execv(sys.executable, [sys.executable, str(LAUNCHER), *args])
        finally:
            os._exit(127)
    output, answers, deadline = b"", list(answers), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            if answers and output.endswith(b": "):  # a prompt ("Password: ", "Again: ") waits
                os.write(fd, answers.pop(0).encode() + b"\n")
        for _ in range(200):  # the child has closed the terminal; it is exiting
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_passwd_on_a_tty_asks_twice():
    auth = pytest.importorskip("backupmx.auth")
    status, output = run_on_tty(["passwd"], ["s3cret", "s3cret"])
    assert status == 0, output
    assert "Password:" in output and "Again:" in output and "s3cret" not in output  # not echoed
    value = [line for line in output.splitlines() if line.startswith("{SCRYPT}")]
    assert len(value) == 1 and auth.verify_password("s3cret", value[0].strip())
    status, output = run_on_tty(["passwd"], ["s3cret", "other"])
    assert status == 1 and "do not match" in output and "{SCRYPT}" not in output
