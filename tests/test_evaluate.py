"""Evaluation stage: per-example records equal a direct computation, summary aggregates them,
interrupted runs resume, bad checkpoints are refused before anything is written, 2 ranks give
the same records as 1, and certified radii never exceed what an attack finds."""
import json
import math
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dsrna_dist.attacks import build_attack
from dsrna_dist.attacks.certify import certify_batch, min_adversarial_eps, random_targets
from dsrna_dist.config import AttackConfig, EvalConfig, TrainConfig, load_config, to_dict
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

DATA = {"name": "synthetic", "synthetic_shape": [1, 16, 16], "synthetic_classes": 4,
        "synthetic_size": 256, "synthetic_test_size": 37, "eval_batch_size": 8}
EVAL = {
    "run": {"name": "ev", "progress": False, "seed": 1},
    "data": DATA,
    "attacks": [{"name": "fgsm", "eps": 0.02}, {"name": "pgd", "eps": 0.03, "step_size": 0.01, "steps": 3},
                {"name": "cw", "eps": 0.0, "steps": 5, "lr": 0.05}],
    "eps_sweep": [0.01, 0.05],
    "sweep_attack": {"name": "pgd", "steps": 3, "step_size": 0.01},
    # eps_init near this net's radii (IBP ~2e-5 - 1.3e-4, CROWN-IBP ~7e-5 - 3e-4 l_inf): from the
    # default 0.05, 6 probes never get down there and every radius is 0
    "certify": {"methods": ["ibp", "crown-ibp"], "norms": ["inf"], "num_examples": 6, "batch_size": 4,
                "bisection_steps": 6, "eps_init": 1e-4},
    # cheap masking checks on the first 8 examples: exercises prefix-only attacks in sharding and resume
    "masking": {"num_examples": 8, "steps": [2, 4], "restarts": 2, "blackbox_queries": 20, "huge_steps": 3},
}
MASK_LABELS = ["mask/FGSM", "mask/PGD-2", "mask/PGD-4", "mask/PGD-4x2", "mask/Square-20", "mask/PGD-3@1"]


def make_train_run(d: Path, seed: int = 3, epochs: int = 4) -> Path:
    """A tiny trained DARTS network saved the way train.py saves it (load_trained reads it)."""
    from dsrna_dist import genotype as G
    from dsrna_dist.data import dataset_info, load_arrays
    from dsrna_dist.space.network import build_network, info_dict

    cfg = load_config(TrainConfig, None, {**{f"data.{k}": v for k, v in DATA.items()},
                                          "model.genotype": "DARTS_V2", "model.init_channels": 4,
                                          "model.layers": 3, "model.auxiliary": False, "run.seed": seed})
    info = dataset_info(cfg.data)
    g = G.load("DARTS_V2")
    torch.manual_seed(seed)
    model = build_network(cfg.model, g, info)
    tr = load_arrays(cfg.data, "train")
    x, y = tr.images.float() / 255, tr.labels
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(y), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    (d / "checkpoints").mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "genotype": g.to_dict(),
                "dataset": "synthetic", "dataset_info": info_dict(info), "epoch": epochs},
               d / "checkpoints" / "best.pt")
    return d / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_train_run(tmp_path_factory.mktemp("train"))


def eval_cfg(tmp_path: Path, ckpt: Path, name: str = "ev", **top) -> EvalConfig:
    d = json.loads(json.dumps(EVAL))
    d["run"].update(name=name, out_dir=str(tmp_path / "runs"))
    for k, v in top.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    d["checkpoint"] = str(ckpt)
    return load_config(EvalConfig, None, _flatten(d))


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def write_yaml(tmp_path: Path, cfg: EvalConfig) -> Path:
    p = tmp_path / f"{cfg.run.name}.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg)))
    return p


def run_cli(*args, extra_env=None, torchrun=0, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] if torchrun else [PY]
    return run_proc([*launcher, "-m", "dsrna_dist.evaluate", *map(str, args)], cwd=ROOT, env=env,
                    timeout=timeout)


def jsonl(p: Path):
    return [json.loads(line) for line in p.read_text().splitlines()]


def results_of(recs):
    """Certify records without their CPU time (a measurement, not a result)."""
    return [{k: v for k, v in r.items() if k != "cpu_s"} for r in recs]


def assert_below_target_radius(r):
    """An untargeted certificate certifies the target too, so ``radius <= radius_target``:
    exactly for IBP run first in a one-norm certify_batch (no warm start: the two searches make
    the same probes until the untargeted one fails where the targeted one certifies, and the
    boxes they reuse are the same IBP boxes), and for a warm-started method (each search starts
    at its own cheaper radius, so the probes differ) up to the targeted search's resolution:
    below the eps at which its bound failed."""
    if r["method"] == "ibp" or r["failed_at_target"] is None:
        assert r["radius"] <= r["radius_target"], r
    else:
        assert r["radius"] <= r["radius_target"] or r["radius"] < r["failed_at_target"], r


def run_inprocess(cfg: EvalConfig) -> Path:
    from dsrna_dist.evaluate import evaluate

    assert evaluate(cfg) == 0
    return Path(cfg.run.out_dir) / cfg.run.name


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, ckpt):
    tmp = tmp_path_factory.mktemp("ev")
    cfg = eval_cfg(tmp, ckpt)
    return cfg, run_inprocess(cfg)


def test_records_equal_a_direct_computation(full_run, ckpt):
    from dsrna_dist.data import load_arrays
    from dsrna_dist.evaluate import _attack_seed
    from dsrna_dist.space.network import load_trained

    cfg, run = full_run
    model, _, _ = load_trained(str(ckpt))
    data = load_arrays(cfg.data, "test")
    x, y = data.images.float() / 255, data.labels
    with torch.no_grad():
        clean = model(x).argmax(1)
    recs = jsonl(run / "attacks.jsonl")
    labels = ["clean", "FGSM", "PGD-3", "C&W", "PGD-3@0.01", "PGD-3@0.05"]
    assert len(recs) == 37 * len(labels) + 8 * len(MASK_LABELS)
    assert sorted({r["attack"] for r in recs}) == sorted(labels + MASK_LABELS)
    assert {r["index"] for r in recs if r["attack"] in MASK_LABELS} == set(range(8))
    by = {(r["index"], r["attack"]): r for r in recs}
    assert len(by) == len(recs), "one record per example per attack"
    for i in range(37):
        assert by[(i, "clean")]["clean_pred"] == int(clean[i]) and by[(i, "clean")]["label"] == int(y[i])
    # PGD on the whole test set at once, same per-example seeds: same predictions as chunked
    atk = build_attack(AttackConfig(name="pgd", eps=0.03, step_size=0.01, steps=3), _attack_seed(1, "PGD-3"))
    with torch.no_grad():
        adv = model(atk(model, x, y, list(range(37)))).argmax(1)
    assert [by[(i, "PGD-3")]["adv_pred"] for i in range(37)] == adv.tolist()
    for r in recs:
        assert r["correct"] == (r["clean_pred"] == r["label"] and r["adv_pred"] == r["label"])
    # certification: the first 6 correctly classified examples, each method x norm once
    first = [i for i in range(37) if clean[i] == y[i]][:6]
    cert = jsonl(run / "certify.jsonl")
    assert sorted({r["index"] for r in cert}) == first
    assert len(cert) == len(first) * 2
    tg = random_targets(y[first], 4, 1, first)
    for r in cert:
        assert r["target"] == int(tg[first.index(r["index"])]) != r["label"]
        assert r["radius"] > 0 and r["radius_target"] > 0
        assert_below_target_radius(r)


def test_summary_aggregates_the_records(full_run, ckpt):
    cfg, run = full_run
    s = json.loads((run / "summary.json").read_text())
    recs = jsonl(run / "attacks.jsonl")
    for lab in ("FGSM", "PGD-3", "C&W"):
        rs = [r for r in recs if r["attack"] == lab]
        assert s["robust_acc"][lab] == pytest.approx(100 * sum(r["correct"] for r in rs) / len(rs))
    clean = [r for r in recs if r["attack"] == "clean"]
    assert s["clean_acc"] == pytest.approx(100 * sum(r["correct"] for r in clean) / 37)
    assert s["n"] == 37 and s["kind"] == "eval" and s["dataset"] == "synthetic"
    assert [p["eps"] for p in s["eps_sweep"]] == [0.0, 0.01, 0.05]   # from the clean point
    assert s["eps_sweep"][0]["robust_acc"] == s["clean_acc"]
    assert [c["check"] for c in s["masking"]["checks"]] == ["eps_monotone", "huge_eps", "effort", "blackbox"]
    assert not set(MASK_LABELS) & set(s["robust_acc"]), "check attacks stay out of the robust-accuracy table"
    for lab in MASK_LABELS:
        rs = [r["correct"] for r in recs if r["attack"] == lab]
        assert len(rs) == 8 and s["masking_attacks_acc"][lab] == pytest.approx(100 * sum(rs) / 8)
    assert s["robust_acc"]["PGD-3"] <= s["robust_acc"]["FGSM"] + 100 * 3 / 37  # stronger attack (noise)
    cert = jsonl(run / "certify.jsonl")
    for m in ("ibp", "crown-ibp"):
        rs = [r["radius"] for r in cert if r["method"] == m]
        assert s["certified"][m]["inf"]["mean_radius"] == pytest.approx(sum(rs) / len(rs))
        cs = [r["cpu_s"] for r in cert if r["method"] == m]
        assert all(c > 0 for c in cs) and s["certified"][m]["inf"]["cpu_s_n"] == len(cs) == 6
        assert s["certified"][m]["inf"]["cpu_s_per_example"] == pytest.approx(sum(cs) / len(cs))
    # by construction (certify_batch starts CROWN-IBP at the IBP radius and keeps the larger) ...
    assert s["certified"]["crown-ibp"]["inf"]["mean_radius"] >= s["certified"]["ibp"]["inf"]["mean_radius"] - 1e-9
    # ... so the order is checked on searches without that warm start (same probes until the
    # CROWN-IBP one certifies where IBP's fails), and CROWN-IBP must gain over IBP somewhere
    from dsrna_dist.bounds import certified_radius
    from dsrna_dist.data import load_arrays
    from dsrna_dist.space.network import load_trained

    model, _, _ = load_trained(str(ckpt))
    data = load_arrays(cfg.data, "test")
    idx = sorted({r["index"] for r in cert})
    x, y = data.images[idx].float() / 255, data.labels[idx]
    kw = dict(steps=cfg.certify.bisection_steps, eps_init=cfg.certify.eps_init)
    cold = {m: certified_radius(model, x, y, "inf", m, **kw) for m in ("ibp", "crown-ibp")}
    assert (cold["crown-ibp"] >= cold["ibp"]).all() and (cold["crown-ibp"] > cold["ibp"]).any(), cold
    assert (cold["ibp"] > 0).all()
    rec = {(r["method"], r["index"]): r["radius"] for r in cert}
    assert [rec[("ibp", i)] for i in idx] == pytest.approx(cold["ibp"].tolist(), rel=1e-6)   # IBP runs cold there
    for m in ("ibp", "crown-ibp"):  # the search's resolution, from the records' failed ends
        rs = [r for r in cert if r["method"] == m]
        ratios = sorted(r["failed_at"] / r["radius"] for r in rs if r["radius"] > 0 and r["failed_at"])
        v = s["certified"][m]["inf"]
        assert v["n_unbracketed"] == sum(1 for r in rs if r["radius"] > 0 and r["failed_at"] is None)
        assert (v["median_bracket"] is None) == (not ratios)
        assert v["median_margin_left_unbracketed"] is None and all(r["margin_left"] is None for r in rs)
        if ratios:
            assert v["median_bracket"] == pytest.approx(statistics.median(ratios))
    assert s["train_run_dir"] == str(Path(ckpt).resolve().parent.parent)
    assert s["params"] > 0 and s["genotype"]["normal"]
    assert s["timing"]["attack_examples_per_s"] > 0 and s["timing"]["peak_memory_mb"] > 0
    cpu = s["timing"]["attack_cpu_s"]
    assert set(cpu) == {r["attack"] for r in recs} - {"clean"} and all(v > 0 for v in cpu.values())
    wall = s["timing"]["attack_wall_s"]
    assert set(wall) == set(cpu) and all(v > 0 for v in wall.values())
    assert sum(wall.values()) <= s["timing"]["attack_s"]   # the per-attack parts of the attack phase
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert "eval/robust_acc/PGD-3" in tags and ea.Scalars("eval/clean_acc")[0].value == pytest.approx(s["clean_acc"])
    # the eps sweep on a readable axis: step = point index, eps as its own series
    acc = ea.Scalars("eval/eps_sweep/PGD-3/robust_acc")
    eps = ea.Scalars("eval/eps_sweep/PGD-3/eps")
    assert [e.step for e in acc] == [0, 1, 2] and [round(e.value, 6) for e in eps] == [0.0, 0.01, 0.05]
    assert [e.value for e in acc] == pytest.approx([p["robust_acc"] for p in s["eps_sweep"]])


def test_interrupted_evaluation_resumes_where_it_stopped(tmp_path, full_run, ckpt, capsys):
    cfg = eval_cfg(tmp_path, ckpt, name="killed", chunk_size=8)
    path = write_yaml(tmp_path, cfg)
    r = run_cli("--config", path, extra_env={"DSRNA_EVAL_STOP_AFTER_CHUNKS": "2"})
    # the resume certifies one example per batch (the reference run: 4): batching is not part of
    # the evaluation, so the resume is accepted and every record equals the reference's
    cfg = eval_cfg(tmp_path, ckpt, name="killed", chunk_size=8, certify={**EVAL["certify"], "batch_size": 1})
    assert r.returncode == 137, r.stderr[-2000:]
    run = tmp_path / "runs" / "killed"
    partial = jsonl(run / "attacks.jsonl")
    assert len({p["index"] for p in partial}) == 16 and not (run / "summary.json").exists()
    with open(run / "attacks.jsonl", "a") as f:
        f.write('{"index": 30, "label": 1, "clean_p')  # a torn line, as a kill mid-write leaves
    run_inprocess(cfg)
    log = (run / "evaluate.log").read_text()
    assert "resuming: 16/37 examples already attacked" in log
    assert cfg.certify.batch_size == 1 != full_run[0].certify.batch_size
    ref = jsonl(full_run[1] / "attacks.jsonl")
    got = jsonl(run / "attacks.jsonl")
    key = lambda r: (r["index"], r["attack"])  # noqa: E731
    assert sorted(got, key=key) == sorted(ref, key=key)
    assert sorted(results_of(jsonl(run / "certify.jsonl")), key=lambda r: (r["index"], r["method"])) == \
        sorted(results_of(jsonl(full_run[1] / "certify.jsonl")), key=lambda r: (r["index"], r["method"]))
    # a different evaluation in the same run dir is refused, naming what differs
    from dsrna_dist.evaluate import evaluate

    other = eval_cfg(tmp_path, ckpt, name="killed", chunk_size=8, eps_sweep=[0.02])
    with pytest.raises(SystemExit) as e:
        evaluate(other)
    assert e.value.code == 2
    # so is the same evaluation in the other memory layout (its attacks round differently)
    other = eval_cfg(tmp_path, ckpt, name="killed", chunk_size=8, dist={"channels_last": False})
    with pytest.raises(SystemExit) as e:
        evaluate(other)
    assert e.value.code == 2 and "attack_layout" in capsys.readouterr().err


def test_bad_checkpoint_is_refused_before_anything_is_written(tmp_path, ckpt, capsys):
    from dsrna_dist.evaluate import evaluate

    run = tmp_path / "runs" / "ev"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"keep": true}\n')
    for bad, needle in ((tmp_path / "nope.pt", "no such file"), (tmp_path / "bad.pt", "corrupt")):
        if bad.name == "bad.pt":
            bad.write_bytes(b"not a checkpoint at all")
        cfg = eval_cfg(tmp_path, bad)
        with pytest.raises(SystemExit) as e:
            evaluate(cfg)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error:") and str(bad) in err[-1] and needle in err[-1]
        assert sorted(p.name for p in run.iterdir()) == ["summary.json"]
        assert (run / "summary.json").read_text() == '{"keep": true}\n'
    with pytest.raises(SystemExit) as e:  # wrong dataset for this checkpoint
        evaluate(eval_cfg(tmp_path, ckpt, data={"synthetic_classes": 5}))
    assert e.value.code == 2 and "data.synthetic_classes" in capsys.readouterr().err


def test_cli_help_and_bad_keys():
    r = run_cli("--help")
    assert r.returncode == 0 and "--eps_sweep" in r.stdout and "--certify.methods" in r.stdout
    r = run_cli("--certify.methodz=ibp")
    assert r.returncode == 2 and "certify.methodz" in r.stderr


@pytest.mark.slow  # ~30 s, `make test-all`: 2 ranks equal 1 rank is test_two_ranks_equal_one_rank
@pytest.mark.dist
def test_certification_started_on_one_rank_continues_on_two(tmp_path, full_run, ckpt):
    """A long certification (issue 16's 200-example CROWN run) may be resumed with more
    processes: the examples still to do are sharded over the new ranks, and every record equals
    the uninterrupted one-rank run's."""
    cfg = eval_cfg(tmp_path, ckpt, name="grow", chunk_size=8, certify={**EVAL["certify"], "batch_size": 2})
    path = write_yaml(tmp_path, cfg)
    # 37 examples in 5 attack chunks, then the first certify chunk (2 of 6 examples): killed
    r = run_cli("--config", path, extra_env={"DSRNA_EVAL_STOP_AFTER_CHUNKS": "6"})
    assert r.returncode == 137, r.stderr[-2000:]
    run = tmp_path / "runs" / "grow"
    assert len({c["index"] for c in jsonl(run / "certify.jsonl")}) == 2
    r = run_cli("--config", path, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    key = lambda r: (r["index"], r["method"], r["norm"])  # noqa: E731
    assert sorted(results_of(jsonl(run / "certify.jsonl")), key=key) == \
        sorted(results_of(jsonl(full_run[1] / "certify.jsonl")), key=key)
    assert jsonl(run / "attacks.jsonl") == jsonl(full_run[1] / "attacks.jsonl")


@pytest.mark.dist
def test_two_ranks_equal_one_rank(tmp_path, full_run, ckpt):
    cfg = eval_cfg(tmp_path, ckpt, name="two")
    r = run_cli("--config", write_yaml(tmp_path, cfg), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "two"
    s2, s1 = (json.loads((d / "summary.json").read_text()) for d in (run, full_run[1]))
    assert s2["world_size"] == 2
    assert jsonl(run / "attacks.jsonl") == jsonl(full_run[1] / "attacks.jsonl")   # 37 examples: uneven
    # the per-attack costs gathered over ranks: a positive cost for every attack the 1-rank run timed
    for k in ("attack_cpu_s", "attack_wall_s"):
        assert set(s2["timing"][k]) == set(s1["timing"][k]) and all(v > 0 for v in s2["timing"][k].values())
    assert results_of(jsonl(run / "certify.jsonl")) == results_of(jsonl(full_run[1] / "certify.jsonl"))


# ----------------------------------------------------------------------------- certification
def _tiny_cnn(seed):
    from dsrna_dist.space.layers import Normalize

    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.5], [0.25]), nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6),
                         nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 4)).eval()


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_certified_radius_never_exceeds_the_smallest_adversarial_eps(norm, ckpt):
    """certify_batch on a random-weight CNN and the trained DARTS net: radii below the attack's
    eps and below the targeted radii. Mostly far below (radius / attack eps, measured: DARTS IBP
    0.35-0.55% and CROWN-IBP 0.8-1.2% l_inf, 0.09-0.12% and 0.19-0.26% l_2; CNN IBP 9-16%,
    CROWN-IBP 49-64%, CROWN 58-81% l_inf, 3-4%, 16-37%, 36-64% l_2), so apart from CROWN on the
    CNN a radius inflated 2x passes here: this is coverage of the real graphs, the checks with
    teeth are in test_certify_batch_sound_and_nearly_tight_on_a_certified_net."""
    from dsrna_dist.space.network import load_trained

    darts, _, _ = load_trained(str(ckpt))
    # full CROWN is slow on the DARTS net on CPU: there only IBP and CROWN-IBP
    for model, methods in ((_tiny_cnn(0), ["ibp", "crown-ibp", "crown"]), (darts, ["ibp", "crown-ibp"])):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(8, 1, 16, 16, generator=g)
        with torch.no_grad():
            y = model(x).argmax(1)        # every example correctly classified by construction
        idx = list(range(8))
        recs = certify_batch(model, x, y, idx, methods=methods, norms=[norm], steps=10,
                             eps_init=0.01, random_target=True, seed=0, num_classes=4)
        adv = min_adversarial_eps(model, x, y, norm, eps_max=2.0 if norm == "2" else 0.5, bisection_steps=7, steps=10)
        assert torch.isfinite(adv).all()
        for r in recs:
            assert 0 <= r["radius"] <= adv[r["index"]].item() + 1e-7, (r, adv)
            assert_below_target_radius(r)
        # IBP's failed end is where a fresh IBP evaluation does not certify (IBP is monotone in
        # the boxes the search reuses; the adaptive CROWN relaxations are not, so for them
        # failed_at is where the search's own evaluation failed), untargeted and targeted
        from dsrna_dist.bounds import BoundedModel
        bm = BoundedModel(model)
        ibp = [r for r in recs if r["method"] == "ibp"]
        assert any(r["failed_at"] for r in ibp) and any(r["failed_at_target"] for r in ibp)
        for r in ibp:
            i = r["index"]
            for key, tg in (("failed_at", None), ("failed_at_target", r["target"])):
                if r[key] is None:
                    continue
                with torch.no_grad():
                    m = bm.margin_lower_bound(x[i:i + 1], y[i:i + 1], r[key], norm, "ibp",
                                              target=None if tg is None else torch.tensor([tg]))
                m = m.scatter(1, y[i:i + 1].view(-1, 1), math.inf).min() if tg is None else m[0]
                assert float(m) <= 0, (key, r)
        best = [r["radius"] for r in recs if r["method"] == methods[-1]]
        assert min(best) > 0, "certification should be non-trivial on these nets"


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_certify_batch_sound_and_nearly_tight_on_a_certified_net(norm):
    """certify_batch's records where the bounds are nearly tight (the IBP-trained one-hidden-layer
    net of test_bounds_tight), so that a radius or a bound off by 2x fails: every radius (and
    random-target radius) is below the smallest eps PGD breaks (untargeted; against the target),
    l_inf also exactly sound (the MILP minimum margin over the ball of the largest radius, and
    of the target's margin at the largest targeted radius, is positive), and at least _TIGHT x
    the attack's eps (measured: untargeted l_inf >= 0.91, l_2 IBP >= 0.40, CROWN(-IBP) >= 0.59;
    targeted l_inf >= 0.91, l_2 >= 0.40 / 0.59); radius <= radius_target (to the resolution) and
    failed_at is where a fresh IBP evaluation fails."""
    from dsrna_dist.bounds import BoundedModel
    from test_bounds_tight import _TIGHT, _adv_eps, _certified_net, _exact_min, _spec

    net, x, y = _certified_net()
    bm = BoundedModel(net)
    tol = 1e-3
    recs = certify_batch(bm, x, y, list(range(len(y))), methods=["ibp", "crown-ibp", "crown"], norms=[norm],
                         steps=40, eps_init=0.05, random_target=True, seed=0, num_classes=3, rel_tol=tol)
    tg = torch.tensor([r["target"] for r in recs if r["method"] == "ibp"])
    hi = 0.5 if norm == "inf" else 4.0
    adv_t = _adv_eps(net, x, _spec(y, 3, target=tg), norm, hi)
    adv = torch.minimum(_adv_eps(net, x, _spec(y, 3), norm, hi), adv_t)  # the target's adversarial is one too
    assert torch.isfinite(adv_t).all()
    for m in ("ibp", "crown-ibp", "crown"):
        rs = [r for r in recs if r["method"] == m]
        assert [r["index"] for r in rs] == list(range(len(y))) and all(r["target"] == int(t) for r, t in zip(rs, tg))
        rad = torch.tensor([r["radius"] for r in rs], dtype=x.dtype)
        rad_t = torch.tensor([r["radius_target"] for r in rs], dtype=x.dtype)
        assert (rad <= adv).all() and (rad_t <= adv_t).all(), (m, rad / adv, rad_t / adv_t)
        assert (rad >= _TIGHT[norm][m] * adv).all() and (2 * rad > adv).any(), (m, rad / adv)
        assert (rad_t >= _TIGHT[norm][m] * adv_t).all() and (2 * rad_t > adv_t).any(), (m, rad_t / adv_t)
        assert (rad_t > 1.5 * rad).any()   # the target is not always the nearest class
        for r in rs:
            assert r["radius"] <= r["radius_target"] * (1 + tol), r
            assert r["failed_at"] is not None and r["failed_at"] <= r["radius"] * (1 + 1.01 * tol), r
        if m == "ibp":  # a fresh IBP evaluation fails at the failed end (IBP is monotone in eps)
            with torch.no_grad():
                for key, t in (("failed_at", None), ("failed_at_target", tg)):
                    e = torch.tensor([r[key] for r in rs], dtype=x.dtype)
                    mb = bm.margin_lower_bound(x, y, e, norm, "ibp", target=t)
                    mb = mb.scatter(1, y[:, None], math.inf).min(1).values if t is None else mb
                    assert (mb <= 0).all(), (key, mb)
        if norm == "inf" and m == "crown":  # the records only grow along the methods: the last one is the largest
            assert (_exact_min(net, x, _spec(y, 3), rad).min(1).values > 0).all()
            assert (_exact_min(net, x, _spec(y, 3, target=tg), rad_t)[:, 0] > 0).all()


def test_testset_reads_imagenet_folders_by_index(tmp_path):
    """ImageNet evaluation: examples are decoded per index from a real JPEG ImageFolder tree."""
    import numpy as np
    from PIL import Image

    from dsrna_dist.config import DataConfig
    from dsrna_dist.evaluate import TestSet

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, wnid in enumerate(("n001", "n002")):
            d = tmp_path / split / wnid
            d.mkdir(parents=True)
            for k in range(3):
                arr = np.full((40, 48, 3), 60 * c + 20 * k, dtype=np.uint8) + rng.integers(0, 3, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k}.JPEG", quality=95)
    ts = TestSet(DataConfig(name="imagenet", root=str(tmp_path), image_size=32, test_subset=5))
    assert len(ts) == 5 and ts.y(range(5), torch.device("cpu")).tolist() == [0, 0, 0, 1, 1]
    x = ts.x([4, 0], torch.device("cpu"))
    assert x.shape == (2, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    # JPEG of a near-constant image: the decoded crop keeps its level (index 4 = class 1, k=1 -> 80)
    assert abs(x[0].mean().item() * 255 - 81) < 4 and abs(x[1].mean().item() * 255 - 1) < 4


# ----------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "eval").glob("*.yaml")))
def test_shipped_eval_configs_build_their_attacks(name):
    from dsrna_dist.evaluate import build_attacks

    cfg = load_config(EvalConfig, str(ROOT / "configs" / "eval" / name), {})
    attacks, _ = build_attacks(cfg)
    meta = {lab: m for lab, _, m in attacks}
    if cfg.eps_sweep:
        assert cfg.eps_sweep[0] == 0.0, "the eps sweep starts at the clean point"
    if name in ("fmnist_small.yaml", "cifar10.yaml"):   # AutoAttack, l_inf and l_2, next to the others
        aa = {m["norm"]: m["eps"] for m in meta.values() if m["name"] == "autoattack"}
        assert set(aa) == {"inf", "2"}
        assert {"FGSM", "PGD-20", "PGD-100", "C&W"} <= set(meta)
        assert cfg.masking.enabled and {"huge", "effort", "blackbox"} <= {m.get("role") for m in meta.values()}
    if name == "fmnist_small.yaml":
        assert cfg.data.name == "fashion_mnist" and cfg.data.test_subset == 0
        assert meta["AutoAttack"]["eps"] == pytest.approx(0.1) and meta["PGD-20"]["eps"] == pytest.approx(0.1)


def test_certify_progress_reads_a_run_in_progress(full_run, tmp_path, capsys):
    """bench/certify_progress.py summarises certify.jsonl alone: on a finished run it equals
    the summary's certified block; on a run cut short (a torn last line) it summarises the rest."""
    sys.path.insert(0, str(ROOT / "bench"))
    import certify_progress

    run = full_run[1]
    assert certify_progress.main([str(run)]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = json.loads((run / "summary.json").read_text())["certified"]  # + certified accuracy
    assert got["certified"] == {m: {nm: {k: v[k] for k in got["certified"][m][nm]} for nm, v in per.items()}
                                for m, per in ref.items()}
    part = tmp_path / "part"
    part.mkdir()
    lines = (run / "certify.jsonl").read_text().splitlines()
    (part / "certify.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    assert certify_progress.main([str(part)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sum(v["n"] for per in got["certified"].values() for v in per.values()) == 3
    assert certify_progress.main([str(tmp_path / "nope")]) == 2


def test_radii_vs_pgd_check_passes_the_run_and_catches_a_forged_radius(full_run, tmp_path, capsys):
    """bench/check_radii_vs_pgd.py: the run's radii sit below PGD's smallest breaking eps on every
    example; one radius forged above it (0.9 in l_inf) is reported by index with exit 1; a run
    without records of the method exits 2."""
    import shutil

    sys.path.insert(0, str(ROOT / "bench"))
    import check_radii_vs_pgd as chk

    run = full_run[1]
    args = ["--method", "crown-ibp", "--steps", "10", "--restarts", "1", "--bisection-steps", "8"]
    assert chk.main([str(run), *args]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    n = sum(1 for r in jsonl(run / "certify.jsonl") if r["method"] == "crown-ibp")
    assert [(o["norm"], o["n"], o["violations"]) for o in out] == [("inf", n, 0)]
    forged = tmp_path / "forged"
    forged.mkdir()
    shutil.copy(run / "config.yaml", forged)
    recs = jsonl(run / "certify.jsonl")
    k = next(r["index"] for r in recs if r["method"] == "crown-ibp")
    (forged / "certify.jsonl").write_text("".join(
        json.dumps(dict(r, radius=0.9) if (r["method"], r["index"]) == ("crown-ibp", k) else r) + "\n" for r in recs))
    assert chk.main([str(forged), *args]) == 1
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["violations"] == 1 and out["violating_indices"] == [k]
    assert chk.main([str(run), "--method", "crown"]) == 2


def test_runs_from_before_the_extra_passes_resume_unless_they_are_asked_for():
    """A run dir written before ``certify.crown_extra_passes`` existed (its fingerprint lacks the
    two keys) is the same evaluation as one at 0 extra passes, whatever the margin threshold (it
    then changes nothing), and a different one with extra passes on; batch size never matters."""
    from dsrna_dist.config import CertifyConfig, to_dict
    from dsrna_dist.evaluate import fingerprint_diff

    new = {"seed": 0, "certify": to_dict(CertifyConfig())}
    old = {"seed": 0, "certify": {k: v for k, v in new["certify"].items()
                                  if k not in ("crown_extra_passes", "crown_extra_margin")}}
    assert "crown_extra_passes" in new["certify"] and new["certify"]["crown_extra_passes"] == 0
    assert fingerprint_diff(old, new) is None
    assert fingerprint_diff(old, {**new, "certify": {**new["certify"], "crown_extra_margin": 0.9}}) is None
    assert fingerprint_diff(old, {**new, "certify": {**new["certify"], "batch_size": 1}}) is None
    assert fingerprint_diff(old, {**new, "certify": {**new["certify"], "crown_extra_passes": 3}}) == "certify"


def test_check_attack_prefix_reuses_the_batch_clean_pass():
    """A check attack on the first N examples (a batch straddles N) gives the records it gives run
    on that prefix alone, and the batch's clean forward is not run again for the prefix."""
    from dsrna_dist.evaluate import attack_records

    torch.manual_seed(0)

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.net(x)

    model = Counting().eval()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    shift = lambda m, xb, yb, ib: (xb + 0.3 * torch.sign(torch.randn_like(xb))).clamp(0, 1)  # noqa: E731
    full = ("noise", shift, {"eps": 0.3, "norm": "inf", "max_index": None})
    check = ("mask/noise", shift, {"eps": 0.3, "norm": "inf", "max_index": 3})
    torch.manual_seed(1)
    recs = attack_records(model, [full, check], x, y, list(range(6)), batch=4)
    # batches [0..3] and [4, 5]: 2 clean passes, 2 full-attack passes, 1 check pass on indices 0..2
    assert model.calls == 5
    by = {(r["attack"], r["index"]): r for r in recs}
    assert sorted(i for a, i in by if a == "mask/noise") == [0, 1, 2]
    assert sorted(i for a, i in by if a == "noise") == list(range(6))
    torch.manual_seed(1)
    alone = attack_records(model, [full], x[:4], y[:4], list(range(4)), batch=4)
    alone += attack_records(model, [(check[0], shift, {**check[2], "max_index": None})], x[:3], y[:3],
                            [0, 1, 2], batch=4)
    for r in alone:
        assert by[(r["attack"], r["index"])] == r
    with torch.no_grad():
        clean = model(x).argmax(1).tolist()
    assert all(r["clean_pred"] == clean[r["index"]] for r in recs)
