"""Deployment modes with real processes (issue 4): inetd with ETRN, socket
activation by descriptor name, privilege drop, SIGHUP with new certificates and
domains, the single-file zipapp, and a world-readable key refused.

test_master.py covers the basics of these modes already (a QUIT-only inetd
session, activation by "plain"/"tls" names, a SIGHUP changing the hostname);
this file covers what an administrator deploys on top of them.
"""

import base64
import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import CERTS, REPO, end_process_group, free_port, queue_one, read_line, wait_for, write_config

PASSWORD = "inetd%s3cret"
AUTH_PLAIN = base64.b64encode(b"\0prim\0" + PASSWORD.encode()).decode()
BODY = b"Subject: deploy\r\n\r\n.leading dot\r\nhello\r\n"


# -- helpers ---------------------------------------------------------------------


class LineClient:
    """A minimal SMTP client over any connected stream socket (a socketpair end, too)."""

    def __init__(self, sock, timeout=10.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(f"connection closed; partial {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self):
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return int(lines[0][:3]), b"\n".join(lines)

    def cmd(self, text):
        self.sock.sendall(text.encode("ascii") + b"\r\n")
        return self.reply()

    def starttls(self, context):
        code, text = self.cmd("STARTTLS")
        assert code == 220, text
        assert self.buf == b""
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def send_message(self, sender, rcpt, body=BODY):
        assert self.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        assert self.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert self.cmd("DATA")[0] == 354
        stuffed = (b"." + body if body.startswith(b".") else body).replace(b"\r\n.", b"\r\n..")
        self.sock.sendall(stuffed + b".\r\n")  # RFC 5321 4.5.2 transparency
        code, text = self.reply()
        assert code == 250, text
        return text


def ca_context():
    return ssl.create_default_context(cafile=str(CERTS / "ca.pem"))


def key_copy(tmp_path, name="server.key"):
    key = Path(tmp_path) / name
    shutil.copyfile(CERTS / name, key)
    key.chmod(0o600)
    return key


def inetd_config(tmp_path, sink_port, **extra):
    """Config for inetd tests: TLS, one ETRN user, example.com delivered to the sink."""
    certs = {"server_cert": str(CERTS / "server.pem"), "server_key": str(key_copy(tmp_path))}
    return write_config(
        Path(tmp_path) / "inetd.ini", port=free_port(), queue=Path(tmp_path) / "q.db", certs=certs,
        log=str(Path(tmp_path) / "inetd.log"),
        domains={"example.com": {"primary": f"127.0.0.1:{sink_port}", "primary_tls": "none"}},
        users={"prim": ("{PLAIN}" + PASSWORD, "example.com")}, **extra)


@contextlib.contextmanager
def inetd_session(command, cfg, *, tls=False, cwd):
    """start_inetd, then kill what is left of it and close our end, whatever the test did."""
    proc, ours = start_inetd(command, cfg, tls=tls, cwd=cwd)
    try:
        yield proc, ours
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ours.close()


def start_inetd(command, cfg, *, tls=False, cwd):
    """Run `command serve --inetd [--tls] -c cfg` on one end of a socketpair; returns (proc, our end)."""
    ours, theirs = socket.socketpair()
    argv = list(command) + ["serve", "--inetd"] + (["--tls"] if tls else []) + ["-c", str(cfg)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.Popen(argv, stdin=theirs, stdout=theirs, stderr=theirs, cwd=str(cwd), env=env)
    theirs.close()
    return proc, ours


def queued_rows(queue, domain="example.com"):
    db = sqlite3.connect(str(queue))
    try:
        return db.execute("SELECT COUNT(*) FROM queue WHERE domain = ? AND state = 'queued'", (domain,)).fetchone()[0]
    finally:
        db.close()


def flusher_pid(log_path):
    text = Path(log_path).read_text() if Path(log_path).exists() else ""
    for line in text.splitlines():
        if "flush-process-started" in line:
            return int(line.split("pid=")[1].split()[0])
    return None


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def status_ids(pid):
    """(real uid, real gid, supplementary groups) of a live process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0]), fields["Groups"].split()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """`backupmx bundle -o backupmx.pyz` from the checkout, once for this file."""
    out = tmp_path_factory.mktemp("bundle") / "backupmx.pyz"
    result = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "bundle", "-o", str(out)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return out


# -- 1. serve --inetd: ETRN delivery outlives the session ---------------------------


def test_inetd_starttls_auth_etrn_delivers_after_the_session(tmp_path, sink):
    # The delivery is still going on when the session has ended: the primary's 250 waits until the
    # test has looked (a 0.5 s delay raced a loaded machine's process starts).
    looked = threading.Event()
    sink.on_delivery = lambda number, delivery: looked.wait(30)
    try:
        cfg = inetd_config(tmp_path, sink.port)
        with inetd_session([sys.executable, str(REPO / "backupmx.py")], cfg, cwd=tmp_path) as (proc, ours):
            c = LineClient(ours)
            assert c.reply()[0] == 220
            assert c.cmd("EHLO primary.test")[0] == 250
            c.send_message("alice@origin.test", "bob@example.com")
            c.starttls(ca_context())
            code, text = c.cmd("EHLO primary.test")
            assert code == 250 and b"AUTH" in text
            assert c.cmd("AUTH PLAIN " + AUTH_PLAIN)[0] == 235
            code, text = c.cmd("ETRN example.com")
            assert code in (250, 253), text
            assert c.cmd("QUIT")[0] == 221
            assert proc.wait(5) == 0
        log = tmp_path / "inetd.log"
        pid = wait_for(lambda: flusher_pid(log), 10)
        assert pid, log.read_text()
        # The session process is gone, the delivery is not done yet: a detached flusher is.
        assert queued_rows(tmp_path / "q.db") == 1
        assert alive(pid) and os.getsid(pid) == pid  # its own session: the supervisor's end of it does not end it
    finally:
        looked.set()
    messages = sink.wait_for(1, timeout=10)
    assert messages[0][0] == "alice@origin.test" and messages[0][1] == ["bob@example.com"]
    assert messages[0][2].endswith(BODY)
    assert wait_for(lambda: queued_rows(tmp_path / "q.db") == 0, 10)
    assert wait_for(lambda: not alive(pid), 10)  # it exits once nothing is left to claim
    text = log.read_text()
    assert "flush-done domain=example.com" in text and "delivered=1" in text, text


def test_inetd_implicit_tls_etrn_through_the_zipapp(tmp_path, sink, bundle):
    cfg = inetd_config(tmp_path, sink.port)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [sys.executable, str(bundle)]
    # A message arrives in one plain session ...
    with inetd_session(command, cfg, cwd=elsewhere) as (proc, ours):
        c = LineClient(ours)
        assert c.reply()[0] == 220
        c.cmd("EHLO sender.test")
        c.send_message("carol@origin.test", "dave@example.com")
        assert c.cmd("QUIT")[0] == 221
        assert proc.wait(5) == 0
    # ... the primary asks for it in another, on an implicit-TLS socket (port 465 style).
    with inetd_session(command, cfg, tls=True, cwd=elsewhere) as (proc, ours):
        c = LineClient(ca_context().wrap_socket(ours, server_hostname="localhost"))
        assert c.reply()[0] == 220
        c.cmd("EHLO primary.test")
        assert c.cmd("AUTH PLAIN " + AUTH_PLAIN)[0] == 235
        assert c.cmd("ETRN example.com")[0] in (250, 253)
        assert c.cmd("QUIT")[0] == 221
        assert proc.wait(5) == 0
    messages = sink.wait_for(1, timeout=10)
    assert messages[0][1] == ["dave@example.com"]
    assert wait_for(lambda: queued_rows(tmp_path / "q.db") == 0, 10)


def test_inetd_etrn_with_nothing_waiting_starts_no_flusher(tmp_path, sink):
    cfg = inetd_config(tmp_path, sink.port)
    with inetd_session([sys.executable, str(REPO / "backupmx.py")], cfg, tls=True, cwd=tmp_path) as (proc, ours):
        c = LineClient(ca_context().wrap_socket(ours, server_hostname="localhost"))
        assert c.reply()[0] == 220
        c.cmd("EHLO primary.test")
        assert c.cmd("AUTH PLAIN " + AUTH_PLAIN)[0] == 235
        assert c.cmd("ETRN example.com")[0] == 251
        assert c.cmd("QUIT")[0] == 221
        assert proc.wait(5) == 0
    assert flusher_pid(tmp_path / "inetd.log") is None



def test_inetd_rebuilds_an_older_queue_once_and_says_so(tmp_path):
    """`serve --inetd` migrates as `serve` does: schema 13's one-time rebuild of a schema 12
    queue is logged (queue-rebuild before, queue-rebuilt after), and mail then queues."""
    from test_store import fill_schema_12

    cfg = inetd_config(tmp_path, free_port())
    fill_schema_12(str(tmp_path / "q.db"))
    with inetd_session([sys.executable, str(REPO / "backupmx.py")], cfg, cwd=tmp_path) as (proc, ours):
        c = LineClient(ours)
        assert c.reply()[0] == 220
        assert c.cmd("QUIT")[0] == 221
        assert proc.wait(5) == 0
    log = (tmp_path / "inetd.log").read_text()
    assert [w for w in re.findall(r"\bqueue-rebuil\w+", log)] == ["queue-rebuild", "queue-rebuilt"], log


# -- 2. socket activation: the descriptor names decide -----------------------------

ACTIVATE = r"""
import os, socket, sys
names, command = sys.argv[1].split(","), sys.argv[4:]  # argv[3] is "--"
ports = [int(p) for p in sys.argv[2].split(",")]
fds = []
for port in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    fds.append(os.dup(s.fileno()))
    s.close()
for i, fd in enumerate(fds):
    os.dup2(fd, 100 + i)
    os.close(fd)
for i in range(len(fds)):
    os.dup2(100 + i, 3 + i, inheritable=True)
    os.close(100 + i)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names), LISTEN_PID=str(os.getpid()))
os.execv(command[0], command)
"""


def test_socket_activation_tells_smtps_from_smtp_by_name(tmp_path):
    """contrib's units name the sockets smtp / smtps / odmr; nothing in the config says which port is which."""
    plain, tls, odmr = free_port(), free_port(), free_port()
    certs = {"server_cert": str(CERTS / "server.pem"), "server_key": str(key_copy(tmp_path))}
    cfg = write_config(tmp_path / "a.ini", port=free_port(), queue=tmp_path / "q.db", certs=certs)
    assert "listen_tls" not in cfg.read_text()
    log = open(tmp_path / "a.log", "wb")
    # smtps first: the order of the descriptors must not matter either
    proc = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, "smtps,smtp,odmr", f"{tls},{plain},{odmr}", "--", sys.executable,
         str(REPO / "backupmx.py"), "serve", "-c", str(cfg)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(tmp_path))
    try:
        from conftest import banner_ready

        assert wait_for(lambda: proc.poll() is not None or banner_ready(plain), 10) and proc.poll() is None, \
            (tmp_path / "a.log").read_text()
        with smtplib.SMTP("127.0.0.1", plain, timeout=5) as c:
            c.ehlo("x")
            assert c.has_extn("starttls")
        with smtplib.SMTP_SSL("localhost", tls, timeout=5, context=ca_context()) as c:
            c.ehlo("x")
            assert not c.has_extn("starttls")  # already TLS: the handshake came first
        with smtplib.SMTP("127.0.0.1", odmr, timeout=5) as c:  # ODMR (RFC 2645): no mail taken there
            assert c.ehlo("x")[1].split(b"\n")[1:] == [b"ENHANCEDSTATUSCODES", b"STARTTLS"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        end_process_group(proc)
        log.close()


# -- 4. SIGHUP: certificates and domains, sessions in flight kept -------------------


def test_sighup_new_certificate_and_domains_old_session_goes_on(server_factory, tmp_path):
    cert, key = tmp_path / "cert.pem", key_copy(tmp_path)
    shutil.copyfile(CERTS / "server.pem", cert)
    srv = server_factory(certs={"server_cert": str(cert), "server_key": str(key)},
                         env={"BACKUPMX_DRAIN_GRACE": "20"})
    old_workers = set(srv.children())
    old = smtplib.SMTP("localhost", srv.port, timeout=10)
    old.ehlo("x")
    old.starttls(context=ca_context())
    old.ehlo("x")
    assert old.mail("a@sender.test")[0] == 250

    # New certificate and key (written in place, as certbot's deploy hook does) and a new domain.
    shutil.copyfile(CERTS / "other.pem", cert)
    shutil.copyfile(CERTS / "other.key", key)
    cfg = Path(srv.config_path)
    cfg.write_text(cfg.read_text() + "\n[domain:new.test]\nprimary = 127.0.0.1:9\nprimary_tls = none\n")
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reloaded" in srv.log(), 5), srv.log()

    new_der = ssl.PEM_cert_to_DER_cert((CERTS / "other.pem").read_text())
    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE

    def served_cert():
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=5) as c:
            c.ehlo("x")
            c.starttls(context=insecure)
            return c.sock.getpeercert(binary_form=True)

    assert wait_for(lambda: served_cert() == new_der, 5)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=5) as c:
        c.ehlo("x")
        c.mail("a@sender.test")
        assert c.rcpt("x@new.test")[0] == 250

    # The session from before the reload finishes under the old settings, then its worker goes.
    code, _ = old.rcpt("x@new.test")
    assert code == 554
    assert old.rcpt("y@example.com")[0] == 250
    assert old.data(b"Subject: old\r\n\r\nfinished\r\n")[0] == 250
    old.quit()
    assert wait_for(lambda: not (old_workers & set(srv.children())), 5), srv.log()

    # A broken reload (the key became world-readable) is refused; the new certificate stays.
    key.chmod(0o644)
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload-failed" in srv.log(), 5)
    failed = [line for line in srv.log().splitlines() if "reload-failed" in line]
    assert len(failed) == 1 and "readable by everyone" in failed[0]
    assert served_cert() == new_der


# -- 5. the single-file zipapp ------------------------------------------------------


def test_zipapp_serves_from_another_directory(tmp_path, bundle):
    import zipfile

    names = zipfile.ZipFile(bundle).namelist()
    assert "backupmx/schema.sql" in names and "__main__.py" in names
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    port = free_port()
    cfg = write_config(tmp_path / "z.ini", port=port, queue=tmp_path / "z.db", workers=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    with open(tmp_path / "z.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-I", str(bundle), "serve", "-c", str(cfg)], cwd=str(elsewhere),
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        from conftest import banner_ready

        assert wait_for(lambda: proc.poll() is not None or banner_ready(port), 10) and proc.poll() is None, \
            (tmp_path / "z.log").read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
            refused = c.sendmail("a@sender.test", ["bob@example.com"], BODY)
            assert refused == {}
        assert queued_rows(tmp_path / "z.db") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        end_process_group(proc)
    listing = subprocess.run([sys.executable, "-I", str(bundle), "queue", "-c", str(cfg)], cwd=str(elsewhere),
                             capture_output=True, text=True, timeout=10, env=env)
    assert listing.returncode == 0 and "example.com" in listing.stdout, listing.stderr


# -- 3. keys, root, privilege drop ---------------------------------------------------


def test_world_readable_key_is_refused_in_one_line(tmp_path):
    key = key_copy(tmp_path)
    key.chmod(0o644)
    certs = {"server_cert": str(CERTS / "server.pem"), "server_key": str(key)}
    cfg = write_config(tmp_path / "k.ini", port=free_port(), queue=tmp_path / "q.db", certs=certs)
    result = subprocess.run([sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(cfg)],
                            capture_output=True, text=True, timeout=10, cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(key) in result.stderr and "readable by everyone" in result.stderr
    assert not (tmp_path / "q.db").exists()
    # Under --inetd the client gets a 421 and the reason goes to the log, not to the socket.
    cfg = write_config(tmp_path / "k2.ini", port=free_port(), queue=tmp_path / "q.db", certs=certs,
                       log=str(tmp_path / "k2.log"))
    with inetd_session([sys.executable, str(REPO / "backupmx.py")], cfg, cwd=tmp_path) as (proc, ours):
        assert read_line(ours).startswith(b"421 ")
        assert proc.wait(5) == 1
    assert "readable by everyone" in (tmp_path / "k2.log").read_text()


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs the test to run as root")


def _nobody():
    import pwd

    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this system")


def _world_usable(path):
    """Every directory above `path` can be traversed by anyone, and `path` read."""
    path = Path(os.path.realpath(path))
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in path.parents)


def python_for_nobody():
    """An interpreter (3.11+) that still works after the drop: the server imports lazily.

    This test machine's own Python may live under /root (mode 0700); then the
    system one is used for the server process.
    """
    if _world_usable(sys.executable) and _world_usable(os.path.join(sys.prefix, "lib")):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _world_usable(candidate):
            ok = subprocess.run([candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                                capture_output=True, timeout=10)
            if ok.returncode == 0:
                return candidate
    pytest.skip("no Python 3.11+ that user nobody can run (this one lives in a private directory)")


@pytest.fixture
def nobody_dir():
    """A directory under /tmp owned by nobody (pytest's tmp_path is root-only 0700)."""
    entry = _nobody()
    path = Path(tempfile.mkdtemp(prefix="backupmx-deploy-"))
    os.chown(path, entry.pw_uid, entry.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _owned_0600(path, uid):
    st = os.stat(path)
    return st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o600


@as_root
def test_root_drops_to_user_before_serving(tmp_path, nobody_dir):
    from conftest import banner_ready, children_of

    entry = _nobody()
    python = python_for_nobody()
    queue = nobody_dir / "queue.db"
    port = free_port()
    certs = {"server_cert": str(CERTS / "server.pem"), "server_key": str(key_copy(tmp_path))}  # root-only
    cfg = write_config(tmp_path / "r.ini", port=port, queue=queue, certs=certs, user="nobody")
    log_path = tmp_path / "r.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, str(REPO / "backupmx.py"), "serve", "-c", str(cfg)], cwd=str(nobody_dir),
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: proc.poll() is not None or banner_ready(port), 10) and proc.poll() is None, \
            log_path.read_text()
        text = log_path.read_text()
        assert "privileges-dropped user=nobody" in text and "running-as-root" not in text, text
        assert wait_for(lambda: len(children_of(proc.pid)) >= 3, 5)  # 2 SMTP workers, 1 flusher
        for pid in [proc.pid] + children_of(proc.pid):
            uid, gid, groups = status_ids(pid)
            assert (uid, gid) == (entry.pw_uid, entry.pw_gid), pid
            assert "0" not in groups
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.starttls(context=ca_context())  # the key was read as root, before the drop
            assert c.sendmail("a@sender.test", ["bob@example.com"], BODY) == {}
        for path in (queue, Path(f"{queue}-wal"), Path(f"{queue}-shm")):
            assert _owned_0600(path, entry.pw_uid), (path, os.stat(path))
        assert queued_rows(queue) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log_path.read_text()
    finally:
        end_process_group(proc)


@as_root
def test_root_owned_queue_is_handed_over_and_inetd_drops_too(tmp_path, nobody_dir):
    from backupmx.store import QueueStore

    entry = _nobody()
    python = python_for_nobody()
    queue = nobody_dir / "queue.db"
    QueueStore(str(queue)).close()  # as root: e.g. an earlier start without `user`
    assert os.stat(queue).st_uid == 0
    log = nobody_dir / "i.log"
    log.touch()
    os.chown(log, entry.pw_uid, entry.pw_gid)
    cfg = write_config(tmp_path / "i.ini", port=free_port(), queue=queue, user="nobody", log=str(log))
    with inetd_session([python, str(REPO / "backupmx.py")], cfg, cwd=nobody_dir) as (proc, ours):
        c = LineClient(ours)
        assert c.reply()[0] == 220, log.read_text()
        c.cmd("EHLO sender.test")
        c.send_message("a@sender.test", "bob@example.com")
        assert c.cmd("QUIT")[0] == 221
        assert proc.wait(5) == 0
    text = log.read_text()
    assert "queue-file-chowned" in text and "privileges-dropped user=nobody" in text, text
    assert _owned_0600(queue, entry.pw_uid)
    assert queued_rows(queue) == 1


@as_root
def test_flush_run_by_root_delivers_as_user(tmp_path, nobody_dir, sink):
    # SPEC Part 2, least privilege: `backupmx flush` and the flusher it starts
    # drop to `user`, and the queue's files stay `user`'s.
    from backupmx.envelope import Envelope, Recipient
    from backupmx.store import QueueStore

    entry = _nobody()
    python = python_for_nobody()
    queue = nobody_dir / "queue.db"
    with QueueStore(str(queue)) as store:  # as root: e.g. an earlier start without `user`
        queue_one(store, store.new_queue_id(), Envelope("a@sender.test", [Recipient("bob@example.com", "example.com")]),
                      BODY, len(BODY), client="192.0.2.1", helo="client.test")
    assert os.stat(queue).st_uid == 0
    log = nobody_dir / "f.log"
    cfg = write_config(nobody_dir / "f.ini", port=free_port(), queue=queue, user="nobody", log=str(log),
                       domains={"example.com": {"primary": f"127.0.0.1:{sink.port}", "primary_tls": "none"}})
    sink.data_delay = 0.5  # long enough to look at the flusher while it delivers
    done = subprocess.run([python, str(REPO / "backupmx.py"), "flush", "example.com", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=30, cwd=str(nobody_dir))
    assert done.returncode == 0 and done.stdout.startswith("253 "), done.stderr
    sink.wait(lambda: sink.data_received >= 1, timeout=10)
    pid = int(re.search(r"flush-process pid=(\d+)", log.read_text()).group(1))
    uid, gid, groups = status_ids(pid)
    assert (uid, gid) == (entry.pw_uid, entry.pw_gid) and "0" not in groups
    sink.wait_for(1, timeout=10)
    assert wait_for(lambda: not alive(pid), 10)
    for path in (queue, Path(f"{queue}-wal"), Path(f"{queue}-shm")):  # SQLite removes the last two on close
        assert not path.exists() or _owned_0600(path, entry.pw_uid), (path, os.stat(path))
    assert queued_rows(queue) == 0


@as_root
def test_root_without_user_warns_loudly(server_factory):
    srv = server_factory()
    lines = [line for line in srv.log().splitlines() if "running-as-root" in line]
    assert len(lines) == 1 and "user" in lines[0]


def test_inetd_tls_without_a_certificate_is_one_log_line(tmp_path):
    cfg = write_config(tmp_path / "n.ini", port=free_port(), queue=tmp_path / "q.db", log=str(tmp_path / "n.log"))
    with inetd_session([sys.executable, str(REPO / "backupmx.py")], cfg, tls=True, cwd=tmp_path) as (proc, ours):
        assert read_line(ours) == b""  # a TLS client cannot read a plaintext 421: just the close
        assert proc.wait(5) == 1
    log = (tmp_path / "n.log").read_text()
    assert "--tls needs tls_cert and tls_key" in log and "Traceback" not in log
