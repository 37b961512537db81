"""The checkpointer process (checkpointer.py): the WAL's checkpoints off the writers' commits,
under a real `serve`, with a real queue file."""

import logging
import os
import re
import signal
import smtplib
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest

from backupmx import checkpointer
from backupmx.checkpointer import Checkpointer, run_checkpointer
from backupmx.config import load_config
from backupmx.store import QueueStore
from backupmx.store_housekeeping import wal_left_bytes
from conftest import wait_for, write_config

BACKSTOP = 64  # pages: the writers' wal_autocheckpoint under the master, shortened for the test


def wal_frames(queue_path):
    """(frames in the WAL, frames of them copied into the database), from the -shm's wal-index
    header (SQLite's wal.c: mxFrame at byte 16 of WalIndexHdr, nBackfill at byte 96, native order)."""
    with open(f"{queue_path}-shm", "rb") as shm:
        header = shm.read(100)
    return struct.unpack_from("=I", header, 16)[0], struct.unpack_from("=I", header, 96)[0]


def checkpointers(server):
    return [int(pid) for pid in re.findall(r"checkpointer-started pid=(\d+)", server.log())]


def stopped_between_checkpoints(queue_path, pid):
    """SIGSTOP `pid`; True when it holds neither a checkpoint nor the write lock then (one of ours
    and a write transaction go through at once), else it goes on."""
    os.kill(pid, signal.SIGSTOP)
    db = sqlite3.connect(queue_path, isolation_level=None, timeout=0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        if db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0:
            return True
    except sqlite3.OperationalError:  # locked: it was opening the queue
        pass
    finally:
        db.close()
    os.kill(pid, signal.SIGCONT)
    return False


def send(server, count, body=b"hello\r\n"):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        for i in range(count):
            client.sendmail("a@sender.test", [f"user{i}@example.com"], b"Subject: wal\r\n\r\n" + body)


def test_the_checkpointer_copies_the_wal_the_writers_keep_a_backstop_and_a_hung_one_is_replaced(server_factory):
    server = server_factory(env={"BACKUPMX_CHECKPOINT_BACKSTOP": str(BACKSTOP), "BACKUPMX_CHECKPOINTER_TIMEOUT": "1.5"})
    # The writers leave a few frames (fewer than the backstop) to the checkpointer, which copies them.
    send(server, 3)
    assert wait_for(lambda: 0 < wal_frames(server.queue_path)[0] == wal_frames(server.queue_path)[1], 5), \
        wal_frames(server.queue_path)
    [first] = checkpointers(server)

    # Stopped (and holding no checkpoint: ours went through), the writers' backstop still bounds
    # the WAL: ~450 frames of mail leave the -wal file at the backstop and a commit beyond it.
    assert wait_for(lambda: stopped_between_checkpoints(server.queue_path, first), 5)
    try:
        send(server, 15, (b"x" * 998 + b"\r\n") * 100)
        page = 4096 + 24  # a WAL frame: its header and a page
        assert os.path.getsize(f"{server.queue_path}-wal") < (BACKSTOP + 60) * page

        # Silent for BACKUPMX_CHECKPOINTER_TIMEOUT: the master kills it (kill -9) and starts another.
        assert wait_for(lambda: len(checkpointers(server)) == 2, 5), server.log()
        log = server.log()
        assert f"checkpointer-hung pid={first}" in log and f"checkpointer-died pid={first} status=signal-9" in log
    finally:
        try:
            os.kill(first, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.fixture
def held_back(tmp_path):
    """A queue (its QueueStore), a writer that leaves the checkpoints to others and has a table of
    ballast, and a reader: (path, store, writer, reader), all closed at the end."""
    path = str(tmp_path / "queue.db")
    store = QueueStore(path)
    writer = sqlite3.connect(path, isolation_level=None)
    reader = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE ballast (data BLOB)")
    yield path, store, writer, reader
    store.close()
    writer.close()
    reader.close()


def test_a_restart_checkpoint_copies_little_while_it_holds_the_writers(held_back, monkeypatch):
    """A RESTART holds the write lock while it copies and waits (RESTART_BUSY_TIMEOUT): what a
    reader kept from the PASSIVE checkpoints (a long `queue list`, a shell in a transaction) is
    copied by PASSIVE ones once it is gone, not by a RESTART that finds it gone, every commit
    waiting meanwhile (40 MB held so: a commit waited 133 ms, not 50)."""
    monkeypatch.setattr(checkpointer, "WAL_LIMIT", 50)
    path, store, writer, reader = held_back
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM ballast").fetchone()  # its snapshot keeps what follows
    for _ in range(checkpointer.RESTART_COPY_LIMIT // 8):  # ~10 pages each
        writer.execute("INSERT INTO ballast VALUES (zeroblob(40000))")
    calls = []
    checkpoint = store.checkpoint

    def recorded(mode, busy_timeout):
        calls.append((mode, checkpoint(mode, busy_timeout)))
        return calls[-1][1]

    def reader_leaves_at_a_restart(statement):
        if "RESTART" in statement and reader.in_transaction:
            reader.execute("COMMIT")

    monkeypatch.setattr(store, "checkpoint", recorded)
    store.connection.set_trace_callback(reader_leaves_at_a_restart)
    looks = Checkpointer(path, logging.getLogger("test"), store)
    looks.turn()
    if reader.in_transaction:
        reader.execute("COMMIT")
    looks.turn()
    restarts = [i for i, (mode, _) in enumerate(calls) if mode == "RESTART"]
    assert restarts, calls  # past WAL_LIMIT, the reader gone: the WAL is started over
    for i in restarts:
        _, (_, wal, copied) = calls[i - 1]
        assert wal - copied <= checkpointer.RESTART_COPY_LIMIT, calls


def test_a_checkpointer_that_cannot_open_the_queue_says_so_once_and_tries_again(tmp_path, monkeypatch, caplog):
    """Its queue not to be opened (here: not there yet; a full disk refuses the write an open
    makes), the checkpointer logs one checkpoint-failed line and tries again, beating meanwhile;
    it used to crash, and the master started another every second, each crash a traceback."""
    monkeypatch.setattr(checkpointer, "FAILURE_PAUSE", 0.01)
    monkeypatch.setattr(checkpointer, "INTERVAL", 0.01)
    path = tmp_path / "spool" / "queue.db"
    config = load_config(write_config(tmp_path / "backupmx.ini", port=1, queue=path))
    beats = []

    def beat():
        beats.append(time.monotonic())
        if len(beats) == 3:  # the queue is back
            path.parent.mkdir()
            QueueStore(str(path)).close()

    with caplog.at_level(logging.INFO, logger="backupmx"):
        run_checkpointer(config, logging.getLogger("backupmx"), lambda: len(beats) >= 5, beat)
    assert [r.getMessage().split()[0] for r in caplog.records] == ["checkpoint-failed", "checkpoint-recovered"]


def all_copied(queue_path):
    """Everything in the WAL is in the database (or the WAL was started over since)."""
    frames, backfilled = wal_frames(queue_path)
    return frames == backfilled


def on_cpu(pid):
    """Seconds the threads of `pid` have run on a CPU so far (/proc schedstat, in ns); a thread that
    ended meanwhile is left out. FileNotFoundError once the process is gone."""
    ran = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return ran / 1e9


def test_a_long_checkpoint_that_copies_is_not_taken_for_a_hung_one(server_factory):
    """A reader held 80 MB of WAL back; once it lets go, one PASSIVE checkpoint copies it all,
    here slowed as by a slow disk (the checkpointer runs ~0.5 ms in 100: SIGSTOP / SIGCONT) so
    that it still copies past BACKUPMX_CHECKPOINTER_TIMEOUT. It beats while it copies: not
    killed (it was, and would have started over). A stopped one still is (the first test)."""
    server = server_factory(env={"BACKUPMX_CHECKPOINTER_TIMEOUT": "1", "BACKUPMX_CHECKPOINT_BACKSTOP": "100000"})
    assert wait_for(lambda: checkpointers(server), 5)
    [pid] = checkpointers(server)
    writer = sqlite3.connect(server.queue_path, isolation_level=None)
    reader = sqlite3.connect(server.queue_path, isolation_level=None)
    try:
        writer.execute("CREATE TABLE ballast (data BLOB)")
        assert wait_for(lambda: all_copied(server.queue_path), 5)  # it has the queue open, and looks
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM ballast").fetchone()  # its snapshot keeps what follows
        writer.execute("BEGIN")
        for _ in range(2000):  # a copy of ~150 ms of CPU: twice what a loaded machine let it run
            writer.execute("INSERT INTO ballast VALUES (zeroblob(40000))")
        writer.execute("COMMIT")
        ran_before = on_cpu(pid)
        started = time.monotonic()
        reader.execute("COMMIT")
        while (elapsed := time.monotonic() - started) < 1.4:
            try:
                os.kill(pid, signal.SIGSTOP)
                # 0.1 s, or longer while it ran more than 0.5% of the time gone by: on a loaded
                # machine the 0.5 ms it is let run can last 5-8 ms, and 14 such were a 40 MB copy
                # (~70 ms of CPU). Never over 0.15 s: beats come only while it runs (the timeout is 1 s).
                time.sleep(min(0.15, max(0.1, (on_cpu(pid) - ran_before) / 0.005 - elapsed)))
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, FileNotFoundError):  # killed for hung
                break
            time.sleep(0.0005)
        still_copying = not all_copied(server.queue_path)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        writer.close()
        reader.close()
    assert still_copying  # 1.4 s after it began: past the timeout, the test shows what it should
    assert wait_for(lambda: all_copied(server.queue_path), 10)
    assert "checkpointer-hung" not in server.log() and checkpointers(server) == [pid]


def _until_its_clock_stands_still(running):
    """Waits until the checkpoint's thread is blocked: between `inside.set()` and `done.wait()` it
    still runs a few instructions, and a look that began before them saw CPU used (a beat)."""
    before = running.sample()[1]
    for _ in range(200):
        time.sleep(0.01)
        now = running.sample()[1]
        if now == before:
            return
        before = now
    raise AssertionError("the blocked checkpoint's thread kept using CPU for 2 s")


def test_a_checkpoint_that_uses_no_cpu_and_moves_no_sectors_gets_no_beats():
    """What keeps a hung checkpoint detectable: one blocked for good (here on an event, with no
    disk to look at: a queue on tmpfs or NFS) gets no progress beats; one that works, some."""
    running = checkpointer.CheckpointProgress()
    beats, stopped, inside, done = [], threading.Event(), threading.Event(), threading.Event()
    looks, sample = [], running.sample
    running.sample = lambda: looks.append(1) or sample()  # the watch's looks, counted

    def checkpoint(work):
        with running:
            inside.set()
            while work and not done.is_set():
                sum(range(1000))
            done.wait()

    for work in (False, True):
        beats.clear()
        copying = threading.Thread(target=checkpoint, args=(work,))
        copying.start()
        inside.wait()
        if not work:
            _until_its_clock_stands_still(running)
        looks.clear()
        watch = threading.Thread(target=running.beat_while_it_copies, args=(lambda: beats.append(1), 0.02, stopped))
        watch.start()
        # Five looks (after the first sample), counted: a 0.1 s sleep could hold fewer, none even,
        # when a loaded machine left the process off the CPU for most of it.
        assert wait_for(lambda: len(looks) > 5, 5, 0.01)
        stopped.set()
        watch.join()
        done.set()
        copying.join()
        for event in (stopped, inside, done):
            event.clear()
        assert bool(beats) == work, (work, beats)


def test_a_checkpoint_blocked_for_good_falls_silent_while_others_keep_its_disk_busy(tmp_path):
    """The disk's sectors move for every writer on it: the SMTP workers' commits go on while a
    checkpoint hangs (the case the master's watchdog is there for: the WAL grows unchecked).
    A checkpoint's progress beats end once it ran as long as its WAL could take at
    checkpointer.COPY_RATE_FLOOR; here, no -wal file: the master's own timeout alone."""
    queue = str(tmp_path / "queue.db")
    running = checkpointer.CheckpointProgress(queue)
    if running.disk is None:
        pytest.skip("no block device statistics for the test's directory (tmpfs?)")
    beats, stopped, inside, done = [], threading.Event(), threading.Event(), threading.Event()

    def hung_checkpoint():
        with running:
            inside.set()
            done.wait()

    def busy_disk():  # another writer: a commit's write and fsync, again and again
        with open(tmp_path / "other", "wb") as f:
            while not done.is_set():
                f.write(os.urandom(65536))
                f.flush()
                os.fsync(f.fileno())

    threads = [threading.Thread(target=hung_checkpoint), threading.Thread(target=busy_disk)]
    for thread in threads:
        thread.start()
    inside.wait()
    looks, sample = [], running.sample
    running.sample = lambda: looks.append(1) or sample()  # the watch's looks, counted
    watch = threading.Thread(target=running.beat_while_it_copies,
                             args=(lambda: beats.append(time.monotonic()), 0.02, stopped))
    watch.start()
    # Ten looks after the first, counted: a fixed 0.2 s could hold none on a loaded machine, and
    # then no beat proved nothing.
    assert wait_for(lambda: len(looks) > 10, 5, 0.01)
    stopped.set()
    done.set()
    for thread in threads + [watch]:
        thread.join()
    assert not beats, f"{len(beats)} beats for a checkpoint that never moved"


def test_the_wal_left_uncopied_is_what_the_last_checkpoint_left_and_a_metric(held_back):
    """backupmx_queue_wal_bytes is the -wal file's high-water mark; the work left is the frames
    the last checkpoint did not copy (what PRAGMA wal_checkpoint returns), here held back by a
    reader, and 0 once copied while the file keeps its size."""
    from backupmx import metrics

    path, store, writer, reader = held_back
    store.checkpoint("PASSIVE", 0)
    assert wal_left_bytes(path) == 0
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM ballast").fetchone()  # its snapshot keeps what follows
    for _ in range(10):
        writer.execute("INSERT INTO ballast VALUES (zeroblob(40000))")
    _, frames, copied = store.checkpoint("PASSIVE", 0)
    left = wal_left_bytes(path)
    assert left == (frames - copied) * 4096 >= 100 * 4096, (frames, copied, left)
    [family] = [f for f in metrics.collect(store, [], time.time()) if f.name == "backupmx_queue_wal_uncopied_bytes"]
    assert family.samples == [({}, left)]
    reader.execute("COMMIT")
    assert store.checkpoint("PASSIVE", 0)[0] == 0
    assert wal_left_bytes(path) == 0 and os.path.getsize(f"{path}-wal") > left


def test_reading_the_wal_left_keeps_this_process_s_snapshots_from_other_processes_checkpoints(held_back):
    """wal_left_bytes reads the -shm in a process whose SQLite connections hold POSIX locks on it
    (the metrics process: up to 8 scrapes at once, each in a read transaction). Closing any
    descriptor of that file dropped them all (fcntl(2)): a checkpoint in another process then
    copied past a snapshot still being read (a scrape's numbers torn, or 'malformed')."""
    import subprocess
    import sys

    path, store, writer, reader = held_back
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM ballast").fetchone()  # its snapshot keeps what follows
    writer.execute("INSERT INTO ballast VALUES (zeroblob(40000))")
    checkpoint = [sys.executable, "-c", "import sqlite3, sys; "
                  "print(*sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(PASSIVE)').fetchone())", path]
    _, frames, copied = map(int, subprocess.run(checkpoint, capture_output=True, text=True, check=True).stdout.split())
    assert copied < frames  # held back by the reader's snapshot
    assert wal_left_bytes(path) == (frames - copied) * 4096
    assert wal_left_bytes(path) == (frames - copied) * 4096  # its descriptor kept, not opened again
    _, frames, copied = map(int, subprocess.run(checkpoint, capture_output=True, text=True, check=True).stdout.split())
    assert copied < frames, "another process checkpointed past this process's snapshot"
    reader.execute("COMMIT")
