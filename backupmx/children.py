"""What every process backupmx starts has in common: signals, crash reports, exit.

Forked children (SMTP workers and flush workers, under the master) and the
detached flusher (a fresh interpreter, under `serve --inetd` and `flush`)
share these rules (docs/DESIGN.md, "Processes"):

- a signal handler only sets a flag (StopFlag); the process's own loop looks
  at it between steps;
- faulthandler is on, writing to the log's stream, so a worker the master
  aborts for not answering (SIGABRT) leaves the stack it was stuck in;
- a forked child ends in os._exit through run_child, never by unwinding into
  the parent's code (its finally blocks, its atexit handlers);
- BOOT_ERROR is the exit status of a child that cannot start with this
  configuration (the queue cannot be opened ...): the master stops rather
  than respawn it forever (gunicorn's WORKER_BOOT_ERROR);
- a child that dies sooner than QUICK_DEATH after its start is respawned only
  after RESPAWN_DELAY, so a crash at start-up cannot become a fork loop.
"""

import errno
import faulthandler
import logging
import os
import select
import signal
import sys
import threading
import time

BOOT_ERROR = 3
QUICK_DEATH = 1.0  # seconds (see the docstring)
RESPAWN_DELAY = 1.0


class StopFlag:
    """SIGTERM sets it; the process's loop asks `should_stop()` between steps.

    `parent` (a pid): also stop when that process is gone (the master died
    and this child was handed to init).
    """

    def __init__(self, parent: int | None = None):
        self.stopped = False
        self.parent = parent

    def set(self, signum=None, frame=None) -> None:
        self.stopped = True  # a flag only: the loop does the work

    def should_stop(self) -> bool:
        return self.stopped or (self.parent is not None and os.getppid() != self.parent)

    def install(self, *, wakeup: bool = False) -> "StopFlag":
        """SIGTERM stops; SIGINT and SIGHUP are the parent's (or the operator's) business.

        `wakeup`: the signal also wakes this process's main thread where it waits in pause()
        (a pipe given to signal.set_wakeup_fd): a loop that pauses between steps sees its stop
        at once without waking up to look."""
        global _wakeup
        signal.set_wakeup_fd(-1)  # the master's wakeup socket is not ours
        if _wakeup is not None:  # a parent's (a flush worker forks helpers)
            for fd in _wakeup:
                os.close(fd)
            _wakeup = None
        if wakeup:
            _wakeup = os.pipe()
            for fd in _wakeup:
                os.set_blocking(fd, False)
            signal.set_wakeup_fd(_wakeup[1], warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self.set)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        return self


# This process's signal wakeup pipe (StopFlag.install(wakeup=True)): (read end, write end), or None.
_wakeup: tuple[int, int] | None = None
# How often pause() looks at should_stop without that pipe (a loop in a thread, under a test):
# the sleep goes on after a signal's handler (PEP 475).
STOP_CHECK = 0.01


def pause(seconds: float, should_stop) -> None:
    """Wait `seconds`, or less: until should_stop() turns true. In the main thread of a process
    whose StopFlag was installed with wakeup, a signal ends the wait at once (and should_stop()
    is asked again): no wake-ups while nothing happens. Elsewhere it looks every STOP_CHECK."""
    deadline = time.monotonic() + seconds
    woken = _wakeup[0] if _wakeup is not None and threading.current_thread() is threading.main_thread() else None
    while not should_stop():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if woken is None:
            time.sleep(min(remaining, STOP_CHECK))
        elif select.select([woken], [], [], remaining)[0]:
            _drain(woken)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def log_stream(logger: logging.Logger):
    """The file the logger writes to, when it writes to one (stderr or a log file); else stderr."""
    for handler in logger.handlers + logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)  # StreamHandler and FileHandler; not SysLogHandler
        try:
            if stream is not None:
                stream.fileno()
                return stream
        except (OSError, ValueError, AttributeError):
            continue
    return sys.stderr


def enable_faulthandler(logger: logging.Logger) -> None:
    """Dump every thread's stack to the log's stream on SIGABRT, SIGSEGV, ... (the master's SIGABRT
    to a hung worker lands here). A log that is syslog only falls back to stderr."""
    try:
        faulthandler.enable(file=log_stream(logger), all_threads=True)
    except (OSError, ValueError, RuntimeError):  # no usable descriptor: the child runs without it
        pass


def run_child(body, logger: logging.Logger, crash_event: str) -> None:
    """The end of every forked child: run `body`, log a crash, flush the log, os._exit.

    Never returns: a child must not unwind into the parent's code after a fork.
    """
    status = 1
    try:
        enable_faulthandler(logger)
        body()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        try:
            logger.exception("%s pid=%d", crash_event, os.getpid())
        except BaseException:
            pass
    finally:
        try:
            logging.shutdown()
        except BaseException:
            pass
        os._exit(status)


def fork_blocking(signals) -> int:
    """os.fork() with `signals` blocked across it; the parent unblocks them at once, the
    child once it has its own handlers.

    A signal a parent sends a child it has just forked (SIGTERM to a new flush
    worker when a stop comes at once) could otherwise reach the parent's handler
    still installed in that child, and be lost there: the child would run on
    until the stop timeout. Blocked, it waits for the child's own handlers.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    return pid


def send_signal(pid: int, sig: int) -> None:
    """os.kill to a child that may be gone already (it is reaped with the others)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def describe_status(status: int) -> str:
    """A wait status as a log value: signal-9, exit-3."""
    if os.WIFSIGNALED(status):
        return f"signal-{os.WTERMSIG(status)}"
    return f"exit-{os.waitstatus_to_exitcode(status)}"


def is_fd_exhaustion(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def read_pipe(fd: int, size: int) -> bytes | None:
    """What a non-blocking pipe from a child holds now: b"" at its end (or when it broke),
    None when nothing is there yet."""
    try:
        return os.read(fd, size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def forget_pipe(selector, fd: int) -> None:
    """Stop watching a child's pipe and close our end of it."""
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
    os.close(fd)


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else repr(exc)
