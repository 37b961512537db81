"""Work that must not block a worker's event loop: run on threads, answered back in the loop.

A session driver hands a slow call (a password check: scrypt takes ~60 ms
and releases the GIL; next, a recipient callout or a DNS lookup) to
`submit(owner, fn, *args, then=callback)`. When it is done, the loop (which
watches `fileno()`) takes it from `completed()` and calls `then(future)` for
the session that asked, in the loop's thread, like any other event: the
session code never runs on the pool's threads, and nobody polls.

Threads start on first use, after the fork, and belong to the one process
that made them.
"""

import collections
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class Offload:
    def __init__(self, threads: int, name: str):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._done: collections.deque = collections.deque()  # appended by pool threads, taken by the loop

    def fileno(self) -> int:
        """Readable when something is done (selectors take this object as it is)."""
        return self._wake_r.fileno()

    def submit(self, owner, fn: Callable, *args, then: Callable[[Future], None]) -> None:
        """Run fn(*args) on a pool thread; `then(future)` runs in the loop once it is done."""
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda done: self._finished(owner, then, done))

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
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._wake_r.close()
        self._wake_w.close()
