"""contrib/ stays true to the program: commands and options exist, the example
config passes `backupmx check` (the fail2ban filter against real log lines: test_observe.py),
the systemd units agree with each other and with what `serve` understands.
"""

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache

import pytest

from conftest import REPO

CONTRIB = REPO / "contrib"
BACKUPMX = [sys.executable, str(REPO / "backupmx.py")]


def contrib_files():
    return sorted(p for p in CONTRIB.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def rel(path):
    return str(path.relative_to(REPO))


# -- what the program accepts, from its own --help ------------------------------------


def _help(*words):
    result = subprocess.run(BACKUPMX + list(words) + ["--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    return result.stdout


@lru_cache(maxsize=None)
def subcommands():
    text = _help()
    block = text.split("COMMAND\n", 2)[-1].split("\noptions:")[0]
    return frozenset(re.findall(r"^    ([a-z][a-z-]*)\s", block, re.M))


@lru_cache(maxsize=None)
def options(*words):
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", _help(*words)))


def test_the_help_parsers_find_something():
    assert {"serve", "check", "etrn", "bundle", "queue"} <= subcommands()
    assert {"--inetd", "--tls", "-c", "--config"} <= options("serve")


# -- backupmx invocations named in contrib ---------------------------------------------

# `backupmx`, `/usr/local/bin/backupmx`, `backupmx.py`, `backupmx.pyz` followed by a word.
MENTION = re.compile(r"(?:(?<=^)|(?<=[\s`'\"=(]))(?:[\w./-]*/)?backupmx(?:\.pyz?)?[ \t]+(?=[a-z-])")
# Text that ends a command on its line.
COMMAND_END = re.compile(r"[`;|&)]|\s#|\s\(|$")


def _logical_lines(text):
    """Lines with backslash-newline continuations joined; xinetd's server + server_args joined too."""
    lines = text.replace("\\\n", " ").splitlines()
    server = None
    for line in lines:
        m = re.match(r"\s*server\s*=\s*(\S+)", line)
        if m:
            server = m.group(1)
        m = re.match(r"\s*server_args\s*=\s*(.*)", line)
        if m and server:
            yield f"{server} {m.group(1)}"
            continue
        yield line


def _command_context(line, start, markdown):
    """Is this mention where a command is run (not prose such as 'backupmx accepts mail')?

    Yes: inside `backticks`, after Exec...=, exec, python3 or "$ ", or at the
    start of a line that is not a comment (a unit's value, a script line, an
    indented Markdown code line). Prose words after a mention elsewhere are
    left alone; a known subcommand is checked wherever it appears.
    """
    before = line[:start]
    if before.count("`") % 2 == 1:
        return True
    if re.search(r"(Exec\w*=|exec\s+|python3?(\s+-I)?\s+|\$\s+)$", before):
        return True
    if before.strip() == "":
        comment = line.lstrip().startswith(("#", ";"))
        prose = markdown and not line.startswith("    ")
        return not comment and not prose
    return False


def invocations(path):
    """[(line text, [argv words after backupmx], in a command context)] for one contrib file."""
    found = []
    markdown = path.suffix == ".md"
    for line in _logical_lines(path.read_text(errors="replace")):
        for m in MENTION.finditer(line):
            rest = line[m.end():]
            end = COMMAND_END.search(rest)
            words = rest[: end.start()].split()
            found.append((line.strip(), words, _command_context(line, m.start(), markdown)))
    return found


def _check_invocation(words, line, where):
    """Problems with one `backupmx WORDS...`; [] when it is fine."""
    if not words:
        return []
    if words[0] in ("-c", "--config") and len(words) > 2:  # -c before the subcommand
        words = words[2:]
    sub = words[0]
    if sub not in subcommands():
        return [f"{where}: unknown subcommand {sub!r} in: {line}"]
    scope = [sub]
    if sub == "queue" and words[1:2] == ["list"]:
        scope.append("list")
    known = options(*scope)
    problems = []
    for word in words[1:]:
        word = word.strip("\"'")
        if word.startswith("-") and len(word) > 1 and word != "--":
            name = word.split("=", 1)[0]
            if name not in known:
                problems.append(f"{where}: `backupmx {' '.join(scope)}` has no option {name} in: {line}")
    return problems


def test_every_backupmx_command_and_option_in_contrib_exists():
    problems = []
    checked = 0
    for path in contrib_files():
        for line, words, command_like in invocations(path):
            if not words:
                continue
            if words[0] not in subcommands() and words[0] not in ("-c", "--config") and not command_like:
                continue  # prose: "backupmx accepts mail ..."
            checked += 1
            problems += _check_invocation(words, line, rel(path))
    assert not problems, "\n".join(problems)
    assert checked >= 15  # the parser does find the unit files' ExecStart lines, the run script, ...


def test_the_checker_catches_a_wrong_option_and_subcommand(tmp_path):
    sample = tmp_path / "unit.service"
    sample.write_text("ExecStart=/usr/local/bin/backupmx serve --inetd --daemon -c /etc/x.ini\n"
                      "# run `backupmx srve -c x`\n# backupmx accepts mail (prose)\n"
                      "`Received:` lines, and backupmx adds its own\n")
    problems = []
    for line, words, command_like in invocations(sample):
        if words[0] in subcommands() or command_like:
            problems += _check_invocation(words, line, "sample")
    assert len(problems) == 2 and "--daemon" in problems[0] and "'srve'" in problems[1], problems


def test_every_contrib_file_says_how_it_is_used():
    for path in contrib_files():
        head = "\n".join(path.read_text(errors="replace").splitlines()[:25])
        assert re.search(r"^(\s*[#;]|<!--).*\S", head, re.M), f"{rel(path)}: no comment at the top"
        assert re.search(r"\bUse\b", head), f"{rel(path)}: the top comment does not say how it is used (Use: ...)"


# -- the example config -------------------------------------------------------------------


def test_example_config_passes_check(tmp_path):
    result = subprocess.run(BACKUPMX + ["check", "-c", str(CONTRIB / "backupmx.ini")], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list(tmp_path.iterdir())  # check creates nothing (the queue is relative to the cwd)


def test_every_commented_key_in_the_example_config_is_a_real_key(tmp_path):
    """Uncommenting any ';key = value' line gives a config whose only possible complaint is the value."""
    from backupmx.config import ConfigError, load_config

    text = (CONTRIB / "backupmx.ini").read_text()
    lines = text.splitlines()
    tried = 0
    for i, line in enumerate(lines):
        m = re.match(r";([a-z_]+) = ", line)
        if not m:
            continue
        section = [ln for ln in lines[:i] if ln.startswith("[") or ln.startswith(";[")][-1].lstrip(";")
        variant = lines[:]
        variant[i] = line[1:]
        if section.startswith("[user:"):  # the whole section is commented out: enable it together
            variant = [ln[1:] if ln.startswith(";[user:") or ln.startswith(";password") or ln.startswith(";domains")
                       else ln for ln in variant]
        path = tmp_path / "variant.ini"
        path.write_text("\n".join(variant) + "\n")
        tried += 1
        try:
            load_config(str(path))
        except ConfigError as exc:
            assert "unknown" not in str(exc).lower(), f"{m.group(1)} in {section}: {exc}"
    assert tried >= 20


# -- fail2ban ---------------------------------------------------------------------------------


def test_fail2ban_jail_names_the_filter():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(CONTRIB / "fail2ban" / "jail.d" / "backupmx.local")
    assert parser["backupmx"]["filter"] == "backupmx"
    assert (CONTRIB / "fail2ban" / "filter.d" / (parser["backupmx"]["filter"] + ".conf")).exists()
    assert parser["backupmx-recipients"]["filter"] == "backupmx[mode=recipients]"
    assert int(parser["backupmx-recipients"]["maxretry"]) > int(parser["backupmx"]["maxretry"])


def test_fail2ban_reads_only_the_journal_fields_journald_sets_for_the_shipped_units():
    """review-1 m4: SYSLOG_IDENTIFIER is the writer's to choose (`logger -t backupmx ...` could
    get the primary banned); _SYSTEMD_UNIT and _SYSTEMD_SLICE come from the writer's control group.
    Every shipped unit that runs `backupmx serve` is matched: by name, and a template's
    instances by the slice systemd gives them (system-<prefix>.slice)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(CONTRIB / "fail2ban" / "filter.d" / "backupmx.conf")
    groups = [group.split() for group in parser["Definition"]["journalmatch"].split(" + ")]
    assert all(len(group) == 1 and group[0].split("=")[0] in ("_SYSTEMD_UNIT", "_SYSTEMD_SLICE") for group in groups)
    matched = {group[0] for group in groups}
    servers = [p.name for p in (CONTRIB / "systemd").glob("*.service") if "backupmx serve" in p.read_text()]
    assert len(servers) >= 3
    for name in servers:
        prefix, at, _ = name.partition("@")
        wanted = f"_SYSTEMD_SLICE=system-{prefix}.slice" if at else f"_SYSTEMD_UNIT={name}"
        assert wanted in matched, name
        assert unit(CONTRIB / "systemd" / name)["Service"].get("Slice") is None, name  # the default slice


# -- systemd units ------------------------------------------------------------------------------


def unit(path):
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(path)
    return parser


def test_systemd_units_fit_together():
    units = {p.name: p for p in CONTRIB.rglob("*") if p.suffix in (".service", ".socket", ".timer")}
    for name, path in units.items():
        u = unit(path)
        if name.endswith(".socket"):
            socket_section = u["Socket"]
            if socket_section.get("Accept") == "yes":
                assert f"{name[:-len('.socket')]}@.service" in units, f"{name}: Accept=yes needs a template service"
            else:
                service = socket_section.get("Service", name.replace(".socket", ".service"))
                assert service in units, f"{name}: Service={service} is not in contrib"
                # What the master tells plain from implicit TLS by (master.build_listeners).
                assert socket_section.get("FileDescriptorName") in ("smtp", "smtps", "odmr"), name
                assert name in unit(units[service])["Service"]["Sockets"].split(), f"{service} must list {name}"
        if name.endswith(".timer"):
            assert name.replace(".timer", ".service") in units
        exec_start = u["Service"].get("ExecStart", "") if u.has_section("Service") else ""
        if "--inetd" in exec_start:
            assert u["Service"].get("StandardInput") == "socket" and u["Service"].get("StandardError") != "socket"
            assert u["Service"].get("KillMode") == "process", f"{name}: the detached flusher must outlive the session"


def systemd_units(*suffixes):
    return sorted(p for p in CONTRIB.rglob("*") if p.suffix in suffixes)


def test_service_units_point_at_installed_things():
    for path in systemd_units(".service"):
        service = unit(path)
        assert service["Unit"].get("Documentation", "").split()[:1] == ["man:backupmx(8)"], f"{rel(path)}: Documentation="
        assert service["Service"].get("SyslogFacility") == "mail", f"{rel(path)}: SyslogFacility="
        # systemd finds a bare `backupmx` in /usr/local/bin or /usr/bin, wherever it was installed.
        assert all("/" not in program for program in _exec_programs(path) if program.endswith("backupmx")), rel(path)
    # Documentation= names a page the packaging installs.
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert "doc/backupmx.8" in data_files["share/man/man8"]


SYSTEMD_ANALYZE = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                     reason="systemd-analyze is not installed (systemd's tools)")


def _exec_programs(path):
    """Programs the unit's Exec*= lines run, as systemd resolves them (prefixes like '-' or '+' dropped)."""
    for key, value in unit(path)["Service"].items() if unit(path).has_section("Service") else ():
        if key.startswith("Exec") and value.strip():
            yield value.split()[0].lstrip("-@:+!")


@pytest.fixture
def systemd_root(tmp_path):
    """A file-system root for `systemd-analyze --root`: the host's stock units (the targets the
    units are ordered after), every contrib unit under /etc/systemd/system, and an executable
    stand-in for each program they run (verify insists that ExecStart= exists; a bare name is
    looked up in /usr/bin there, as systemd does on a merged-/usr host)."""
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    if os.path.isdir("/usr/lib/systemd/system"):
        shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    for path in systemd_units(".service", ".socket", ".timer"):
        shutil.copyfile(path, units / path.name)
        for program in _exec_programs(path):
            stand_in = root / (program.lstrip("/") if program.startswith("/") else f"usr/bin/{program}")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\nexit 0\n")
            stand_in.chmod(0o755)
    return root


@SYSTEMD_ANALYZE
def test_systemd_analyze_verify(systemd_root, tmp_path):
    """systemd's own parser: unknown keys, bad values, missing programs, and (--man=yes) a
    Documentation= man page that man(1) cannot find; MANPATH holds only ours."""
    manpath = tmp_path / "man"
    (manpath / "man8").mkdir(parents=True)
    shutil.copyfile(REPO / "doc" / "backupmx.8", manpath / "man8" / "backupmx.8")
    units = systemd_root / "etc" / "systemd" / "system"
    names = sorted(p.name for p in units.iterdir())
    env = dict(os.environ, MANPATH=str(manpath))
    result = subprocess.run(["systemd-analyze", "verify", f"--root={systemd_root}", "--man=yes"] + names,
                            capture_output=True, text=True, timeout=60, cwd=str(units), env=env)
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                       if "Failed to connect to bus" not in line and line.strip())
    assert result.returncode == 0 and not output, output
    assert len(names) >= 9


MAX_EXPOSURE = 3.5  # systemd-analyze security: 0 (locked down) .. 10 (UNSAFE)


@SYSTEMD_ANALYZE
def test_every_service_unit_is_hardened():
    scores = {}
    for path in systemd_units(".service"):
        result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                                capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
        assert m, result.stdout + result.stderr
        scores[rel(path)] = float(m.group(1))
    assert len(scores) >= 5
    assert all(score <= MAX_EXPOSURE for score in scores.values()), scores


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers / systemd-tmpfiles are not installed")
def test_sysusers_and_tmpfiles_make_the_user_and_the_directories(tmp_path):
    """Applied for real, to a scratch root: the user exists, the queue's directory is 0700 its own."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for tool, snippet in (("systemd-sysusers", "sysusers.d"), ("systemd-tmpfiles", "tmpfiles.d")):
        argv = [tool, f"--root={root}"] + (["--create"] if tool == "systemd-tmpfiles" else [])
        result = subprocess.run(argv + [str(CONTRIB / snippet / "backupmx.conf")], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    entry = next(line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("backupmx:"))
    uid, home, shell = int(entry[2]), entry[5], entry[6]
    assert 0 < uid < 1000 and home == "/var/spool/backupmx" and shell.endswith("nologin")
    spool = (root / "var" / "spool" / "backupmx").stat()
    assert (spool.st_uid, spool.st_mode & 0o777) == (uid, 0o700)
    assert ((root / "var" / "log" / "backupmx").stat().st_mode & 0o777) == 0o750
    # The units write where the snippets made room.
    service = unit(CONTRIB / "systemd" / "backupmx.service")["Service"]
    assert home in service["ReadWritePaths"].split() and service["User"] == "backupmx"
    assert service["LogsDirectory"] == "backupmx"


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_logrotate_snippet_parses(tmp_path):
    """logrotate's own parser (--debug changes nothing). It resolves the `su` and `create` owner,
    so this host's user stands in for backupmx when there is none."""
    import grp
    import pwd

    text = (CONTRIB / "logrotate.d" / "backupmx").read_text()
    assert text.count(" backupmx backupmx") == 2  # su and create
    try:
        pwd.getpwnam("backupmx")
    except KeyError:
        me = f" {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
        text = text.replace(" backupmx backupmx", me)
    snippet = tmp_path / "backupmx"
    snippet.write_text(text)
    result = subprocess.run(["logrotate", "--debug", "--state", str(tmp_path / "state"), str(snippet)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr
    assert "rotating pattern: /var/log/backupmx/*.log  weekly" in result.stderr + result.stdout, result.stderr


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
def test_fetchmailrc_parses(tmp_path):
    rc = tmp_path / "fetchmailrc"
    shutil.copyfile(CONTRIB / "primary" / "fetchmailrc", rc)
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    result = subprocess.run(["fetchmail", "-f", str(rc), "--configdump"], capture_output=True, text=True,
                            timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert '"protocol":"ETRN"' in result.stdout and '"service":"465"' in result.stdout


def test_runit_scripts_are_executable_shell():
    for path in (CONTRIB / "runit").rglob("run"):
        assert os.access(path, os.X_OK), rel(path)
        result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, result.stderr
        words = shlex.split(path.read_text().replace("\\\n", " "), comments=True)
        assert "exec" in words
