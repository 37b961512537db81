"""Where a benchmark step's time goes, per process: CPU, disk I/O and the machine's idle time.

backlog.py takes a Snapshot before and after each flush; Usage.between() turns the two into
each role's CPU seconds (utime+stime from /proc/PID/stat), the bytes the flushers and the
checkpointer read and wrote (/proc/PID/io: read_bytes, and write_bytes, which counts the
pages a process dirtied, whoever writes them back later), the machine's busy, interrupt,
idle, iowait and steal seconds over both cores (/proc/stat), and the three other processes
that used the most CPU meanwhile (kernel threads, someone else's run). A question it
answers: when the same flush is slower at 1M queued, which process spends more, does the
flush wait (idle, iowait), or did something else take the cores ("busy, not these": the
busy time no process here was charged for, processes that started and ended within the
step among it)?

Roles come from the server's log lines (`worker-started pid=...`, as backlog.py's RSS
sampler finds them), the rest by process tree: the master (the server's own pid), a flush
worker's children ("flush helper": the second connection's process, flush_sharing.share), the
sink, and the benchmark itself ("bench": it polls the sink). A helper that ended within
the step is counted from its flush worker's cutime+cstime (the kernel adds a reaped
child's CPU there), one still running from its own; its I/O counts are lost with it.
Linux only; a process that went away between the two snapshots loses its share (said in
the `gone` count).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")
# The master's children by the log line that announces them (master.py, flush_workers.py).
LOGGED_ROLES = {"worker-started": "smtp worker", "flush-worker-started": "flush worker",
                "checkpointer-started": "checkpointer", "metrics-process-started": "metrics"}
IO_ROLES = ("flush worker", "flush helper", "checkpointer")  # whose /proc/PID/io is kept


def _stat(pid: int) -> tuple[int, float, float, str] | None:
    """(ppid, own CPU seconds, reaped children's CPU seconds, comm) of `pid`, None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime) / TICK, (cutime + cstime) / TICK, text[text.index("(") + 1:text.rindex(")")]


def _io(pid: int) -> tuple[int, int]:
    """(read_bytes, write_bytes) of `pid`; zeros when unreadable."""
    try:
        with open(f"/proc/{pid}/io") as f:
            values = dict(line.split(": ") for line in f.read().splitlines())
        return int(values["read_bytes"]), int(values["write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _machine() -> tuple[float, ...]:
    """(total, idle, iowait, steal, irq) CPU seconds of all cores since boot (steal: the time
    the hypervisor ran something else on our virtual CPUs; irq: hard and soft interrupts,
    the loopback's packets among them, charged to no process)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return tuple(t / TICK for t in (sum(ticks[:8]), ticks[3], ticks[4], ticks[7], ticks[5] + ticks[6]))


def _all() -> dict[int, tuple[int, float, float, str]]:
    """_stat() of every process."""
    every = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            got = _stat(int(name))
            if got is not None:
                every[int(name)] = got
    return every


@dataclass
class Snapshot:
    at: float  # time.monotonic()
    wall: float  # time.time(), against the log's timestamps
    machine: tuple[float, float, float, float]
    logged: bytes  # the log's lines since the snapshot before
    procs: dict[int, tuple[str, float, float, int, int]] = field(default_factory=dict)
    # pid -> (role, own CPU s, reaped children's CPU s, read_bytes, write_bytes)
    others: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (comm, CPU s)


class Usage:
    """The server's processes (master pid `master`, its log `log`), the sink's and this one's ("bench"), by role."""

    def __init__(self, master: int, log, sink: int | None = None):
        self.master, self.log, self.sink = master, log, sink
        self.logged_roles: dict[int, str] = {}
        self.log_read = 0  # bytes of the log read: each snapshot reads only the lines since

    def read_log(self) -> bytes:
        """The log's whole lines since the last call (the roles they start noted)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_read)
                data = f.read()
        except OSError:
            return b""
        data = data[:data.rfind(b"\n") + 1]
        self.log_read += len(data)
        for event, pid in re.findall(rb"\b([a-z-]+-started) pid=(\d+)", data):
            role = LOGGED_ROLES.get(event.decode())
            if role:
                self.logged_roles[int(pid)] = role
        return data

    def roles(self, every: dict[int, tuple]) -> dict[int, str]:
        roles = {self.master: "master", os.getpid(): "bench", **self.logged_roles}
        for pid, (ppid, *_rest) in every.items():
            if roles.get(ppid) == "flush worker":
                roles.setdefault(pid, "flush helper")
            elif self.sink is not None and (pid == self.sink or ppid == self.sink):
                roles.setdefault(pid, "sink")
        return roles

    def snapshot(self) -> Snapshot:
        snap = Snapshot(time.monotonic(), time.time(), _machine(), self.read_log())
        every = _all()
        roles = self.roles(every)
        for pid, (_ppid, own, reaped, comm) in every.items():
            role = roles.get(pid)
            if role is None:
                snap.others[pid] = (comm, own)
                continue
            read, write = _io(pid) if role in IO_ROLES else (0, 0)
            snap.procs[pid] = (role, own, reaped, read, write)
        return snap

    def between(self, before: Snapshot, after: Snapshot) -> dict:
        """Each role's CPU seconds and I/O bytes from `before` to `after`, the machine's idle and
        iowait (and steal) seconds (both cores), the wall time, and the server's log events meanwhile."""
        cpu: dict[str, float] = {}
        io: dict[str, list[int]] = {}
        gone = 0
        for pid, (role, own, reaped, read, write) in after.procs.items():
            was = before.procs.get(pid)
            if was is not None and was[0] != role:
                was = None  # a pid used again
            own0, reaped0, read0, write0 = was[1:] if was else (0.0, reaped, 0, 0)
            cpu[role] = cpu.get(role, 0.0) + own - own0
            if role == "flush worker":  # its helpers that ended meanwhile
                cpu["flush helper"] = cpu.get("flush helper", 0.0) + reaped - reaped0
            if role in IO_ROLES:
                acc = io.setdefault(role, [0, 0])
                acc[0] += read - read0
                acc[1] += write - write0
        for pid, (role, *_rest) in before.procs.items():
            if pid not in after.procs and role != "flush helper":
                gone += 1  # (a helper gone is in its flush worker's reaped CPU)
        total, idle, iowait, steal, irq = (a - b for a, b in zip(after.machine, before.machine))
        others = {}  # comm -> CPU s of the processes that are none of these (kernel threads, others' runs)
        for pid, (comm, own) in after.others.items():
            spent = own - before.others.get(pid, ("", 0.0))[1]  # (a kworker's comm names its current work)
            if spent > 0:
                name = comm.split("/")[0] if comm.startswith("kworker") else comm
                others[name] = others.get(name, 0.0) + spent
        return {"wall": after.at - before.at, "cpu": cpu, "io": io, "gone": gone,
                "busy": total - idle - iowait - steal, "idle": idle, "iowait": iowait, "steal": steal,
                "irq": irq, "others": dict(sorted(others.items(), key=lambda kv: -kv[1])[:3]),
                "events": events(after.logged), "started": started(after.logged, before.wall)}


def events(logged: bytes) -> dict[str, int]:
    """The server's log events in `logged`, counted by name, but the per-message ones
    (delivered); "reclaimed" with the messages it deleted."""
    counts: dict[str, int] = {}
    for m in re.finditer(rb"^\S+ \S+ \S+ (\S+)(?: messages=(\d+))?", logged, re.M):
        key = m.group(1).decode(errors="replace")
        if key != "delivered":
            counts[key] = counts.get(key, 0) + (int(m.group(2)) if key == "reclaimed" and m.group(2) else 1)
    return counts


def started(logged: bytes, since: float) -> float:
    """Seconds from `since` (time.time()) to the first flush-start line in `logged` (NaN
    without one): how long the ETRN's flush waited for a flush worker."""
    m = re.search(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ flush-start ", logged, re.M)
    if m is None:
        return float("nan")
    return time.mktime(time.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000 - since


ORDER = ("master", "smtp worker", "flush worker", "flush helper", "checkpointer", "metrics", "sink", "bench")


def per_message(usage: dict, messages: int) -> dict[str, float]:
    """us a message of each role's CPU, of the machine's idle/iowait/busy time and of the wall
    time; MB for the I/O columns."""
    n = max(1, messages)
    row = {role: usage["cpu"].get(role, 0.0) * 1e6 / n for role in ORDER if role in usage["cpu"]}
    row["all server"] = sum(v for k, v in usage["cpu"].items() if k not in ("sink", "bench")) * 1e6 / n
    for key in ("busy", "irq", "idle", "iowait", "steal", "wall"):
        row[key] = usage[key] * 1e6 / n
    row["flush start ms (not a msg)"] = usage["started"] * 1000
    # busy: user, system and interrupt time; what no process here was charged for
    row["busy, not these"] = (usage["busy"] - usage["irq"] - sum(usage["cpu"].values())) * 1e6 / n
    for role, (read, write) in usage["io"].items():
        row[f"{role} read MB"] = read / 1e6
        row[f"{role} write MB"] = write / 1e6
    return row


def line(usage: dict, messages: int) -> str:
    """One flush's figures on one line (us a message), and its log events."""
    row = per_message(usage, messages)
    cells = [f"{k} {v:.0f}" if not k.endswith("MB") else f"{k} {v:.1f}" for k, v in row.items()
             if not k.startswith("flush start")]
    events = ", ".join(f"{k} {v}" for k, v in sorted(usage["events"].items()))
    others = ", ".join(f"{comm} {spent * 1e6 / max(1, messages):.0f}" for comm, spent in usage["others"].items())
    return f"    flush started {usage['started'] * 1000:.0f} ms after the ETRN; us/msg: " + "; ".join(cells) + (f"  [log: {events}]" if events else "") + \
        (f"  [others, us/msg: {others}]" if others else "") + \
        (f"  ({usage['gone']} gone)" if usage["gone"] else "")


def table(levels: dict[str, list[dict]]) -> list[str]:
    """Medians per level (column) of each row of per_message(), the last level against the first."""
    rows = {}
    for level, each in levels.items():
        for usage in each:
            for k, v in usage.items():
                rows.setdefault(k, {}).setdefault(level, []).append(v)
    names = list(levels)
    out = [f"{'us a message (median)':<26}" + "".join(f"{n:>16}" for n in names)
           + (f"{'diff':>10}" if len(names) > 1 else "")]
    for k, by in rows.items():
        med = [statistics.median(by[n]) if n in by else 0.0 for n in names]
        out.append(f"{k:<26}" + "".join(f"{m:>16.1f}" for m in med)
                   + (f"{med[-1] - med[0]:>+10.1f}" if len(names) > 1 else ""))
    return out
