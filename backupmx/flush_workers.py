"""The flush workers one master keeps: spawned, ready, reaped, respawned, their leases released.

The master (master.py) supervises; this is its part for flush workers, and
asks its `supervisor` (the Master) for what is the master's: the current
config, generation and logger, its selector, its SIGNALS (blocked across
children.fork_blocking) and close_in_child().

- Each flush worker gets a pipe and says "ready" on it once its queue is open
  (flush_worker_child), or "error <why>" before it exits with BOOT_ERROR. At
  start-up the master serves nothing until every one is ready
  (Master.start_flushers); later, one that cannot start is logged at ERROR
  and tried again after FLUSHER_RETRY_MIN, doubled each time up to
  FLUSHER_RETRY_MAX, while the server keeps taking mail.
- Each has a lease owner name of its own (flusher_owner: the pid is in it),
  so a respawned one never renews its predecessor's leases. When one that
  was ready dies (kill -9, the OOM killer), its leases are released at once
  and those flushes requested again (release_leases), instead of waiting
  3 x timeout + 30 s for the leases to run out.
"""

import logging
import os
import selectors
import signal
import socket
import time

from backupmx import children
from backupmx.children import BOOT_ERROR, QUICK_DEATH, RESPAWN_DELAY, StopFlag, describe_status, first_line
from backupmx.config import tuning
from backupmx.log import log_event
from backupmx.store import FlushRequests

# One that could not start (after start-up) is tried again after this long,
# doubled each time up to FLUSHER_RETRY_MAX.
FLUSHER_RETRY_MIN = 2.0
FLUSHER_RETRY_MAX = 60.0
# The master's own short write (releasing a dead flusher's leases) waits at
# most this long for the queue's write lock; then the lease running out does it.
LEASE_RELEASE_BUSY = tuning("BACKUPMX_LEASE_RELEASE_BUSY", 1.0)


class FlusherHandle:
    """The master's view of one flush worker."""

    def __init__(self, pid, slot, generation, owner=None, ready_fd=None):
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.owner = owner  # its name on the leases it takes (flushes.lease_owner)
        self.ready_fd = ready_fd  # the pipe it says "ready" (or "error <why>") on; None once read
        self.ready = False
        self.boot_error = None  # what it said when it could not start
        self.started = time.monotonic()
        self.retiring = False


def flusher_owner(master_pid, slot, generation, pid):
    """A flush worker's lease owner: unique per process, so a respawned one never shares its predecessor's."""
    return f"{socket.gethostname()}:{master_pid}:{slot}:{generation}:{pid}"


class FlushWorkers:
    """The flush workers of one master: `handles` (pid -> FlusherHandle) and what they need."""

    def __init__(self, supervisor, body):
        self.supervisor = supervisor
        self.body = body  # flush_worker(config, owner, should_stop, ready=): flusher.run_flush_worker
        self.handles = {}
        self.respawn_after = {}  # slot -> monotonic
        self.boot_failures = {}  # slot -> failed starts in a row
        self.boot_failure = None  # during start-up: why one could not start

    @property
    def all_ready(self):
        return bool(self.handles) and all(f.ready for f in self.handles.values())

    def manage(self):
        """Keep config.flush_workers running (of the current generation)."""
        busy = {f.slot for f in self.handles.values() if not f.retiring}
        now = time.monotonic()
        for slot in range(self.supervisor.config.flush_workers):
            if slot not in busy and now >= self.respawn_after.get(slot, 0.0):
                self.spawn(slot)

    def spawn(self, slot):
        master = self.supervisor
        ready_r = ready_w = None
        try:
            ready_r, ready_w = os.pipe()
            pid = children.fork_blocking(master.SIGNALS)
        except OSError as exc:
            for fd in (ready_r, ready_w):
                if fd is not None:
                    os.close(fd)
            log_event(master.logger, "fork-failed", error=exc.strerror)
            self.respawn_after[slot] = time.monotonic() + RESPAWN_DELAY
            return
        if pid == 0:
            os.close(ready_r)
            master.close_in_child()
            config, logger, body = master.config, master.logger, self.body
            owner = flusher_owner(master.pid, slot, master.generation, os.getpid())
            stop = StopFlag(parent=master.pid)
            children.run_child(lambda: flush_worker_child(body, config, owner, stop, ready_w, logger),
                               logger, "flush-worker-crashed")
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        owner = flusher_owner(master.pid, slot, master.generation, pid)
        f = FlusherHandle(pid, slot, master.generation, owner, ready_r)
        self.handles[pid] = f
        master.selector.register(ready_r, selectors.EVENT_READ, f)
        log_event(master.logger, "flush-worker-started", pid=pid, owner=owner)

    def read_ready(self, f):
        """What a flush worker said on its ready pipe: "ready", or "error <why>" before it exits."""
        data = children.read_pipe(f.ready_fd, 512)
        if data is None:
            return
        text = data.decode("utf-8", "replace").strip()
        if text == "ready":
            f.ready = True
            self.boot_failures.pop(f.slot, None)
        elif text.startswith("error "):
            f.boot_error = text[6:]
        self.forget_ready_fd(f)

    def forget_ready_fd(self, f):
        if f.ready_fd is not None:
            children.forget_pipe(self.supervisor.selector, f.ready_fd)
            f.ready_fd = None

    def close_in_child(self):
        """In a fresh child of the master: the ready pipes are the master's."""
        for f in self.handles.values():
            if f.ready_fd is not None:
                os.close(f.ready_fd)

    def signal_all(self, sig, *, retiring=False):
        for f in self.handles.values():
            f.retiring = f.retiring or retiring
            children.send_signal(f.pid, sig)

    def wait_until_ready(self, timeout):
        """At start-up: spawn them and turn the master's loop (supervisor.poll) until every one
        is ready. None then; else why one could not start, with none of them left running."""
        master = self.supervisor
        deadline = time.monotonic() + timeout
        while not self.all_ready and self.boot_failure is None and not master.stopping:
            if time.monotonic() > deadline:
                self.boot_failure = f"not ready after {timeout:g}s"
                break
            self.manage()  # the first time, and again for one whose fork failed
            master.poll()
        if self.boot_failure is None:
            return None
        log_event(master.logger, "flush-worker-boot-failed", error=self.boot_failure, level=logging.ERROR)
        self.signal_all(signal.SIGKILL)
        while self.handles:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.handles.pop(pid, None)
        return self.boot_failure

    def retire_all(self):
        """A reload: the running ones finish their flush and exit; the new generation starts."""
        self.signal_all(signal.SIGTERM, retiring=True)
        self.respawn_after.clear()

    def exited(self, f, status, *, stopping, serving):
        """A flush worker was reaped: its leases, why it went, when the next one starts."""
        master = self.supervisor
        self.forget_ready_fd(f)
        if f.ready and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            release_leases(master.config.queue, f.owner, master.logger)  # exit 0: it released its own
        code = os.waitstatus_to_exitcode(status)
        if not f.ready and not stopping and (code == BOOT_ERROR or f.boot_error):
            return self.boot_failed(f, status, serving)
        if f.retiring or stopping:
            log_event(master.logger, "flush-worker-exited", pid=f.pid, status=describe_status(status))
            return
        log_event(master.logger, "flush-worker-died", pid=f.pid, status=describe_status(status))
        if time.monotonic() - f.started < QUICK_DEATH:
            self.respawn_after[f.slot] = time.monotonic() + RESPAWN_DELAY

    def boot_failed(self, f, status, serving):
        reason = f.boot_error or f"exited {describe_status(status)} before it was ready"
        if not serving:
            self.boot_failure = reason  # Master.start_flushers ends the start-up with it
            return
        failures = self.boot_failures.get(f.slot, 0) + 1
        self.boot_failures[f.slot] = failures
        delay = min(FLUSHER_RETRY_MAX, FLUSHER_RETRY_MIN * 2 ** (failures - 1))
        log_event(self.supervisor.logger, "flush-worker-boot-failed", pid=f.pid, error=reason, retry=f"{delay:g}s",
                  level=logging.ERROR)
        self.respawn_after[f.slot] = time.monotonic() + delay


def release_leases(queue, owner, logger, reason="flush worker died"):
    """A flush worker (or an ODMR session, odmr_sessions.py) died holding leases: free its
    domains now and request their flushes again (an ETRN was answered "started"). A short
    connection of the master's own, closed before any fork (no SQLite connection crosses one)."""
    try:
        with FlushRequests(queue, busy_timeout=LEASE_RELEASE_BUSY) as store:
            domains = store.release_leases_of(owner)
    except Exception as exc:  # busy, or gone: the leases still run out by themselves
        log_event(logger, "flush-lease-release-failed", owner=owner, error=first_line(exc), level=logging.WARNING)
        return
    for domain in domains:
        log_event(logger, "flush-lease-released", domain=domain, owner=owner, reason=reason)


def flush_worker_child(body, config, owner, stop, ready_fd, logger):
    """A forked flush worker: `body(config, owner, should_stop, ready=)`, which calls ready()
    once its queue is open. Whatever stops it before that (an ImportError, a queue it cannot
    open) goes to the master on the ready pipe, and the exit status is BOOT_ERROR."""
    booted = False

    def ready():
        nonlocal booted
        booted = True
        _tell(ready_fd, "ready")

    stop.install(wakeup=True)  # its pauses (flusher._pause) end at the master's SIGTERM, without polling
    try:
        body(config, owner, stop.should_stop, ready=ready)
    except Exception as exc:
        if booted:
            raise
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        _tell(ready_fd, "error " + reason)
        log_event(logger, "flush-worker-boot-failed", pid=os.getpid(), error=reason, level=logging.ERROR)
        raise SystemExit(BOOT_ERROR) from None


def _tell(fd, text):
    try:
        os.write(fd, text.encode("utf-8", "replace")[:500])
        os.close(fd)
    except OSError:  # the master is gone, or was told already
        pass
