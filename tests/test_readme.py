"""The README's walk-through, run as written: its shell blocks, in order, with the
ports and `python3` swapped for this test's (openssl and swaks must be installed).

A block follows a `<!-- walk-through: NAME -->` line. `setup` runs as one script;
each line of `servers` is a process started in the background (a terminal of its
own in the README); `send` and `etrn` run line by line, with a wait for the
delivery (the README's "a moment later") before the primary's spool is listed.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, banner_ready, end_process_group, free_port, wait_for

README = REPO / "README.md"
BLOCK = re.compile(r"<!-- walk-through: (\w+) -->\n```sh\n(.*?)```", re.S)


def walkthrough_blocks(ports):
    text = README.read_text()
    blocks = {name: body for name, body in BLOCK.findall(text)}
    assert list(blocks) == ["setup", "servers", "send", "etrn"], list(blocks)
    swapped = {}
    for name, body in blocks.items():
        body = body.replace("2525", str(ports["backup"])).replace("2526", str(ports["primary"]))
        swapped[name] = re.sub(r"\bpython3 ", f"{sys.executable} ", body)
    return swapped


def shell(script, cwd):
    result = subprocess.run(["bash", "-euc", script], cwd=str(cwd), capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("swaks") is None,
                    reason="the walk-through needs openssl and swaks (apt-get install openssl swaks)")
def test_the_readme_walkthrough_works(tmp_path):
    ports = {"backup": free_port(), "primary": free_port()}
    blocks = walkthrough_blocks(ports)
    checkout = tmp_path / "checkout"  # the commands run from a checkout: `../backupmx.py` from try/
    (checkout / "tests").mkdir(parents=True)
    (checkout / "backupmx.py").symlink_to(REPO / "backupmx.py")
    (checkout / "tests" / "sink.py").symlink_to(REPO / "tests" / "sink.py")

    shell(blocks["setup"], checkout)
    try_dir = checkout / "try"
    servers = []
    try:
        for line in blocks["servers"].splitlines():
            servers.append(subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=str(try_dir),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            start_new_session=True))
        for port in ports.values():
            assert wait_for(lambda: banner_ready(port) or any(p.poll() is not None for p in servers), 15)
        assert all(p.poll() is None for p in servers), [p.stderr.read() for p in servers if p.poll() is not None]

        swaks, queue = blocks["send"].splitlines()
        assert "bob@example.com" in shell(swaks, try_dir)
        assert re.search(r"^example\.com\s+1\s", shell(queue, try_dir), re.M)
        assert not list((try_dir / "primary-mail").iterdir())  # queued, not forwarded

        etrn, listing, queue = blocks["etrn"].splitlines()
        assert re.search(r"ETRN example\.com: 253 .*1 pending", shell(etrn, try_dir))
        assert wait_for(lambda: (try_dir / "primary-mail" / "000001.json").exists(), 15)
        assert "000001.eml" in shell(listing, try_dir)
        body = (try_dir / "primary-mail" / "000001.eml").read_bytes()
        assert body.startswith(b"Received: ") and b"Subject: hello" in body
        assert wait_for(lambda: "no mail queued" in shell(queue, try_dir), 10)
    finally:
        for proc in servers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in servers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            end_process_group(proc)
