"""The listening sockets: bound from the config, or adopted from systemd.

A Listener is a socketserver.TCPServer, so its hooks carry socketserver's
names (get_request, verify_request, process_request, shutdown_request); the
master's selectors loop calls handle_request_noblock() when one is readable
(not serve_forever: there are several listeners and the workers' sockets).
What to do with a connection is the supervisor's decision: the listener asks
its `supervisor` (verify_request, process_request, accept_failed).

Under systemd socket activation (LISTEN_PID / LISTEN_FDS, Accept=no) the
passed sockets are adopted instead of binding (bind_and_activate=False, as
socketserver intends for inherited sockets).
"""

import errno
import os
import socket
import socketserver

from backupmx.config_values import format_hostport

# Accepts per listener per loop turn (fairness between listeners and workers).
ACCEPT_BATCH = 64


class ListenError(OSError):
    """A one-line reason why an address cannot be listened on (the CLI prints it)."""


class Listener(socketserver.TCPServer):
    """One listening address, plain (STARTTLS offered) or implicit TLS; or an ODMR port (odmr: STARTTLS, ATRN)."""

    allow_reuse_address = True  # rebind at once after a crash (docs/SPEC.md, "Command line": serve)
    request_queue_size = 1024  # listen() backlog: bursts wait in the kernel

    def __init__(self, address, supervisor, implicit_tls: bool, *, sock: socket.socket | None = None,
                 odmr: bool = False):
        self.supervisor = supervisor
        self.implicit_tls = implicit_tls
        self.odmr = odmr
        if sock is not None:  # adopted (systemd socket activation): no bind
            self.address_family = sock.family
            super().__init__(address, None, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        else:
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            super().__init__(address, None, bind_and_activate=True)
        self.socket.setblocking(False)

    def server_bind(self):
        """May be overridden. IPv6 listeners are IPv6 only: 0.0.0.0 and :: are two listeners."""
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def log_fields(self, tls_available: bool) -> dict:
        """What its `listening` line says of it besides the address: a plain listener
        offers STARTTLS only when a certificate is configured."""
        tls = "implicit" if self.implicit_tls else "starttls" if tls_available else "none"
        return {"tls": tls, "odmr": "yes" if self.odmr else None}

    @property
    def label(self) -> str:
        return format_hostport(*self.server_address[:2])

    def get_request(self):
        """May be overridden. accept(); raises BlockingIOError when nobody waits."""
        return self.socket.accept()

    def verify_request(self, request, client_address):
        """May be overridden. The per-client session limit (the supervisor counts)."""
        return self.supervisor.verify_request(self, request, client_address)

    def process_request(self, request, client_address):
        """May be overridden. Hand the connection to a worker (or refuse: busy)."""
        self.supervisor.process_request(self, request, client_address)

    def shutdown_request(self, request):
        """May be overridden. Half-close then close, so a 421 just written is not lost to a RST."""
        super().shutdown_request(request)

    def handle_request_noblock(self):
        """Accept what is waiting (up to ACCEPT_BATCH): socketserver's _handle_request_noblock, in a loop."""
        for _ in range(ACCEPT_BATCH):
            try:
                request, client_address = self.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.supervisor.accept_failed(self, exc)
                return
            if self.verify_request(request, client_address):
                try:
                    self.process_request(request, client_address)
                except Exception:
                    self.supervisor.logger.exception("dispatch-failed client=%s", client_address[0])
                    self.shutdown_request(request)
            else:
                self.shutdown_request(request)


def refuse(sock: socket.socket, reply: bytes) -> None:
    """Write a one-line refusal on a just-accepted socket (its send buffer is empty)."""
    try:
        sock.setblocking(False)
        sock.send(reply)
    except OSError:
        pass


def sockets_from_systemd() -> list[tuple[socket.socket, str]]:
    """Listening sockets passed by systemd (LISTEN_PID/LISTEN_FDS, Accept=no) with their names, or []."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    result = []
    for i in range(count):
        sock = socket.socket(fileno=3 + i)  # sd_listen_fds(3): the first passed descriptor is 3
        os.set_inheritable(sock.fileno(), False)
        result.append((sock, names[i] if i < len(names) else ""))
    return result


def build_listeners(config, supervisor) -> list[Listener]:
    """Listeners for config.listen (plain), config.listen_tls (implicit TLS) and config.listen_odmr.

    Under systemd socket activation the passed sockets are adopted instead: a
    socket is implicit-TLS when its FileDescriptorName is "tls"/"smtps" or its
    port is one of listen_tls's, ODMR when its name is "odmr" or its port one of
    listen_odmr's. Raises ListenError (one line) when an address cannot be
    bound; nothing stays open then.
    """
    inherited = sockets_from_systemd()
    if inherited:
        tls_ports = {port for _, port in config.listen_tls}
        odmr_ports = {port for _, port in config.listen_odmr}
        listeners = []
        for sock, name in inherited:
            port = sock.getsockname()[1]
            named = name in ("plain", "smtp", "tls", "smtps", "odmr")
            tls = name in ("tls", "smtps") or (port in tls_ports and not named)
            odmr = name == "odmr" or (port in odmr_ports and not named)
            listeners.append(Listener(sock.getsockname()[:2], supervisor, tls, sock=sock, odmr=odmr))
        return listeners
    listeners = []
    try:
        for addresses, tls, odmr in ((config.listen, False, False), (config.listen_tls, True, False),
                                     (config.listen_odmr, False, True)):
            for host, port in addresses:
                try:
                    listeners.append(Listener((host, port), supervisor, tls, odmr=odmr))
                except OSError as exc:
                    reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                    raise ListenError(f"cannot listen on {format_hostport(host, port)}: {reason}") from None
    except BaseException:
        for listener in listeners:
            listener.server_close()
        raise
    return listeners
