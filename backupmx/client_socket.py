"""The client's socket as a session driver writes to it.

prepare_socket readies a just-accepted socket (the master does it before the
hand-off to a worker); Unsent holds the replies the socket has not taken yet,
with their write deadline. Replies waiting stay below OUTPUT_BOUND: a client
that never reads what it is sent costs that much memory, and SEND_BUFFER in the
kernel (connection.SMTPConnection reads a session only while Unsent has room).
"""

import socket

from backupmx import smtp

# Backpressure: replies waiting to be sent stay below this (plus one reply):
# the session is read, or let go on with its backlog, only while there is room
# for what it may answer at once (smtp.OUTPUT_PAUSE). A client that never
# reads its replies therefore costs this, and RECV_SIZE of input in the session.
OUTPUT_BOUND = 64 * 1024
# The kernel's send buffer for a session (it would grow to megabytes on its
# own): SMTP replies are small, and what a client does not read should cost
# little in the kernel as well.
SEND_BUFFER = 32 * 1024
# Unsent.has_room: what may wait so that the session's next answers still fit below OUTPUT_BOUND.
ROOM = OUTPUT_BOUND - smtp.OUTPUT_PAUSE


def prepare_socket(sock) -> None:
    """Ready a just-accepted client socket for a session driver: non-blocking, a bounded send
    buffer (SEND_BUFFER), no Nagle delay for the small replies (TCP). The master does this
    before the hand-off, so the worker serving the sessions need not (its socket options
    and its flags belong to the connection, not to the descriptor)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass



class Unsent:
    """Replies waiting for the socket (already encrypted under TLS), and their write deadline:
    it runs while any wait, and each octet the socket takes restarts it."""

    def __init__(self, clock, timeout: float):
        self.data = bytearray()
        self.deadline: float | None = None
        self.clock, self.timeout = clock, timeout

    def __len__(self) -> int:
        return len(self.data)

    def add(self, data: bytes) -> None:
        if data:
            self.data += data
            self.deadline = self.deadline or self.clock() + self.timeout

    def has_room(self) -> bool:
        """Room for what the session may answer next (up to smtp.OUTPUT_PAUSE) below OUTPUT_BOUND."""
        return len(self.data) <= ROOM

    def write(self, sock, data: bytes) -> None:
        """Send `data` at once when nothing waits before it (the usual case: one send() per
        reply or pipelined group, no buffering); what the socket does not take waits here
        for the driver's on_writable. A broken connection is noticed there (send() fails again)."""
        if not self.data:
            try:
                sent = sock.send(data)
            except OSError:  # BlockingIOError included: it all waits
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.add(data)

    def send(self, sock) -> bool:
        """Write what the socket takes now; False when the connection broke."""
        while self.data:
            try:
                sent = sock.send(self.data)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            del self.data[:sent]
            self.deadline = self.clock() + self.timeout if self.data else None
        return True

