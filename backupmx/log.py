"""One line per event, key=value, on the configured target.

    queued id=4F2A9K1X0B domain=example.com from=<a@b> size=123 client=192.0.2.1
    delivered id=4F2A9K1X0B relay=mail.example.com:25 reply="250 2.0.0 Ok"

Every value may come from a client (HELO names, addresses, replies), so every
value is rendered so that it can never start a new line or fake a field:
CR, LF, NUL and every other non-printable character become \\r, \\n, \\x00 ...,
and a value holding a space, a quote, "=", a backslash or such an escape is
double-quoted. Passwords and AUTH payloads are never passed here.

Under --inetd, stdin/stdout (and often stderr) are the client's socket, so
setup_logging(..., inetd=True) makes sure nothing logging does ever writes there:
"stderr" is honoured there only when the caller hands over a stderr it checked
is not the socket (tcpserver's svlogd pipe, systemd's StandardError=journal).

Writes: an SMTP worker's loop defers them (defer_writes): the lines of one
loop round wait in memory and go out in one write() at its end
(flush_pending), or at once with a warning or an error, or when
PENDING_LINES wait; one write per line and a stat() of the file per line
(logrotate) were a sixth of a worker's time. So a kill -9 can lose the
INFO lines of the loop round in progress (connect, queued, disconnect...),
never a warning or an error, and never mail: the 250 follows the commit,
and the queue's events table has every message's record (`backupmx show`).
A flusher writes the outcome lines of one batch together (lines_together),
right after the batch's commit. Everything else (the master, the CLI, other
threads) writes each line at once.

When stderr is the systemd journal (JOURNAL_STREAM names its device and inode),
lines carry a "<N>" syslog priority prefix (sd-daemon(3)) and neither a time
nor a "backupmx[pid]:" tag: journald adds its own, and doubling them broke
fail2ban's matching; with the prefix `journalctl -p warning` finds warnings.
Elsewhere a line that is not INFO ends with level=warning / level=error; syslog
gets the priority from the record's level.
"""

from __future__ import annotations

import logging
import contextlib
import re
import logging.handlers
import os
import sys
import threading
import time

__all__ = ["format_event", "log_event", "setup_logging", "is_journal", "defer_writes", "flush_pending", "lines_together",
           "LOGGER_NAME", "LEVELS"]

LOGGER_NAME = "backupmx"
SYSLOG_SOCKET = "/dev/log"
# A log file holds client addresses and senders: owner and group only
# (docs/SPEC.md, "Least privilege everywhere"; like Postfix's maillog_file
# under a restrictive umask). An existing
# file keeps its mode; only a file we create gets this one.
LOG_FILE_MODE = 0o640

# log_level values (the config key) and the logging levels they stand for.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# sd-daemon(3) / syslog(3) priorities of the logging levels.
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

# A deferring handler writes once this many lines wait, round over or not (bounded memory).
PENDING_LINES = 256

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\r": "\\r", "\n": "\\n", "\t": "\\t", "\0": "\\x00"}


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable() or c == " ":
        return c
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


# A value made only of these needs neither escaping nor quotes.
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")
_plain = _PLAIN.fullmatch

# "key=" as format_event writes each key (keys are the code's keyword names: a bounded set).
_KEY_PREFIXES: dict[str, str] = {}


def format_value(value: object) -> str:
    """One value, safe for a log line: escaped, and quoted when it needs to be."""
    if type(value) is str:
        text = value
    elif isinstance(value, bytes):
        text = value.decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    if _plain(text):  # the common case, checked in C
        return text
    escaped = "".join(_escape_char(c) for c in text)
    if not text or escaped != text or " " in text or "=" in text:
        return f'"{escaped}"'
    return text


def format_event(event: str, /, **fields: object) -> str:
    """ "queued", id="AB12", from_="<a@b>" -> 'queued id=AB12 from=<a@b>'.

    A trailing underscore is dropped from a key, so Python keywords can be keys
    (from_= gives from=). None values are left out.
    """
    line = event if type(event) is str and _plain(event) else format_value(event)
    # One string grown in place, a key's prefix by subscript: three lines a message come here.
    for key, value in fields.items():
        if value is None:
            continue
        try:
            prefix = _KEY_PREFIXES[key]
        except KeyError:
            prefix = format_value(key[:-1] if key.endswith("_") else key) + "="
            if len(_KEY_PREFIXES) < 1024:
                _KEY_PREFIXES[key] = prefix
        # format_value's common cases without its call: an int (digits, a sign) and a plain str.
        if type(value) is int:
            line += f" {prefix}{value}"
        elif type(value) is str and _plain(value):
            line += f" {prefix}{value}"
        else:
            line += f" {prefix}{format_value(value)}"
    return line


def log_event(logger: logging.Logger, event: str, /, level: int = logging.INFO, **fields: object) -> None:
    """Log one event line (see format_event) at `level` on `logger`.

    When the line can reach no one but our own handler (no other handler or filter on
    the way: the server's case), the handler gets it without the logging module's
    LogRecord and dispatch, a third of a line's cost; the line is the same."""
    if logger.isEnabledFor(level):
        line = format_event(event, **fields)
        handler = _only_handler(logger, level)
        if handler is None:
            logger.log(level, "%s", line)
        elif getattr(handler.formatter, "direct", False):
            handler.add_line(level, line)
        else:
            handler.handle(_Line(logger.name, level, line))


def _only_handler(logger: logging.Logger, level: int) -> logging.Handler | None:
    """The one handler a line of `logger` at `level` reaches, when it is ours and nothing on the
    way filters, diverts or also sees the line; else None (the logging module dispatches it)."""
    node = logger
    while node is not logging.root:
        if node is None or node.handlers or node.filters or not node.propagate or node.disabled:
            return None
        node = node.parent
    if len(node.handlers) != 1 or node.filters:
        return None
    handler = node.handlers[0]
    if type(handler) not in _DIRECT_HANDLERS or handler.filters or level < handler.level:
        return None
    return handler


_pid = os.getpid()  # a LogRecord asks the kernel for it per line; we ask once per process


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class _Line:
    """What our handlers and formatters read of a LogRecord (log_event's direct path):
    the same values, as LogRecord sets them."""

    args = ()
    exc_info = exc_text = stack_info = None

    def __init__(self, name: str, levelno: int, message: str):
        self.name, self.msg, self.levelno = name, message, levelno
        self.levelname = logging.getLevelName(levelno)
        self.created = now = time.time()
        self.msecs = int((now - int(now)) * 1000) + 0.0
        self.process = _pid

    def getMessage(self) -> str:
        return self.msg


_deferring = threading.local()  # .on: defer_writes() in this thread: its caller flushes the lines itself


def defer_writes(on: bool = True) -> None:
    """From now on this thread's lines wait for flush_pending() (the module docstring says
    what a crash can lose then). The SMTP workers' loop turns it on, and calls flush_pending()
    at the end of every round; logging.shutdown() (children.run_child) writes what is left.
    Other threads (DNS look-ups, a flusher's second connection) still write at once."""
    _deferring.on = on


@contextlib.contextmanager
def lines_together():
    """This thread's lines inside the block go out in one write at its end (a flusher's
    outcome lines of one batch, logged right after the batch's commit)."""
    before = getattr(_deferring, "on", False)
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = before
        flush_pending()


def flush_pending() -> None:
    """Write the lines that wait (one write per handler); cheap when none does."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_pending", None):
            handler.flush()


class _Batched:
    """For a stream or file handler: formatted lines wait in _pending while the process
    defers writes (defer_writes), then go out together (flush); a line above INFO
    takes every line before it out at once."""

    terminator = "\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if not getattr(_deferring, "on", False) or record.levelno > logging.INFO or len(self._pending) >= PENDING_LINES:
            self.flush()

    def add_line(self, levelno: int, message: str) -> None:
        """log_event's direct path when our formatter can write the line itself
        (_Formatter.direct): emit() without a record and Handler.handle's calls."""
        text = self.formatter.line(levelno, message) + self.terminator
        with self.lock:
            self._pending.append(text)
        if not getattr(_deferring, "on", False) or levelno > logging.INFO or len(self._pending) >= PENDING_LINES:
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self._pending:
                # Taken out before the write: a write that fails (disk full) loses these
                # lines, as the stock handlers do, rather than holding them in memory.
                text, self._pending = "".join(self._pending), []
                try:
                    self._write(text)
                except RecursionError:
                    raise
                except Exception:
                    logging.Handler.handleError(self, None)
            if self.stream is not None and hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()

    def _write(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text)


class _StreamHandler(_Batched, logging.StreamHandler):
    """stderr (or the journal), written once per batch."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self._pending: list[str] = []


class _LogFileHandler(_Batched, logging.handlers.WatchedFileHandler):
    """WatchedFileHandler whose file, when it has to create it, is created LOG_FILE_MODE,
    and which looks for logrotate's move (a stat) once per batch rather than per line.

    _open also runs when logrotate moved the file away (reopenIfNeeded), so the
    new file gets the same mode; the umask can only narrow it.
    """

    def __init__(self, filename, **kw):
        self._pending: list[str] = []
        super().__init__(filename, **kw)

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def _write(self, text: str) -> None:
        if self.stream is None:
            # The reopen after logrotate's move failed (disk full, a directory the
            # dropped user cannot write yet): try again, as FileHandler.emit does.
            self.stream = self._open()
            self._statstream()
        else:
            self.reopenIfNeeded()
        self.stream.write(text)

    def close(self) -> None:
        self.flush()
        super().close()


_DIRECT_HANDLERS = (_StreamHandler, _LogFileHandler)


# The formats setup_logging gives its formatters: a line in one of them needs nothing of a
# LogRecord but the time, the pid and the message (_Formatter.line writes it directly).
_FILE_FORMAT = "%(asctime)s backupmx[%(process)d]: %(message)s"
_SYSLOG_FORMAT = "backupmx[%(process)d]: %(message)s"
_JOURNAL_FORMAT = "%(message)s"


class _Formatter(logging.Formatter):
    """Adds level=warning / level=error to the line when it is not plain INFO; the
    date part of the time is formatted once per second, not once per line."""

    _second: int | None = None
    _date = ""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        # Our own formats only: any other may name a record attribute line() does not have.
        self.direct = fmt in (_FILE_FORMAT, _SYSLOG_FORMAT, _JOURNAL_FORMAT)
        self._uses_time = self.usesTime()

    def line(self, levelno: int, message: str) -> str:
        """What format() makes of a record of `message` at `levelno` logged now, by this
        process (a `direct` formatter only; the values as LogRecord sets them)."""
        values = {"message": message, "process": _pid}
        if self._uses_time:
            now = time.time()
            values["asctime"] = self._time(now, int((now - int(now)) * 1000))
        text = self._fmt % values
        if levelno != logging.INFO:
            text += f" level={logging.getLevelName(levelno).lower()}"
        return text

    def _time(self, created: float, msecs: int) -> str:
        second = int(created)
        if second != self._second:
            self._date, self._second = time.strftime(self.default_time_format, self.converter(created)), second
        return self.default_msec_format % (self._date, msecs)

    def formatTime(self, record: logging.LogRecord, datefmt=None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time(record.created, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.levelno != logging.INFO:
            line += f" level={record.levelname.lower()}"
        if record.exc_info:
            # A traceback must not spread over lines either; format() appended it.
            line = line.replace("\r", "\\r").replace("\n", "\\n")
        return line


class _JournalFormatter(_Formatter):
    """"<N>message" for a stderr that is the journal: journald reads the priority and
    adds the time and the identifier itself."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"

    def line(self, levelno: int, message: str) -> str:
        return f"<{_JOURNAL_PRIORITY.get(levelno, 6)}>{super().line(levelno, message)}"


def is_journal(stream) -> bool:
    """True when `stream` is the systemd journal: JOURNAL_STREAM ("dev:ino", set by
    systemd for StandardError=journal) names the file it writes to."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in expected.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup_logging(target: str | None, *, inetd: bool = False, level: str = "info", stderr=None) -> logging.Logger:
    """Send the "backupmx" loggers (and the root logger) to `target`, replacing earlier setup.

    target: "stderr", "syslog" (facility mail, on /dev/log) or a file path
    (WatchedFileHandler: logrotate may move the file away; created 0640). None means the mode's
    default: syslog under inetd, stderr otherwise. When /dev/log does not exist,
    syslog falls back to stderr, or to nowhere under inetd.
    level: a LEVELS name (log_level); lines below it are not even formatted.
    stderr: the stream "stderr" means (sys.stderr). Under inetd, stderr may be the
    client's socket, so "stderr" is honoured only when the caller passes one it
    checked is not (inetd.py); otherwise syslog (or nothing) is used instead.
    Raises OSError when a log file cannot be opened.
    Returns the "backupmx" logger.
    """
    if target is None:
        target = "syslog" if inetd else "stderr"
    if stderr is None and not inetd:
        stderr = sys.stderr
    handler: logging.Handler | None
    if target == "syslog":
        handler = _syslog_handler()
        if handler is None:
            handler = logging.NullHandler() if inetd else _StreamHandler(stderr)
    elif target == "stderr":
        handler = _StreamHandler(stderr) if stderr is not None else (_syslog_handler() or logging.NullHandler())
    else:
        handler = _LogFileHandler(target, encoding="utf-8")
    if isinstance(handler, logging.handlers.SysLogHandler):
        formatter = _Formatter(_SYSLOG_FORMAT)  # syslog adds the time
    elif isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
            and is_journal(handler.stream):
        formatter = _JournalFormatter(_JOURNAL_FORMAT)
    else:
        formatter = _Formatter(_FILE_FORMAT)
    handler.setFormatter(formatter)
    handler._backupmx = True  # ours: the next setup_logging (SIGHUP) replaces it

    # What a line never shows: where in the code it was logged (a stack walk per
    # line), the thread's and the multiprocessing process's names (the logging
    # HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_backupmx", False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    if inetd:
        # logging's own error reports (handleError) and lastResort write to stderr.
        logging.raiseExceptions = False
        logging.lastResort = None
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(LEVELS[level])
    return logger


def _syslog_handler() -> logging.Handler | None:
    if not os.path.exists(SYSLOG_SOCKET):
        return None
    try:
        return logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
    except OSError:
        return None
