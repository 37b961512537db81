"""Queue ids: 14 characters of [0-9A-Z], in time order, unique across the processes that write the queue."""

from __future__ import annotations

import os
import secrets
import time
from typing import Callable

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_ID_EPOCH = 1577836800  # 2020-01-01T00:00:00Z; 8 base-36 digits of milliseconds last until 2109

_ID_TIME_DIGITS = 8

_ID_RANDOM_DIGITS = 6

def is_queue_id(text: str) -> bool:
    """True if `text` looks like a queue id (14 of [0-9A-Z]) rather than a domain:
    for `backupmx hold|release|delete|requeue ID|DOMAIN`."""
    return len(text) == _ID_TIME_DIGITS + _ID_RANDOM_DIGITS and all(c in _ID_ALPHABET for c in text)

# Every pair of id digits, so an id is seven look-ups rather than fourteen divisions.
_ID_PAIRS = [a + b for a in _ID_ALPHABET for b in _ID_ALPHABET]

class _IdSequence:
    """The six digits after the time: a random start once per process, then a count.

    The start is drawn again in a forked child (os.register_at_fork), so two
    workers never share a sequence; within one process an id cannot repeat
    unless 36**6 messages land in one millisecond. One getrandom() per process
    instead of two per message (secrets.randbelow of a 32-bit range redraws
    about half the time)."""

    def __init__(self):
        self.next = None

    def take(self) -> int:
        if self.next is None:
            self.next = secrets.randbelow(36**_ID_RANDOM_DIGITS)
        number, self.next = self.next, (self.next + 1) % 36**_ID_RANDOM_DIGITS
        return number

    def forked(self) -> None:
        self.next = None

_id_sequence = _IdSequence()
os.register_at_fork(after_in_child=_id_sequence.forked)

def _base36(number: int, pairs: int) -> str:
    """`number` as 2 * `pairs` base-36 digits (the high ones dropped)."""
    text = ""
    for _ in range(pairs):  # no divmod, append, reverse, join: two of these per message
        text = _ID_PAIRS[number % (36 * 36)] + text
        number //= 36 * 36
    return text

def new_queue_id(clock: Callable[[], float] = time.time) -> str:
    """A new queue id: 14 characters of [0-9A-Z].

    Eight base-36 digits of milliseconds since 2020 (so ids sort by time, as
    Postfix's do), then six of this process's sequence (_IdSequence: a
    random start, then counting), so two workers clash only when their
    sequences meet in the same millisecond (one chance in 2.2e9 per pair
    of messages, as with six random digits). A clash is still possible in
    principle; enqueue_many() then refuses that message and the client
    simply retries, so nothing is lost.
    """
    milliseconds = max(0, int(clock() * 1000) - _ID_EPOCH * 1000)
    return _base36(milliseconds, _ID_TIME_DIGITS // 2) + _base36(_id_sequence.take(), _ID_RANDOM_DIGITS // 2)
