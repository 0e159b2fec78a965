"""``subprocess.run([sys.executable, "-m", MODULE, ...])`` for the CLI tests, minus the start-up.

A tiny single-process run of a stage does about a second of work after seconds of imports: torch,
torch._dynamo (torch.optim's first ``step`` imports it) and matplotlib (TensorBoard figures).
Paid by every CLI test, that was a third of the default suite. Here such a run is forked from a
multiprocessing forkserver that has those modules preloaded: it is still its own process (own
pid, environment, working directory, fds 1 and 2, exit status; ``os._exit``, signals and
timeouts behave as for a subprocess), and the module runs as ``__main__`` the way ``python -m``
runs it. Only the imports are shared, which nothing under test depends on.

Anything else (launchers, ``-c`` code, an environment that changes how Python starts, such as
``PYTHONPATH``) runs as a real subprocess, and ``DSRNA_TEST_SUBPROCESS=1`` runs everything that
way: the suite passes both ways.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

#: modules whose import dominates a tiny run; nothing of dsrna_dist, so a run imports our code
#: afresh with its own environment (module-level reads of os.environ see the run's values)
PRELOAD = ["torch", "torch._dynamo", "torch.utils.tensorboard", "accelerate", "matplotlib.pyplot"]
#: these spawn their workers with a fresh interpreter themselves: nothing to gain by forking
LAUNCHERS = ("torch.distributed.run", "accelerate.commands.launch")

_ctx = None
_server_env: Dict[str, str] = {}


def _context():
    global _ctx, _server_env
    if _ctx is None:  # the server starts, with the environment of this moment, on first use
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
        _server_env = dict(os.environ)
    return _ctx


def _forkable(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    if os.environ.get("DSRNA_TEST_SUBPROCESS") == "1":
        return False
    if len(argv) < 3 or argv[0] != sys.executable or argv[1] != "-m" or argv[2] in LAUNCHERS:
        return False
    base = _server_env or os.environ  # before the server starts: what it will start with
    # how the interpreter starts (PYTHONPATH, -X options, hash seed...) is fixed in the server
    return all(env.get(k) == base.get(k) for k in set(env) | set(base)
               if k.startswith("PYTHON") and k != "PYTHONUNBUFFERED")


def _exit_code(e: SystemExit) -> int:
    """What the interpreter exits with for an uncaught ``SystemExit``."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _child(module: str, args: List[str], env: Dict[str, str], cwd: str, out: str, err: str) -> None:
    import atexit
    import runpy
    import traceback

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    # as the interpreter sets them up for a pipe: stdout block-buffered, stderr line-buffered
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), line_buffering=True,
                                  write_through=unbuffered, errors="backslashreplace")
    import torch  # preloaded: its thread pool size was read from the server's environment

    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *args]
    sys.path.insert(0, cwd)  # as ``python -m`` puts the working directory first
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - the interpreter's own last resort
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # logging.shutdown and the like, as at a normal interpreter exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, cwd=None,
        timeout: Optional[float] = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)``."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    if kwargs or not _forkable(argv, env):
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout, **kwargs)
    with tempfile.TemporaryDirectory(prefix="dsrna_proc_") as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        p = _context().Process(target=_child, args=(argv[2], argv[3:], env,
                                                    str(cwd or os.getcwd()), out, err))
        p.start()
        p.join(timeout)
        timed_out = p.exitcode is None
        if timed_out:
            p.kill()
            p.join()

        def read(path: str) -> str:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    return f.read()
            except FileNotFoundError:
                return ""
        stdout, stderr = read(out), read(err)
    if timed_out:
        raise subprocess.TimeoutExpired(argv, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(argv, p.exitcode, stdout, stderr)
