"""backupmx.log: one key=value line per event, nothing a client sends can forge a line."""

import io
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backupmx.log import format_event, format_value, log_event, setup_logging

ROOT = Path(__file__).resolve().parent.parent


def parse_line(line):
    """A reader for the format: event, then key=value with optional "..." and escapes."""
    tokens, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        token = ""
        while i < len(line) and line[i] != " ":
            if line[i] == '"':
                i += 1
                while line[i] != '"':
                    if line[i] == "\\":
                        nxt = line[i + 1]
                        if nxt in "xuU":
                            width = {"x": 2, "u": 4, "U": 8}[nxt]
                            token += chr(int(line[i + 2 : i + 2 + width], 16))
                            i += 2 + width
                            continue
                        token += {"r": "\r", "n": "\n", "t": "\t"}.get(nxt, nxt)
                        i += 2
                        continue
                    token += line[i]
                    i += 1
                i += 1
            else:
                token += line[i]
                i += 1
        tokens.append(token)
    event, fields = tokens[0], {}
    for token in tokens[1:]:
        key, _, value = token.partition("=")
        fields[key] = value
    return event, fields


def test_example_line():
    line = format_event("queued", id="AB12", domain="example.com", from_="<a@b>", size=123, client="1.2.3.4")
    assert line == "queued id=AB12 domain=example.com from=<a@b> size=123 client=1.2.3.4"


def test_quoting_and_none():
    line = format_event("delivered", id="X", relay="h:25", reply='250 2.0.0 Ok "fine"', user=None, empty="")
    assert line == 'delivered id=X relay=h:25 reply="250 2.0.0 Ok \\"fine\\"" empty=""'


@pytest.mark.parametrize(
    "value, rendered",
    [
        ("evil\r\nqueued id=FAKE", '"evil\\r\\nqueued id=FAKE"'),
        ("a\0b", '"a\\x00b"'),
        ("tab\there", '"tab\\there"'),
        ("\x1b[31mred", '"\\x1b[31mred"'),
        ("line\u2028sep", '"line\\u2028sep"'),
        ("nel\x85", '"nel\\x85"'),
        ("back\\slash", '"back\\\\slash"'),
        ("k=v", '"k=v"'),
        (b"\xff\x00ok", '"\\xff\\x00ok"'),
        ("ünïcode", "ünïcode"),
    ],
)
def test_values_escaped(value, rendered):
    assert format_value(value) == rendered


def test_injection_never_makes_a_second_line():
    stream = io.StringIO()
    logger = logging.getLogger("backupmx.test_log.inject")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, "auth-failed", client="192.0.2.1", user="x\r\nauth-ok client=192.0.2.1 user=root\n")
        log_event(logger, "rejected", helo="a\rb", reply="550 5.5.2 bare\nLF")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    event, fields = parse_line(lines[0])
    assert event == "auth-failed" and fields["user"] == "x\r\nauth-ok client=192.0.2.1 user=root\n"
    assert set(fields) == {"client", "user"}


def test_random_values_round_trip():
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    alphabet = "ab =\"\\\r\n\t\0\x1b\x7f\x85\u2028é<>@:;,'" + "".join(map(chr, range(32)))
    for _ in range(2000):
        values = {f"k{i}": "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))) for i in range(3)}
        line = format_event("ev", **values)
        assert "\n" not in line and "\r" not in line and "\0" not in line and line.isprintable()
        assert parse_line(line) == ("ev", values), (seed, values, line)


def test_level_is_marked(tmp_path):
    run_logging(tmp_path, f"setup_logging({str(tmp_path / 'x.log')!r})\nlogging.getLogger('backupmx').warning('boom')")
    assert (tmp_path / "x.log").read_text().rstrip().endswith("boom level=warning")


def test_direct_lines_match_the_logging_module(tmp_path):
    """log_event hands a line straight to our handler when no one else would see it: the same
    text as a LogRecord through the logging module (time, pid after a fork, level); a filter
    on the way gets the line through the logging module."""
    path = tmp_path / "x.log"
    out, _ = run_logging(tmp_path, (
        f"log = setup_logging({str(path)!r})\n"
        "from backupmx.log import format_event\n"
        "import os\n"
        "log_event(log, 'queued', id='A', from_='<a b>', level=logging.WARNING)\n"
        "log.warning('%s', format_event('queued', id='A', from_='<a b>'))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    log_event(log, 'child'); log.info('%s', format_event('child')); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "seen = []\n"
        "log.addFilter(lambda record: seen.append(record.getMessage()) or True)\n"
        "log_event(log, 'filtered', a=1)\n"
        "print(os.getpid(), pid, seen)\n"))
    parent, pid, seen = out.split(" ", 2)
    assert seen.strip() == "['filtered a=1']"
    lines = [line.split(" ", 2) for line in path.read_text().splitlines()]
    assert len(lines) == 5 and all(re.fullmatch(r"\d\d:\d\d:\d\d,\d{3}", time) for _, time, _ in lines)
    texts = [text for _, _, text in lines]
    assert texts[0] == texts[1] == f'backupmx[{parent}]: queued id=A from="<a b>" level=warning'
    assert texts[2] == texts[3] == f"backupmx[{pid}]: child"


def run_logging(tmp_path, code):
    """Run `code` in a fresh interpreter (logging is process-wide); return (stdout, stderr)."""
    script = "import logging, sys\nfrom backupmx.log import setup_logging, log_event\n" + code + "\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def test_stderr_default(tmp_path):
    out, err = run_logging(tmp_path, "log_event(setup_logging(None), 'started', pid=1)")
    assert out == ""
    assert err.rstrip().endswith("started pid=1") and len(err.splitlines()) == 1
    assert "backupmx[" in err


@pytest.mark.parametrize("target", [None, "stderr", "syslog"])
def test_inetd_writes_nothing_to_stdout_or_stderr(tmp_path, target):
    code = (
        f"log = setup_logging({target!r}, inetd=True)\n"
        "log_event(log, 'session', client='1.2.3.4')\n"
        "log.error('bad')\n"
        "logging.getLogger('other.library').warning('hello')\n"
        "logging.warning('root')\n"
    )
    assert run_logging(tmp_path, code) == ("", "")


def test_file_target_follows_logrotate(tmp_path):
    path = tmp_path / "backupmx.log"
    code = (
        f"log = setup_logging({str(path)!r})\n"
        "log_event(log, 'one')\n"
        f"import os; os.rename({str(path)!r}, {str(path) + '.1'!r})\n"
        "log_event(log, 'two')\n"
        "log_event(setup_logging(" + repr(str(path)) + "), 'three')\n"  # SIGHUP: set up again
    )
    assert run_logging(tmp_path, code) == ("", "")
    assert Path(str(path) + ".1").read_text().rstrip().endswith("one")
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["two", "three"]  # not doubled after the re-setup


def test_a_failed_reopen_after_logrotate_is_tried_again_and_holds_nothing(tmp_path):
    """The reopen after logrotate's move fails once (here: a directory where the file
    was, as a full disk or a directory the dropped user cannot write yet would): the next
    line opens the file again, and the lines in between are dropped, not held in memory."""
    path = tmp_path / "backupmx.log"
    code = (
        f"log = setup_logging({str(path)!r})\n"
        "logging.raiseExceptions = False\n"
        "log_event(log, 'one')\n"
        f"import os; os.rename({str(path)!r}, {str(path) + '.1'!r}); os.mkdir({str(path)!r})\n"
        "for i in range(1000): log_event(log, 'lost', i=i)\n"
        "handler = [h for h in logging.getLogger().handlers if getattr(h, '_backupmx', False)][0]\n"
        "print(len(handler._pending))\n"
        f"os.rmdir({str(path)!r})\n"
        "log_event(log, 'two')\n"
    )
    out, _ = run_logging(tmp_path, code)
    assert out.split() == ["0"]
    assert [line.split(": ", 1)[1] for line in path.read_text().splitlines()] == ["two"]


def test_a_worker_s_lines_wait_for_the_end_of_its_loop_round_but_warnings_do_not(tmp_path):
    """defer_writes: an SMTP worker's INFO lines go out together at the end of a loop round
    (flush_pending); a warning takes them and itself out at once (what kill -9 may cost is
    the round's INFO lines, never a warning)."""
    path = tmp_path / "w.log"
    code = (
        "from backupmx.log import defer_writes, flush_pending\n"
        f"log = setup_logging({str(path)!r})\n"
        "defer_writes(True)\n"
        "size = lambda: os.path.getsize(" + repr(str(path)) + ")\n"
        "log_event(log, 'connect')\n"
        "print(size())\n"
        "log_event(log, 'trouble', level=logging.WARNING)\n"
        "print(size())\n"
        "log_event(log, 'queued')\n"
        "flush_pending()\n"
        "print(size())\n"
        "defer_writes(False)\n"
        "from backupmx.log import lines_together\n"
        "with lines_together():\n"  # a flusher's batch of outcome lines
        "    log_event(log, 'delivered')\n"
        "    print(size())\n"
        "print(size())\n"
        "os._exit(0)\n"  # no logging.shutdown: what is written is what a kill -9 leaves
    )
    out, _ = run_logging(tmp_path, "import os\n" + code)
    empty, after_warning, after_round, in_batch, after_batch = map(int, out.split())
    assert empty == 0 and 0 < after_warning < after_round == in_batch < after_batch
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["connect", "trouble level=warning", "queued", "delivered"]


def test_unwritable_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        setup_logging(str(tmp_path / "missing-dir" / "x.log"))


def test_log_file_is_created_0640_also_after_logrotate(tmp_path):
    path = tmp_path / "backupmx.log"
    code = (
        "import os; os.umask(0o022)\n"  # the common umask, which would give 0644
        f"log = setup_logging({str(path)!r})\n"
        "log_event(log, 'one')\n"
        f"os.rename({str(path)!r}, {str(path) + '.1'!r})\n"
        "log_event(log, 'two')\n"
    )
    assert run_logging(tmp_path, code) == ("", "")
    assert oct(Path(str(path) + ".1").stat().st_mode & 0o777) == oct(0o640)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)  # the file reopened after the rotation too
    assert path.read_text().rstrip().endswith("two")


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o644])
def test_an_existing_log_file_keeps_its_mode(tmp_path, mode):
    path = tmp_path / "backupmx.log"
    path.write_text("old line\n")
    path.chmod(mode)
    run_logging(tmp_path, f"log_event(setup_logging({str(path)!r}), 'new')")
    assert path.stat().st_mode & 0o777 == mode  # neither widened nor changed behind the operator's back
    assert path.read_text().splitlines()[0] == "old line"


def test_serve_creates_its_log_file_0640(server_factory, tmp_path):
    path = tmp_path / "mail.log"
    old_umask = os.umask(0o022)
    try:
        server = server_factory(log=path)
    finally:
        os.umask(old_umask)
    assert "listening" in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    assert server.log() == ""  # the log went to the file, not to stderr


def test_log_level_drops_what_is_below_it(tmp_path):
    path = tmp_path / "x.log"
    code = (f"log = setup_logging({str(path)!r}, level='warning')\n"
            "log_event(log, 'connect', client='192.0.2.1')\n"
            "log_event(log, 'auth-failed', client='192.0.2.1', level=logging.WARNING)\n")
    run_logging(tmp_path, code)
    [line] = path.read_text().splitlines()
    assert "auth-failed client=192.0.2.1" in line and line.endswith("level=warning")


def test_journal_form_when_stderr_is_the_journal(tmp_path):
    """systemd's StandardError=journal: JOURNAL_STREAM names stderr; lines carry <N>, no time, no tag."""
    stderr = tmp_path / "journal"
    code = ("import os\n"
            "st = os.fstat(2)\n"
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
            "log = setup_logging('stderr', level='debug')\n"
            "log_event(log, 'connect', client='192.0.2.1', level=logging.DEBUG)\n"
            "log_event(log, 'reject', client='192.0.2.1')\n"
            "log_event(log, 'auth-failed', client='192.0.2.1', level=logging.WARNING)\n"
            "log_event(log, 'queue-error', error='x', level=logging.ERROR)\n"
            "os.environ['JOURNAL_STREAM'] = '1:2'\n"  # another file: back to the plain form
            "log_event(setup_logging('stderr'), 'plain')\n")
    with open(stderr, "w") as err:
        proc = subprocess.run([sys.executable, "-c", "import logging\nfrom backupmx.log import setup_logging, "
                               "log_event\n" + code], cwd=ROOT, stderr=err, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0
    lines = stderr.read_text().splitlines()
    assert lines[:4] == ["<7>connect client=192.0.2.1 level=debug", "<6>reject client=192.0.2.1",
                         "<4>auth-failed client=192.0.2.1 level=warning", "<3>queue-error error=x level=error"]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ backupmx\[\d+\]: plain$", lines[4])
