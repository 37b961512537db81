#!/usr/bin/env python3
"""Start a command the way systemd socket activation (Accept=no) does.

    python3 tests/launch_activation.py --plain 127.0.0.1:2525 --tls 127.0.0.1:4650 -- CMD ARGS...
    python3 tests/launch_activation.py --dual-stack --plain [::]:2525 -- CMD ARGS...

Binds and listens on each address, puts the listening sockets at fds 3, 4, ...
(in the order given; IPv6 ones IPv6-only unless --dual-stack, as systemd's
BindIPv6Only=both would make them: then IPv4 clients arrive as
::ffff:a.b.c.d), sets LISTEN_FDS, LISTEN_FDNAMES ("plain" / "tls") and
LISTEN_PID to this process's pid, and exec()s CMD, which therefore keeps that
pid: what sd_listen_fds(3) checks. Test helper only (no systemd needed).
"""

import fcntl
import os
import socket
import sys

SD_LISTEN_FDS_START = 3


def parse(argv):
    if "--" not in argv:
        sys.exit(__doc__)
    split = argv.index("--")
    opts, command = argv[:split], argv[split + 1:]
    wanted = []
    dual_stack = "--dual-stack" in opts
    it = iter(o for o in opts if o != "--dual-stack")
    for flag in it:
        if flag not in ("--plain", "--tls"):
            sys.exit(f"unknown option {flag}")
        host, _, port = next(it).rpartition(":")
        wanted.append((flag[2:], host.strip("[]"), int(port)))
    if not wanted or not command:
        sys.exit(__doc__)
    return wanted, command, dual_stack


def main(argv):
    wanted, command, dual_stack = parse(argv)
    temporaries = []
    names = []
    for name, host, port in wanted:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((host, port))
        sock.listen(128)
        # Park it high first so moving it to 3+i cannot clobber another one.
        temporaries.append(fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 100))
        sock.close()
        names.append(name)
    for i, fd in enumerate(temporaries):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(names))
    os.environ["LISTEN_FDNAMES"] = ":".join(names)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
