"""A big flush's work list shared with a second connection to the same primary, in a thread or a helper process.

While one connection waits for the primary's reply, the other sends. Work
is a flush's list of messages still to take; ExtraConnection takes from it
with a second connection in a thread of the flush worker. A flush of at
least HELPER_MIN_MESSAGES has that connection in a helper process instead
(share forks it: two connections in one process take turns for one GIL),
and its work list becomes SharedWork, runs of it in a pipe that either
process takes. Both loops are _deliver_share.

What must always hold:

- A big flush's second connection may live in a helper process (share):
  it takes runs of the same work list, records its own outcomes under the
  same lease, and its counts join the flush's; the main connection alone
  decides that the primary is not taking mail (flusher._suspend).
- Each run of the work list is taken by exactly one process; a run the
  helper took and will not deliver goes back into the pipe before it exits
  (SharedWork.give_back), and a helper that ends without its report has
  the flush asked for again (flusher._join_helper).
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import select
import signal
import struct
import sys
import threading
from collections.abc import Callable

from backupmx import children

from backupmx.flush_lease import Lease, LeaseLost
from backupmx.flush_session import Flush, Trouble
from backupmx.log import flush_pending, log_event
from backupmx.store import QueueStore

# Connections to the primary per flush beyond the first, for flushes of at
# least EXTRA_CONNECTION_MIN_MESSAGES messages: while one waits for the
# primary's reply, the other sends (the "parallel connections to the primary
# where it allows" of Postfix's qmgr, at a modest 2).
EXTRA_CONNECTIONS = 1
EXTRA_CONNECTION_MIN_MESSAGES = 20
# A flush of at least HELPER_MIN_MESSAGES messages, started in a process with no
# other thread, has its second connection in a helper process instead (share):
# two connections in one process take turns for one GIL, and the flush worker
# was CPU-bound on one core while the machine's other core waited.
HELPER_MIN_MESSAGES = 100
MAX_HELPER_RUNS = 4096  # runs of the work list in the pipe the helper shares (8 bytes each)
_RUN = struct.Struct("=II")  # one run: (index of its first message, how many)


class Work:
    """The messages a flush has still to take, oldest first.

    deque.popleft is atomic: the extra connections (threads) take from the same list.
    """

    def __init__(self, messages=()):
        self.queue = collections.deque(messages)

    def popleft(self):
        """The next message to deliver; IndexError when none is there now."""
        return self.queue.popleft()

    def __len__(self) -> int:
        return len(self.queue)

    def wait(self, should_stop: Callable[[], bool], lease: Lease) -> bool:
        """None is there now: True when more may come (look again), False when none will."""
        return False

    def stop_helper(self) -> None:
        """The flush stops (suspended, interrupted, lease lost): so does a helper process."""

    def join_helper(self) -> dict[str, int]:
        """What a helper process delivered (its counts), once it is gone; {} without one."""
        return {}


class SharedWork(Work):
    """A work list shared with a helper process (share): runs of it in a pipe, taken by either process.

    A run is written and read as one _RUN.size-byte piece (below PIPE_BUF: atomic),
    so each run is taken by exactly one process, which delivers it from its own
    deque. The helper holds the pipe's only write end: a run it took and will
    not deliver (it stopped early) goes back into the pipe before it exits,
    so the parent sees the pipe's end only once the helper is gone and every
    run was taken (wait). Both ends' reads are non-blocking: an empty pipe
    means, for the helper, that its work is done.
    """

    def __init__(self, messages: list, runs_fd: int, *, helper_pid: int | None = None,
                 result_fd: int | None = None, return_fd: int | None = None):
        super().__init__()
        self.messages = messages
        self.runs_fd = runs_fd
        self.helper_pid, self.result_fd = helper_pid, result_fd  # in the parent
        self.return_fd = return_fd  # in the helper: the pipe's write end
        self.run_end = 0  # index after the last message of the run in self.queue
        self.ended = False  # the pipe is empty and has no writer left

    def popleft(self):
        if not self.queue:
            self._take_run()
        return self.queue.popleft()

    def _take_run(self) -> None:
        try:
            data = os.read(self.runs_fd, _RUN.size)
        except BlockingIOError:
            return
        if not data:
            self.ended = True
            return
        first, count = _RUN.unpack(data)
        self.queue.extend(self.messages[first:first + count])
        self.run_end = first + count

    def wait(self, should_stop: Callable[[], bool], lease: Lease) -> bool:
        while not self.ended:
            if should_stop():
                return True
            lease.check()
            if select.select([self.runs_fd], [], [], 0.1)[0]:
                return True  # a run, or the end: popleft tells
        return False

    def give_back(self, announced=None) -> bool:
        """In the helper, stopping early: the rest of its run goes back to the parent, as one run.

        `announced`: the message whose commands went out with the last end of data and
        whose content never did (Flush.quit). It was the last one taken, so it is the
        one just before the rest (the last of the previous run when the rest is empty),
        and goes back with it. False when any of them could not go back.
        """
        first, count = self.run_end - len(self.queue), len(self.queue)
        self.queue.clear()
        if announced is not None:
            if first == 0 or self.messages[first - 1] is not announced:
                return False
            first, count = first - 1, count + 1
        if not count:
            return True
        if self.return_fd is None:
            return False
        try:
            os.write(self.return_fd, _RUN.pack(first, count))
        except OSError:  # the parent is gone: they stay queued for the next flush
            return False
        return True

    def stop_helper(self) -> None:
        if self.helper_pid is not None:
            children.send_signal(self.helper_pid, signal.SIGTERM)

    def join_helper(self) -> dict[str, int]:
        """Waits for the helper to end: it stops between messages (stop_helper), so this
        is bounded by one message's delivery, as the flush itself is."""
        if self.helper_pid is None:
            return {}
        pid, self.helper_pid = self.helper_pid, None
        _, status = _waitpid(pid)
        result = b""
        try:
            result = os.read(self.result_fd, 512)
        except OSError:
            pass
        finally:
            os.close(self.result_fd)
            os.close(self.runs_fd)
        try:
            counts = dict(zip(_HELPER_REPORT, map(int, result.split())))
        except ValueError:
            counts = {}
        if status != 0 or len(counts) != len(_HELPER_REPORT):
            # Killed (or crashed) mid-flush: what it had taken and not recorded is still
            # queued, and must not wait for the next ETRN.
            raise HelperLost(pid, children.describe_status(status))
        return counts


# What a helper reports when it ends: its counts, and "again" (1) when it stopped with a
# message it took neither recorded nor given back: the flush must then be asked for again.
_HELPER_REPORT = ("messages", "delivered", "deferred", "failed", "again")


class HelperLost(Exception):
    """The helper process of a flush ended without its report (killed, crashed)."""

    def __init__(self, pid: int, status: str):
        super().__init__(f"pid {pid} {status}")
        self.status = status


def _waitpid(pid: int) -> tuple[int, int]:
    while True:
        try:
            return os.waitpid(pid, 0)
        except ChildProcessError:
            return pid, 0xFF00  # reaped by someone else: no report, so a lost helper
        except InterruptedError:
            continue


def _deliver_share(flush: "Flush", work: Work, should_stop: Callable[[], bool],
                   finished: threading.Event | None = None) -> tuple[object | None, bool]:
    """A second connection's loop (a thread's, or a helper process's): connect, then take
    messages from `work` until none is left, should_stop(), or `finished` is set.

    It only joins in once its connection is up: a primary that refuses more
    than one connection just gets one, and no message is deferred for it. At
    the first trouble it leaves the rest to the main connection, which alone
    decides when the primary is not taking mail. Records what it did and ends
    its session, whatever happens.

    Returns the message it had announced when it stopped (taken, never sent, not
    recorded: Flush.quit), or None; and whether it left a message it took
    unrecorded otherwise (the lease ran out mid-message, the outcome write failed).
    """
    log, name = flush.log, flush.domain.name
    unrecorded = False
    try:
        flush.client = flush.connect()
        # A message announced on this connection is delivered even once the main
        # connection is done: it was taken from the work list.
        while not should_stop() and (flush.announced is not None or finished is None or not finished.is_set()):
            message = flush.next_message(work)
            if message is None:
                break
            if flush.deliver(message, work) is not None:
                break
    except Trouble:
        pass  # no session: the main connection carries on (or has the same trouble itself)
    except LeaseLost:
        # Stolen: the new owner's flush takes every queued message. Ran out: nobody's does.
        unrecorded = flush.lease.ran_out
    except Exception as e:  # never lose the main flush over this one
        unrecorded = True
        log_event(log, "flush-error", domain=name, error=f"extra connection: {type(e).__name__}: {e}",
                  level=logging.WARNING)
    finally:
        try:
            flush.record_outcomes()
        except Exception as e:  # unrecorded: those messages are delivered again, never lost
            unrecorded = True
            log_event(log, "flush-error", domain=name, error=f"extra connection: {e}", level=logging.WARNING)
        withdrawn = flush.quit()
    return (withdrawn.message if withdrawn is not None else None), unrecorded


class ExtraConnection(threading.Thread):
    """A second connection to the same primary in a thread, taking messages from the same work list
    (_deliver_share), with its own QueueStore connection (SQLite connections stay in their thread)."""

    def __init__(self, main: "Flush", work: Work, finished: threading.Event, should_stop: Callable[[], bool]):
        super().__init__(name=f"flush-{main.domain.name}", daemon=True)
        self.main = main
        self.work, self.finished, self.should_stop = work, finished, should_stop
        self.counts = {"messages": 0, "delivered": 0, "deferred": 0, "failed": 0}
        # It stopped with a message it took and neither recorded nor delivered (the one it had
        # announced, or one whose outcome write failed): the flush is asked for again.
        self.again = False

    def run(self):
        main = self.main
        try:
            store = QueueStore(main.store.path)
        except Exception as e:
            log_event(main.log, "flush-error", domain=main.domain.name, error=f"extra connection: {e}",
                      level=logging.WARNING)
            return
        flush = Flush(store, main.domain, owner=main.owner, hostname=main.hostname, timeout=main.timeout,
                       lease=main.lease, log=main.log, primary=main.primary)
        try:
            # Unlike a helper's, an announced message is not handed back: the main connection
            # may be done with the work list already, and nobody would take it.
            announced, unrecorded = _deliver_share(flush, self.work, self.should_stop, self.finished)
            self.again = unrecorded or (announced is not None and not main.lease.stolen)
        finally:
            self.counts = flush.counts
            store.close()


def share(main: "Flush", messages: list, helper: bool = True) -> Work:
    """The flush's work list, shared with a helper process when the flush is big enough (and
    `helper`: no flush worker whose helper's fork once cost it its queue connection forks again).

    The helper is a fork of this process with a connection of its own to the
    primary (a Flush on its own QueueStore, opened after the fork), taking
    runs of the work list from a pipe as the main connection does
    (SharedWork) and recording its own outcomes: a message leaves the queue
    only after the 250 to its own end of data, whichever process sent it. It
    renews the same lease, as the same owner, and stops when the lease is
    lost, when this process asks (SIGTERM: stop_helper) or is gone, and at
    its first trouble. Forked before the lease thread starts and only from a
    process with no other thread (none can be inside SQLite or hold a lock
    at the fork); otherwise, and for a primary that takes one session (a
    reversed ODMR one), the work list stays this process's own.
    """
    if (not helper or len(messages) < HELPER_MIN_MESSAGES or main.primary.single_session
            or threading.active_count() > 1 or EXTRA_CONNECTIONS < 1):
        return Work(messages)
    runs_r, runs_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = None
    try:
        os.set_blocking(runs_r, False)
        os.set_blocking(runs_w, False)
        room = fcntl.fcntl(runs_w, fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 4096
        per_run = -(-len(messages) // max(1, min(MAX_HELPER_RUNS, room // _RUN.size)))
        runs = b"".join(_RUN.pack(first, min(per_run, len(messages) - first))
                        for first in range(0, len(messages), per_run))
        if os.write(runs_w, runs) != len(runs):
            raise BlockingIOError("the pipe took only part of the runs")
        parent = os.getpid()
        # The child must inherit no SQLite state (QueueDatabase.closed_for_fork): our
        # connection is closed across the fork, and no other may be open in this process.
        with main.store.closed_for_fork():
            if _queue_files_open(main.store.path):
                raise _QueueOpenElsewhere("another connection to the queue is open in this process")
            _flush_buffers()
            pid = children.fork_blocking((signal.SIGTERM,))
            if pid == 0:  # all the child does is inside run_child: it never unwinds into the code below
                children.run_child(lambda: _helper_start(main, messages, runs_r, runs_w, result_r, result_w, parent),
                                   main.log, "flush-helper-crashed")
    except BaseException as e:
        os.close(runs_w)
        os.close(result_w)
        if pid is not None:  # forked, and then our connection did not reopen: the flush fails, the helper stops
            _stop_forked_helper(main, SharedWork(messages, runs_r, helper_pid=pid, result_fd=result_r))
            raise
        os.close(runs_r)
        os.close(result_r)
        if not isinstance(e, (OSError, _QueueOpenElsewhere)):
            raise
        log_event(main.log, "flush-error", domain=main.domain.name, error=f"helper: {e}", level=logging.WARNING)
        return Work(messages)
    os.close(runs_w)
    os.close(result_w)
    return SharedWork(messages, runs_r, helper_pid=pid, result_fd=result_r)


def _helper_start(main: "Flush", messages: list, runs_r: int, runs_w: int, result_r: int, result_w: int,
                  parent: int) -> None:
    """In the forked helper: its ends of the pipes, then its work (_helper_main)."""
    os.close(result_r)
    _helper_main(main, SharedWork(messages, runs_r, return_fd=runs_w), result_w, parent)


def _stop_forked_helper(main: "Flush", work: SharedWork) -> None:
    """A helper whose flush cannot go on right after the fork: stopped and reaped here (its
    own outcomes recorded by itself, the rest of its run left queued), never left a zombie."""
    work.stop_helper()
    try:
        work.join_helper()
    except HelperLost as e:
        log_event(main.log, "flush-helper-lost", domain=main.domain.name, relay=main.relay, status=e.status,
                  level=logging.WARNING)


class _QueueOpenElsewhere(Exception):
    """A fork would hand the child SQLite's state of a connection we cannot close."""


def _queue_files_open(path: str) -> bool:
    """Whether a descriptor of this process is on the queue's database, -wal or -shm file
    (SQLite keeps them open for every connection; True when /proc cannot tell)."""
    files = set()
    for name in (path, path + "-wal", path + "-shm"):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        files.add((st.st_dev, st.st_ino))
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return True
    for fd in fds:
        try:
            st = os.stat(int(fd))
        except (OSError, ValueError):
            continue  # the listing's own descriptor, closed by now
        if (st.st_dev, st.st_ino) in files:
            return True
    return False


def _flush_buffers() -> None:
    """Before a fork: no line of ours waits in a buffer that the child would write again."""
    flush_pending()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, closed, or /dev/null gone
            pass


def _helper_main(main: "Flush", work: SharedWork, result_fd: int, parent: int) -> None:
    """The helper process (share): deliver runs of the work list, then report its counts.

    `parent` is the flush's pid, taken before the fork: had it died before this
    runs, getppid() would already name init."""
    stop = children.StopFlag(parent=parent).install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM,))
    with QueueStore(main.store.path) as store:
        lease = Lease(store, main.domain.name, main.owner, main.lease.seconds, main.log)
        flush = Flush(store, main.domain, owner=main.owner, hostname=main.hostname, timeout=main.timeout,
                       lease=lease, log=main.log, primary=main.primary)
        announced, again = None, False
        try:
            with lease:
                announced, again = _deliver_share(flush, work, stop.should_stop)
        except LeaseLost:
            pass  # it took nothing
        finally:
            if not work.give_back(announced):
                again = True
    report = " ".join(str(int(again) if k == "again" else flush.counts[k]) for k in _HELPER_REPORT)
    try:
        os.write(result_fd, report.encode())
    except OSError:  # the flush was killed (the master's stop timeout): what we recorded stays recorded
        log_event(main.log, "flush-helper-orphaned", domain=main.domain.name, relay=main.relay,
                  level=logging.WARNING)
