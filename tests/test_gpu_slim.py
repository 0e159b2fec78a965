"""bench/gpu_slim.sh: hides results/grid from the device tool's tree for a call, restores it exactly."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _sent(repo):
    """What the device tool sends: tracked files plus untracked files git does not ignore."""
    return set(_git(repo, "ls-files").split()) | set(_git(repo, "ls-files", "--others", "--exclude-standard").split())


def _repo(tmp_path):
    repo = tmp_path / "r"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_slim.sh", repo / "bench")
    ck = repo / "results" / "grid" / "net" / "adv" / "x_s0" / "train" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "best.pt").write_bytes(b"w" * 100)
    (repo / "results" / "grid" / "grid.json").write_text("{}")
    (repo / "README.md").write_text("r")
    # the project's own .gitignore re-includes grid checkpoints; hiding must beat that negation
    (repo / ".gitignore").write_text("results/**/checkpoints/*\n!results/grid/net/adv/*/train/checkpoints/best.pt\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    return repo


def _slim(repo, verb, guard="no-such-process-gpu-slim-test"):
    env = dict(os.environ, GPU_SLIM_GUARD=guard)
    return subprocess.run(["bash", "bench/gpu_slim.sh", verb], cwd=repo, env=env, capture_output=True, text=True)


def test_hide_drops_the_grid_from_the_sent_tree_and_restore_puts_it_back(tmp_path):
    repo = _repo(tmp_path)
    before, exclude = _sent(repo), (repo / ".git" / "info" / "exclude").read_text()
    assert "results/grid/net/adv/x_s0/train/checkpoints/best.pt" in before
    r = _slim(repo, "hide")
    assert r.returncode == 0, r.stderr
    assert _sent(repo) == {".gitignore", "README.md", "bench/gpu_slim.sh"}
    assert (repo / "results" / "grid" / "grid.json").exists()  # the working tree is untouched
    r = _slim(repo, "restore")
    assert r.returncode == 0, r.stderr
    assert _sent(repo) == before and _git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert (repo / ".git" / "info" / "exclude").read_text() == exclude


def test_hide_refuses_while_the_committer_runs(tmp_path):
    repo = _repo(tmp_path)
    before = _sent(repo)
    # a process whose command line holds the guard string stands in for bench/grid_commit.sh
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "gpu-slim-guard-test"])
    try:
        r = _slim(repo, "hide", guard="gpu-slim-guard-test")
    finally:
        sleeper.kill()
    assert r.returncode == 1 and "stop it first" in r.stderr
    assert _sent(repo) == before
