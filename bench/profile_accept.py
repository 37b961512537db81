#!/usr/bin/env python3
"""Where backupmx's CPU goes under smtp-source load (issue 16): CPU per message, and
optionally a cProfile of every SMTP worker.

    python3 bench/profile_accept.py                      # 10 sessions, 5000 x 2 KB: CPU per message
    python3 bench/profile_accept.py --profile --top 40   # the same under cProfile, workers merged
    python3 bench/profile_accept.py --starttls ecdsa     # STARTTLS on every connection (smtpload)
    python3 bench/profile_accept.py --smtpload           # plain, but smtpload's clients (to compare with that)

Needs smtp-source (Postfix's tools; see bench/README.md); with --starttls (or
--smtpload for plain SMTP) the load is tls.py's instead (smtpload.py: threads in 2 processes, one message
per connection, STARTTLS and a full handshake on each, the server with a
certificate of the kind named, made as tls.py makes it). The server is
peers.py's backupmx (a fresh queue in a temp dir, 127.0.0.1 only, its own
process group, stopped in a `finally`). With --profile its command line is this
script's `--serve`: the server as `backupmx serve`, with SessionLoop.run of each
forked worker wrapped in cProfile (timer: time.process_time, so a worker waiting
in select() costs nothing); each worker writes its stats when it ends, and they
are merged. The product holds no profiling code. Profiling slows the workers
about twofold: compare shares, and take CPU per message from a run without it.
"""

import argparse
import cProfile
import glob
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import REPO, BackupMX, cpu_seconds, cpu_ticks, free_port, process_tree, smtp_source  # noqa: E402


def ticks_by_process(server):
    """{pid: (user, system) clock ticks} of the server and each of its children."""
    return {pid: ticks for pid in process_tree(server.roots()) if (ticks := cpu_ticks(pid)) is not None}


def cpu_split(server):
    """{"master": (user, system), "children": (user, system)} in seconds (children: workers, flushers)."""
    split = {"master": [0, 0], "children": [0, 0]}
    for pid, ticks in ticks_by_process(server).items():
        role = split["master" if pid == server.proc.pid else "children"]
        role[0] += ticks[0]
        role[1] += ticks[1]
    tick = os.sysconf("SC_CLK_TCK")
    return {role: (user / tick, system / tick) for role, (user, system) in split.items()}


def cpu_by_child(server):
    """{pid: CPU seconds} of each of the server's children (workers, flushers): how a run spread."""
    tick = os.sysconf("SC_CLK_TCK")
    return {pid: sum(ticks) / tick for pid, ticks in ticks_by_process(server).items() if pid != server.proc.pid}


class ProfiledBackupMX(BackupMX):
    def __init__(self, *args, what="workers", **certificate):
        super().__init__(*args, **certificate)
        self.what = what

    def command(self, cfg):
        return [sys.executable, str(Path(__file__).resolve()), "--serve", self.what, str(self.dir), str(cfg)]


def serve_profiled(what, stats_dir, cfg):
    """The server, each SMTP worker's loop (or the master) under cProfile (runs in the spawned process)."""
    sys.path.insert(0, str(REPO))
    from backupmx import cli, worker

    run = worker.SessionLoop.run

    def profiled_run(self):
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        try:
            return run(self)
        finally:
            profile.disable()
            profile.dump_stats(os.path.join(stats_dir, f"worker-{os.getpid()}.prof"))

    if what == "workers":
        worker.SessionLoop.run = profiled_run
        return cli.main(["serve", "-c", cfg])
    profile = cProfile.Profile(time.process_time)
    os.register_at_fork(after_in_child=profile.disable)  # the master alone
    profile.enable()
    try:
        return cli.main(["serve", "-c", cfg])
    finally:
        profile.disable()
        profile.dump_stats(os.path.join(stats_dir, "master.prof"))


def smtpload_run(port, sessions, messages, size, starttls):
    """smtpload's load, as tls.py's accept rows run it: (seconds, note or None)."""
    import smtpload
    result = smtpload.run_load(smtpload.Load(port=port, sessions=sessions, messages=messages, size=size,
                                             tls=smtpload.client_context() if starttls else None))
    note = f"{result.errors} client errors, e.g. {result.samples[:1]}" if result.errors else None
    return result.elapsed, note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=None, help="backupmx workers (config default: 4)")
    ap.add_argument("--profile", nargs="?", const="workers", choices=("workers", "master"),
                    help="cProfile every SMTP worker (or the master)")
    ap.add_argument("--top", type=int, default=40, help="rows of the profile to print")
    ap.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative, ...)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, log, .prof files)")
    ap.add_argument("--starttls", choices=("ecdsa", "rsa"),
                    help="STARTTLS on every connection with a certificate of this kind (smtpload.py's load)")
    ap.add_argument("--smtpload", action="store_true", help="smtpload.py's clients instead of smtp-source")
    ap.add_argument("--serve", nargs=3, metavar=("WHAT", "DIR", "CFG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve_profiled(*args.serve)
    args.smtpload = args.smtpload or args.starttls is not None
    if not args.smtpload and not shutil.which("smtp-source"):
        print("profile_accept.py: smtp-source not found (apt-get install postfix)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="profile-accept-"))
    os.chmod(workdir, 0o755)
    certificate = {}
    if args.starttls:
        from tls import make_certificate  # bench/tls.py's
        certificate = dict(zip(("cert", "key"), make_certificate(workdir, args.starttls)))
    if args.profile:
        server = ProfiledBackupMX(workdir, free_port(), args.workers, what=args.profile, **certificate)
    else:
        server = BackupMX(workdir, free_port(), args.workers, **certificate)
    try:
        server.start()
        before, split_before, children_before = cpu_seconds(server), cpu_split(server), cpu_by_child(server)
        if args.smtpload:
            elapsed, note = smtpload_run(server.port, args.sessions, args.messages, args.size, args.starttls)
        else:
            elapsed, note = smtp_source(server.port, args.sessions, args.messages, args.size, timeout=600)
        cpu, split_after = cpu_seconds(server) - before, cpu_split(server)
        children = sorted((seconds - children_before.get(pid, 0.0) for pid, seconds in cpu_by_child(server).items()),
                          reverse=True)
        held = server.count()
    finally:
        server.stop()
    print(f"{args.messages} x {args.size} B, {args.sessions} sessions"
          + (f", STARTTLS {args.starttls}" if args.starttls else ", smtpload" if args.smtpload else "")
          + f": {args.messages / elapsed:.0f} msg/s, "
          f"server CPU {cpu:.2f} s = {cpu * 1000 / args.messages:.3f} ms per message, held {held}"
          + (" (profiled)" if args.profile else "") + (f"  NOTE: {note}" if note else ""))
    per_message = {role: [(a - b) * 1000 / args.messages for a, b in zip(split_after[role], split_before[role])]
                   for role in split_after}
    print("  per message (ms): " + ", ".join(f"{role} user {user:.3f} sys {system:.3f}"
                                             for role, (user, system) in per_message.items()))
    print("  children's CPU (s), busiest first: " + " ".join(f"{seconds:.2f}" for seconds in children)
          + f" over {elapsed:.2f} s")
    if args.profile:
        files = glob.glob(str(workdir / ("worker-*.prof" if args.profile == "workers" else "master.prof")))
        if files:
            stats = pstats.Stats(*files)
            print(f"{len(files)} processes, {stats.total_tt:.2f} s profiled")
            stats.sort_stats(args.sort).print_stats(args.top)
        else:
            print("no profile was written")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if held == args.messages and note is None else 1


if __name__ == "__main__":
    sys.exit(main())
