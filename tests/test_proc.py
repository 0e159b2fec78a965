"""The forked CLI runner (tests/_proc.py) behaves like ``subprocess.run`` on what the tests read.

Each case runs a probe module both ways, forked and as a real subprocess, and compares exit
status and output: if the fast path drifted from the interpreter's behaviour, the CLI tests that
use it could pass where a user's run would fail.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _proc import run as run_proc

PROBE = textwrap.dedent("""
    import atexit, os, sys, time
    atexit.register(lambda: print("atexit ran", flush=True))
    what = sys.argv[1]
    if what == "info":
        print("preloaded" if "torch" in sys.modules else "fresh")
    elif what == "env":
        print(os.environ.get("PROBE_VALUE"), os.path.realpath(os.getcwd()), sys.argv[1:])
        print("to stderr", file=sys.stderr)
    elif what == "exit":
        sys.exit(int(sys.argv[2]))
    elif what == "exitmsg":
        sys.exit("probe: bad field 'x'")
    elif what == "raise":
        raise ValueError("boom")
    elif what == "osexit":
        print("unflushed? no:", flush=True)
        os._exit(7)
    elif what == "kill":
        os.kill(os.getpid(), 9)
    elif what == "sleep":
        time.sleep(60)
""")


@pytest.fixture()
def probe_dir(tmp_path: Path) -> Path:
    (tmp_path / "probe_mod.py").write_text(PROBE)
    return tmp_path


def both(args, cwd, monkeypatch, **kw):
    forked = run_proc([sys.executable, "-m", "probe_mod", *args], cwd=cwd, **kw)
    with monkeypatch.context() as m:
        m.setenv("DSRNA_TEST_SUBPROCESS", "1")
        real = run_proc([sys.executable, "-m", "probe_mod", *args], cwd=cwd, **kw)
    return forked, real


@pytest.mark.skipif(os.environ.get("DSRNA_TEST_SUBPROCESS") == "1", reason="fast path off on request")
def test_fast_path_is_taken(probe_dir, monkeypatch):
    forked, real = both(["info"], probe_dir, monkeypatch)
    assert (forked.stdout.split()[0], real.stdout.split()[0]) == ("preloaded", "fresh")


@pytest.mark.parametrize("args,code", [(["exit", "0"], 0), (["exit", "3"], 3), (["exit", "258"], 2),
                                       (["exitmsg"], 1), (["osexit"], 7), (["kill"], -signal.SIGKILL)])
def test_exit_status_and_output_match(probe_dir, monkeypatch, args, code):
    forked, real = both(args, probe_dir, monkeypatch)
    assert forked.returncode == real.returncode == code
    assert (forked.stdout, forked.stderr) == (real.stdout, real.stderr)


def test_uncaught_exception(probe_dir, monkeypatch):
    forked, real = both(["raise"], probe_dir, monkeypatch)
    assert forked.returncode == real.returncode == 1
    assert forked.stdout == real.stdout == "atexit ran\n"
    for p in (forked, real):  # the frames above the probe differ (runpy vs <frozen runpy>)
        assert p.stderr.startswith("Traceback (most recent call last):")
        assert p.stderr.rstrip().endswith("ValueError: boom")


def test_env_cwd_argv_and_streams(probe_dir, monkeypatch, tmp_path):
    env = dict(os.environ, PROBE_VALUE="v42")
    forked, real = both(["env", "a b", "--x=1"], probe_dir, monkeypatch, env=env)
    assert forked.returncode == real.returncode == 0
    assert (forked.stdout, forked.stderr) == (real.stdout, real.stderr)
    assert forked.stdout.splitlines()[0] == f"v42 {os.path.realpath(probe_dir)} ['env', 'a b', '--x=1']"
    assert "PROBE_VALUE" not in os.environ  # the run's environment stayed in the run


def test_timeout_kills_and_raises(probe_dir):
    with pytest.raises(subprocess.TimeoutExpired):
        run_proc([sys.executable, "-m", "probe_mod", "sleep"], cwd=probe_dir, timeout=3)


def test_interpreter_env_falls_back_to_subprocess(probe_dir):
    env = dict(os.environ, PYTHONPATH=str(probe_dir))  # changes how Python starts: not forkable
    p = run_proc([sys.executable, "-m", "probe_mod", "info"], cwd=probe_dir, env=env)
    assert p.stdout.split()[0] == "fresh"
