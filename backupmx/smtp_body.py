"""A message's content as it arrives: after DATA (RFC 5321 4.5.2) or in BDAT chunks (RFC 3030).

Part of the sans-I/O session (smtp.py) and bound by its rules: lines end at
CRLF only and only CRLF "." CRLF ends the data (rule 1: SMTP smuggling,
CVE-2023-51764); every buffer is bounded, and a message that fails (a bare
CR or LF, a NUL, an over-long line, too big, a mail loop) is read through to
its end and only then refused (rule 2).

DataTransfer frames DATA's dot-stuffed lines. BDAT's content comes in
counted chunks (ChunkReader takes exactly the octets a BDAT announced, with
no line-ending interpretation: a chunk may end inside a CRLF or a UTF-8
sequence) and is checked as one byte stream by ChunkedTransfer. The checks
are DATA's: a bare CR or LF or a NUL refuses the message. We deliver with
DATA and dot-stuffing, so a message is stored exactly as the primary will
get it and no byte that a line-based parser (ours for DATA, the primary's)
could read as a line end can travel inside it; BDAT is not a way around
rule 1 (docs/DESIGN.md). A BDAT message that does not end in CRLF gets one,
the line end DATA's framing would have given it.

This module never imports socket, ssl, sqlite3, os, time or logging.
"""

from backupmx import replies
from backupmx.replies import Reply
from backupmx.smtp_events import MessageAborted, MessageData

# RFC 5321 4.5.3.1.6 says 1000 octets per text line; real mail breaks that, so
# we accept longer lines up to this bound and refuse the message beyond it.
MAX_DATA_LINE = 64 * 1024
# Content counts as progress (for the per-command deadline) once per this many octets.
DATA_PROGRESS_OCTETS = 64 * 1024
# More Received headers than this means a loop (RFC 5321 6.3); Postfix uses 50.
MAX_RECEIVED_HEADERS = 50


class HeaderScan:
    """Counts Received: lines in the header section (RFC 5321 6.3 loop detection) and
    notes 8-bit header text, from pieces that may end anywhere: the unfinished
    line is kept only as far as needed (its start, and its last octet in case
    that is the CR of a CRLF)."""

    def __init__(self):
        self.done = False  # the empty line that ends the header section was seen
        self.received = 0
        self.eight_bit = False  # a header octet above 127 (RFC 6532 UTF-8 header text)
        self._pending = b""

    def feed(self, piece: bytes) -> None:
        if self.done:
            return
        lines = (self._pending + piece).split(b"\r\n")
        self._pending = lines.pop()
        for line in lines:
            if line == b"":
                self.done = True
                return
            if line[:9].lower() == b"received:":
                self.received += 1
            self.eight_bit = self.eight_bit or not line.isascii()
        if len(self._pending) > 64:
            self.eight_bit = self.eight_bit or not self._pending.isascii()
            self._pending = self._pending[:16] + self._pending[-1:]


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
        self.headers = HeaderScan()
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
        self.headers.feed(block)
        if self.headers.received > MAX_RECEIVED_HEADERS:
            self._fail(replies.MAIL_LOOP)
        self.size += len(block)
        if self.size > self.max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
        if self.failure is None:
            self.events.append(MessageData(block))

    def _count(self, octets: int) -> None:
        self._octets += octets
        self.ticks += self._octets // DATA_PROGRESS_OCTETS
        self._octets %= DATA_PROGRESS_OCTETS

    def _fail(self, reply: Reply) -> None:
        """The message will not be queued; keep reading to the end of the data, then say why."""
        if self.failure is None:
            self.failure = reply
            self.events.append(MessageAborted(reply))


class ChunkReader:
    """Exactly `octets` octets after a BDAT command (RFC 3030 2), handed to `transfer`
    as they arrive (None: the chunk is read through and dropped, then answered with
    `refusal`, a (Reply, fields)). No line-ending interpretation: these octets are
    data, never commands."""

    def __init__(self, octets: int, last: bool, transfer: "ChunkedTransfer | None", refusal: tuple | None = None):
        self.octets, self.last, self.transfer, self.refusal = octets, last, transfer, refusal
        self.remaining = octets
        self.ticks = 0
        self._counted = 0

    def read(self, buffer: bytearray) -> bool:
        """Take what belongs to the chunk from `buffer`; True once all of it is read."""
        take = min(self.remaining, len(buffer))
        if take:
            piece = bytes(buffer[:take])
            del buffer[:take]
            self.remaining -= take
            if self.transfer is not None:
                self.transfer.feed(piece)
            self._counted += take
            self.ticks += self._counted // DATA_PROGRESS_OCTETS
            self._counted %= DATA_PROGRESS_OCTETS
        return self.remaining == 0


class ChunkedTransfer:
    """The content of one BDAT transaction: its chunks as one byte stream, checked as DATA's lines are.

    Appends MessageData and MessageAborted events to `events`. `failure` is the
    first reason the message will not be queued (every later chunk gets it too).
    """

    def __init__(self, envelope, max_size: int, events: list):
        self.envelope = envelope  # the transaction it belongs to (a new MAIL makes it stale)
        self.max_size = max_size
        self.events = events
        self.size = 0
        self.failure: Reply | None = None
        self.reported = False  # the failure was answered once already
        self.headers = HeaderScan()
        self._held_cr = False  # the last octet so far is a CR: its LF may open the next chunk
        self._line = 0  # octets of the current line so far
        self._tail = b""  # the last two octets of the content

    def feed(self, piece: bytes) -> None:
        data = (b"\r" if self._held_cr else b"") + piece
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            self._fail(replies.BARE_LINE_ENDING)
        if b"\0" in piece:
            self._fail(replies.NUL_IN_DATA)
        self._check_line_length(piece)
        self._add(piece)

    def finish(self) -> None:
        """BDAT ... LAST was read: a CR left at the very end is a bare CR; a last
        line without its CRLF gets one (what DATA's framing gives every message),
        and is scanned like every other line (a header line: RFC 6531 3.2)."""
        if self._held_cr:
            self._fail(replies.BARE_LINE_ENDING)
        if self.size and self._tail != b"\r\n":
            self._add(b"\r\n")

    def _add(self, piece: bytes) -> None:
        """Content as it will be queued: its header lines scanned, its size counted, handed on."""
        if not piece:
            return
        self.headers.feed(piece)
        if self.headers.received > MAX_RECEIVED_HEADERS:
            self._fail(replies.MAIL_LOOP)
        self.size += len(piece)
        self._tail = (self._tail + piece)[-2:]
        if self.size > self.max_size:
            self._fail(replies.MESSAGE_TOO_BIG)
        if self.failure is None:
            self.events.append(MessageData(piece))

    def _check_line_length(self, piece: bytes) -> None:
        first = piece.find(b"\n")
        if first < 0:
            self._line += len(piece)
        else:
            longest = self._line + first + 1
            if len(piece) > MAX_DATA_LINE:
                longest = max(longest, max(map(len, piece[first + 1:].split(b"\n"))) + 1)
            self._line = len(piece) - piece.rfind(b"\n") - 1
            if longest > MAX_DATA_LINE:
                self._fail(replies.LINE_TOO_LONG)
        if self._line > MAX_DATA_LINE:
            self._fail(replies.LINE_TOO_LONG)

    def _fail(self, reply: Reply) -> None:
        if self.failure is None:
            self.failure = reply
            self.events.append(MessageAborted(reply))
