#!/usr/bin/env python3
"""What the TLS layer's own Python costs per record, against two ways without it (issue 16).

    python3 bench/tls_layer.py [--commands 5000] [--runs 3]

The server side of an established TLS 1.3 session (ECDSA P-256 certificate)
answering one short command with one short reply, as a worker does for MAIL
or RCPT, three ways, each on a real 127.0.0.1 TCP connection with
TCP_NODELAY, its client a blocking SSLSocket in a thread:

  TLSLayer    what the worker does: a non-blocking socket's recv() into
              TLSLayer.receive(), send() and outgoing() into the socket
  bare BIOs   the same MemoryBIO/SSLObject calls without TLSLayer around
              them: the layer's own cost is the difference
  SSLSocket   a non-blocking ssl.SSLSocket (OpenSSL reads and writes the
              descriptor itself; no memory buffers): what replacing the
              MemoryBIOs would save, before the driver's work it needs

Only the server thread's CPU is timed (time.thread_time around its calls),
the handshake not: microseconds per command, the lowest of the runs. A
last line times making a TLSLayer (the STARTTLS step: two MemoryBIOs and
an SSLObject).
"""

import argparse
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backupmx import tls  # noqa: E402

COMMAND = b"MAIL FROM:<a@sender.bench>\r\n"
REPLY = b"250 2.1.0 Ok\r\n"


def certificate(directory):
    cert, key = Path(directory) / "ecdsa.pem", Path(directory) / "ecdsa.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=mx.bench"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def connected_pair():
    """(server side, client side) of a 127.0.0.1 TCP connection, both with TCP_NODELAY."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    for sock in (server, client):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.setblocking(False)
    return server, client


def run_client(sock, commands):
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    with client_ctx.wrap_socket(sock, server_hostname="mx.bench") as conn:
        for _ in range(commands):
            conn.sendall(COMMAND)
            got = b""
            while len(got) < len(REPLY):
                got += conn.recv(1024)


def serve_layer(sock, server_ctx, commands):
    layer = tls.TLSLayer(server_ctx)
    spent, answered = 0.0, 0
    while answered < commands:
        select.select([sock], [], [])
        timed = layer.handshake_complete  # the handshake is not timed (its last event may bring a command)
        start = time.thread_time()
        if layer.receive(sock.recv(65536)):
            layer.send(REPLY)
            answered += 1
        sock.send(layer.outgoing())
        if timed:
            spent += time.thread_time() - start
    return spent


def serve_bios(sock, server_ctx, commands):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
    done, spent, answered = False, 0.0, 0
    while answered < commands:
        select.select([sock], [], [])
        timed = done
        start = time.thread_time()
        incoming.write(sock.recv(65536))
        try:
            if not done:
                obj.do_handshake()
                done = True
            if incoming.pending and obj.read(65536):
                obj.write(REPLY)
                answered += 1
        except ssl.SSLWantReadError:  # more of the handshake, or of a record, to come
            pass
        sock.send(outgoing.read())
        if timed:
            spent += time.thread_time() - start
    return spent


def serve_sslsocket(sock, server_ctx, commands):
    conn = server_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    done, spent, answered = False, 0.0, 0
    while answered < commands:
        select.select([conn], [], [])
        timed = done
        start = time.thread_time()
        try:
            if not done:
                conn.do_handshake()
                done = True
            if conn.recv(65536):
                conn.send(REPLY)
                answered += 1
        except ssl.SSLWantReadError:  # more of the handshake, or of a record, to come
            pass
        if timed:
            spent += time.thread_time() - start
    conn.close()
    return spent


WAYS = {"TLSLayer": serve_layer, "bare BIOs": serve_bios, "SSLSocket": serve_sslsocket}


def measure(serve, server_ctx, commands):
    server, client = connected_pair()
    thread = threading.Thread(target=run_client, args=(client, commands))
    thread.start()
    try:
        return serve(server, server_ctx, commands) / commands
    finally:
        thread.join(30)
        server.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=5000, help="commands per measurement (default 5000)")
    parser.add_argument("--runs", type=int, default=3, help="measurements per way, lowest reported (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        server_ctx = tls.server_context(*certificate(workdir))
        best = {}
        for _ in range(args.runs):  # interleaved, so that the machine's load falls on each way alike
            for name, serve in WAYS.items():
                spent = measure(serve, server_ctx, args.commands)
                best[name] = min(best.get(name, spent), spent)
    print(f"{ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}; {args.commands} commands x {args.runs} runs; "
          "server thread CPU per command (us), lowest run")
    for name, spent in best.items():
        print(f"{name:<12}{spent * 1e6:8.2f}")
    print(f"{'the layer':<12}{(best['TLSLayer'] - best['bare BIOs']) * 1e6:8.2f}  (TLSLayer - bare BIOs)")
    made = min(timeit.repeat(lambda: tls.TLSLayer(server_ctx), number=1000, repeat=args.runs)) / 1000
    print(f"making a TLSLayer: {made * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
