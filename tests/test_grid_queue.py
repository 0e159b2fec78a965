"""bench/grid_queue.py: every step is a valid grid.py invocation, steps run in order from --from,
a worker moves on while others hold a step's last tasks, and an unknown step name is refused
with the name."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import grid  # noqa: E402
import grid_queue  # noqa: E402


@pytest.mark.parametrize("name, args", grid_queue.STEPS, ids=[n for n, _ in grid_queue.STEPS])
def test_each_step_is_a_valid_grid_invocation(tmp_path, monkeypatch, capsys, name, args):
    monkeypatch.setattr(grid, "OUT", tmp_path)
    assert grid.main([*args, "--status"]) == 0  # argparse exits 2 on a misspelt method or stage
    assert "usage" not in capsys.readouterr().err


def test_the_queue_runs_its_steps_in_order_from_the_named_one(monkeypatch):
    seen = []
    monkeypatch.setattr(grid, "work", lambda a: seen.append(list(a)) or grid.Outcome(1, int("crown" in a), 0))
    assert grid_queue.main(["--from", "group2-autoattack"]) == 1  # a failed step is reported, the rest still run
    assert seen == [[*a, "--no-wait"] for _, a in grid_queue.STEPS[1:]]  # one pass: nothing held by others


def test_a_worker_takes_the_next_steps_tasks_and_walks_again_while_others_hold_some(monkeypatch, capsys):
    """A step whose last tasks other workers hold does not stop this worker: it goes on to the
    next steps, then walks the queue again (after a pause only when it ran nothing) until no step
    has a task held elsewhere."""
    passes = [{"capacity-control": grid.Outcome(0, 0, 1), "group3": grid.Outcome(2, 0, 0)},  # ran: no pause
              {"capacity-control": grid.Outcome(0, 0, 1)},                                    # ran nothing: pause
              {}]
    names = [n for n, _ in grid_queue.STEPS]
    calls, sleeps = [], []

    flags = []

    def work(a):
        k = a.index("--no-wait")
        calls.append(names[[x for _, x in grid_queue.STEPS].index(a[:k])])
        flags.append(a[k:])
        return passes[(len(calls) - 1) // len(names)].get(calls[-1], grid.Outcome(0, 0, 0))
    monkeypatch.setattr(grid, "work", work)
    monkeypatch.setattr(grid_queue.time, "sleep", sleeps.append)
    assert grid_queue.main([], poll_s=7) == 0
    assert calls == names * 3 and sleeps == [7]
    # the pass after one that ran nothing polls quietly: no step headers, no empty summaries
    assert flags == [["--no-wait"]] * (2 * len(names)) + [["--no-wait", "--quiet"]] * len(names)
    out = capsys.readouterr().out
    assert out.count("[queue] group3:") == 2 and out.count("held by other workers: polling every 7 s") == 1


def test_no_wait_returns_when_the_tasks_left_are_held_by_a_live_worker(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid, "OUT", tmp_path)
    held = [t.key for t in grid.tasks(["darts"], [0], ["search"], 1)]
    (tmp_path / ".locks").mkdir()
    (tmp_path / ".locks" / f"{held[0]}.lock").write_text(str(os.getppid()))  # a live process, not ours
    monkeypatch.setattr(grid.time, "sleep", lambda s: pytest.fail("waited on the other worker"))
    assert grid.main(["--methods", "darts", "--seeds", "0", "--stages", "search", "--no-wait"]) == 3
    assert "0 tasks run, 0 failed, 1 left to other workers" in capsys.readouterr().out
    assert grid.work(["--methods", "darts", "--seeds", "0", "--stages", "search", "--no-wait"]) == (0, 0, 1)
    capsys.readouterr()
    assert grid.work(["--methods", "darts", "--seeds", "0", "--stages", "search", "--no-wait", "--quiet"]) == (0, 0, 1)
    assert capsys.readouterr().out == ""  # an idle poll prints nothing


def test_an_unknown_step_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(grid, "work", lambda a: pytest.fail("ran a step"))
    with pytest.raises(SystemExit, match="no step 'grop3'"):
        grid_queue.main(["--from", "grop3"])


def test_list_prints_the_commands_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(grid, "work", lambda a: pytest.fail("ran a step"))
    assert grid_queue.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in out] == [n for n, _ in grid_queue.STEPS]
    assert out[0].endswith("--seeds 3 4 5 6 7 8 9 --recipes pbn --stages search train eval certify autoattack")


def _run(repo: Path, *cmd: str) -> "subprocess.CompletedProcess[str]":
    """``cmd`` in ``repo`` with a committer identity (a bare CI machine has none)."""
    ident = {k: v for k in ("AUTHOR", "COMMITTER") for k, v in ((f"GIT_{k}_NAME", "t"), (f"GIT_{k}_EMAIL", "t@t"))}
    return subprocess.run(list(cmd), cwd=repo, env=dict(os.environ, **ident), capture_output=True, text=True)


def test_grid_commit_commits_finished_stages_only(tmp_path):
    """bench/grid_commit.sh: a stage with a summary is committed with the grid log; a running
    one (no summary yet) is left alone; a second call finds nothing to do."""
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "grid_commit.sh", tmp_path / "bench")
    _run(tmp_path, "git", "init", "-q")
    net = tmp_path / "results" / "grid" / "net" / "pbn"
    for run, name in (("a_s0", "summary.json"), ("b_s0", "partial.json")):
        (net / run / "autoattack").mkdir(parents=True)
        (net / run / "autoattack" / name).write_text("{}")
    (tmp_path / "results" / "grid" / "grid_log.jsonl").write_text('{"task": "a"}\n')
    r = _run(tmp_path, "bash", "bench/grid_commit.sh")
    assert r.returncode == 0 and "committed net/pbn/a_s0/autoattack" in r.stdout, r.stderr
    log = lambda: _run(tmp_path, "git", "log", "--format=%s").stdout.splitlines()  # noqa: E731
    assert log() == ["#15 grid: net/pbn/a_s0/autoattack"]
    files = _run(tmp_path, "git", "ls-files").stdout.split()
    assert "results/grid/grid_log.jsonl" in files and not any("b_s0" in f for f in files)
    r = _run(tmp_path, "bash", "bench/grid_commit.sh")
    assert r.returncode == 0 and r.stdout == "" and len(log()) == 1
    r = _run(tmp_path, "bash", "bench/grid_commit.sh", "10m")
    assert r.returncode == 2 and "interval must be whole seconds, got '10m'" in r.stderr
