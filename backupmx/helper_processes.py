"""The master's helper processes: the metrics process and the checkpointer.

Each is a process of its own under the master, beside the SMTP and flush
workers: started, started again when it dies, replaced on SIGHUP (it runs with
the config it was started with), stopped with the rest. HelperProcess is that
life; MetricsProcess (metrics_http.py) and CheckpointerProcess
(checkpointer.py, with its heartbeat pipe) say what each runs;
HelperProcesses is the master's set of them.
"""

import logging
import os
import signal
import time

from backupmx import children
from backupmx.checkpointer import run_checkpointer
from backupmx.children import QUICK_DEATH, RESPAWN_DELAY, StopFlag, describe_status
from backupmx.config import tuning
from backupmx.flush_workers import FlusherHandle
from backupmx.log import log_event
from backupmx.metrics_http import run_metrics

# Seconds without a heartbeat after which the checkpointer is taken for hung and killed
# (it sends one every checkpointer.INTERVAL, or FAILURE_PAUSE while the disk fails it, and
# every quarter of this while a long checkpoint goes on: CPU used, or the queue's disk's
# sectors moved).
CHECKPOINTER_TIMEOUT = tuning("BACKUPMX_CHECKPOINTER_TIMEOUT", 30.0)


class HelperProcess:
    """A process of its own under the master, beside the workers: started, started again when it
    dies (after RESPAWN_DELAY when it died at once), replaced on SIGHUP (it runs with the config
    it was started with), stopped with the rest. A subclass says what it runs (`body`) and names
    it in the log lines (`name`-started, -died, -crashed)."""

    name = "helper"

    def __init__(self):
        self.handle: FlusherHandle | None = None  # the process now running, None when none
        self.respawn_after = 0.0

    @property
    def pid(self):
        return self.handle.pid if self.handle is not None else None

    def body(self, config, logger, should_stop):
        raise NotImplementedError

    def close_in_child(self, master):
        master.close_in_child()

    def close_fds(self, keep):
        """In a child of the master: this helper's descriptors are the master's (but `keep`)."""

    def manage(self, master):
        if master.stopping or self.handle is not None or time.monotonic() < self.respawn_after:
            return
        try:
            pid = children.fork_blocking(master.SIGNALS)
        except OSError as exc:
            log_event(master.logger, "fork-failed", error=exc.strerror)
            self.respawn_after = time.monotonic() + RESPAWN_DELAY
            return
        if pid == 0:
            self.close_in_child(master)
            config, logger, stop = master.config, master.logger, StopFlag(parent=master.pid)

            def run():
                stop.install()
                self.body(config, logger, stop.should_stop)

            children.run_child(run, logger, f"{self.name}-crashed")
        self.handle = FlusherHandle(pid, None, master.generation)
        log_event(master.logger, f"{self.name}-started", pid=pid)

    def exited(self, master, status):
        handle, self.handle = self.handle, None
        if handle.retiring or master.stopping:
            return
        log_event(master.logger, f"{self.name}-died", pid=handle.pid, status=describe_status(status),
                  level=logging.WARNING)
        if time.monotonic() - handle.started < QUICK_DEATH:
            self.respawn_after = time.monotonic() + RESPAWN_DELAY

    def stop(self, *, retiring=False):
        if self.handle is not None:
            self.handle.retiring = self.handle.retiring or retiring
            children.send_signal(self.handle.pid, signal.SIGTERM)


class MetricsProcess(HelperProcess):
    """The metrics process (metrics_http.py): GET /metrics on its socket, bound at start."""

    name = "metrics-process"

    def __init__(self, sock):
        super().__init__()
        self.sock = sock

    def close_in_child(self, master):
        master.close_in_child(keep=self.sock)

    def close_fds(self, keep):
        if keep is not self.sock:
            self.sock.close()

    def body(self, config, logger, should_stop):
        run_metrics(self.sock, config, logger, should_stop)


class CheckpointerProcess(HelperProcess):
    """The checkpointer (checkpointer.py): the WAL's checkpoints, off the writers' commits.

    It writes a byte on a pipe at each look, and while a long checkpoint copies, every quarter
    of CHECKPOINTER_TIMEOUT in which it used CPU or the queue's disk moved sectors; one silent
    for CHECKPOINTER_TIMEOUT is killed (SIGKILL) and started again: hung inside a checkpoint it
    holds SQLite's checkpoint lock, and the writers' backstop checkpoints cannot run until it is
    gone."""

    name = "checkpointer"

    def __init__(self):
        super().__init__()
        self.beats = self.beat_end = None  # the heartbeat pipe's ends (the write end until the fork)
        self.last_seen = 0.0
        self.killed = False

    def manage(self, master):
        self.watch(master)
        if self.handle is None and self.beats is None:
            self.beats, self.beat_end = os.pipe()
            os.set_blocking(self.beats, False)
            os.set_blocking(self.beat_end, False)
        super().manage(master)
        if self.handle is not None and self.beat_end is not None:
            os.close(self.beat_end)
            self.beat_end, self.last_seen, self.killed = None, time.monotonic(), False

    def watch(self, master):
        if self.handle is None or self.beats is None:
            return
        if children.read_pipe(self.beats, 4096):
            self.last_seen = time.monotonic()
        elif not self.killed and time.monotonic() - self.last_seen > CHECKPOINTER_TIMEOUT:
            log_event(master.logger, "checkpointer-hung", pid=self.handle.pid,
                      silent=f"{time.monotonic() - self.last_seen:.1f}s", signal="SIGKILL", level=logging.WARNING)
            self.killed = True
            children.send_signal(self.handle.pid, signal.SIGKILL)

    def close_in_child(self, master):
        master.close_in_child(keep=self.beat_end)

    def close_fds(self, keep):
        for fd in (self.beats, self.beat_end):
            if fd is not None and fd != keep:
                os.close(fd)

    def body(self, config, logger, should_stop):
        run_checkpointer(config, logger, should_stop, beat=lambda: _beat(self.beat_end),
                         progress_look=CHECKPOINTER_TIMEOUT / 4)

    def exited(self, master, status):
        os.close(self.beats)
        self.beats = None
        super().exited(master, status)


def _beat(fd):
    """One heartbeat on the pipe to the master; a full pipe (the master is behind) or a broken one is no matter."""
    try:
        os.write(fd, b".")
    except OSError:
        pass


class HelperProcesses:
    """The master's helper processes: the metrics process (with metrics_listen) and the checkpointer."""

    def __init__(self):
        self.metrics: MetricsProcess | None = None  # with metrics_listen: its socket and its process
        self.checkpointer = CheckpointerProcess()  # the WAL's checkpoints, off the writers' commits

    def __iter__(self):
        return iter([h for h in (self.metrics, self.checkpointer) if h is not None])

    def pids(self):
        return [h.pid for h in self if h.pid is not None]

    def manage(self, master):
        for helper in self:
            helper.manage(master)

    def exited(self, master, pid, status):
        for helper in self:
            if helper.pid == pid:
                helper.exited(master, status)

    def stop(self, *, retiring=False):
        for helper in self:
            helper.stop(retiring=retiring)

    def close_in_child(self, keep):
        for helper in self:
            helper.close_fds(keep)
