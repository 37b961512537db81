"""The SMTP workers one master keeps, and the hand-off of each accepted connection to one of them.

The master (master.py) accepts and supervises; this is its part for SMTP
workers, as flush_workers.py is for flush workers, and asks its
`supervisor` (the Master) for what is the master's: the current config,
generation, TLS context and logger, its selector, its SIGNALS (blocked across
children.fork_blocking), close_in_child(), the sessions per client across
workers (`clients`), its own refusals (`rejects`) and halt().

- The hand-off (dispatch): the client's socket goes over the chosen worker's
  control socket (SEQPACKET, with a "conn ..." header: see worker.py for the
  protocol); a worker holds up to SESSIONS_PER_WORKER sessions at once. New
  sessions go to the busiest worker below PACK_SESSIONS (pick_worker); when
  every worker is past SPAWN_THRESHOLD another one starts (up to
  max_workers); when none has room, the master's 421 (replies.BUSY).
- The verbs, gunicorn's: spawn, reap (Master.reap_workers: exited), murder,
  manage. A worker that stops sending heartbeats gets SIGABRT (its
  faulthandler writes the stack it was stuck in to the log), and SIGKILL if
  it is still there ABORT_GRACE seconds later; one started under load is
  drained after IDLE_RETIRE seconds without a session; one that exits with
  children.BOOT_ERROR halts the master rather than being respawned forever.
- The session count of each worker is the master's own (hand-offs minus the
  ips of its "closed" messages), which also covers connections still queued
  on its control socket.
"""

import collections
import errno
import os
import selectors
import signal
import socket
import time

from backupmx import children, replies, worker
from backupmx.children import BOOT_ERROR, QUICK_DEATH, RESPAWN_DELAY, describe_status
from backupmx.config import tuning
from backupmx.log import log_event

# Seconds without a heartbeat after which a worker is taken for hung and
# aborted (it sends one every worker.HEARTBEAT_INTERVAL).
HEARTBEAT_TIMEOUT = tuning("BACKUPMX_HEARTBEAT_TIMEOUT", 30.0)
# Seconds an aborted worker has to go (faulthandler writes its stack, then it
# dies of SIGABRT) before it is SIGKILLed. A stopped or wedged process ignores SIGABRT.
ABORT_GRACE = 1.0
# Sessions one worker holds at once (non-blocking sockets: fds, not processes).
SESSIONS_PER_WORKER = tuning("BACKUPMX_SESSIONS_PER_WORKER", 256, int)
# When every worker holds more than this many sessions, start another one (up to
# max_workers). High on purpose: idle and slow sessions cost descriptors, not
# processes, and `workers` already spreads busy ones over the cores.
SPAWN_THRESHOLD = tuning("BACKUPMX_SPAWN_THRESHOLD", 128, int)
# New sessions go to the busiest worker holding fewer than this many (then to the least
# loaded): one loop round and one group commit (one fsync, one turn of the write lock,
# one refill of SQLite's page cache after another process wrote) serve all of a worker's
# sessions, so 10 sessions in one worker cost about 0.65 of the CPU per message that the
# same 10 spread over 4 workers do (bench/README.md, issue 16); past it, a second worker
# takes the next ones and the cores share the load.
PACK_SESSIONS = tuning("BACKUPMX_PACK_SESSIONS", 32, int)
# A worker started beyond config.workers (under load) is drained after this
# many seconds without a session.
IDLE_RETIRE = 60.0


class WorkerHandle:
    """The master's view of one SMTP worker process."""

    def __init__(self, pid, ctrl, generation):
        self.pid = pid
        self.ctrl = ctrl  # the master's end of the SEQPACKET pair
        self.generation = generation
        self.sessions = 0
        self.clients = collections.Counter()  # ip -> sessions in this worker
        self.started = time.monotonic()
        self.last_seen = self.started
        self.draining = False
        self.aborted_at = None  # monotonic: when murder sent SIGABRT
        self.full_until = 0.0  # monotonic: its control socket refused a hand-off until then
        self.idle_since = self.started  # monotonic, None while it holds sessions


def pick_worker(room):
    """Of the workers with room: the busiest below PACK_SESSIONS (and SPAWN_THRESHOLD), else the
    least loaded; None when none has room."""
    packing = [w for w in room if w.sessions < min(PACK_SESSIONS, SPAWN_THRESHOLD)]
    if packing:
        return max(packing, key=lambda w: w.sessions)
    return min(room, key=lambda w: w.sessions) if room else None


class SmtpWorkers:
    """The SMTP workers of one master: `handles` (pid -> WorkerHandle) and what they need."""

    def __init__(self, supervisor):
        self.supervisor = supervisor
        self.handles = {}
        self.respawn_after = 0.0  # monotonic: no SMTP worker spawned before this

    def dispatch(self, listener, sock, ip, header):
        master = self.supervisor
        for _ in range(3):  # a worker whose control socket is full is skipped
            w = self.choose()
            if w is None:
                break
            try:
                socket.send_fds(w.ctrl, [header], [sock.fileno()])
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EPIPE, errno.ECONNRESET):
                    raise
                w.full_until = time.monotonic() + 1.0  # its control socket is full: skip it a moment
                continue
            w.sessions += 1
            w.idle_since = None
            w.clients[ip] += 1
            master.clients.opened(ip)
            sock.close()  # the worker has its own copy now
            return
        master.rejects.refuse(master.logger, master.config.hostname, sock, ip, replies.BUSY)
        listener.shutdown_request(sock)

    def active(self):
        return [w for w in self.handles.values() if not w.draining and w.aborted_at is None]

    def choose(self):
        """The worker for a new session (pick_worker); spawn one when all are past SPAWN_THRESHOLD."""
        active = self.active()
        now = time.monotonic()
        room = [w for w in active if w.sessions < SESSIONS_PER_WORKER and w.full_until <= now]
        if (not room or min(w.sessions for w in room) >= SPAWN_THRESHOLD) and \
                len(active) < self.supervisor.config.max_workers:
            w = self.spawn()
            if w is not None:
                return w
        return pick_worker(room)

    def spawn(self):
        master = self.supervisor
        if master.stopping or time.monotonic() < self.respawn_after:
            return None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = children.fork_blocking(master.SIGNALS)
        except OSError as exc:
            parent_end.close()
            child_end.close()
            log_event(master.logger, "fork-failed", error=exc.strerror)
            self.respawn_after = time.monotonic() + RESPAWN_DELAY
            return None
        if pid == 0:
            parent_end.close()
            master.close_in_child(keep=child_end)
            worker.run_worker(child_end, master.config, master.ssl_context, master.logger,
                              connection_class=master.connection_class)
        child_end.close()
        parent_end.setblocking(False)
        w = WorkerHandle(pid, parent_end, master.generation)
        self.handles[pid] = w
        master.selector.register(parent_end, selectors.EVENT_READ, w)
        log_event(master.logger, "worker-started", pid=pid, generation=master.generation)
        return w

    def close_in_child(self):
        """In a fresh child of the master: each worker must see EOF when the master dies."""
        for w in self.handles.values():
            w.ctrl.close()

    def drain_all(self, how):
        """Every worker drains (`how`: "drain", "retire" or "stop": worker.py), and the next
        generation may start at once: a worker that died a moment ago does not hold it back."""
        for w in list(self.handles.values()):
            self.drain(w, how)
        self.respawn_after = 0.0

    def drain(self, w, how):
        if w.draining and how != "stop":  # a stop still reaches a draining (retiring) worker
            return
        w.draining = True
        try:
            w.ctrl.send(how.encode("ascii"))
        except OSError:
            children.send_signal(w.pid, signal.SIGTERM)

    def read(self, w):
        """What a worker said on its control socket: heartbeats, and the sessions it closed."""
        for _ in range(1024):
            try:
                data = w.ctrl.recv(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker is gone; Master.reap_workers does the bookkeeping
                self.forget_ctrl(w)
                return
            w.last_seen = time.monotonic()
            words = data.decode("ascii", "replace").split()
            for ip in words[1:] if words[:1] == ["closed"] else ():  # the sessions one round of its loop ended
                self.session_closed(w, ip)
            # "hb <n>": last_seen above is all a heartbeat is for. The session
            # count stays the master's own (hand-offs minus "closed"), which
            # also covers connections still queued on the control socket.

    def session_closed(self, w, ip):
        if w.clients[ip] > 0:
            w.clients[ip] -= 1
            if not w.clients[ip]:
                del w.clients[ip]
            w.sessions = max(0, w.sessions - 1)
            if not w.sessions:
                w.idle_since = time.monotonic()
            self.supervisor.clients.closed(ip)

    def forget_ctrl(self, w):
        try:
            self.supervisor.selector.unregister(w.ctrl)
        except (KeyError, ValueError):
            pass

    def forget_sessions(self, w):
        for ip, n in w.clients.items():
            self.supervisor.clients.closed(ip, n)
        w.clients.clear()
        w.sessions = 0

    def exited(self, w, status):
        master = self.supervisor
        self.forget_ctrl(w)
        w.ctrl.close()
        lost = w.sessions
        self.forget_sessions(w)
        code = os.waitstatus_to_exitcode(status)
        if code == BOOT_ERROR and not master.stopping:
            log_event(master.logger, "worker-boot-failed", pid=w.pid, status=describe_status(status))
            master.halt(BOOT_ERROR)
            return
        if (w.draining or master.stopping) and code == 0:
            log_event(master.logger, "worker-exited", pid=w.pid)
            return
        log_event(master.logger, "worker-died", pid=w.pid, status=describe_status(status), sessions=lost)
        if time.monotonic() - w.started < QUICK_DEATH:
            self.respawn_after = time.monotonic() + RESPAWN_DELAY

    def murder(self):
        """A worker silent for HEARTBEAT_TIMEOUT gets SIGABRT; one still there ABORT_GRACE later, SIGKILL.

        SIGABRT first (gunicorn's order): the worker's faulthandler writes
        where it was stuck to the log before it dies.
        """
        now = time.monotonic()
        for w in self.handles.values():
            if w.aborted_at is None and now - w.last_seen > HEARTBEAT_TIMEOUT:
                log_event(self.supervisor.logger, "worker-hung", pid=w.pid, silent=f"{now - w.last_seen:.1f}s",
                          signal="SIGABRT")
                w.aborted_at = now
                children.send_signal(w.pid, signal.SIGABRT)
            elif w.aborted_at is not None and now - w.aborted_at > ABORT_GRACE:
                log_event(self.supervisor.logger, "worker-killed", pid=w.pid, reason="still there after SIGABRT")
                w.aborted_at = float("inf")  # once
                children.send_signal(w.pid, signal.SIGKILL)

    def manage(self):
        """Keep config.workers workers of the current generation running."""
        master = self.supervisor
        if master.stopping:
            return
        active = self.active()
        missing = master.config.workers - len(active)
        for _ in range(max(0, missing)):
            if self.spawn() is None:
                break
        # Workers spawned under load go again once they have been idle a while.
        now = time.monotonic()
        for w in active[master.config.workers:]:
            if w.sessions == 0 and w.idle_since is not None and now - w.idle_since > IDLE_RETIRE:
                log_event(master.logger, "worker-retired", pid=w.pid, reason="idle")
                self.drain(w, "drain")
