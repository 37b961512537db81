"""The DNS look-ups of host-name primaries, for the master, in a child of their own.

getaddrinfo has no timeout: the master never looks a name up in its loop.
At start-up (pin_primaries) it waits for the child at most LOOKUP_TIMEOUT; at
a reload (PendingLookups) the child's answers complete the reload when they
come; the names that did not resolve are looked up again every
UNRESOLVED_RETRY seconds (UnresolvedPrimaries, RetryLookups) until they do.
What to do with the answers is primaries.py's (pin, pin_resolved); this
module only runs the look-ups and hands the answers to the master.
"""

import logging
import os
import selectors
import signal
import time

from backupmx import children, primaries
from backupmx.config import tuning
from backupmx.log import log_event

# The DNS lookups of host-name primaries (in a child, at start-up and at each reload) get this long.
LOOKUP_TIMEOUT = primaries.LOOKUP_TIMEOUT
# Seconds between the master's new lookups of the host-name primaries that did not resolve
# (their mail waits queued meanwhile); a name that resolved is not looked up again.
UNRESOLVED_RETRY = tuning("BACKUPMX_UNRESOLVED_RETRY", 300.0)


class PendingLookups:
    """The DNS lookups of host-name primaries (primaries.pin), in a child, for at most LOOKUP_TIMEOUT.

    getaddrinfo has no timeout: run in the loop, a slow resolver would stall
    every hand-off of a connection. A child looks the names up and writes
    the answers to a pipe; the reload completes when they come
    (Master.finish_reload), or after LOOKUP_TIMEOUT with what came (a name
    without an answer keeps its addresses). The old configuration serves
    meanwhile; a newer SIGHUP replaces a pending one. At start-up the master
    waits for them (wait()), as long and no longer.
    """

    def __init__(self, pid, fd, config, ssl_context):
        self.pid, self.fd = pid, fd
        self.config, self.ssl_context = config, ssl_context
        self.deadline = time.monotonic() + LOOKUP_TIMEOUT
        self.answers = bytearray()

    @classmethod
    def begin(cls, master, config, ssl_context, names):
        """start(), as the master's pending lookups, read in its loop; raises OSError as start() does."""
        master.lookups = cls.start(master, config, ssl_context, names)
        master.selector.register(master.lookups.fd, selectors.EVENT_READ, master.lookups)

    @classmethod
    def start(cls, master, config, ssl_context, names):
        """A child looking `names` up; raises OSError when it cannot be started."""
        read_end, write_end = os.pipe()
        try:
            pid = children.fork_blocking(master.SIGNALS)
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:
            os.close(read_end)
            master.close_in_child()
            children.run_child(lambda: _write_lookups(write_end, names), master.logger, "lookup-crashed")
        os.close(write_end)
        os.set_blocking(read_end, False)
        return cls(pid, read_end, config, ssl_context)

    def finish(self, master, lookups):
        """The answers are in (or the deadline passed): the reload completes."""
        master.finish_reload(self.config, self.ssl_context, lookups)

    def read(self) -> bool:
        """Take what the child wrote; True once it is done."""
        data = children.read_pipe(self.fd, 65536)
        if data:
            self.answers += data
        return data == b""

    def results(self) -> dict:
        try:
            return primaries.decode_lookups(bytes(self.answers))
        except ValueError:  # cut short (the deadline): the names get no answer
            return {}

    def wait(self) -> bool:
        """Block until the child is done (True) or the deadline has passed (False): start-up
        has nothing else to serve yet. The child is gone when this returns."""
        selector = selectors.DefaultSelector()
        selector.register(self.fd, selectors.EVENT_READ)
        try:
            while (remaining := self.deadline - time.monotonic()) > 0:
                if selector.select(remaining) and self.read():
                    return True
            return False
        finally:
            selector.close()
            os.close(self.fd)
            children.send_signal(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def pin_primaries(master):
    """Start-up: the master's config with its host-name primaries resolved, bounded like a
    reload's lookups. A name without an answer in time is logged (primary-unresolved) and
    its domain's mail waits queued until UnresolvedPrimaries resolves it: the server starts,
    for a backup MX is needed most when DNS (the primary's own zone) is what is broken."""
    names = primaries.host_primaries(master.config)
    if not names:
        return master.config
    try:
        pending = PendingLookups.start(master, master.config, master.ssl_context, names)
    except OSError as exc:  # no child: look them up here, unbounded
        log_event(master.logger, "fork-failed", error=exc.strerror)
        lookups = primaries.look_up(names)
    else:
        if not pending.wait():
            log_lookup_timeout(master.logger)
        lookups = pending.results()
    return primaries.pin(master.config, master.logger, resolver=primaries.answered(lookups))


def log_lookup_timeout(logger):
    log_event(logger, "primary-lookup-timeout", seconds=f"{LOOKUP_TIMEOUT:g}", level=logging.WARNING)


def _write_lookups(fd, names):
    """The lookup child: every name's answer, on the pipe to the master."""
    data = primaries.encode_lookups(primaries.look_up(names))
    while data:
        data = data[os.write(fd, data):]
    os.close(fd)

class UnresolvedPrimaries:
    """When the host-name primaries that did not resolve (primaries.unresolved) are next looked
    up: every UNRESOLVED_RETRY seconds while there are any, in the reload's bounded child
    (RetryLookups), so that mail queued while DNS was broken at start-up goes once it is back,
    not only after a SIGHUP. Names that resolved are never looked up again (pins are deliberate)."""

    def __init__(self):
        self.due = time.monotonic() + UNRESOLVED_RETRY

    def look_up_due(self, master):
        """Start the lookups when due. Not while a reload's lookups are pending (they resolve
        every name anyway; a SIGHUP cancels a retry's), nor while stopping."""
        if master.stopping or master.lookups is not None or time.monotonic() < self.due:
            return
        self.due = time.monotonic() + UNRESOLVED_RETRY
        names = primaries.unresolved(master.config)
        if not names:
            return
        try:
            RetryLookups.begin(master, master.config, master.ssl_context, names)
        except OSError as exc:  # never looked up in the loop: an interval later
            log_event(master.logger, "fork-failed", error=exc.strerror)


class RetryLookups(PendingLookups):
    """UnresolvedPrimaries' lookups: what now resolves is pinned (primary-resolved) and the
    flush workers are replaced so the new ones deliver there. The queue is left alone: a
    backup MX delivers on ETRN or at retry_interval, as before. SMTP workers use the pins only
    for `recipients = verify` callouts and monitoring probes: replaced only for such a domain."""

    def finish(self, master, lookups):
        if master.stopping:
            return
        master.config, resolved = primaries.pin_resolved(master.config, lookups, master.logger)
        if not resolved:
            return
        master.flush_workers.retire_all()
        master.flush_workers.manage()
        if any(d.verify or d.accept_when == "primary-unreachable" for d in resolved):
            master.replace_workers(master.ssl_context, "retire")  # their sessions are not hurried
