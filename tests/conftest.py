"""Shared fixtures for end-to-end tests: real server processes on 127.0.0.1.

    free_port()                      a TCP port nobody listens on (right now)
    flushes_in_progress(queue_path)  flush requests and leases outstanding (0: no flush can deliver more)
    certs                            fixture: paths of tests/certs/*, server.key copied 0600
    server_factory(**overrides)      starts `python3 backupmx.py serve -c cfg` and waits for its banner
    server                           server_factory() with the defaults

A started server is a RunningServer: .port, .tls_port, .queue_path, .proc,
.config_path, .log_path, .log() (its stderr so far), .stop(sig) -> exit status,
.children() (pids of its workers and flushers). Every server server_factory
started is killed at teardown, its whole process group at once (SIGKILL), so no
worker outlives a test.
"""

import compileall
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CERTS = Path(__file__).resolve().parent / "certs"
START_TIMEOUT = 10.0


def pytest_sessionstart(session):
    """Compile the package's bytecode once, before any test starts a process.

    The suite starts about 350 Python processes (servers, CLI commands, detached
    flushers). Where PYTHONDONTWRITEBYTECODE is set (this CI's environment) nothing
    wrote __pycache__ but the first `python3 -I` child (a detached flusher, in
    test_cli), and only for what it imports (not the master's modules): until then
    every process compiled its modules from source, ~0.1 s of CPU a `serve`, ~0.04 s a
    CLI command; on a fresh clone about 9 s of the test files before that point.
    Compiling here takes 0.2 s. Python checks each .pyc against its source's mtime
    and size as always (an edited module is compiled again); a checkout that cannot be
    written to runs as before."""
    compileall.compile_dir(str(REPO / "backupmx"), quiet=2)


def received_client(ip="127.0.0.1"):
    """How our Received: header names a client at `ip` on this machine: "(name [ip])", the name
    its reverse DNS confirms (client_dns; "localhost" where /etc/hosts says so) or "unknown"."""
    from backupmx.client_dns import SystemResolver, verified_name

    return f"({verified_name(SystemResolver(), ip)} [{ip}])"


def free_port(host="127.0.0.1"):
    """A port that was free a moment ago (bind to 0, read, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=5.0, interval=0.02):
    """Poll `predicate` until it returns something true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def read_line(sock, timeout=5.0):
    """One CRLF-terminated reply line from a plain socket (b"" on EOF)."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def children_of(pid):
    """Direct children of `pid` (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def queue_one(store, queue_id, envelope, body, size, *, client, helo, received_at=None, quotas=None):
    """Queue one message the way the SMTP workers do (enqueue_many, the group commit),
    raising the exception that kept it out (QueueUnavailable, QuotaExceeded, ValueError)."""
    from backupmx.store import Submission

    [problem] = store.enqueue_many([Submission(queue_id, envelope, body, size, client, helo, received_at)],
                                   quotas=quotas)
    if problem is not None:
        raise problem


def _record(store, outcome, queue_id, domain, addresses, reply, retry_after=None):
    """One delivery attempt's outcome for `addresses`, as the flusher records it (record_attempts)."""
    from backupmx.outcome import Outcome, Verdict

    verdict = Verdict.deferred(reply) if outcome is Outcome.DEFERRED else Verdict(outcome, reply)
    return store.record_attempts([(queue_id, domain, dict.fromkeys(addresses, verdict), retry_after)])[0]


def record_delivered(store, queue_id, domain, addresses, reply):
    """The primary accepted these recipients (2xx). Returns the row's state after, None once gone."""
    from backupmx.outcome import Outcome

    return _record(store, Outcome.DELIVERED, queue_id, domain, addresses, reply)


def reclaim(store):
    """What housekeeping's reclaim does (lifecycle._Round.reclaim), all at once: the
    messages whose last row left are deleted. Returns how many."""
    listed = store.reclaim_listed(1_000_000)
    deleted, _ = store.reclaim(sorted({queue_id for _, queue_id in listed}), 1 << 62)
    store.forget_reclaimed(listed)
    return deleted


def record_deferred(store, queue_id, domain, addresses, reply, *, retry_after=None):
    """4xx or connection trouble for these recipients."""
    from backupmx.outcome import Outcome

    return _record(store, Outcome.DEFERRED, queue_id, domain, addresses, reply, retry_after)


def record_failed(store, queue_id, domain, addresses, reply):
    """5xx for these recipients."""
    from backupmx.outcome import Outcome

    return _record(store, Outcome.FAILED, queue_id, domain, addresses, reply)


def pending_flushes(queue_path):
    """Domains with a flush request waiting (leased or not), oldest request first."""
    import sqlite3

    db = sqlite3.connect(str(queue_path))
    try:
        return [row[0] for row in db.execute(
            "SELECT domain FROM flushes WHERE requested_at IS NOT NULL ORDER BY requested_at, domain")]
    finally:
        db.close()


def flushes_in_progress(queue_path):
    """Flush requests not yet claimed and leases not yet released, in the queue at `queue_path`.

    0 means no flush is running or about to: nothing more can be delivered until
    someone asks again.
    """
    import sqlite3

    db = sqlite3.connect(str(queue_path))
    try:
        return db.execute("SELECT COUNT(*) FROM flushes WHERE requested_at IS NOT NULL"
                          " OR lease_owner IS NOT NULL").fetchone()[0]
    finally:
        db.close()


def wait_exit(proc, timeout):
    """proc.wait(timeout), woken the moment the process ends (a pidfd) rather than by
    Popen.wait's polling, which can add up to 50 ms to every server a test stops."""
    if proc.returncode is None:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:  # gone already (reaped below), or no pidfd on this kernel: poll
            return proc.wait(timeout)
        try:
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
    return proc.wait(0)  # TimeoutExpired if it is still running


def end_process_group(proc):
    """Kill what is left of a server started with start_new_session=True, and reap it."""
    if proc.poll() is None:
        proc.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture
def certs(tmp_path):
    """Paths of the committed test certificates; "server_key" is a 0600 copy in tmp."""
    if not (CERTS / "server.pem").exists():
        pytest.skip("tests/certs not there yet")
    key = tmp_path / "server.key"
    shutil.copyfile(CERTS / "server.key", key)
    key.chmod(0o600)
    return {
        "ca": str(CERTS / "ca.pem"),
        "server_cert": str(CERTS / "server.pem"),
        "server_key": str(key),
        "other_cert": str(CERTS / "other.pem"),
        "other_key": str(CERTS / "other.key"),
    }


class RunningServer:
    def __init__(self, proc, config_path, log_path, port, tls_port, queue_path):
        self.proc = proc
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        self.tls_port = tls_port
        self.queue_path = queue_path

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def children(self):
        return children_of(self.proc.pid)

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Send `sig`, wait up to `timeout` s; returns the exit status (SIGKILL after the wait)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                return wait_exit(self.proc, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill_group(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def write_config(
    path,
    *,
    port,
    queue,
    tls_port=None,
    certs=None,
    primary_port=None,
    users=None,
    domains=None,
    **globals_,
):
    """Write an INI config; `globals_` are extra/overriding [backupmx] keys (None removes a key)."""
    settings = {
        "hostname": "mx2.test",
        "listen": f"127.0.0.1:{port}",
        "queue": str(queue),
        "workers": "2",
        "flush_workers": "1",
        "timeout": "30s",
    }
    if tls_port is not None:
        settings["listen_tls"] = f"127.0.0.1:{tls_port}"
    if certs is not None:
        settings["tls_cert"] = certs["server_cert"]
        settings["tls_key"] = certs["server_key"]
    for key, value in globals_.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = str(value)
    lines = ["[backupmx]"] + [f"{k} = {v}" for k, v in settings.items()]
    if domains is None:
        primary = primary_port if primary_port is not None else free_port()
        domains = {
            "example.com": {"primary": f"127.0.0.1:{primary}", "primary_tls": "none"},
            "example.org": {"primary": f"127.0.0.1:{primary}", "primary_tls": "none"},
        }
    for name, keys in domains.items():
        lines.append(f"\n[domain:{name}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
    for name, (password, user_domains) in (users or {}).items():
        lines.append(f"\n[user:{name}]")
        lines.append(f"password = {password}")
        lines.append(f"domains = {user_domains}")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def banner_ready(port, timeout=0.5):
    """True once a client gets a 220 on `port` (the master is up and a worker answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            line = read_line(s, timeout)
            if line.startswith(b"220"):
                try:
                    s.sendall(b"QUIT\r\n")
                except OSError:
                    pass
                return True
    except OSError:
        pass
    return False


def start_server(tmp_path, *, env=None, tls=False, listen_tls=False, wait=True, **overrides):
    """Start a real server process; returns a RunningServer once its banner answers.

    tls=True configures tests/certs (STARTTLS); listen_tls=True also an
    implicit-TLS listener. Other keyword arguments go to write_config.
    """
    tmp_path = Path(tmp_path)
    port = overrides.pop("port", None) or free_port()
    tls_port = free_port() if listen_tls else None
    queue = overrides.pop("queue", tmp_path / "queue.db")
    certs = overrides.pop("certs", None)
    if (tls or listen_tls) and certs is None:
        certs = _certs(tmp_path)
    config_path = tmp_path / "backupmx.ini"
    write_config(config_path, port=port, queue=queue, tls_port=tls_port, certs=certs, **overrides)
    log_path = tmp_path / "server.log"
    full_env = dict(os.environ)
    full_env.pop("LISTEN_PID", None)
    full_env.pop("LISTEN_FDS", None)
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "backupmx.py"), "serve", "-c", str(config_path)],
            cwd=str(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=full_env,
            start_new_session=True,  # its own process group: teardown kills every worker
        )
    server = RunningServer(proc, str(config_path), str(log_path), port, tls_port, str(queue))
    if wait:
        ready = wait_for(lambda: proc.poll() is not None or banner_ready(port), START_TIMEOUT, 0.01)
        if proc.poll() is not None or not ready:
            text = server.log()
            server.stop(signal.SIGKILL)
            server.kill_group()
            raise AssertionError(f"server did not start (status {proc.returncode}):\n{text}")
    return server


def _certs(tmp_path):
    key = Path(tmp_path) / "server.key"
    shutil.copyfile(CERTS / "server.key", key)
    key.chmod(0o600)
    return {"ca": str(CERTS / "ca.pem"), "server_cert": str(CERTS / "server.pem"), "server_key": str(key)}


@pytest.fixture
def server_factory(tmp_path):
    """start_server bound to this test's tmp_path; every server is killed at teardown.

    Calling it twice in one test needs distinct directories: pass `sub="name"`.
    """
    started = []

    def factory(sub=None, **overrides):
        directory = tmp_path / sub if sub else tmp_path
        directory.mkdir(exist_ok=True)
        server = start_server(directory, **overrides)
        started.append(server)
        return server

    yield factory
    for server in started:
        # SIGKILL to the whole group, as test_master's stub servers: the test is over and no one
        # looks at how this server ends. A SIGTERM stop cost 0.1-0.2 s a server (the checkpointer's
        # look interval, each process's exit); the tests of a stop send their own and assert on it.
        server.kill_group()
        server.stop(signal.SIGKILL, timeout=10.0)


@pytest.fixture
def server(server_factory):
    return server_factory()


@pytest.fixture
def sink():
    """A real SMTP server playing the primary (tests/sink.py), stopped at teardown."""
    from sink import Sink

    with Sink() as primary:
        yield primary
