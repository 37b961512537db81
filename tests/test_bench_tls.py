"""bench/tls.py runs (its --help) and prints its table from any subset of its rows;
bench/tls_steps.py measures a few sessions, bench/handshake_burst.py a small burst.

The benchmarks themselves need root and Postfix (tls.py) or minutes of CPU:
they are run by hand (bench/README.md), never here.
"""

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "tls.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_tls", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_runs():
    done = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "--certs" in done.stdout and "STARTTLS" in done.stdout


def test_tls_steps_measures_plain_and_starttls_sessions():
    script = BENCH.parent / "tls_steps.py"
    done = subprocess.run([sys.executable, str(script), "--sessions", "2", "--runs", "1", "--certs", "ecdsa"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "client Finished" in done.stdout and "STARTTLS ecdsa: +" in done.stdout


def test_handshake_burst_serves_a_small_burst():
    script = BENCH.parent / "handshake_burst.py"
    done = subprocess.run([sys.executable, str(script), "--sessions", "3", "--runs", "1", "--certs", "ecdsa"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("ecdsa "), done.stdout


def test_table_from_a_subset_of_rows():
    bench = load_bench()
    args = bench.argparse.Namespace(quick=True, messages=0, duration=0, certs=["rsa", "ecdsa"], sessions=None)
    rows = bench.plan(args)
    only_tls = [r for r in rows if "STARTTLS" in r[0]]  # no plain row to divide by
    for subset, plain_lines in ((rows, 4), (only_tls, 0)):
        results = {}
        for label, kind, cert, params, unit in subset:
            for name, value in (("backupmx", 300.0), ("postfix", 150.0)):
                extra = {"resumed_pct": 99.0, "mail_p99_ms": 1.0, "mail_max_ms": 2.0, "load_msg_s": 3.0}
                results[(label, name)] = [bench.Result(value * (2 if cert is None else 1), extra=extra)]
        out = io.StringIO()
        bench.print_table(subset, results, ["backupmx", "postfix"], out=out)
        text = out.getvalue()
        assert "2.00x" in text
        ratios = [line for line in text.splitlines() if line.startswith("plain / STARTTLS") and " sess: " in line]
        assert len(ratios) == plain_lines
        assert all("backupmx 2.00, postfix 2.00" in line for line in ratios)


def test_tls_layer_compares_the_layer_with_bare_bios_and_an_sslsocket():
    script = BENCH.parent / "tls_layer.py"
    done = subprocess.run([sys.executable, str(script), "--commands", "20", "--runs", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for row in ("TLSLayer", "bare BIOs", "SSLSocket", "the layer", "making a TLSLayer"):
        assert row in done.stdout
