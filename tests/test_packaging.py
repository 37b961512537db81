"""Packaging as a user meets it: an sdist that builds a wheel, the wheel installed
in a fresh venv, one version everywhere, the man page, and the single-file
bundle run by an unprivileged user."""

import argparse
import os
import pwd
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from backupmx import __version__
from backupmx.cli import build_parser
from conftest import REPO

MAN_PAGE = REPO / "doc" / "backupmx.8"
# What `pip install` puts beside the package, relative to the prefix (pyproject's data-files).
DATA_FILES = ("share/man/man8/backupmx.8", "lib/sysusers.d/backupmx.conf", "lib/tmpfiles.d/backupmx.conf")
# Checkout debris that must not reach the copy the build starts from.
NOT_SOURCE = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
                                    ".pytest_cache", ".benchmarks", "*.db", "*.db-*", "*.pyz")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BACKUPMX_DEBUG", "PYTHONHOME")}
    env.update(extra)
    return env


def run(argv, **kw):
    kw.setdefault("timeout", 120)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=clean_env(), **kw)


# -- one version ----------------------------------------------------------------------------------


def test_the_version_has_one_source():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert project["dependencies"] == []  # the runtime is the standard library
    assert "version" not in (REPO / "setup.py").read_text()
    result = run([sys.executable, REPO / "backupmx.py", "--version"], cwd=str(REPO))
    assert result.returncode == 0 and result.stdout == f"backupmx {__version__}\n", result


# -- sdist -> wheel -> venv -------------------------------------------------------------------------


def _offline_build_tools(python):
    """None when `python` can build offline (setuptools>=61, a bdist_wheel); else why not."""
    probe = ("import setuptools\n"
             "major = int(setuptools.__version__.split('.')[0])\n"
             "minor = int(setuptools.__version__.split('.')[1])\n"
             "assert major >= 61, 'setuptools ' + setuptools.__version__ + ' < 61'\n"
             "if (major, minor) < (70, 1):\n"
             "    import wheel\n")
    result = run([python, "-c", probe], timeout=60)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return (f"cannot build offline ({last}): needs setuptools>=61 and `wheel` "
                f"(python3 -m pip install build wheel; .ci/run does it when PyPI is reachable)")
    return None


# What `python -m build` does (an sdist, then the wheel built FROM that sdist), with the
# backend pyproject.toml names called in one process instead of one per hook: the same
# PEP 517 hooks, the build frontend's process start-ups left out (about a second).
BUILD_SDIST_THEN_WHEEL = """
import importlib, os, sys, tarfile, tomllib
source, dist, unpacked = sys.argv[1:4]
with open(os.path.join(source, "pyproject.toml"), "rb") as f:
    backend = importlib.import_module(tomllib.load(f)["build-system"]["build-backend"])
os.chdir(source)
sdist = backend.build_sdist(dist)
with tarfile.open(os.path.join(dist, sdist)) as tar:
    tar.extractall(unpacked, filter="data")
os.chdir(os.path.join(unpacked, sdist[:-len(".tar.gz")]))
backend.build_wheel(dist)
"""


def test_sdist_builds_a_wheel_that_installs_and_runs(tmp_path):
    venv = tmp_path / "venv"
    # The venv sees this Python's build tools (no network); what it installs stays in it.
    made = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    reason = _offline_build_tools(python)
    if reason:
        pytest.skip(reason)
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    dist = tmp_path / "dist"
    built = run([python, "-c", BUILD_SDIST_THEN_WHEEL, source, dist, tmp_path / "unpacked"], cwd=str(tmp_path))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = dist.glob("backupmx-*.tar.gz")
    (wheel,) = dist.glob("backupmx-*.whl")
    assert sdist.name == f"backupmx-{__version__}.tar.gz"

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("schema.sql", "LICENSE", "README.md", "backupmx.py", "doc/backupmx.8", "setup.py",
                   "contrib/backupmx.ini", "contrib/systemd/backupmx.service", "tests/certs/server.pem",
                   "tests/conftest.py"):
        assert needed in names, f"the sdist lacks {needed}"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert whl.read("backupmx/schema.sql") == (REPO / "schema.sql").read_bytes()
        metadata = whl.read(f"backupmx-{__version__}.dist-info/METADATA").decode()
    for path in DATA_FILES:
        assert f"backupmx-{__version__}.data/data/{path}" in names
    for field in ("License: MIT", "Requires-Python: >=3.11", "Project-URL: Homepage",
                  "Description-Content-Type: text/markdown", "# backupmx"):
        assert field in metadata, field
    assert "Requires-Dist" not in metadata

    installed = run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheel], cwd=str(tmp_path))
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing but the venv can be imported
    elsewhere.mkdir()
    version = run([venv / "bin" / "backupmx", "--version"], cwd=str(elsewhere))
    assert version.returncode == 0 and version.stdout == f"backupmx {__version__}\n", version
    for path in DATA_FILES:
        assert (venv / path).is_file(), path
    # The installed package carries schema.sql itself: a bundle made from it holds it.
    bundled = run([venv / "bin" / "backupmx", "bundle", "-o", elsewhere / "b.pyz"], cwd=str(elsewhere))
    assert bundled.returncode == 0, bundled.stderr
    with zipfile.ZipFile(elsewhere / "b.pyz") as z:
        assert z.read("backupmx/schema.sql") == (REPO / "schema.sql").read_bytes()


# -- the man page -------------------------------------------------------------------------------------


def _parser_words():
    """{subcommand: {option strings}} from the real parser, "" for the top level."""
    parser = build_parser()
    found = {"": set()}

    def walk(p, name):
        for action in p._actions:  # argparse keeps no public list of them
            if action.option_strings:
                found.setdefault(name, set()).update(o for o in action.option_strings if o not in ("-h", "--help"))
            if not isinstance(action, argparse._SubParsersAction):
                continue
            for sub_name, sub in action.choices.items():
                key = f"{name} {sub_name}".strip()
                found.setdefault(key, set())
                walk(sub, key)

    walk(parser, "")
    return found


def _config_keys():
    from backupmx import config

    keys = set()
    for name in dir(config):
        if name.endswith("_KEYS") and isinstance(getattr(config, name), dict):
            keys |= set(getattr(config, name))
    return keys


def _man_text():
    """The page with roff escapes and font changes taken out, as a reader searches it."""
    text = MAN_PAGE.read_text()
    text = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace("\\(aq", "'")
    return re.sub(r"^\.(?:B|I|BR|RB|IR|RI|BI|IB|TP|PP|SH|SS)\b ?", "", text, flags=re.M)


def test_the_man_page_names_every_command_option_and_config_key():
    text = _man_text()
    words = _parser_words()
    missing = []
    for command, options in words.items():
        if command and not re.search(rf"^{re.escape(command)}\b", text, re.M):
            missing.append(f"command `{command}`")
        for option in options:
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                missing.append(f"option {option} of `backupmx {command}`".replace("  ", " "))
    for key in _config_keys():
        if not re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text):
            missing.append(f"config key {key}")
    assert not missing, "doc/backupmx.8 does not mention: " + ", ".join(sorted(missing))
    assert len(words) >= 12 and len(_config_keys()) >= 30  # the walk did find the parser and the keys


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_the_man_page_is_clean_roff():
    result = run(["groff", "-man", "-ww", "-z", MAN_PAGE], timeout=30)
    assert result.returncode == 0 and not result.stderr, result.stderr


# -- the bundle, run by someone else ------------------------------------------------------------------


def test_bundle_is_executable_by_an_unprivileged_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the bundle as user nobody (os.setuid in the child)")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this system")
    # tmp_path's parents are 0700 root: nobody could not even reach the file there.
    shared = Path(tempfile.mkdtemp(prefix="backupmx-bundle-"))
    try:
        shared.chmod(0o755)
        bundle = shared / "backupmx"
        made = run([sys.executable, REPO / "backupmx.py", "bundle", "-o", bundle], cwd=str(tmp_path))
        assert made.returncode == 0, made.stderr
        assert bundle.stat().st_mode & 0o777 == 0o755
        assert bundle.read_bytes().startswith(b"#!/usr/bin/env python3\n")
        work = shared / "work"  # nobody's own directory, for the queue `check` looks at
        work.mkdir()
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
        config = work / "backupmx.ini"
        config.write_text(f"[backupmx]\nlisten = 127.0.0.1:2525\nqueue = {work}/queue.db\n"
                          "[domain:example.com]\nprimary = 127.0.0.1:2526\n")

        def become_nobody():
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

        # Run as a supervisor would: the file itself (its #! line), as that user.
        for argv in ([bundle, "--version"], [bundle, "check", "-c", config]):
            result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60,
                                    cwd=str(work), env=clean_env(HOME=str(work)), preexec_fn=become_nobody)
            assert result.returncode == 0, (argv, result.returncode, result.stderr)
        assert result.stdout.startswith("ok: config")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_every_environment_knob_is_documented():
    """review-1 m9: the BACKUPMX_* tuning knobs (config.tuning) are operator tunables,
    listed in the README and the man page, not hidden test seams."""
    import re

    knobs = set()
    for source in (REPO / "backupmx").glob("*.py"):
        knobs |= set(re.findall(r"""tuning\(\s*["'](BACKUPMX_\w+)["']""", source.read_text()))
    assert len(knobs) >= 10
    readme, man = (REPO / "README.md").read_text(), MAN_PAGE.read_text()
    assert not [k for k in sorted(knobs) if f"`{k}`" not in readme or k not in man]
