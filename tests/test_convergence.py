"""Convergence diagnostics of a search (entropy, max softmax(alpha), genotype stability), the
one alpha heatmap and the one node-naming convention."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsrna_dist import genotype as G
from dsrna_dist import plots as P
from dsrna_dist.strategies.convergence import (GenotypeTracker, alpha_stats, convergence, stable_window)
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

ROOT = Path(__file__).resolve().parents[1]
PRIMS = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
         "dil_conv_3x3", "dil_conv_5x5"]
EDGES = 9  # 3 nodes: 2 + 3 + 4


def alphas(gap: float, seed: int = 0):
    """Per edge: one op (chosen at random) gap above the others, plus tiny noise."""
    g = torch.Generator().manual_seed(seed)
    a = 1e-3 * torch.randn(EDGES, len(PRIMS), generator=g, dtype=torch.float64)
    a[torch.arange(EDGES), torch.randint(1, len(PRIMS), (EDGES,), generator=g)] += gap
    return a.tolist()


def geno(op: str = "sep_conv_3x3"):
    edges = [[op, 0], [op, 1], [op, 0], [op, 2], [op, 1], [op, 3]]
    return {"normal": edges, "normal_concat": [2, 3, 4], "reduce": edges, "reduce_concat": [2, 3, 4]}


def record(epoch, gap, *, steps=None, changes=None, last=None, g=None):
    r = {"epoch": epoch, "primitives": PRIMS, "alphas_normal": alphas(gap, epoch),
         "alphas_reduce": alphas(gap, 100 + epoch)}
    if steps is not None:
        r.update(arch_steps=steps, genotype_changes=changes, last_change_arch_step=last)
    if g is not None:
        r["genotype"] = g
    return r


# --------------------------------------------------------------------------- statistics
def test_alpha_stats_against_torch_categorical():
    a = {"normal": alphas(1.3, 1), "reduce": alphas(0.2, 2)}
    st = alpha_stats(a)
    for kind in ("normal", "reduce"):
        dist = torch.distributions.Categorical(logits=torch.tensor(a[kind], dtype=torch.float64))
        assert st[f"entropy_{kind}"] == pytest.approx(dist.entropy().mean().item(), rel=1e-9)
        assert st[f"max_softmax_{kind}"] == pytest.approx(dist.probs.max(-1).values.mean().item(), rel=1e-9)
    assert st["entropy"] == pytest.approx((st["entropy_normal"] + st["entropy_reduce"]) / 2)
    u = alpha_stats({"normal": [[0.0] * 8] * EDGES, "reduce": [[0.0] * 8] * EDGES})
    assert u["entropy"] == pytest.approx(math.log(8)) == pytest.approx(u["uniform_entropy"])
    assert u["max_softmax"] == pytest.approx(1 / 8)


def test_gap_needed_for_the_threshold():
    """One op ahead by d on every edge: max softmax = e^d / (e^d + 7) crosses 0.25 at d = ln(7/3)."""
    d = math.log(7 / 3)
    assert convergence([record(0, d - 0.02, g=geno())])["moved"] is False
    assert convergence([record(0, d + 0.02, g=geno())])["moved"] is True


# --------------------------------------------------------------------------- criterion
def test_stability_window_boundary_per_arch_step():
    T = 200
    w = stable_window(T)
    assert w == 50
    ok = convergence([record(0, 0.0, steps=100, changes=3, last=90),
                      record(1, 2.0, steps=T, changes=1, last=T - w)])
    assert ok["stable"] and ok["moved"] and ok["converged"]
    assert ok["genotype_changes"] == 4 and ok["resolution"] == "arch step"
    late = convergence([record(0, 0.0, steps=100, changes=3, last=90),
                        record(1, 2.0, steps=T, changes=1, last=T - w + 1)])
    assert not late["stable"] and not late["converged"] and late["moved"]
    flat = convergence([record(0, 0.0, steps=T, changes=0, last=0)])
    assert flat["stable"] and not flat["moved"] and not flat["converged"]
    assert stable_window(7) == 2  # ceil: a quarter of 7 steps is 2 steps, not 1


def test_no_arch_steps_is_not_converged():
    h = [record(0, 5.0, steps=0, changes=0, last=0)]
    c = convergence(h)
    assert c["moved"] and not c["stable"] and not c["converged"]
    assert convergence([])["converged"] is False


def test_epoch_resolution_fallback_dates_changes_at_epoch_ends():
    """Without per-step counts: compare consecutive genotypes; records are one step each."""
    gs = [geno("sep_conv_3x3"), geno("skip_connect"), geno("skip_connect"), geno("skip_connect"),
          geno("skip_connect")]
    h = [record(i, 2.0, g=g) for i, g in enumerate(gs)]
    c = convergence(h)
    assert c["resolution"] == "epoch" and c["genotype_changes"] == 1 and c["last_change_arch_step"] == 2
    assert c["arch_steps"] == 5 and c["stable_window"] == 2 and c["converged"]
    h[-1]["genotype"] = geno("sep_conv_5x5")
    c = convergence(h)
    assert c["genotype_changes"] == 2 and c["last_change_arch_step"] == 5 and not c["stable"]


def test_epoch_fallback_derives_genotypes_from_weights_when_absent():
    """Older histories hold only genotype weights: the genotype is parsed from them."""
    h = []
    for i, gap in enumerate([0.0, 3.0, 3.0, 3.0]):
        r = record(i, gap)
        r["weights_normal"] = P.softmax_rows(r["alphas_normal"]).tolist()
        r["weights_reduce"] = P.softmax_rows(r["alphas_reduce"]).tolist()
        h.append(r)
    # every record draws its own random leaders (seeded by epoch): each one is a change
    c = convergence(h)
    assert c["genotype_changes"] == 3 and not c["stable"]
    for r in h[2:]:
        r["alphas_normal"], r["weights_normal"] = h[1]["alphas_normal"], h[1]["weights_normal"]
        r["alphas_reduce"], r["weights_reduce"] = h[1]["alphas_reduce"], h[1]["weights_reduce"]
    c = convergence(h)
    assert c["genotype_changes"] == 1 and c["last_change_arch_step"] == 2 and c["stable"]


def test_tracker_counts_flips_inside_an_epoch_and_resumes():
    t = GenotypeTracker()
    t.start(G.from_dict(geno("sep_conv_3x3")))
    seq = ["sep_conv_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_3x3", "sep_conv_3x3"]
    flags = [t.observe(G.from_dict(geno(op))) for op in seq[:3]]
    saved = json.loads(json.dumps(t.state_dict()))  # what the checkpoint carries
    t2 = GenotypeTracker()
    t2.load_state_dict(saved)
    t2.start(G.from_dict(geno("dil_conv_3x3")))  # ignored: the resumed tracker knows its genotype
    flags += [t2.observe(G.from_dict(geno(op))) for op in seq[3:]]
    assert flags == [False, True, True, False, False]
    assert (t2.arch_steps, t2.changes, t2.last_change) == (5, 2, 3)
    # a flip and a flip back between two epoch ends is invisible at epoch resolution, not here
    assert t2.changes == 2 and G.from_dict(geno(seq[0])) == G.from_dict(geno(seq[-1]))


def test_genotype_key_is_the_architecture_not_the_listing_order():
    """A node sums its two inputs, so swapping them (their strengths crossed) is the same cell;
    reference: equality of the multisets of (node, op, input) per cell, over random genotypes."""
    from dsrna_dist.strategies.convergence import genotype_key

    rng = np.random.default_rng(0)
    ops = PRIMS[1:3] + PRIMS[4:5]  # few ops and inputs, so equal architectures occur often

    def cell():
        return [[str(rng.choice(ops)), int(rng.integers(0, n + 2))] for n in (0, 0, 1, 1, 2, 2)]

    def variant(g):
        """g relisted (random swaps inside nodes) and, half of the time, one edge redrawn."""
        h = json.loads(json.dumps(g))
        for kind in ("normal", "reduce"):
            for node in range(3):
                if rng.random() < 0.5:
                    e = h[kind]
                    e[2 * node], e[2 * node + 1] = e[2 * node + 1], e[2 * node]
        if rng.random() < 0.5:
            kind, i = str(rng.choice(["normal", "reduce"])), int(rng.integers(0, 6))
            h[kind][i] = [str(rng.choice(ops)), int(rng.integers(0, i // 2 + 2))]
        return h

    def multiset(g):
        return {k: sorted((i // 2, op, src) for i, (op, src) in enumerate(g[k])) for k in ("normal", "reduce")}

    same = diff = 0
    for _ in range(300):
        a = {"normal": cell(), "normal_concat": [2, 3, 4], "reduce": cell(), "reduce_concat": [2, 3, 4]}
        b = variant(a)
        equal = multiset(a) == multiset(b)
        assert (genotype_key(a) == genotype_key(b)) == equal, (a, b)
        assert genotype_key(G.from_dict(a)) == genotype_key(a)
        same, diff = same + equal, diff + (not equal)
    assert same > 50 and diff > 50
    swapped = geno()
    swapped["normal"][0], swapped["normal"][1] = swapped["normal"][1], swapped["normal"][0]
    assert genotype_key(swapped) == genotype_key(geno()) and swapped != geno()
    t = GenotypeTracker()
    t.start(G.from_dict(geno()))
    assert not t.observe(G.from_dict(swapped)) and t.changes == 0
    assert t.observe(G.from_dict(geno("skip_connect"))) and t.changes == 1


def test_decision_margin_is_the_smallest_change_that_changes_the_cell():
    """Reference: the derivation itself. Noise of max-norm just under half the margin never
    changes the derived cell; moving the two sides of the reported decision by just over half
    the margin does."""
    from dsrna_dist.space.supernet import derive_genotype
    from dsrna_dist.strategies.convergence import decision_margin, genotype_key

    rng = np.random.default_rng(1)

    def cell(w):
        t = {k: torch.tensor(v) for k, v in w.items()}
        return genotype_key(derive_genotype(t["normal"], t["reduce"], PRIMS, 3))

    for trial in range(30):
        w = {k: rng.dirichlet(np.ones(len(PRIMS)), size=EDGES) for k in ("normal", "reduce")}
        m = decision_margin(w, PRIMS)
        assert 0 < m["margin"] < 1
        for _ in range(20):
            noisy = {k: v + rng.uniform(-0.49, 0.49, v.shape) * m["margin"] for k, v in w.items()}
            assert cell(noisy) == cell(w)
        kind, rest = m["where"].split(" node ")
        node = int(rest.split(":")[0])
        start = sum(2 + i for i in range(node))
        rows = w[kind][start:start + 2 + node]
        cand = list(range(1, len(PRIMS)))  # PRIMS[0] is none
        strength = rows[:, cand].max(1)
        order = np.argsort(-strength, kind="stable")
        push = {k: v.copy() for k, v in w.items()}
        d = 0.51 * m["margin"]
        if rest.endswith("edges"):
            lose, win = start + order[1], start + order[2]
            push[kind][lose, 1 + np.argmax(rows[order[1], cand])] -= d
            push[kind][win, 1 + np.argmax(rows[order[2], cand])] += d
        else:
            j = int(rest.split("input ")[1])
            ops = np.argsort(-rows[j, cand], kind="stable")
            push[kind][start + j, 1 + ops[0]] -= d
            push[kind][start + j, 1 + ops[1]] += d
        assert cell(push) != cell(w), (trial, m)


# --------------------------------------------------------------------------- naming, heatmap
def test_one_node_naming():
    assert G.edge_names(3) == ["c_{k-2}->0", "c_{k-1}->0", "c_{k-2}->1", "c_{k-1}->1", "0->1",
                               "c_{k-2}->2", "c_{k-1}->2", "0->2", "1->2"]
    assert P.edge_labels(3) == G.edge_names(3)
    g = G.from_dict(geno())
    assert "0->1 sep_conv_3x3" in str(g) and "c_{k-1}->2 sep_conv_3x3" in str(g)
    from dsrna_dist.search_artifacts import genotype_markdown

    md = genotype_markdown(g)
    assert "| normal | 1->2 | sep_conv_3x3 |" in md and "| reduce | c_{k-2}->0 | sep_conv_3x3 |" in md


def test_heatmap_shows_softmax_alpha_and_betas_apart(tmp_path):
    rec = record(0, 2.0)
    rec["betas_normal"] = torch.randn(EDGES).tolist()
    rec["betas_reduce"] = torch.randn(EDGES).tolist()
    rec["weights_normal"] = [[0.0] * 8] * EDGES  # stale product: must not be what is drawn
    ops, betas, what = P.arch_panels(rec)
    assert what == "softmax(alpha)"
    fig = P.alpha_heatmap_figure(ops, PRIMS, "t", betas)
    panels = [ax for ax in fig.axes if ax.images and ax.get_yticklabels()]
    assert len(panels) == 3
    np.testing.assert_allclose(np.asarray(panels[0].images[0].get_array()),
                               torch.softmax(torch.tensor(rec["alphas_normal"]), -1).numpy(), rtol=1e-6)
    # betas: softmax over each node's incoming edges (2, 3, 4), normal and reduce as columns
    b = np.asarray(panels[2].images[0].get_array())
    ref = torch.cat([torch.softmax(torch.tensor(rec["betas_reduce"])[s:s + n], 0)
                     for s, n in ((0, 2), (2, 3), (5, 4))]).numpy()
    np.testing.assert_allclose(b[:, 1], ref, rtol=1e-6)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == G.edge_names(3)
    path = P.alpha_heatmap_of_record(rec, PRIMS, "t", tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_beta = {k: v for k, v in rec.items() if not k.startswith("betas_")}
    assert P.arch_panels(no_beta)[1] is None


def test_cell_diagram_uses_the_node_names(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = []
    monkeypatch.setattr(P, "_save", lambda fig, path: seen.append(
        [t.get_text() for ax in fig.axes for t in ax.texts]) or plt.close(fig) or path)
    P.cell_diagram(G.from_dict(geno()), "normal", "t", tmp_path / "c.png")
    assert {"c_{k-2}", "c_{k-1}", "0", "1", "2"} <= set(seen[0])


# --------------------------------------------------------------------------- end to end
TINY = ["--data.name=synthetic", "--data.synthetic_size=64", "--data.synthetic_shape=[3,8,8]",
        "--data.synthetic_classes=4", "--data.batch_size=8", "--data.crop_padding=1",
        "--model.init_channels=4", "--model.layers=3", "--model.nodes=2", "--run.progress=false",
        "--steps_per_epoch=1", "--epochs=6", "--arch_optim.lr=0.3", "--arch_optim.schedule=cosine",
        "--run.log_every=1"]


def test_search_logs_convergence_per_epoch_and_in_the_summary(tmp_path):
    """One arch step per epoch: the per-step tracker must agree with comparing the per-epoch
    genotype files, and summary.json with convergence() recomputed from alphas.jsonl."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = run_proc([sys.executable, "-m", "dsrna_dist.search", *TINY, f"--run.out_dir={tmp_path}",
                 "--run.name=s"], env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "s"
    hist = [json.loads(x) for x in (run / "alphas.jsonl").read_text().splitlines()]
    assert [h["arch_steps"] for h in hist] == [1, 2, 3, 4, 5, 6]
    for h in hist:
        for k in ("entropy", "max_softmax", "genotype_changes", "converged", "genotype", "edges"):
            assert k in h, k
        ref = torch.distributions.Categorical(logits=torch.tensor(h["alphas_normal"] + h["alphas_reduce"]))
        assert h["entropy"] == pytest.approx(ref.entropy().mean().item(), rel=1e-6)
    files = [G.load(str(run / "genotypes" / f"epoch_{i:03d}.json")) for i in range(6)]
    assert [G.from_dict(h["genotype"]) for h in hist] == files
    changes = sum(a != b for a, b in zip(files, files[1:]))
    assert sum(h["genotype_changes"] for h in hist[1:]) == changes
    assert changes >= 1, "lr 0.3 must move the genotype at least once in 6 arch steps"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["convergence"] == convergence(hist)
    assert summary["search_cpu_s"] > 0
    stripped = [{k: v for k, v in h.items() if k not in ("arch_steps", "genotype_changes")} for h in hist]
    coarse = convergence(stripped)
    # epoch resolution sees the same changes except the one at the first arch step (no epoch
    # record holds the initial genotype)
    assert coarse["genotype_changes"] == changes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"arch/entropy", "arch/max_softmax", "arch/genotype_changes", "arch/converged"} <= tags
    assert [e.value for e in ea.Scalars("arch/entropy")] == pytest.approx([h["entropy"] for h in hist])
    # each epoch's logged means are in its record too (the report's largest-epoch grad_share reads them)
    assert [e.value for e in ea.Scalars("epoch/train_loss")] == pytest.approx([h["means"]["train_loss"] for h in hist])
    assert hist[-1]["means"] == summary["last_epoch_means"]
    assert "arch/weights" in ea.Tags()["images"]
    # the arch lr followed the cosine schedule per step: the last step (epoch 5 of 6) used 0.3 * (1 + cos(5 pi / 6)) / 2
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["optimizers"]["arch"]["param_groups"][0]["lr"] == pytest.approx(0.15 * (1 + math.cos(5 * math.pi / 6)))


def test_arch_lr_schedule():
    from dsrna_dist.config import ArchOptimConfig
    from dsrna_dist.engine.schedule import arch_lr_at

    const = ArchOptimConfig(lr=0.1)
    assert [arch_lr_at(const, p, 2, 8) for p in (0, 2, 7.99)] == [0.1, 0.1, 0.1]
    cos = ArchOptimConfig(lr=0.1, schedule="cosine", lr_min=0.01)
    vals = [arch_lr_at(cos, 2 + 6 * k / 60, 2, 8) for k in range(61)]
    assert vals[0] == pytest.approx(0.1) and vals[-1] == pytest.approx(0.01) and vals[30] == pytest.approx(0.055)
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert arch_lr_at(cos, 0.5, 2, 8) == pytest.approx(0.1)  # before arch updates start: unused, clamped
    # cosine2: the cosine's factor squared, same ends; 3/4 of cosine's step sum (lr_min 0), and the
    # last quarter's share of the squared steps is what the docstring says (midpoint sums, 6000 steps)
    sq = ArchOptimConfig(lr=0.1, schedule="cosine2", lr_min=0.01)
    vals2 = [arch_lr_at(sq, 2 + 6 * k / 60, 2, 8) for k in range(61)]
    assert vals2[0] == pytest.approx(0.1) and vals2[-1] == pytest.approx(0.01)
    assert vals2[30] == pytest.approx(0.01 + 0.09 * 0.25) and all(a > b for a, b in zip(vals2, vals2[1:]))
    n = 6000
    for sched, step_sum, last_sq in (("cosine", 0.5, 2.9e-3), ("cosine2", 0.375, 4.9e-5)):
        c = ArchOptimConfig(lr=1.0, schedule=sched, lr_min=0.0)
        lr = [arch_lr_at(c, 2 + 6 * (k + 0.5) / n, 2, 8) for k in range(n)]
        assert sum(lr) / n == pytest.approx(step_sum, rel=1e-6)
        assert sum(v * v for v in lr[3 * n // 4:]) / sum(v * v for v in lr) == pytest.approx(last_sq, rel=0.02)


def test_cli_reports_each_run_and_fails_on_unconverged(tmp_path, capsys):
    from dsrna_dist.strategies.convergence import main

    good, flat = tmp_path / "good", tmp_path / "flat"
    for d, gap in ((good, 3.0), (flat, 0.0)):
        d.mkdir()
        (d / "alphas.jsonl").write_text(json.dumps(record(0, gap, steps=8, changes=1, last=2)) + "\n")
    assert main([str(good)]) == 0
    assert main([str(good), str(flat)]) == 1
    out = capsys.readouterr().out
    assert f"{flat}: converged=False (moved=False, stable=True)" in out
    assert main([str(tmp_path / "missing")]) == 2 and "no alpha history" in capsys.readouterr().err
    # the documented command: exit code and output as in-process, and no runpy warning (the
    # strategies package must not import the module it runs)
    r = subprocess.run([sys.executable, "-m", "dsrna_dist.strategies.convergence", str(good), str(flat)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 1 and f"{flat}: converged=False" in r.stdout and "Warning" not in r.stderr, r.stderr
