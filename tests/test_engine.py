"""Engine: process group + Accelerator setup, checkpoints/resume, gather, sync, launch scripts.

The multi-process tests start REAL ranks (torchrun / accelerate launch subprocesses running
``dsrna_dist.engine.selftest``, or ``accelerate.debug_launcher``) and assert world_size == 2
plus cross-rank facts; a run that merely exits 0 would prove nothing.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dsrna_dist.config import ConfigError, SearchConfig, TrainConfig, replace, to_dict
from dsrna_dist.engine import (CheckpointError, CheckpointManager, TBWriter, all_reduce_mean_,
                               assert_identical_across_ranks, broadcast_parameters, capture_rng,
                               compare_configs, gather_objects, load_checkpoint, restore_rng,
                               shard_indices)
from dsrna_dist.engine import selftest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def _results(out_dir: Path, name: str = "selftest") -> list[dict]:
    files = sorted((out_dir / name).glob("result_rank*.json"))
    return [json.loads(f.read_text()) for f in files]


def _selftest_inprocess(out_dir: Path, **kw) -> dict:
    args = [f"--run.out_dir={out_dir}"] + [f"--{k}={v}" for k, v in kw.items()]
    assert selftest.cli(args) == 0
    return _results(out_dir)[0]


# --------------------------------------------------------------------------- sharding / gather
@pytest.mark.parametrize("n", [0, 1, 7, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_indices_exact_cover(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))  # every index once, none padded or repeated
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_shard_indices_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard_indices(10, 2, 2)


def test_gather_objects_single_process_sorts_and_dedups():
    recs = [{"index": 3, "v": "c"}, {"index": 1, "v": "a"}, {"index": 3, "v": "dup"}, {"index": 2, "v": "b"}]
    assert [r["v"] for r in gather_objects(recs)] == ["a", "b", "c"]
    plain = [5, 1, 3]
    assert gather_objects(plain) == plain  # no index key: identity at world size 1


# --------------------------------------------------------------------------- config comparison
def test_compare_configs_classifies_keys():
    base = to_dict(SearchConfig())
    changed = to_dict(replace(SearchConfig(), **{"model.layers": 5, "run.progress": False,
                                                 "epochs": 99, "optim.lr": 0.5}))
    errors, warnings = compare_configs(base, changed)
    assert [e[0] for e in errors] == ["model.layers"]
    assert [w[0] for w in warnings] == ["optim.lr"]  # run.progress / epochs are harmless
    errors, _ = compare_configs(base, changed, strict=True)
    assert {e[0] for e in errors} == {"model.layers", "optim.lr"}
    errors, warnings = compare_configs(base, changed, structural=(), harmless=("*",))
    assert errors == [] and warnings == []


def test_load_refuses_structural_mismatch_naming_key(tmp_path, caplog):
    cfg = TrainConfig()
    mgr = CheckpointManager(tmp_path, is_main=True)
    mgr.save({"model": {"w": torch.ones(2)}, "config": to_dict(cfg)})
    with pytest.raises(CheckpointError) as ei:
        mgr.load(mgr.latest(), replace(cfg, **{"model.init_channels": 16}))
    msg = str(ei.value)
    assert "model.init_channels" in msg and str(mgr.last_path) in msg
    with pytest.raises(CheckpointError, match="data.name"):
        mgr.load(mgr.latest(), replace(cfg, **{"data.name": "cifar10"}))
    # harmless change: silent; other change: loads with a warning naming the key
    mgr.load(mgr.latest(), replace(cfg, **{"run.progress": False, "epochs": 1}))
    with caplog.at_level(logging.WARNING, logger="dsrna_dist"):
        st = mgr.load(mgr.latest(), replace(cfg, **{"optim.lr": 0.5}))
    assert torch.equal(st["model"]["w"], torch.ones(2))
    assert "optim.lr" in caplog.text
    # the structural list is a parameter
    mgr.load(mgr.latest(), replace(cfg, **{"model.init_channels": 16}), structural=(), harmless=("model.*",))


# --------------------------------------------------------------------------- checkpoint files
def test_corrupt_checkpoint_names_file_and_touches_nothing(tmp_path):
    mgr = CheckpointManager(tmp_path, is_main=True)
    mgr.save({"model": {"w": torch.randn(1000)}, "config": {"a": 1}}, is_best=True)
    best_before = mgr.best_path.read_bytes()
    data = mgr.last_path.read_bytes()
    mgr.last_path.write_bytes(data[: len(data) // 2])  # truncated, as if killed mid-copy
    truncated = mgr.last_path.read_bytes()
    with pytest.raises(CheckpointError) as ei:
        mgr.load(mgr.latest())
    assert str(mgr.last_path) in str(ei.value)
    assert mgr.best_path.read_bytes() == best_before and mgr.last_path.read_bytes() == truncated
    assert sorted(p.name for p in mgr.dir.iterdir()) == ["best.pt", "last.pt"]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_refuses_unsafe_state_and_keeps_previous(tmp_path):
    mgr = CheckpointManager(tmp_path, is_main=True)
    mgr.save({"step": 1})
    before = mgr.last_path.read_bytes()
    with pytest.raises(CheckpointError, match="weights_only"):
        mgr.save({"step": 2, "arr": np.zeros(3)})  # numpy arrays are not weights_only-loadable
    assert mgr.last_path.read_bytes() == before
    assert not [p for p in mgr.dir.iterdir() if p.name.endswith(".tmp")]
    assert CheckpointManager(tmp_path, is_main=False).save({"step": 3}) is None
    assert mgr.last_path.read_bytes() == before


def test_rng_capture_restore_roundtrip():
    import random

    state = capture_rng()
    buf = io.BytesIO()
    torch.save(state, buf)  # must survive weights_only loading
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    a = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng(state)
    b = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert a == b


def test_set_deterministic_toggles_and_the_default_skips_torch_inductor():
    """Turning it off when it is already off costs no torch._inductor import (~3 s per evaluate
    process, where no optimizer pulls in torch._dynamo anyway); toggling still works both ways."""
    from dsrna_dist.engine.seeding import set_deterministic

    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    code = ("import sys, torch; from dsrna_dist.engine.seeding import set_deterministic; "
            "set_deterministic(False); print(sorted(m for m in sys.modules if m.startswith('torch._inductor')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# --------------------------------------------------------------------------- run_stage in process
def test_resume_is_bit_identical_and_needs_rng(tmp_path):
    ref = _selftest_inprocess(tmp_path / "ref", steps=6, ckpt_every=2)
    part = tmp_path / "part"
    first = _selftest_inprocess(part, steps=4, ckpt_every=2)
    assert first["start_step"] == 0
    res = _selftest_inprocess(part, steps=6, ckpt_every=2)  # `steps` differs: warned, allowed
    assert res["start_step"] == 4
    assert res["param_sha"] == ref["param_sha"]
    assert res["losses"] == ref["losses"][4:]
    # the same resume without the RNG states continues differently (dropout + data draws)
    norng = tmp_path / "norng"
    shutil.copytree(part, norng)
    ck = norng / "selftest" / "checkpoints" / "last.pt"
    st = torch.load(ck, weights_only=True)
    st["step"], st["rng"] = 4, {"world_size": 1, "ranks": [capture_rng()["ranks"][0]]}
    torch.manual_seed(12345)
    st["rng"]["ranks"][0]["torch"] = torch.get_rng_state()
    torch.save(st, ck)
    other = _selftest_inprocess(norng, steps=6, ckpt_every=0)
    assert other["start_step"] == 4 and other["param_sha"] != ref["param_sha"]


def test_run_stage_error_policy(tmp_path, capsys):
    # a user error: exactly one line "error: ...", exit 2
    with pytest.raises(SystemExit) as ei:
        selftest.cli([f"--run.out_dir={tmp_path}", "--fail_rank=0", "--fail_step=1",
                      "--fail_mode=user_error"])
    assert ei.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err == ["error: selftest: injected user error on rank 0"]
    # a bug: traceback plus a final one-line summary, exit 1
    with pytest.raises(SystemExit) as ei:
        selftest.cli([f"--run.out_dir={tmp_path}", "--run.name=bug", "--fail_rank=0", "--fail_step=1"])
    assert ei.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" in err[0] and err[-1] == ("error: RuntimeError: selftest: injected failure "
                                                 "on rank 0 at step 1")
    # a corrupt checkpoint met on resume: one line naming the file, exit 2
    ck = tmp_path / "bug" / "checkpoints" / "last.pt"
    ck.write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit) as ei:
        selftest.cli([f"--run.out_dir={tmp_path}", "--run.name=bug"])
    assert ei.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: checkpoint ") and str(ck) in err[0]


def test_nccl_on_cpu_is_a_config_error():
    from dsrna_dist.engine.procgroup import resolve_backend

    assert resolve_backend("auto", cuda=False) == "gloo"
    assert resolve_backend("auto", cuda=True) == "nccl"
    with pytest.raises(ConfigError, match="dist.backend"):
        resolve_backend("nccl", cuda=False)


# --------------------------------------------------------------------------- TensorBoard
def test_accelerate_launch_dynamo_config_does_not_compile_behind_dist_compile(monkeypatch):
    """`accelerate launch` exports ACCELERATE_DYNAMO_BACKEND from its config; a plain
    Accelerator() would then compile the model whatever dist.compile says."""
    from accelerate.state import AcceleratorState

    from dsrna_dist.config import DistConfig
    from dsrna_dist.engine.runtime import build_accelerator

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    try:
        assert str(build_accelerator(DistConfig()).state.dynamo_plugin.backend).endswith("NO")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_tbwriter_roundtrip(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TBWriter(tmp_path / "tb")
    tb.scalar("loss", torch.tensor(0.5), 3)
    tb.scalars({"a": 1.0, "b": 2}, 4, prefix="m/")
    tb.image("img_chw", torch.rand(3, 8, 8), 1)
    tb.image("img_hwc", np.zeros((8, 8, 3), dtype=np.uint8), 1)
    tb.text("note", "hello", 0)
    before = set(plt.get_fignums())  # figures other tests left open are not this test's business
    fig = plt.figure()
    plt.plot([0, 1], [1, 0])
    tb.figure("fig", fig, 2)
    tb.close()
    assert set(plt.get_fignums()) == before
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(3, 0.5)]
    assert ea.Scalars("m/b")[0].value == 2.0
    assert {"img_chw", "img_hwc", "fig"} <= set(ea.Tags()["images"])
    assert "note/text_summary" in ea.Tags()["tensors"]
    off = TBWriter(tmp_path / "off", active=False)
    off.scalar("x", 1.0, 0)
    off.close()
    assert not (tmp_path / "off").exists()


# --------------------------------------------------------------------------- launch files
@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*") if p.suffix in (".sh", ".sbatch")))
def test_launch_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_launch_scripts_require_module():
    for s in ("torchrun_single_node.sh", "torchrun_multi_node.sh"):
        r = subprocess.run(["bash", str(LAUNCH / s)], capture_output=True, text=True)
        assert r.returncode == 2 and "usage" in r.stderr


@pytest.mark.parametrize("name", ["cpu_2proc", "single_node_multi_gpu", "multi_node"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / "accelerate" / f"{name}.yaml"))
    assert str(cfg.distributed_type).endswith("MULTI_GPU")
    assert cfg.num_processes >= 2 and cfg.dynamo_config.get("dynamo_backend") == "NO"


# --------------------------------------------------------------------------- real 2-rank runs
def _check_ddp_results(res: list[dict]) -> None:
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["world_size"] == 2 for r in res)
    assert all(r["identical"] for r in res)  # assert_identical_across_ranks, bitwise
    assert res[0]["param_sha"] == res[1]["param_sha"]
    # ranks saw different data, so identical parameters really come from gradient averaging
    assert res[0]["first_batch_sha"] != res[1]["first_batch_sha"]
    assert res[0]["losses"] != res[1]["losses"]


@pytest.mark.dist
def test_torchrun_two_ranks_ddp(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dsrna_dist.engine.selftest", f"--run.out_dir={tmp_path}", "--steps=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _check_ddp_results(_results(tmp_path))


@pytest.mark.dist
def test_accelerate_launch_two_ranks_ddp(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(LAUNCH / "accelerate" / "cpu_2proc.yaml"), "-m", "dsrna_dist.engine.selftest",
           f"--run.out_dir={tmp_path}", "--steps=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _check_ddp_results(_results(tmp_path))


@pytest.mark.dist
def test_one_rank_raising_fails_the_launch_fast(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dsrna_dist.engine.selftest", f"--run.out_dir={tmp_path}", "--steps=6",
           "--fail_rank=1", "--fail_step=2", "--dist.timeout_s=600"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=180)
    ended = time.time()
    assert r.returncode != 0
    failed_at = float((tmp_path / "selftest" / "failed_at.txt").read_text())
    assert ended - failed_at < 15, "the peer hung instead of being stopped"  # timeout was 600 s
    assert "error (rank 1): RuntimeError: selftest: injected failure on rank 1 at step 2" in r.stderr
    assert not _results(tmp_path)


def _debug_worker() -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    # exact uneven gather: 101 records, each once, in original order
    recs = [{"index": i, "rank": rank} for i in shard_indices(101, rank, world)]
    out = gather_objects(recs)
    assert [r["index"] for r in out] == list(range(101))
    assert {r["rank"] for r in out} == {0, 1}
    # padded duplicates (as FFCV distributed loaders produce) are dropped
    pad = recs + ([{"index": 0, "rank": rank}] if rank == 1 else [])
    assert [r["index"] for r in gather_objects(pad)] == list(range(101))
    # broadcast / mean all-reduce / identity check
    p = torch.full((3,), float(rank + 1))
    assert not assert_identical_across_ranks([p])
    broadcast_parameters([p])
    assert torch.equal(p, torch.ones(3)) and assert_identical_across_ranks([p])
    g = [torch.full((2, 2), float(rank)), None, torch.tensor([2.0 * rank], dtype=torch.float64)]
    all_reduce_mean_(g)
    assert torch.equal(g[0], torch.full((2, 2), 0.5)) and g[2].item() == 1.0
    # capture_rng gathers every rank's distinct state
    torch.manual_seed(100 + rank)
    st = capture_rng()
    assert st["world_size"] == 2 and not torch.equal(st["ranks"][0]["torch"], st["ranks"][1]["torch"])
    a = torch.rand(4)
    restore_rng(st)
    assert torch.equal(torch.rand(4), a)


@pytest.mark.dist
def test_debug_launcher_gather_and_sync():
    from accelerate import debug_launcher

    debug_launcher(_debug_worker, num_processes=2)


# --------------------------------------------------------------------------- slow end-to-end
@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_restart_resumes_bit_exact(tmp_path):
    """--max-restarts 1, rank 1 SIGKILLs itself once: the relaunch resumes from last.pt and
    ends with exactly the parameters of an uninterrupted run."""
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ref = subprocess.run(base + ["-m", "dsrna_dist.engine.selftest", f"--run.out_dir={tmp_path / 'ref'}"],
                         capture_output=True, text=True, env=_env(), timeout=240)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = base + ["--max-restarts", "1", "-m", "dsrna_dist.engine.selftest",
                  f"--run.out_dir={tmp_path / 'rs'}", "--fail_rank=1", "--fail_step=3",
                  "--fail_mode=kill", f"--fail_once_marker={tmp_path / 'marker'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "marker").exists()  # the kill happened
    res, want = _results(tmp_path / "rs"), _results(tmp_path / "ref")
    _check_ddp_results(want)
    assert all(x["restart_count"] == 1 and x["start_step"] == 2 for x in res)
    assert [x["param_sha"] for x in res] == [x["param_sha"] for x in want]


@pytest.mark.slow
@pytest.mark.dist
def test_multi_node_script_two_local_nodes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(["bash", str(LAUNCH / "torchrun_multi_node.sh"), "dsrna_dist.engine.selftest",
                               f"--run.out_dir={tmp_path}", "--steps=3"],
                              env=_env(NNODES="2", NODE_RANK=str(n), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), NPROC_PER_NODE="1", RDZV_ID="t",
                                       PYTHON=sys.executable),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    _check_ddp_results(_results(tmp_path))


@pytest.mark.slow
@pytest.mark.dist
def test_slurm_train_sbatch_with_fake_srun(tmp_path):
    """Run the sbatch script itself, with `srun`/`scontrol` shims for one 2-process node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nshift\nSLURM_NODEID=0 exec \"$@\"\n")  # drop --kill-on-bad-exit
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_NUM_NODES="1", NPROC_PER_NODE="2", MAX_RESTARTS="0",
               MODULE="dsrna_dist.engine.selftest", PYTHON=sys.executable)
    r = subprocess.run(["bash", str(LAUNCH / "slurm_train.sbatch"), f"--run.out_dir={tmp_path}", "--steps=3"],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _check_ddp_results(_results(tmp_path))


def test_incompatible_resume_overwrites_nothing(tmp_path, capsys):
    """A structural mismatch on resume is refused before config.yaml or checkpoints change."""
    from dsrna_dist.engine.checkpoint import STRUCTURAL_KEYS

    assert selftest.cli([f"--run.out_dir={tmp_path}", "--steps=2"]) == 0
    run = tmp_path / "selftest"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tb" not in p.parts}
    # make `width` structural for this check through a config whose model key differs:
    cfg_yaml = yaml.safe_load((run / "config.yaml").read_text())
    cfg_yaml["model"] = {"layers": 8}  # pretend the saved run had a model section
    (run / "config.yaml").write_text(yaml.safe_dump(cfg_yaml))
    before[run / "config.yaml"] = (run / "config.yaml").read_bytes()
    assert any(k.startswith("model.") for k in STRUCTURAL_KEYS)
    with pytest.raises(SystemExit) as ei:
        selftest.cli([f"--run.out_dir={tmp_path}", "--steps=4"])
    assert ei.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "model.layers" in err[0] and "config.yaml" in err[0]
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "tb" not in p.parts}
    assert after == before
