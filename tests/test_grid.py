"""The comparison grid's scheduler (bench/grid.py) and tables (bench/grid_report.py): tasks
appear as their inputs land, one network per (recipe, cell, seed), locks of dead workers are
taken over, and the report's statistics come from the finished cells only."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsrna_dist import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import grid  # noqa: E402
import grid_report  # noqa: E402
import grid_rescore  # noqa: E402
import rebuild_checkpoint  # noqa: E402

CELL_A = {"normal": [["sep_conv_3x3", 0], ["skip_connect", 1]], "normal_concat": [2],
          "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]], "reduce_concat": [2]}
CELL_B = {**CELL_A, "normal": [["dil_conv_3x3", 0], ["skip_connect", 1]]}


@pytest.fixture
def out(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "OUT", tmp_path)
    monkeypatch.setattr(grid_report, "OUT", tmp_path)
    return tmp_path


def found(out: Path, method: str, seed: int, cell: dict, **conv) -> None:
    d = out / "search" / f"{method}_s{seed}"
    d.mkdir(parents=True)
    (d / "genotype.json").write_text(json.dumps({**cell, "source": method}))
    (d / "summary.json").write_text(json.dumps({"search_cpu_s": 60.0, "convergence": {
        "max_softmax": 0.4, "entropy": 1.5, "genotype_changes": 3, "last_change_arch_step": 10,
        "arch_steps": 40, "converged": True, **conv}}))


def test_tasks_appear_as_inputs_land_and_networks_are_shared(out):
    ts = grid.tasks(["darts", "pcdarts", "dsrna_cb"], [0, 1], grid.STAGES, 1)
    assert [t.stage for t in ts] == ["search"] * 6  # nothing else is visible before a search finishes
    assert [t.key for t in ts][:3] == ["search-darts-s0", "search-pcdarts-s0", "search-dsrna_cb-s0"]
    found(out, "pcdarts", 0, CELL_A)
    found(out, "dsrna_cb", 0, CELL_A)   # the same cell with the same seed: one network per recipe
    found(out, "darts", 0, CELL_B)
    ts = grid.tasks(["darts", "pcdarts", "dsrna_cb"], [0, 1], grid.STAGES, 1)
    train = [t for t in ts if t.stage == "train"]
    assert len(train) == 4  # 2 distinct cells x 2 recipes
    shared = [t for t in train if "pcdarts" in t.info["methods"]]
    assert {tuple(t.info["methods"]) for t in shared} == {("pcdarts", "dsrna_cb")}
    # the core methods' seed 0 end to end first (its searches, then its trains), then the other
    # seeds' searches; eval appears only once a train has written its summary
    assert [t.key for t in ts][:7] == ["search-darts-s0", "search-pcdarts-s0", "search-dsrna_cb-s0"] + [
        t.key for t in train]
    assert all(t.stage == "search" for t in ts[7:]) and not any(t.stage == "eval" for t in ts)
    (Path(train[0].done).parent / "checkpoints").mkdir(parents=True)
    train[0].done.write_text("{}")
    (train[0].done.parent / "checkpoints" / "best.pt").write_text("")
    ts = grid.tasks(["darts", "pcdarts", "dsrna_cb"], [0, 1], grid.STAGES, 1)
    ev = [t for t in ts if t.stage in ("eval", "autoattack")]
    assert ev and all(t.info["genotype_hash"] == train[0].info["genotype_hash"] for t in ev)
    assert ts[-1].stage == "autoattack"  # the hours-long stage goes last
    for t in ev:  # naturally trained nets: AutoAttack at the small eps (at 0.1 PGD already breaks them)
        if t.stage == "autoattack":
            assert any(a.endswith("fmnist_small_grid_aa_small.yaml") for a in t.argv) == (t.info["recipe"] == "pbn")
    assert any(f"--checkpoint={train[0].done.parent / 'checkpoints' / 'best.pt'}" in t.argv for t in ev)


def test_capacity_controls_are_opt_in_and_retrain_the_cell_narrower(out, monkeypatch):
    monkeypatch.setattr(grid, "CONTROLS", {"darts_s0": 5, "darts_s1": 4})
    found(out, "darts", 0, CELL_B)
    assert not any("control" in t.info for t in grid.tasks(["darts"], [0, 1], grid.STAGES, 1))  # opt-in
    ts = grid.tasks(["darts"], [0, 1], [grid.CONTROL], 1, recipes=["pbn", "nat"])
    # only darts_s0's cell exists: its control per recipe (nat keeps the first sessions' unsuffixed name)
    assert [t.key for t in ts] == ["control-train-darts_s0_c5", "control-train-darts_s0_c5_pbn"]
    tr = ts[1]
    assert f"--config={grid.RECIPES['pbn']}" in tr.argv and "--model.init_channels=5" in tr.argv
    assert f"--model.genotype={out / 'search' / 'darts_s0' / 'genotype.json'}" in tr.argv
    assert f"--run.out_dir={out / 'control' / 'darts_s0_c5_pbn'}" in tr.argv and "--run.seed=0" in tr.argv
    assert tr.done == out / "control" / "darts_s0_c5_pbn" / "train" / "summary.json"
    assert grid.tasks(["pcdarts"], [0], [grid.CONTROL], 1, recipes=["pbn"]) == []  # method filter
    tr.done.parent.mkdir(parents=True)
    tr.done.write_text("{}")
    ev = [t for t in grid.tasks(["darts"], [0], [grid.CONTROL], 1, recipes=["pbn"]) if t.stage == "eval"]
    assert [t.key for t in ev] == ["control-eval-darts_s0_c5_pbn"]
    assert f"--config={grid.RECIPE_EVALS['pbn'][0][1]}" in ev[0].argv
    assert f"--checkpoint={out / 'control' / 'darts_s0_c5_pbn' / 'train' / 'checkpoints' / 'best.pt'}" in ev[0].argv
    found(out, "darts", 1, CELL_A)
    assert "control-train-darts_s1_c4_adv" in [t.key for t in grid.tasks(["darts"], [1], [grid.CONTROL], 1)]
    assert not any("s1" in t.key for t in grid.tasks(["darts"], [0], [grid.CONTROL], 1))  # seed filter


def test_recipes_restrict_the_networks(out):
    found(out, "darts", 0, CELL_B)
    nat = grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["nat"])
    both = grid.tasks(["darts"], [0], grid.STAGES, 1)
    assert [t.info["recipe"] for t in nat if t.stage == "train"] == ["nat"]
    assert sorted(t.info["recipe"] for t in both if t.stage == "train") == ["adv", "pbn"]  # nat, ibp: opt-in
    # certified training: its own config, then one eval (verified accuracy) of last.pt, nothing else
    ibp = grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["ibp"])
    tr = [t for t in ibp if t.stage == "train"]
    assert len(tr) == 1 and f"--config={grid.RECIPES['ibp']}" in tr[0].argv
    (tr[0].done.parent / "checkpoints").mkdir(parents=True)
    tr[0].done.write_text("{}")
    (tr[0].done.parent / "checkpoints" / "last.pt").write_text("")
    ev = [t for t in grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["ibp"]) if t.stage != "search" and t.stage != "train"]
    assert [t.stage for t in ev] == ["eval"] and f"--config={grid.IBP_EVAL_CFG}" in ev[0].argv
    assert f"--checkpoint={tr[0].done.parent / 'checkpoints' / 'last.pt'}" in ev[0].argv
    assert (ROOT / grid.RECIPES["ibp"]).exists() and (ROOT / grid.IBP_EVAL_CFG).exists()
    # precise BN: opt-in too; the nat recipe plus precise_bn_batches and nothing else
    pbn = [t for t in grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["pbn"]) if t.stage == "train"]
    assert len(pbn) == 1 and f"--config={grid.RECIPES['pbn']}" in pbn[0].argv
    from dsrna_dist.config import TrainConfig, load_config, to_dict
    a = to_dict(load_config(TrainConfig, str(ROOT / grid.RECIPES["nat"]), {}))
    b = to_dict(load_config(TrainConfig, str(ROOT / grid.RECIPES["pbn"]), {}))
    assert {k for k in a if a[k] != b[k]} == {"run", "precise_bn_batches"} and b["precise_bn_batches"] == 100
    assert {k for k in a["run"] if a["run"][k] != b["run"][k]} == {"name"}


def test_rescore_adopts_only_a_bit_identical_rerun(out, tmp_path):
    def search(d: Path, alpha: float, changes: int, converged: bool) -> None:
        d.mkdir(parents=True)
        (d / "genotype.json").write_text(json.dumps(CELL_A))
        (d / "alphas.jsonl").write_text(json.dumps({"epoch": 0, "alphas_normal": [[alpha, 0.0]],
                                                    "alphas_reduce": [[0.0, alpha]]}) + "\n")
        (d / "summary.json").write_text(json.dumps({"convergence": {
            "genotype_changes": changes, "last_change_arch_step": changes, "converged": converged}}))
        (d / "search.log").write_text(f"changes {changes}\n")

    scratch = tmp_path / "scratch"
    search(out / "search" / "pcdarts_s0", 0.5, 9, False)
    search(scratch / "pcdarts_s0", 0.5, 4, True)       # same alphas, recounted
    search(out / "search" / "darts_s1", 0.5, 9, False)
    search(scratch / "darts_s1", 0.5000001, 4, True)   # not the same search: left alone
    note = grid_rescore.rescore("pcdarts_s0", scratch)
    assert note["before"]["converged"] is False and note["after"]["converged"] is True
    assert json.loads((out / "search" / "pcdarts_s0" / "summary.json").read_text())["convergence"]["converged"]
    assert json.loads((out / "search" / "pcdarts_s0" / "rescored.json").read_text())["after"]["genotype_changes"] == 4
    before = (out / "search" / "darts_s1" / "summary.json").read_text()
    assert grid_rescore.rescore("darts_s1", scratch) is None
    assert (out / "search" / "darts_s1" / "summary.json").read_text() == before
    assert not (out / "search" / "darts_s1" / "rescored.json").exists()
    with pytest.raises(SystemExit):
        grid_rescore.rescore("nosuch_s0", scratch)


#: a stand-in for `python -m dsrna_dist.train ... --run.name=rebuild`: writes the run's record and
#: its checkpoint the way train does (what is tested is the comparison and the hand-over)
FAKE_TRAIN = """
import json, pathlib, sys
d = pathlib.Path(sys.argv[1]); (d / 'checkpoints').mkdir(parents=True, exist_ok=True)
(d / 'checkpoints' / 'best.pt').write_text('weights')
rows = [{'epoch': 0, 'train_loss': 0.5, 'val_top1': 80.0, 'img_per_s': 99.0},
        {'epoch': 1, 'train_loss': float(sys.argv[2]), 'val_top1': 85.0, 'img_per_s': 12.0}]
(d / 'metrics.jsonl').write_text(''.join(json.dumps(r) + chr(10) for r in rows))
(d / 'summary.json').write_text('{}')
"""


def test_lost_checkpoint_is_rebuilt_and_kept_only_if_identical(out):
    found(out, "darts", 0, CELL_B)
    tr = [t for t in grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["nat"]) if t.stage == "train"][0]
    net = tr.done.parent.parent
    tr.done.parent.mkdir(parents=True)
    tr.done.write_text("{}")
    ref = [{"epoch": 0, "train_loss": 0.5, "val_top1": 80.0, "img_per_s": 61.0},
           {"epoch": 1, "train_loss": 0.25, "val_top1": 85.0, "img_per_s": 100.0}]
    (net / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref))
    # summary committed, weights gone: one rebuild task instead of the evaluations, in their place
    ts = grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["nat"])
    rb = [t for t in ts if t.stage == "rebuild"]
    assert len(rb) == 1 and not any(t.stage in ("eval", "crown") for t in ts)
    assert rb[0].done == net / "train" / "checkpoints" / "best.pt" and "--run.name=rebuild" in rb[0].argv
    assert rb[0].info["for_stage"] == "eval"
    crown_only = grid.tasks(["darts"], [0], ["crown"], 1, recipes=["nat"])
    assert [grid.tier(t) for t in crown_only] == [2]  # rebuilt when the late stage's turn comes
    fake = [sys.executable, "-c", FAKE_TRAIN, str(net / "rebuild")]
    # a rebuilt run that differs in one loss leaves train/ as it was
    assert rebuild_checkpoint.rebuild(net, fake + ["0.2500001"]) == 3
    assert not (net / "train" / "checkpoints").exists() and (net / "rebuild" / "metrics.jsonl").exists()
    # identical except timing: checkpoints handed over, the check recorded, the scratch run gone
    (net / "rebuild" / "checkpoints" / "best.pt").unlink()
    assert rebuild_checkpoint.rebuild(net, fake + ["0.25"]) == 0
    assert (net / "train" / "checkpoints" / "best.pt").read_text() == "weights"
    rec = json.loads((net / "train" / "rebuilt.json").read_text())
    assert rec["identical"] and rec["epochs_compared"] == 2 and not (net / "rebuild").exists()
    assert [t.stage for t in grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["nat"])
            if t.stage not in ("search", "train")][:1] == ["eval"]


def test_adopt_makes_a_differing_rebuild_the_network(out):
    found(out, "darts", 0, CELL_B)
    tr = [t for t in grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["nat"]) if t.stage == "train"][0]
    net = tr.done.parent.parent
    tr.done.parent.mkdir(parents=True)
    tr.done.write_text(json.dumps({"test_top1": 90.4}))
    (net / "train" / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 0.5}) + "\n")
    for stage in ("eval", "autoattack"):
        (net / stage).mkdir()
        (net / stage / "summary.json").write_text("{}")
    rb = [t for t in grid.tasks(["darts"], [0], ["crown"], 1, recipes=["nat"], rebuild="adopt")
          if t.stage == "rebuild"][0]
    cut = rb.argv.index("--")
    assert "--code" not in rb.argv[:cut]  # adopt trains with the current code
    stages = rb.argv[rb.argv.index("--adopt") + 1:cut]
    assert stages == [st for st, _ in grid.RECIPE_EVALS["nat"]]
    fake = [sys.executable, "-c", FAKE_TRAIN, str(net / "rebuild"), "0.3"]
    assert rebuild_checkpoint.rebuild(net, fake, None, stages) == 0
    rec = json.loads((net / "train" / "rebuilt.json").read_text())
    assert rec["identical"] is False and rec["first_difference"].startswith("2 epochs rebuilt")
    assert rec["superseded"] == {"test_top1": 90.4, "stages_deleted": ["eval", "autoattack"]}
    assert (net / "train" / "checkpoints" / "best.pt").read_text() == "weights"
    assert not any((net / d).exists() for d in ("eval", "autoattack", "rebuild", "train.superseded"))
    assert len((net / "train" / "metrics.jsonl").read_text().splitlines()) == 2  # the new run's record
    # the old evaluations are gone, so every stage of the new network is pending again
    assert {t.stage for t in grid.tasks(["darts"], [0], grid.STAGES, 1, recipes=["nat"])} >= {"eval", "crown"}


def test_rebuild_runs_the_recorded_code_version(out):
    key = "train-nat-97c7ea0e8a-s0"
    assert grid.train_code(key) is None
    (out / "train_code.json").write_text(json.dumps({key: {"code": "9f4a0da", "why": "inferred"}}))
    assert grid.train_code(key) == "9f4a0da"
    recs = [{"task": key, "rc": 1, "code": "aaaaaaa"}, {"task": key, "rc": 0, "code": "bbbbbbb+dirty"},
            {"task": "train-nat-other-s0", "rc": 0, "code": "ccccccc"}]
    (out / "grid_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert grid.train_code(key) == "bbbbbbb"  # the log's successful record wins over the inferred one
    (out / "train").mkdir()
    (out / "train" / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    ran = out / "ran"
    argv = [str(out), "--code", "no-such-rev-xyz", "--", sys.executable, "-c", f"open({str(ran)!r}, 'w')"]
    assert rebuild_checkpoint.main(argv) == 2 and not ran.exists()  # unknown version: nothing trained


def test_lock_claim_and_dead_worker_takeover(out):
    t = grid.Task("search-x-s0", "search", (0,), out / "x", [], {})
    lock = grid.claim(t)
    assert lock is not None and grid.claim(t) is None  # held by a live process (this one)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))
    assert grid.claim(t) is not None  # a dead worker's lock is taken over


def test_a_task_killed_and_resumed_logs_the_wall_time_of_both_parts(out):
    """A worker killed mid-task (a session's hard end) leaves its clock in .wall/; the resumed run
    logs the sum and the number of parts, and a finished task's clock is cleared."""
    burner = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 60: pass"]
    worker = subprocess.Popen([sys.executable, "-c", (
        "import sys, pathlib; sys.path.insert(0, sys.argv[1]); import grid; grid.OUT = pathlib.Path(sys.argv[2]);"
        f"grid.run_task(grid.Task('eval-x', 'eval', (0,), grid.OUT / 'x', {burner!r}, {{}}), {{}}, beat_s=0.2)"),
        str(ROOT / "bench"), str(out)], start_new_session=True)
    ledger = out / ".wall" / "eval-x.json"
    for _ in range(600):
        if ledger.exists() and json.loads(ledger.read_text())["wall_s"] >= 3.0:
            break
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its child, as at a session's end
    worker.wait()
    killed = json.loads(ledger.read_text())
    assert killed["parts"] == 1 and killed["wall_s"] >= 3.0
    assert 0.3 <= killed["cpu_s"] <= killed["wall_s"] + 0.5  # the burning child's CPU, counted while it ran
    assert not (out / "grid_log.jsonl").exists()  # the killed part logged nothing itself

    t = grid.Task("eval-x", "eval", (0,), out / "x", [sys.executable, "-c", "import time; time.sleep(0.5)"], {})
    assert grid.run_task(t, dict(os.environ), beat_s=0.2) == 0
    rec = grid.read_jsonl(out / "grid_log.jsonl")[-1]
    assert rec["parts"] == 2 and killed["wall_s"] + 0.5 <= rec["wall_s"] < killed["wall_s"] + 5
    assert killed["cpu_s"] <= rec["cpu_s"] <= killed["cpu_s"] + 1.0  # + the sleeping part's own
    assert not ledger.exists()
    assert grid.run_task(t, dict(os.environ), beat_s=0.2) == 0  # a fresh run: one part, its own time
    rec = grid.read_jsonl(out / "grid_log.jsonl")[-1]
    assert rec["parts"] == 1 and 0.5 <= rec["wall_s"] < killed["wall_s"] and rec["cpu_s"] < killed["cpu_s"]
    recs = grid.read_jsonl(out / "grid_log.jsonl")  # the report's cost table: wall over parts, one resumed
    assert grid_report.main(["--out", str(out / "r.md")]) == 0
    row = next(line for line in (out / "r.md").read_text().splitlines() if line.startswith("| eval |"))
    wall = sum(r["wall_s"] for r in recs) / 60
    assert row.split(" | ")[1:3] == ["2", "1"] and row.endswith(f" | {wall / 2:.1f} | {wall:.1f} |")


def test_tree_cpu_s_counts_a_live_task_and_its_children(tmp_path):
    """Against each process's own clock (time.process_time): a task and a child it started both
    burn CPU, then idle; the live tree's /proc sum equals the sum of their own clocks."""
    burn = ("import sys, time\nwhile time.process_time() < 0.6: pass\n"
            "open(sys.argv[1], 'w').write(repr(time.process_time()))\ntime.sleep(60)")
    parent = ("import subprocess, sys\n"
              f"kid = subprocess.Popen([sys.executable, '-c', {burn!r}, sys.argv[2]])\n"
              f"exec({burn!r})")
    task = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path / "p"), str(tmp_path / "k")],
                            start_new_session=True)
    try:
        for _ in range(600):
            if all((tmp_path / n).exists() and (tmp_path / n).read_text() for n in "pk"):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        own = sum(float((tmp_path / n).read_text()) for n in "pk")
        assert own >= 1.0  # each burned CPU, or the comparison proves nothing
        assert abs(grid.tree_cpu_s(task.pid) - own) < 0.1
        assert grid.tree_cpu_s(2 ** 22 + 1) == 0.0  # no such process
    finally:
        os.killpg(task.pid, signal.SIGKILL)
        task.wait()


@pytest.mark.parametrize("ledger_text", ["", '{"wall_s": 12.0', '{"parts": 2}', '{"wall_s": null, "parts": 1}', "[1, 2]"])
def test_a_corrupt_wall_ledger_reads_as_no_prior_part(out, ledger_text):
    """A ledger cut short or garbled (a disk filled mid-write) must not block the task: it runs,
    logs one part of its own time and clears the ledger."""
    ledger = out / ".wall" / "eval-z.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(ledger_text)
    t = grid.Task("eval-z", "eval", (0,), out / "z", [sys.executable, "-c", "import time; time.sleep(0.3)"], {})
    assert grid.run_task(t, dict(os.environ), beat_s=0.1) == 0
    rec = grid.read_jsonl(out / "grid_log.jsonl")[-1]
    assert rec["parts"] == 1 and 0.3 <= rec["wall_s"] < 10
    assert not ledger.exists()


def test_a_worker_error_does_not_leave_its_task_running(out, monkeypatch):
    pidfile = out / "child.pid"
    argv = [sys.executable, "-c", f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"]

    def broken(*_):
        if pidfile.exists() and pidfile.read_text():
            raise OSError("disk full")

    monkeypatch.setattr(grid, "atomic_write_json", broken)
    t0 = time.time()
    with pytest.raises(OSError, match="disk full"):
        grid.run_task(grid.Task("eval-y", "eval", (0,), out / "y", argv, {}), dict(os.environ), beat_s=0.1)
    assert time.time() - t0 < 30  # killed, not waited for (it sleeps 60 s)
    assert not grid.pid_alive(int(pidfile.read_text()))


def test_status_plans_worker_hours_from_the_logged_wall_times(out):
    def task(key, stage, **info):
        return grid.Task(key, stage, (0,), out / key, [], info)

    ts = [task("search-a-s0", "search", method="darts", seed=0),
          task("search-a-s1", "search", method="darts", seed=1),
          task("search-b-s0", "search", method="robnet", seed=0),
          task("eval-adv-x-s0", "eval", recipe="adv"), task("eval-adv-y-s0", "eval", recipe="adv"),
          task("eval-pbn-x-s0", "eval", recipe="pbn"), task("rebuild-adv-z-s0", "rebuild", recipe="adv")]
    (out / "search-a-s0").write_text("")  # done
    log = [{"stage": "search", "methods": ["darts"], "rc": 0, "wall_s": 600.0},
           {"stage": "search", "methods": ["darts"], "rc": 0, "wall_s": 1200.0},
           {"stage": "search", "methods": ["darts"], "rc": 1, "wall_s": 9e9},  # failed: not a cost
           {"stage": "eval", "recipe": "adv", "rc": 0, "wall_s": 1800.0},
           {"stage": "eval", "recipe": "nat", "rc": 0, "wall_s": 600.0},
           {"stage": "train", "recipe": "adv", "rc": 0, "wall_s": 3600.0}]
    states = [grid.task_state(t) for t in ts]
    assert states == ["done"] + ["todo"] * 6
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in grid.plan(ts, states, log)[1:-1]}
    assert rows["search darts"] == ["1", "0", "1", "15.0", "0.2"]  # (10 + 20) / 2 min, the failed run ignored
    assert rows["search robnet"] == ["0", "0", "1", "?", "?"]
    assert rows["eval adv"] == ["0", "0", "2", "30.0", "1.0"]
    assert rows["eval pbn"] == ["0", "0", "1", "20.0*", "0.3"]  # no pbn record: all evals' mean, marked
    assert rows["rebuild adv"] == ["0", "0", "1", "60.0*", "1.0"]  # a rebuild is a retraining
    assert grid.plan(ts, states, log)[-1].startswith("worker-hours left: 2.6 + 1 task(s)")  # 0.25 + 1 + 1/3 + 1


def test_report_tables_and_tests_from_finished_cells(out):
    found(out, "pcdarts", 0, CELL_A)
    found(out, "pcdarts", 1, CELL_A)
    found(out, "dsrna_cb", 0, CELL_B)
    found(out, "dsrna_cb", 1, CELL_B, converged=False)
    acc = {("pcdarts", 0): 80.0, ("pcdarts", 1): 82.0, ("dsrna_cb", 0): 85.0, ("dsrna_cb", 1): 88.0}
    for (m, s), a in acc.items():
        gh = grid.genotype_hash(out / "search" / f"{m}_s{s}" / "genotype.json")
        ev = out / "net" / "nat" / f"{gh}_s{s}" / "eval"
        ev.mkdir(parents=True)
        (ev / "summary.json").write_text(json.dumps({"clean_acc": a, "robust_acc": {"PGD-20": a - 50}}))
        aa = ev.parent / "autoattack"  # natural nets: AutoAttack (and PGD-20 beside it) at l_inf 0.02
        aa.mkdir()
        (aa / "summary.json").write_text(json.dumps({"robust_acc": {"PGD-20 @0.02 (200)": a - 40,
                                                                    "AutoAttack @0.02 (200)": a - 42 - (m == "pcdarts")}}))
        cr = ev.parent / "crown"   # full CROWN: mean radius, bracket and the margin left where unbracketed
        cr.mkdir()
        (cr / "summary.json").write_text(json.dumps({"certified": {"crown": {"inf": {
            "n": 5, "mean_radius": a / 1e5, "median_bracket": 1.25 if s else None,
            "median_margin_left_unbracketed": 0.5 if m == "dsrna_cb" else 0.1}}}}))
    for (m, s), v in {("pcdarts", 0): 40.0, ("pcdarts", 1): 44.0, ("dsrna_cb", 0): 60.0, ("dsrna_cb", 1): 66.0}.items():
        gh = grid.genotype_hash(out / "search" / f"{m}_s{s}" / "genotype.json")
        ev = out / "net" / "ibp" / f"{gh}_s{s}" / "eval"
        ev.mkdir(parents=True)
        (ev / "summary.json").write_text(json.dumps({"clean_acc": v + 5, "robust_acc": {"PGD-20": v + 1}, "certified": {
            "ibp": {"inf": {"n": 9, "mean_radius": 0.05, "certified_acc": {"0.05": v}}}}}))
    adv = out / "net" / "adv" / f"{grid.genotype_hash(out / 'search' / 'pcdarts_s0' / 'genotype.json')}_s0"
    for stage, summary in (("eval", {"clean_acc": 70.0, "robust_acc": {"PGD-20": 50.0}}),
                           ("autoattack", {"robust_acc": {"PGD-20 @0.1 (200)": 52.0, "AutoAttack @0.1 (200)": 47.0}})):
        (adv / stage).mkdir(parents=True)
        (adv / stage / "summary.json").write_text(json.dumps(summary))
    ctl = out / "control" / "pcdarts_s0_c4"
    (ctl / "train").mkdir(parents=True)
    (ctl / "train" / "summary.json").write_text(json.dumps({"params": 11318, "best_top1": 77.0, "test_top1": 76.5}))
    (ctl / "eval").mkdir()
    (ctl / "eval" / "summary.json").write_text(json.dumps({"clean_acc": 77.25, "robust_acc": {"PGD-20": 1.5}}))
    assert grid_report.main(["--out", str(out / "new" / "r.md")]) == 0  # its folder is made
    text = (out / "new" / "r.md").read_text()
    assert "| dsrna_cb (1 not converged) | 86.50 ± 2.12 (n=2) | 36.50 ± 2.12 (n=2) |" in text
    assert "| pcdarts_s0_c4 | 11.32 | 77.00 | 76.50 | 77.25 | 1.50 |" in text
    head = next(ln for ln in text.splitlines() if ln.startswith("| method |") and "margin left" in ln).split(" | ")
    row = next(ln for ln in text.splitlines() if ln.startswith("| dsrna_cb (1 not") and "0.000865" in ln).split(" | ")
    assert row[head.index("radius crown l_inf margin left (median, unbracketed)")].startswith("0.5")
    assert row[head.index("radius crown l_inf bracket (median)")].startswith("1.25 (n=1)")
    assert "| nat | dsrna_cb | pcdarts | radius crown l_inf (n=5) |" in text      # the radius is tested,
    assert "pcdarts | radius crown l_inf margin left" not in text                  # its resolution is not
    five = text[text.index("**Tables 5-6 form**"):].split("\n\n")[1].splitlines()[2:]
    assert [ln.split(" | ")[1] for ln in five if ln.startswith("| nat |")] == ["crown l_inf (n=5)"]  # nor tabled
    assert "Converged per method: pcdarts 2 of 2; dsrna_cb 1 of 2." in text
    assert "## Retrained with certified (IBP) training" in text
    assert "| dsrna_cb (1 not converged) | 68.00 ± 4.24 (n=2) | 64.00 ± 4.24 (n=2) | 63.00 ± 4.24 (n=2) |" in text
    # the paper's forms: Table 2 (search cost 60 CPU-s = 1.0 min; no test top-1 in these summaries)
    assert "| dsrna_cb | - | - | 1.0 ± 0.0 (n=2) | gradient |" in text
    # Tables 1 / 4 form; a natural net's AutoAttack column is the small-eps run, and its header says so
    assert "| method | without attack | PGD (100) | PGD (20) | FGSM | C&W | AutoAttack @0.02 (200) |" in text
    assert "| pcdarts | 81.00 ± 1.41 (n=2) | - | 31.00 ± 1.41 (n=2) | - | - | 38.00 ± 1.41 (n=2) |" in text
    form = text[text.index("**Tables 1 / 4 form** (PGD adversarial training)"):].split("\n\n")[1].splitlines()
    assert form[0].endswith("| C&W | AutoAttack @0.1 (200) |")  # a PGD-AT net's: eps 0.1
    assert form[2] == "| pcdarts | 70.00 (n=1) | - | 50.00 (n=1) | - | - | 47.00 (n=1) |"
    head = next(ln for ln in text.splitlines() if ln.startswith("| method |") and "| PGD-20 - AutoAttack @0.1 (200) |" in ln)
    row = next(ln for ln in text.splitlines() if ln.startswith("| pcdarts |") and "| 47.00 (n=1) |" in ln)
    assert row.split(" | ")[head.split(" | ").index("PGD-20 - AutoAttack @0.1 (200)")] == "5.00 (n=1)"
    res = json.loads((out / "grid.json").read_text())
    v = [x for x in res["tests"] if x["recipe"] == "ibp" and x["metric"] == "verified ibp @0.05"][0]
    assert v["diff"] == pytest.approx(21.0) and v["pairs"] == 2
    for k, d in (("PGD-20 @0.02 (200)", 5.5), ("AutoAttack @0.02 (200)", 6.5)):  # tested, on the same images
        assert [x["diff"] for x in res["tests"] if x["recipe"] == "nat" and x["metric"] == k] == [pytest.approx(d)]
    gap = [x for x in res["tests"] if x["recipe"] == "nat" and x["metric"] == "PGD-20 - AutoAttack @0.02 (200)"]
    assert [x["diff"] for x in gap] == [pytest.approx(-1.0)]  # PGD - AutoAttack: 2 (dsrna_cb) vs 3 (pcdarts)
    t = [x for x in res["tests"] if x["recipe"] == "nat" and x["metric"] == "clean" and x["baseline"] == "pcdarts"][0]
    assert t["diff"] == pytest.approx(5.5) and t["pairs"] == 2
    from scipy import stats as st
    assert t["welch_p"] == pytest.approx(st.ttest_ind([85, 88], [80, 82], equal_var=False).pvalue)
    assert t["paired_p"] == pytest.approx(st.ttest_rel([85, 88], [80, 82]).pvalue)
    assert t["welch_p_holm"] == t["welch_p"]  # a family of one (one DSRNA variant, one baseline)
    assert "| recipe | DSRNA | baseline | metric | diff | Welch p | Holm | paired p | n | seeds for 80% |" in text
    assert t["seeds_80"] == stats.seeds_for_power(5.5, *t["sd"], alpha=0.05 / 1)  # family of one: level 0.05
    assert t["sd"] == [pytest.approx(2.1213203), pytest.approx(1.4142136)]


def test_seeds_for_80_plans_at_holms_first_level_per_family():
    def t(metric, diff, sd, p):
        return {"recipe": "pbn", "dsrna": "dsrna_cb", "baseline": "darts", "metric": metric, "diff": diff,
                "sd": sd, "welch_p": p}
    tests = grid_report.seeds_for_80([t("clean", 2.0, [1.0, 1.0], 0.1), t("clean", 19.5, [7.7, 11.1], 0.07),
                                      t("clean", 1.0, [1.0, 1.0], None), t("PGD-20", 2.0, [1.0, 1.0], 0.1),
                                      t("PGD-20", 0.05, [1.0, 1.0], 0.9), t("PGD-20", 1.0, [1.0, 1.0], float("nan"))])
    got = [x["seeds_80"] for x in tests]
    # clean has two tests (m = 2: level 0.025), PGD-20 two as well; the None p gets no plan
    assert got[0] == stats.seeds_for_power(2.0, 1.0, 1.0, alpha=0.025) and got[0] > stats.seeds_for_power(2.0, 1.0, 1.0)
    assert got[1] == stats.seeds_for_power(19.5, 7.7, 11.1, alpha=0.025)
    assert got[2] is None and got[3] == got[0] and got[4] is None  # 0.05 sd apart: past 30
    assert got[5] is None  # a NaN p is no test and does not count in m (PGD-20 stays a family of two)


def test_tests_table_row_names_the_paired_count_when_fewer_seeds_are_common():
    t = {"recipe": "adv", "dsrna": "dsrna_cb", "baseline": "darts", "metric": "clean", "diff": 1.5,
         "welch_p": 0.2, "welch_p_holm": 0.4, "paired_p": 0.5, "n": [3, 2], "pairs": 1, "seeds_80": 7}
    assert grid_report.test_row(t) == "| adv | dsrna_cb | darts | clean | +1.5 | 0.2 | 0.4 | 0.5 | 3 vs 2 (1 paired) | 7 |"
    t.update(n=[3, 3], pairs=3, paired_p=0.0, no_spread=True, seeds_80=None)
    assert grid_report.test_row(t).endswith("| 0.2 | 0.4 | 0* | 3 vs 3 | >30 |")  # every seed paired: no note
    t.update(welch_p=float("nan"), welch_p_holm=None, diff=0.0)
    assert grid_report.test_row(t).endswith("| +0 | - | - | 0* | 3 vs 3 | - |")


def test_a_genotype_without_cells_has_no_parameter_free_count(out):
    found(out, "pcdarts", 0, CELL_A)
    found(out, "pcdarts", 1, {})  # a genotype file that lost its cells: no count, not zero ops
    rows = grid_report.searches()
    assert [r["param_free"] for r in rows] == [[1, 2], None]  # skip; two max pools
    assert grid_report.param_free_series(rows) == {"pcdarts": {0: 3.0}}
    assert list(grid_report.cell_convs(rows)) == [("pcdarts", 0)]


def test_holm_families_are_one_recipe_and_one_metric():
    def t(recipe, d, b, metric, p):
        return {"recipe": recipe, "dsrna": d, "baseline": b, "metric": metric, "welch_p": p}
    tests = [t("pbn", "dsrna_cb", "darts", "clean", 0.01), t("pbn", "dsrna_cb", "pcdarts", "clean", 0.04),
             t("pbn", "dsrna_jacobian", "darts", "clean", None), t("pbn", "dsrna_cb", "darts", "PGD-20", 0.02),
             t("adv", "dsrna_cb", "darts", "clean", 0.01), t("pbn", "dsrna_jacobian", "pcdarts", "clean", 0.03)]
    got = [x["welch_p_holm"] for x in grid_report.holm_by_family(tests)]
    # pbn/clean: 0.01, 0.03, 0.04 of m = 3 -> 0.03, 0.06, 0.06; None stays; the others are families of one
    assert got == [pytest.approx(0.03), pytest.approx(0.06), None, 0.02, 0.01, pytest.approx(0.06)]


def test_report_measures_retraining_noise_from_the_rebuilt_nets(out):
    found(out, "darts", 0, CELL_A)
    found(out, "pcdarts", 0, CELL_A)   # the same cell and seed: one net, both methods named
    found(out, "dsrna_cb", 1, CELL_B)

    def rebuilt(recipe: str, runs: tuple) -> None:
        for m, s, old, new in runs:
            gh = grid.genotype_hash(out / "search" / f"{m}_s{s}" / "genotype.json")
            tr = out / "net" / recipe / f"{gh}_s{s}" / "train"
            tr.mkdir(parents=True)
            (tr / "summary.json").write_text(json.dumps({"test_top1": new}))
            (tr / "rebuilt.json").write_text(json.dumps({"identical": False, "superseded": {"test_top1": old}}))

    rebuilt("nat", (("darts", 0, 90.0, 93.0), ("dsrna_cb", 1, 88.0, 87.0)))
    # a bit-identical rebuild (same CPU) is no noise sample
    ident = out / "net" / "adv" / f"{grid.genotype_hash(out / 'search' / 'darts_s0' / 'genotype.json')}_s0" / "train"
    ident.mkdir(parents=True)
    (ident / "summary.json").write_text(json.dumps({"test_top1": 80.0}))
    (ident / "rebuilt.json").write_text(json.dumps({"identical": True, "superseded": {"test_top1": 80.0}}))
    assert grid_report.main(["--out", str(out / "r.md")]) == 0
    text = (out / "r.md").read_text()
    gh_a = grid.genotype_hash(out / "search" / "darts_s0" / "genotype.json")
    assert f"| nat | `{gh_a}_s0` | darts, pcdarts | 90.00 | 93.00 | +3.00 |" in text
    noise = json.loads((out / "grid.json").read_text())["rebuild_noise"]
    assert sorted(r["diff"] for r in noise) == [-1.0, 3.0]
    # diffs +3, -1: mean +1, sd 2*sqrt(2) = 2.83, per retraining 2.00
    assert "n = 2 pairs: mean difference +1.00, mean |difference| 2.00, sd of the differences 2.83" in text
    assert "sd ~2.00 points" in text
    assert "recipe nat, n = 2" not in text  # one recipe: no per-recipe line repeating the pooled one
    # a second recipe's pairs get their own line (its noise is not the natural recipe's)
    rebuilt("pbn", (("darts", 0, 80.0, 80.5), ("dsrna_cb", 1, 77.0, 76.9)))
    assert grid_report.main(["--out", str(out / "r.md")]) == 0
    text = (out / "r.md").read_text()
    assert "\nn = 4 pairs: mean difference +0.60" in text
    assert "recipe nat, n = 2 pairs: mean difference +1.00, mean |difference| 2.00, sd of the differences 2.83" in text
    # pbn: +0.5, -0.1: mean +0.20, sd 0.6 / sqrt 2 = 0.42
    assert "recipe pbn, n = 2 pairs: mean difference +0.20, mean |difference| 0.30, sd of the differences 0.42" in text


def test_report_compares_precise_bn_with_the_same_nets_natural_runs(out):
    found(out, "darts", 0, CELL_A)
    found(out, "dsrna_cb", 1, CELL_B)
    curve = [{"epoch": 0, "train_loss": 0.5, "train_top1": 80.0}, {"epoch": 1, "train_loss": 0.3, "train_top1": 88.0}]
    nets = {}
    for m, s, nat, pbn, same in (("darts", 0, 84.0, 90.0, True), ("dsrna_cb", 1, 89.0, 90.0, False)):
        gh = grid.genotype_hash(out / "search" / f"{m}_s{s}" / "genotype.json")
        nets[m] = f"{gh}_s{s}"
        for recipe, top1 in (("nat", nat), ("pbn", pbn)):
            tr = out / "net" / recipe / f"{gh}_s{s}" / "train"
            tr.mkdir(parents=True)
            (tr / "summary.json").write_text(json.dumps({"test_top1": top1}))
            rows = [dict(r) for r in curve]
            if recipe == "pbn":
                rows[-1].update(val_top1_ema=70.5, val_top1=89.25)
                if not same:
                    rows[0]["train_loss"] = 0.5000001  # another CPU's rounding
            (tr / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a pbn net without its nat twin is left out
    lone = out / "net" / "pbn" / "0000000000_s2" / "train"
    lone.mkdir(parents=True)
    (lone / "summary.json").write_text(json.dumps({"test_top1": 50.0}))
    assert grid_report.main(["--out", str(out / "r.md")]) == 0
    text = (out / "r.md").read_text()
    assert f"| `{nets['darts']}` | darts | yes | 84.00 | 90.00 | +6.00 | 70.50 | 89.25 |" in text
    assert f"| `{nets['dsrna_cb']}` | dsrna_cb | no | 89.00 | 90.00 | +1.00 | 70.50 | 89.25 |" in text
    pbn = json.loads((out / "grid.json").read_text())["precise_bn"]
    assert sorted(r["diff"] for r in pbn) == [1.0, 6.0]
    # nat 84, 89 (sd 3.54); pbn 90, 90 (sd 0); differences +6, +1: paired t = 3.5 / (3.54 / sqrt 2) = 1.4
    assert ("n = 2 nets (1 with the same curve): test top-1 across nets 86.50 ± 3.54 (nat) and 90.00 ± 0.00 (pbn); "
            "pbn - nat +3.50 (range +1.00 to +6.00), paired t-test p = ") in text
    import scipy.stats as st
    p = st.ttest_rel([90.0, 90.0], [84.0, 89.0]).pvalue
    assert f"paired t-test p = {p:.3g}." in text
    # the paper's Table 2 form gives both natural test top-1 columns; only attacked nets get Tables 1 / 4 rows
    assert "| darts | 84.00 (n=1) | 90.00 (n=1) | - | 1.0 (n=1) | gradient |" in text
    assert "(natural training, precise BN)" not in text
    ev = out / "net" / "pbn" / nets["darts"] / "eval"
    ev.mkdir()
    (ev / "summary.json").write_text(json.dumps({"clean_acc": 91.0, "robust_acc": {"PGD-20": 2.5}}))
    assert grid_report.main(["--out", str(out / "r.md")]) == 0
    text = (out / "r.md").read_text()
    form = text[text.index("**Tables 1 / 4 form** (natural training, precise BN)"):]
    assert form.split("\n\n")[1].splitlines()[2] == "| darts | 91.00 (n=1) | - | 2.50 (n=1) | - | - | - |"


def test_radius_figure_shows_every_net_per_bound_and_refuses_an_empty_one(tmp_path):
    """One panel per untargeted l_inf mean-radius column, methods in the grid's order, every net's
    radius (zeros kept: they are drawn on a floor line, not dropped); nothing certified anywhere is
    an error, not an empty figure."""
    from dsrna_dist.plots import radius_strip

    per = {"dsrna_cb": [{"seed": 0, "radius crown-ibp l_inf (n=200)": 2e-4, "radius crown l_inf (n=5)": 7e-3,
                         "radius crown-ibp l_2 (n=200)": 4e-4, "radius crown-ibp l_inf random target (n=200)": 3e-4}],
           "darts": [{"seed": 0, "radius crown-ibp l_inf (n=200)": 0.0, "radius crown l_inf (n=5)": 4e-4},
                     {"seed": 1, "radius crown-ibp l_inf (n=200)": 1e-7}],
           "pcdarts": [{"seed": 0, "clean": 90.0}]}
    panels = grid_report.radius_panels(per)
    assert panels == {"crown-ibp l_inf (n=200)": {"darts": [0.0, 1e-7], "dsrna_cb": [2e-4]},
                      "crown l_inf (n=5)": {"darts": [4e-4], "dsrna_cb": [7e-3]}}
    assert list(panels["crown-ibp l_inf (n=200)"]) == [m for m in grid.METHODS if m in ("darts", "dsrna_cb")]
    assert radius_strip(panels, "t", tmp_path / "r.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no positive radius"):
        radius_strip({"b": {"darts": [0.0, 0.0]}}, "t", tmp_path / "z.png")
    assert not (tmp_path / "z.png").exists()


def test_report_figures_average_over_seeds_on_common_points(out):
    """The eps-sweep and max-softmax figures: mean and sample std over seeds, only on the eps
    values every seed has, curves cut to the shortest search, RobNet-like runs (no criterion)
    left out; the files are written and linked from the report."""
    import math

    import numpy as np

    found(out, "pcdarts", 0, CELL_A)
    found(out, "pcdarts", 1, CELL_A)
    sweeps = {0: {0.0: 90.0, 0.02: 40.0, 0.05: 4.0}, 1: {0.0: 92.0, 0.02: 30.0}}
    for s, sw in sweeps.items():
        gh = grid.genotype_hash(out / "search" / f"pcdarts_s{s}" / "genotype.json")
        ev = out / "net" / "nat" / f"{gh}_s{s}" / "eval"
        ev.mkdir(parents=True)
        (ev / "summary.json").write_text(json.dumps({"clean_acc": sw[0.0], "eps_sweep": [
            {"attack": "PGD-20", "eps": e, "norm": "inf", "robust_acc": a} for e, a in sw.items()]}))
    a0 = {0: [[0.0] * 8] * 2, 1: [[2.0] + [0.0] * 7] * 2}  # epoch-1 alphas per seed (2 edges)
    for s in (0, 1):
        recs = [{"epoch": e, "alphas_normal": a0[s], "alphas_reduce": a0[s]} for e in range(3 - s)]
        (out / "search" / f"pcdarts_s{s}" / "alphas.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = grid_report.searches()
    eps, mean, std = grid_report.sweep_series("nat", rows)["pcdarts (n=2)"]
    assert eps == [0.0, 0.02] and mean == pytest.approx([91.0, 35.0])
    assert std == pytest.approx([np.std([90, 92], ddof=1), np.std([40, 30], ddof=1)])
    x, m, sd = grid_report.max_softmax_series(rows)["pcdarts (n=2)"]
    top = math.exp(2) / (math.exp(2) + 7)
    assert x == [1, 2] and m == pytest.approx([(0.125 + top) / 2] * 2)
    assert sd[0] == pytest.approx(np.std([0.125, top], ddof=1))
    assert grid_report.main(["--out", str(out / "r.md")]) == 0
    text = (out / "r.md").read_text()
    assert "(max_softmax.png)" in text and "(eps_sweep_nat.png)" in text and "eps_sweep_adv" not in text
    assert (out / "max_softmax.png").stat().st_size > 0 and (out / "eps_sweep_nat.png").exists()


def test_certified_vs_pgd_check_counts_violations(tmp_path):
    """bench/check_certified_vs_pgd.py: certified = radius >= eps (l_inf only), a violation = a
    certified example the attack broke; exit 1 on any violation."""
    import check_certified_vs_pgd as chk

    att = [{"index": i, "attack": "PGD-20", "correct": c} for i, c in enumerate([True, True, False, False])]
    cert = [{"index": 0, "method": "ibp", "norm": "inf", "radius": 0.06},
            {"index": 1, "method": "ibp", "norm": "inf", "radius": 0.01},
            {"index": 2, "method": "ibp", "norm": "2", "radius": 0.9},      # l_2: not counted
            {"index": 0, "method": "crown-ibp", "norm": "inf", "radius": 0.05},
            {"index": 3, "method": "crown-ibp", "norm": "inf", "radius": 0.05}]
    (tmp_path / "attacks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in att))
    (tmp_path / "certify.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cert))
    res = chk.check(tmp_path, 0.05)
    assert res["ibp"] == {"records": 2, "certified": 1, "violations": 0, "attacked": 4}
    assert res["crown-ibp"] == {"records": 2, "certified": 2, "violations": 1, "attacked": 4}
    assert chk.main([str(tmp_path), "0.05"]) == 1
    assert chk.main([str(tmp_path), "0.06"]) == 0
    # nothing to check is an error (exit 2), not a pass
    assert chk.main([str(tmp_path), "0.05", "--attack", "PGD-100"]) == 2
    assert chk.main([str(tmp_path / "missing"), "0.05"]) == 2
    (tmp_path / "certify.jsonl").write_text(json.dumps(cert[2]) + "\n")  # l_2 only
    assert chk.main([str(tmp_path), "0.05"]) == 2


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_grid_searches_keep_the_recorded_config(out):
    """Every grid search, finished or still to run, runs one config per method: the config the
    grid plans now (the method's yaml, its extra arguments, the pinned arch schedule) equals, field
    by field, what each of the grid's finished searches recorded (results/grid/search/*/config.yaml),
    except run.* and fields added to the code after the record. A yaml edited for users (e.g.
    DARTS+'s min_epochs, the arch schedule) must come with a pin in bench/grid.py."""
    import dataclasses

    import yaml

    from dsrna_dist.config import SearchConfig, load_config

    records = sorted((ROOT / "results" / "grid" / "search").glob("*_s*/config.yaml"))
    assert len(records) >= 12
    compared = set()
    for t in grid.tasks(list(grid.METHODS), sorted({int(p.parent.name.rsplit("_s", 1)[1]) for p in records}),
                        ["search"], 1):
        argv = t.argv[t.argv.index("dsrna_dist.search") + 1:]
        path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
        over = {a[2:].split("=", 1)[0]: yaml.safe_load(a.split("=", 1)[1]) for a in argv
                if a.startswith("--") and not a.startswith(("--config=", "--run."))}
        cfg = load_config(SearchConfig, str(ROOT / path), over)
        method = t.info["method"]
        assert cfg.arch_optim.schedule == "cosine" and cfg.arch_optim.lr == grid.SEARCH_ARCH_LR[method], method
        rec_path = ROOT / "results" / "grid" / "search" / f"{method}_s{t.info['seed']}" / "config.yaml"
        if not rec_path.exists():
            continue
        planned = _flat(json.loads(json.dumps(dataclasses.asdict(cfg))))
        recorded = _flat(yaml.safe_load(rec_path.read_text()))
        diff = {k: (v, planned.get(k)) for k, v in recorded.items() if not k.startswith("run.") and planned.get(k) != v}
        assert not diff, f"{rec_path.parent.name}: recorded vs planned {diff}"
        compared.add(method)
    assert {"darts", "pcdarts", "dsrna_jacobian", "dsrna_cb", "dartsplus"} <= compared


def test_search_table_shows_the_largest_epoch_grad_share(out):
    """The last epoch's share alone would hide a first arch epoch the metric swamped."""
    from torch.utils.tensorboard import SummaryWriter

    found(out, "dsrna_cb", 0, CELL_B)
    found(out, "pcdarts", 0, CELL_A)  # no TensorBoard record: '-'
    d = out / "search" / "dsrna_cb_s0"
    s = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**s, "last_epoch_means": {"grad_share": 0.06}}))
    with SummaryWriter(str(d / "tb")) as w:
        for epoch, v in enumerate([930000.0, 0.13, 0.06]):
            w.add_scalar("epoch/grad_share", v, epoch)
            w.add_scalar("step/grad_share", 5e6, epoch)  # another tag: not read
    assert grid_report.epoch_max(d, "grad_share") == pytest.approx(930000.0)
    assert grid_report.epoch_max(d, "nothing") is None
    # alphas.jsonl's per-epoch means (committed) come first
    pc = out / "search" / "pcdarts_s0"
    (pc / "alphas.jsonl").write_text("".join(json.dumps({"epoch": e, "means": {"grad_share": v}}) + "\n"
                                             for e, v in enumerate([0.2, 0.7, 0.5])))
    assert grid_report.epoch_max(pc, "grad_share") == pytest.approx(0.7)
    (d / "alphas.jsonl").write_text('{"epoch": 0, "mea\n{"epoch": 1, "means": {"grad_share": 0.1}}\n')  # damaged
    assert grid_report.epoch_max(d, "grad_share") == pytest.approx(930000.0)  # TensorBoard's, no crash
    (d / "alphas.jsonl").unlink()
    (pc / "alphas.jsonl").unlink()
    assert grid_report.main(["--out", str(out / "r.md")]) == 0
    text = (out / "r.md").read_text()
    head = next(ln for ln in text.splitlines() if ln.startswith("| method | seed |")).split(" | ")
    cb = next(ln for ln in text.splitlines() if ln.startswith("| dsrna_cb | 0 |")).split(" | ")
    pc = next(ln for ln in text.splitlines() if ln.startswith("| pcdarts | 0 |")).split(" | ")
    assert cb[head.index("grad_share")] == "0.06" and cb[head.index("max grad_share")] == "9.3e+05"
    assert pc[head.index("max grad_share")] == "-"


def test_radius_against_convolutions_counts_each_net_once_and_matches_scipy():
    from scipy import stats as st
    # (method, seed) -> (cell hash, parameter-free ops of 12); darts and pcdarts found one cell with seed 0
    cells = {("darts", 0): ("aa", 4), ("pcdarts", 0): ("aa", 4), ("darts", 1): ("bb", 6),
             ("dsrna_cb", 0): ("cc", 11), ("dsrna_cb", 1): ("dd", 9), ("pcdarts", 1): ("ee", 7)}
    srows = [{"method": m, "seed": s, "ghash": g, "param_free": [pf, 0]} for (m, s), (g, pf) in cells.items()]
    radius = {("darts", 0): 0.0, ("pcdarts", 0): 0.0, ("darts", 1): 0.0, ("dsrna_cb", 0): 2e-4,
              ("dsrna_cb", 1): 1e-6, ("pcdarts", 1): 3e-8}
    key = "radius crown-ibp l_inf (n=200)"
    data = {"pbn": {}}
    for (m, s), v in radius.items():
        data["pbn"].setdefault(m, []).append({"seed": s, key: v, f"{key[:-8]}random target (n=200)": 1.0})
    rows = grid_report.radius_vs_convs(data, srows)
    assert [r["radius"] for r in rows] == [key]  # the random-target twin is not read
    r = rows[0]
    assert r["n"] == 5  # the shared cell once
    convs = [8, 6, 1, 3, 5]
    radii = [0.0, 0.0, 2e-4, 1e-6, 3e-8]
    want = st.spearmanr(convs, radii)
    assert r["spearman_r"] == pytest.approx(want.statistic) and r["p"] == pytest.approx(want.pvalue)
    assert r["certifying_by_convs"] == {1: [1, 1], 3: [1, 1], 5: [1, 1], 6: [0, 1], 8: [0, 1]}


def test_log_radius_tests_use_logs_skip_uncertified_nets_and_match_scipy():
    from scipy import stats as st
    key = "radius crown l_inf (n=5)"
    cb, darts, pc = [6.9e-3, 5.6e-3, 1.0e-3], [4.4e-4, 7.1e-5, 6.4e-5], [3.1e-4, 0.0, 3.3e-4]
    left = "radius crown l_inf margin left (median, unbracketed)"  # resolution, not a radius: not tested
    data = {"pbn": {"dsrna_cb": [{"seed": s, key: v, left: 0.5} for s, v in enumerate(cb)],
                    "darts": [{"seed": s, key: v, left: 0.1} for s, v in enumerate(darts)],
                    "pcdarts": [{"seed": s, key: v} for s, v in enumerate(pc)]}}
    rows = grid_report.log_radius_tests(data)
    # pcdarts has a net certifying nothing (no log): only dsrna_cb against darts
    assert [(r["dsrna"], r["baseline"], r["radius"]) for r in rows] == [("dsrna_cb", "darts", key)]
    r = rows[0]
    la, lb = [math.log10(v) for v in cb], [math.log10(v) for v in darts]
    assert r["welch_p_log"] == pytest.approx(st.ttest_ind(la, lb, equal_var=False).pvalue)
    geo = math.prod(cb) ** (1 / 3) / math.prod(darts) ** (1 / 3)
    assert r["ratio"] == pytest.approx(geo)
    assert r["mann_whitney_p"] == pytest.approx(0.1)  # complete separation, 3 against 3
    assert r["welch_p_log_holm"] == pytest.approx(r["welch_p_log"])  # a family of one
    lines = "\n".join(grid_report.log_radius_lines(rows))
    assert f"| pbn | crown l_inf (n=5) | dsrna_cb | darts | {geo:.3g}x | {r['welch_p_log']:.2g} | " \
           f"{r['welch_p_log']:.2g} |" in lines
    assert grid_report.log_radius_lines([]) == []
    # a second certifying baseline and a second recipe: Holm within one recipe's one radius only
    sd = [2.0e-4, 1.5e-4, 2.7e-4]
    data["pbn"]["sdarts_adv"] = [{"seed": s, key: v} for s, v in enumerate(sd)]
    data["adv"] = {"dsrna_cb": [{"seed": s, key: 10 * v} for s, v in enumerate(cb)],
                   "darts": [{"seed": s, key: v} for s, v in enumerate(darts)]}
    rows = {(r["recipe"], r["baseline"]): r for r in grid_report.log_radius_tests(data)}
    p_d = st.ttest_ind(la, lb, equal_var=False).pvalue
    p_s = st.ttest_ind(la, [math.log10(v) for v in sd], equal_var=False).pvalue
    lo, hi = sorted([p_d, p_s])
    holm = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), min(1, hi))}
    assert rows[("pbn", "darts")]["welch_p_log_holm"] == pytest.approx(holm[p_d])
    assert rows[("pbn", "sdarts_adv")]["welch_p_log_holm"] == pytest.approx(holm[p_s])
    adv = rows[("adv", "darts")]
    assert adv["welch_p_log_holm"] == pytest.approx(adv["welch_p_log"])  # its own family of one


def test_radius_against_robustness_counts_each_net_once_and_matches_scipy():
    from scipy import stats as st
    cells = {("darts", 0): ("aa", 4), ("pcdarts", 0): ("aa", 4), ("darts", 1): ("bb", 6),
             ("dsrna_cb", 0): ("cc", 11), ("dsrna_cb", 1): ("dd", 9), ("robnet", 0): ("ee", 7)}
    srows = [{"method": m, "seed": s, "ghash": g, "param_free": [pf, 0]} for (m, s), (g, pf) in cells.items()]
    key, aa = "radius crown l_inf (n=5)", "AutoAttack @0.02 (200)"
    vals = {("darts", 0): (4e-4, 30.0), ("pcdarts", 0): (4e-4, 30.0), ("darts", 1): (7e-5, 20.0),
            ("dsrna_cb", 0): (6.9e-3, 50.0), ("dsrna_cb", 1): (5.6e-3, 38.0), ("robnet", 0): (1.3e-3, 12.0)}
    data = {"pbn": {}}
    for (m, s), (rad, acc) in vals.items():
        row = {"seed": s, key: rad, "clean": 90.0 - s}
        if m != "darts" or s != 1:  # one net without AutoAttack: absent from that row only
            row[aa] = acc
        data["pbn"].setdefault(m, []).append(row)
    rows = {r["metric"]: r for r in grid_report.radius_vs_robustness(data, srows)}
    assert set(rows) == {"clean", aa} and all(r["radius"] == key for r in rows.values())
    r = rows[aa]
    assert r["n"] == 4  # the cell darts and pcdarts share with seed 0 once; darts seed 1 has no AutoAttack
    radii, accs = [4e-4, 6.9e-3, 5.6e-3, 1.3e-3], [30.0, 50.0, 38.0, 12.0]
    want = st.spearmanr(radii, accs)
    assert r["spearman_r"] == pytest.approx(want.statistic) and r["p"] == pytest.approx(want.pvalue)
    assert rows["clean"]["n"] == 5
    text = "\n".join(grid_report.radius_robustness_lines(list(rows.values())))
    assert f"| pbn | crown l_inf (n=5) | {aa} | 4 | {r['spearman_r']:+.2f} | {r['p']:.2g} |" in text
    assert grid_report.radius_robustness_lines([]) == []


def test_metrics_against_convolutions_count_each_net_once_and_match_scipy():
    from scipy import stats as st
    cells = {("darts", 0): ("aa", 4), ("pcdarts", 0): ("aa", 4), ("darts", 1): ("bb", 6),
             ("dsrna_cb", 0): ("cc", 11), ("dsrna_cb", 1): ("dd", 9), ("pcdarts", 1): ("ee", 7)}
    srows = [{"method": m, "seed": s, "ghash": g, "param_free": [pf, 0]} for (m, s), (g, pf) in cells.items()]
    clean = {("darts", 0): 81.0, ("pcdarts", 0): 81.0, ("darts", 1): 80.0, ("dsrna_cb", 0): 76.0,
             ("dsrna_cb", 1): 77.5, ("pcdarts", 1): 79.0}
    params = {("darts", 0): 30.0, ("pcdarts", 0): 30.0, ("darts", 1): 28.0, ("dsrna_cb", 0): 14.0,
              ("dsrna_cb", 1): 16.0, ("pcdarts", 1): 41.0}
    data = {"adv": {}}
    for (m, s), v in clean.items():
        row = {"seed": s, "clean": v, "params (k)": params[(m, s)], "radius crown-ibp l_inf (n=200)": 0.0}
        if m != "darts":
            row["AutoAttack @0.1 (200)"] = v - 15
        data["adv"].setdefault(m, []).append(row)
    rows = grid_report.metrics_vs_convs(data, srows)
    assert [r["metric"] for r in rows] == ["clean", "AutoAttack @0.1 (200)"]  # radii are not accuracy
    r = rows[0]
    assert r["n"] == 5  # the cell darts and pcdarts share with seed 0 counts once
    convs, vals, ps = [8, 6, 1, 3, 5], [81.0, 80.0, 76.0, 77.5, 79.0], [30.0, 28.0, 14.0, 16.0, 41.0]
    assert r["r_convs"] == pytest.approx(st.spearmanr(convs, vals).statistic)
    assert r["p_convs"] == pytest.approx(st.spearmanr(convs, vals).pvalue)
    assert r["r_params"] == pytest.approx(st.spearmanr(ps, vals).statistic)
    aa = rows[1]
    assert aa["n"] == 4  # darts has no AutoAttack: its seed-1 net is absent, seed 0's comes from pcdarts
    text = "\n".join(grid_report.metric_conv_lines(rows))
    assert f"| adv | clean | 5 | {r['r_convs']:+.2f} | {r['p_convs']:.2g} | {r['r_params']:+.2f} |" in text
