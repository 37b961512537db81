"""Work that must not block a worker's event loop: run on threads, answered back in the loop.

A session driver hands a slow call (a password check: scrypt takes ~60 ms
and releases the GIL; a recipient callout; a DNS lookup) to
`submit(owner, fn, *args, then=callback)`. When it is done, the loop (which
watches `fileno()`) takes it from `completed()` and calls `then(future)` for
the session that asked, in the loop's thread, like any other event: the
session code never runs on the pool's threads, and nobody polls.

Calls run in lanes, each a pool of its own, so that one kind of slow call
cannot starve another: callouts to a primary that takes seconds to answer
never hold up a password check or a DNS lookup. The lane "offload" is the
default one.

An owner of None is a per-process service rather than a session (the
callout single-flight): its `then` runs in the loop whatever happened to
the session that caused the call, and hands each waiting session its answer
with `deliver(owner, then, value)`, which comes back through the loop like
a finished call.

Threads start on first use, after the fork, and belong to the one process
that made them.
"""

import collections
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

DEFAULT_LANE = "offload"


class Offload:
    def __init__(self, threads: int, name: str = DEFAULT_LANE):
        self._lanes = {DEFAULT_LANE: ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)}
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._done: collections.deque = collections.deque()  # appended by pool threads, taken by the loop

    def add_lane(self, lane: str, threads: int) -> None:
        """A pool of `threads` for calls submitted with lane=`lane` (threads start on first use)."""
        if lane not in self._lanes:
            self._lanes[lane] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=lane)

    def fileno(self) -> int:
        """Readable when something is done (selectors take this object as it is)."""
        return self._wake_r.fileno()

    def submit(self, owner, fn: Callable, *args, then: Callable[[Future], None], lane: str = DEFAULT_LANE) -> None:
        """Run fn(*args) on a thread of `lane`; `then(future)` runs in the loop once it is done."""
        future = self._lanes[lane].submit(fn, *args)
        future.add_done_callback(lambda done: self._finished(owner, then, done))

    def deliver(self, owner, then: Callable[[Future], None], value) -> None:
        """Hand `value` to `owner` through the loop, as if a call of its own had returned it."""
        future = Future()
        future.set_result(value)
        self._finished(owner, then, future)

    def _finished(self, owner, then, future) -> None:
        self._done.append((owner, then, future))
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the socket buffer is full of wake-ups already (or closed): the loop will look
            pass

    def completed(self) -> list[tuple[object, Callable[[Future], None], Future]]:
        """(owner, then, future) of everything done since the last call."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done

    def close(self) -> None:
        for pool in self._lanes.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()


class PerThread:
    """One `factory()` per pool thread, made on its first use there: what a call on a
    pool thread keeps for itself, such as its own queue connection (an SQLite
    connection stays in the thread that opened it). They end with the process."""

    def __init__(self, factory: Callable[[], object]):
        self._factory = factory
        self._local = threading.local()

    def get(self):
        value = getattr(self._local, "value", None)
        if value is None:
            value = self._local.value = self._factory()
        return value
