"""A message's content as it arrives after DATA: CRLF-framed, dot-stuffed lines (RFC 5321 4.5.2).

Part of the sans-I/O session (smtp.py) and bound by its rules: lines end at
CRLF only and only CRLF "." CRLF ends the data (rule 1: SMTP smuggling,
CVE-2023-51764); every buffer is bounded, and a message that fails (a bare
CR or LF, a NUL, an over-long line, too big, a mail loop) is read through to
its end and only then refused (rule 2). Another framing (BDAT's counted
chunks, RFC 3030) is a sibling of DataTransfer with the same interface:
read(buffer) until it returns True, then `failure` and `size`.

This module never imports socket, ssl, sqlite3, os, time or logging.
"""

from dataclasses import dataclass

from backupmx import replies
from backupmx.replies import Reply

# RFC 5321 4.5.3.1.6 says 1000 octets per text line; real mail breaks that, so
# we accept longer lines up to this bound and refuse the message beyond it.
MAX_DATA_LINE = 64 * 1024
# Content counts as progress (for the per-command deadline) once per this many octets.
DATA_PROGRESS_OCTETS = 64 * 1024
# More Received headers than this means a loop (RFC 5321 6.3); Postfix uses 50.
MAX_RECEIVED_HEADERS = 50


@dataclass(frozen=True)
class MessageData:
    """Event: a piece of the content, dot-unstuffed, CRLF line endings as received."""
    data: bytes


@dataclass(frozen=True)
class MessageAborted:
    """Event: the content will not be queued (bare line ending, NUL, too big, loop): drop the spool."""
    reply: Reply


class DataTransfer:
    """The content of one DATA command, read from the session's input buffer.

    Appends MessageData and MessageAborted events to `events`; `ticks` counts
    progress (one per DATA_PROGRESS_OCTETS) for the session to take.
    """

    def __init__(self, max_size: int, events: list):
        self.max_size = max_size
        self.events = events
        self.size = 0
        self.failure: Reply | None = None
        self.ticks = 0
        self._octets = 0
        self._received_headers = 0
        self._in_headers = True
        self._at_line_start = True

    def read(self, buffer: bytearray) -> bool | None:
        """Consume what is complete in `buffer`: True at the end of the data, False when
        some lines were taken (call again), None when more input is needed."""
        if not buffer:
            return None
        if self._at_line_start and buffer.startswith(b".\r\n"):
            end = 0
        else:
            marker = buffer.find(b"\r\n.\r\n")
            end = marker + 2 if marker >= 0 else -1
        if end >= 0:
            self._lines(bytes(buffer[:end]))
            del buffer[:end + 3]
            return True
        last = buffer.rfind(b"\r\n")
        if last < 0:
            if len(buffer) > MAX_DATA_LINE:
                # Rule 2: keep the last octet, it may be the CR of a CRLF.
                self._fail(replies.LINE_TOO_LONG)
                self._count(len(buffer) - 1)
                del buffer[:-1]
                self._at_line_start = False
            return None
        self._lines(bytes(buffer[:last + 2]))
        del buffer[:last + 2]
        return False

    def _lines(self, block: bytes) -> None:
        """Whole lines of the content (the last ends in CRLF) or the end of a long one."""
        self._count(len(block))
        if not block:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            self._fail(replies.BARE_LINE_ENDING)
        if b"\0" in block:
            self._fail(replies.NUL_IN_DATA)
        if len(block) > MAX_DATA_LINE and max(map(len, block.split(b"\r\n"))) + 2 > MAX_DATA_LINE:
            self._fail(replies.LINE_TOO_LONG)
        if self._at_line_start and block.startswith(b"."):
            block = block[1:]
        block = block.replace(b"\r\n.", b"\r\n")  # RFC 5321 4.5.2 transparency
        self._at_line_start = True
        if self._in_headers:
            self._scan_headers(block)
        self.size += len(block)
        if self.size > self.max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
        if self.failure is None:
            self.events.append(MessageData(block))

    def _scan_headers(self, block: bytes) -> None:
        """Count Received: lines in the header section (RFC 5321 6.3 loop detection)."""
        for line in block.split(b"\r\n")[:-1]:
            if line == b"":
                self._in_headers = False
                break
            if line[:9].lower() == b"received:":
                self._received_headers += 1
        if self._received_headers > MAX_RECEIVED_HEADERS:
            self._fail(replies.MAIL_LOOP)

    def _count(self, octets: int) -> None:
        self._octets += octets
        self.ticks += self._octets // DATA_PROGRESS_OCTETS
        self._octets %= DATA_PROGRESS_OCTETS

    def _fail(self, reply: Reply) -> None:
        """The message will not be queued; keep reading to the end of the data, then say why."""
        if self.failure is None:
            self.failure = reply
            self.events.append(MessageAborted(reply))
