"""The metrics process: GET /metrics on `metrics_listen`, apart from everything SMTP.

The master binds the address at start (as root, like the SMTP listeners: a
port in use is a one-line error before anything forks) and supervises one
process that serves it with the standard library's http.server. That process
reads the queue read-only (SQLite mode=ro, a fresh connection per scrape) and
never touches the SMTP workers: a slow or hostile HTTP client can cost this
process a thread and a descriptor, nothing else. Bounded by construction:

  - at most MAX_CLIENTS connections at once; one more is closed unanswered;
  - a connection gets CLIENT_DEADLINE seconds in all (a timer shuts its socket
    down), and READ_TIMEOUT per read: a client that drips bytes is cut off;
  - only GET /metrics is answered (404 for other paths, 501 for other methods),
    one request per connection (HTTP/1.0), request and header lines bounded by
    http.server (64 KiB, 100 headers).
"""

from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import threading
import time
from urllib.parse import urlsplit

from backupmx import metrics
from backupmx.config import tuning
from backupmx.log import log_event
from backupmx.store import QueueStore

MAX_CLIENTS = 8
CLIENT_DEADLINE = tuning("BACKUPMX_METRICS_DEADLINE", 10.0)
READ_TIMEOUT = 5.0
POLL = 0.1  # seconds between looks at the stop flag: the master's stop and a reload wait for it


def bind(address: tuple[str, int]) -> socket.socket:
    """The listening socket for metrics_listen (SO_REUSEADDR, like the SMTP listeners). Raises OSError."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    return socket.create_server(address, family=family, backlog=16)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "backupmx"
    sys_version = ""
    timeout = READ_TIMEOUT  # StreamRequestHandler: the socket's timeout for every read

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "only /metrics is here")
            return
        try:
            body = self.server.render().encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - the queue cannot be read now: say so, stay up
            log_event(self.server.logger, "metrics-failed", error=f"{type(exc).__name__}: {exc}",
                      level=logging.WARNING)
            self.send_error(503, "the queue cannot be read now")
            return
        self.send_response(200)
        self.send_header("Content-Type", metrics.CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        log_event(self.server.logger, "metrics-request", client=self.client_address[0], detail=format % args,
                  level=logging.DEBUG)


class MetricsServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """http.server on an already bound socket, a thread per connection, at most MAX_CLIENTS of them."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, config, logger: logging.Logger):
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.config, self.logger = config, logger
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.timeout = POLL

    def server_bind(self) -> None:  # the master bound it already
        pass

    def render(self) -> str:
        with QueueStore(self.config.queue, read_only=True) as store:
            families = metrics.collect(store, self.config.domains, time.time())
        return metrics.render(families)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this one is closed unanswered
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        deadline = threading.Timer(CLIENT_DEADLINE, _cut, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.slots.release()


def _cut(request: socket.socket) -> None:
    """The connection's time is up: its reads and writes fail now, and its thread ends."""
    try:
        request.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def run_metrics(sock: socket.socket, config, logger: logging.Logger, should_stop) -> None:
    """The metrics process's body: serve until should_stop()."""
    server = MetricsServer(sock, config, logger)
    log_event(logger, "metrics-started", address=_label(sock))
    try:
        while not should_stop():
            server.handle_request()  # waits at most POLL for a connection
    finally:
        server.server_close()


def _label(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
