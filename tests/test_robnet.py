"""RobNet baseline: uniform sampling, one-hot sub-architectures, ranking by PGD accuracy on a toy
whose answer is known analytically, exact restore between candidates, and the search stage."""
import itertools
import json
import os
import sys
import types
from collections import Counter

import pytest
import torch
from scipy import stats
from torch import nn

from dsrna_dist.config import ConfigError, SearchConfig, replace
from dsrna_dist.genotype import Genotype
from dsrna_dist.search import build_optimizers, check_config
from dsrna_dist.space.supernet import Supernet
from dsrna_dist.strategies import SearchContext, build_strategy
from dsrna_dist.strategies.robnet import cell_weights, sample_genotype
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

torch.set_num_threads(1)


def info(c=3, size=8, k=4):
    return types.SimpleNamespace(name="t", in_channels=c, image_size=size, num_classes=k,
                                 mean=(0.5,) * c, std=(0.25,) * c)


@pytest.mark.parametrize("prims,nodes", [(("none", "skip_connect", "sep_conv_3x3"), 2),
                                         (("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"), 3)])
def test_sampling_is_uniform_over_cells(prims, nodes):
    """Chi-square goodness of fit of the sampled normal and reduce cells against the uniform
    distribution over all DARTS cells (2 distinct inputs per node, a non-none op each)."""
    real = [p for p in prims if p != "none"]
    n_cells = 1
    for i in range(nodes):
        n_cells *= (2 + i) * (1 + i) // 2 * len(real) ** 2
    draws = 40 * n_cells if n_cells < 200 else 6000
    gen = torch.Generator().manual_seed(0)
    normal, reduce = Counter(), Counter()
    for _ in range(draws):
        g = sample_genotype(prims, nodes, gen)
        assert all(op != "none" for op, _ in g.normal + g.reduce)
        normal[g.normal] += 1
        reduce[g.reduce] += 1
    for counts in (normal, reduce):
        assert len(counts) <= n_cells
        if n_cells < 200:  # every cell seen; full chi-square over all cells
            obs = [counts.get(c, 0) for c in counts] + [0] * (n_cells - len(counts))
            assert stats.chisquare(obs).pvalue > 1e-3
    if n_cells >= 200:  # too many cells: test the per-node marginals (input pair, ops)
        for node in range(nodes):
            pairs = Counter(tuple(src for _, src in g[2 * node:2 * node + 2]) for g in normal.elements())
            assert len(pairs) == (2 + node) * (1 + node) // 2
            if len(pairs) > 1:  # node 0 has one pair only
                assert stats.chisquare(list(pairs.values())).pvalue > 1e-3
            ops = Counter(op for g in normal.elements() for op, _ in g[2 * node:2 * node + 2])
            assert stats.chisquare(list(ops.values())).pvalue > 1e-3
    # normal and reduce are independent draws
    joint = Counter()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3000):
        g = sample_genotype(prims, nodes, gen)
        joint[(g.normal[0][0], g.reduce[0][0])] += 1
    table = [[joint[(a, b)] for b in real] for a in real]
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_one_hot_weights_run_exactly_the_sampled_cell():
    cfg = replace(SearchConfig(), **{"model.init_channels": 4, "model.layers": 3, "model.nodes": 2})
    torch.manual_seed(0)
    model = Supernet(cfg.model, info()).eval()
    g = sample_genotype(model.primitives, 2, torch.Generator().manual_seed(3))
    w = {"normal": cell_weights(g.normal, model.primitives, 2), "reduce": cell_weights(g.reduce, model.primitives, 2)}
    assert w["normal"].sum().item() == 4 and w["normal"].sum(1).max().item() == 1
    x = torch.rand(2, 3, 8, 8)
    before = model(x, w)
    chosen = {(kind, sum(2 + n for n in range(i // 2)) + src, op)
              for kind, cell in (("normal", g.normal), ("reduce", g.reduce)) for i, (op, src) in enumerate(cell)}
    with torch.no_grad():  # scramble every op that is not in the sampled cell
        for cell in model.cells:
            kind = "reduce" if cell.reduction else "normal"
            for e, edge in enumerate(cell.edges):
                for k, op in zip(edge.index, edge.ops):
                    if (kind, e, model.primitives[k]) not in chosen:
                        for p in op.parameters():
                            p.add_(torch.randn_like(p))
    assert torch.equal(model(x, w), before)


class ToyNet(nn.Module):
    """Logit z = (mean(x) - 0.5) + n_bad * (x[0,0,0] - 0.5), n_bad = how many chosen edges use
    max_pool. The pixel (0,0,0) is 0.5 in the data, so every cell is 100% clean-accurate, but an
    l_inf attack of radius eps moves z by eps * (1 + n_bad): the adversarial accuracy is the
    fraction of margins d = |mean - 0.5| above eps * (1 + n_bad), known in closed form."""

    primitives = ("none", "skip_connect", "max_pool_3x3")
    nodes = 1

    def __init__(self):
        super().__init__()
        self.alphas_normal = nn.Parameter(torch.zeros(2, 3))
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, arch_weights=None):
        bad = arch_weights["normal"][:, 2].sum() + arch_weights["reduce"][:, 2].sum()
        z = (x.mean((1, 2, 3)) - 0.5) + bad * (x[:, 0, 0, 0] - 0.5) + 0 * self.dummy
        return torch.stack([-z, z], 1)


def test_ranking_by_pgd_accuracy_is_correct_on_a_known_toy():
    eps = 0.1
    cfg = replace(SearchConfig(), **{"strategy.name": "robnet", "model.primitives": list(ToyNet.primitives),
                                     "model.nodes": 1, "robnet.eps": eps, "robnet.step_size": 0.025,
                                     "robnet.eval_steps": 10, "robnet.finetune_steps": 0})
    model = ToyNet()
    w_opt = torch.optim.SGD([model.dummy], lr=0.1)
    strat = build_strategy(SearchContext(cfg=cfg, model=model, net=model, w_optim=w_opt, a_optim=w_opt))
    margins = torch.linspace(0.055, 0.495, 45)  # no margin on a threshold eps * k
    xs, ys = [], []
    for i, d in enumerate(margins):
        label = i % 2
        img = torch.full((1, 4, 4), 0.5 + (d if label else -d))
        img[0, 0, 0] = 0.5  # the pixel only max_pool cells read: neutral on clean data
        xs.append(img)
        ys.append(label)
    x, y = torch.stack(xs), torch.tensor(ys)
    # the attack lowers class-1 images and raises class-0 ones: it never hits the [0, 1] box
    assert (x[y == 1] - eps).min() > 0 and (x[y == 0] + eps).max() < 1
    d_true = (x.mean((1, 2, 3)) - 0.5).abs()
    ops = ("skip_connect", "max_pool_3x3")
    cells = [Genotype(((a, 0), (b, 1)), (2,), ((c, 0), (e, 1)), (2,))
             for a, b, c, e in itertools.product(ops, repeat=4)]
    rows = strat.rank(cells, [], [(x[:23], y[:23]), (x[23:], y[23:])])
    by_index = {r["index"]: r for r in rows}
    for i, g in enumerate(cells):
        n_bad = sum(op == "max_pool_3x3" for op, _ in g.normal + g.reduce)
        expect = int((d_true > eps * (1 + n_bad) + 1e-6).sum()) / len(d_true)
        assert by_index[i]["clean_acc"] == 1.0
        assert by_index[i]["adv_acc"] == pytest.approx(expect, abs=1e-9), (g, n_bad, by_index[i]["adv_acc"], expect)
    assert [r["adv_acc"] for r in rows] == sorted((r["adv_acc"] for r in rows), reverse=True)
    best = Genotype(**{k: tuple(tuple(e) for e in v) if "concat" not in k else tuple(v)
                       for k, v in rows[0]["genotype"].items()})
    assert all(op == "skip_connect" for op, _ in best.normal + best.reduce)  # the unique n_bad = 0 cell
    assert rows[0]["adv_acc"] > rows[1]["adv_acc"]


def test_finetune_runs_then_restores_the_supernet_exactly():
    cfg = replace(SearchConfig(), **{"strategy.name": "robnet", "model.init_channels": 4, "model.layers": 3,
                                     "model.nodes": 2, "robnet.train_steps": 2, "robnet.eval_steps": 2})
    torch.manual_seed(0)
    model = Supernet(cfg.model, info())
    w, a = build_optimizers(cfg, model)
    strat = build_strategy(SearchContext(cfg=cfg, model=model, net=model, w_optim=w, a_optim=a, seed=0))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(2)]
    xt, yt = batches[0]
    strat.step(xt, yt, xt, yt, epoch=0, step=0, lr=0.05)  # momentum buffers exist
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {k: {n: t.clone() for n, t in v.items()} for k, v in w.state_dict()["state"].items()}
    cands = [strat.sample(2, i) for i in range(3)]
    with_ft = strat.rank(cands, batches, batches)
    no_ft = strat.rank(cands, [], batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    now = w.state_dict()["state"]
    assert now.keys() == opt_state.keys() and all(torch.equal(now[k][n], t) for k, v in opt_state.items()
                                                  for n, t in v.items() if torch.is_tensor(t))
    assert strat.rank(cands, batches, batches) == with_ft  # deterministic: same seeds, same restore
    assert len(with_ft) == 3 and {r["index"] for r in no_ft} == {0, 1, 2}


def test_config_checks():
    with pytest.raises(ConfigError, match=r"robustness\.name"):
        check_config(replace(SearchConfig(), **{"strategy.name": "robnet", "robustness.name": "jacobian"}))
    with pytest.raises(ConfigError, match=r"model\.edge_normalization"):
        check_config(replace(SearchConfig(), **{"strategy.name": "robnet", "model.edge_normalization": True,
                                                "model.partial_channels": 2}))


@pytest.mark.slow
def test_robnet_search_writes_a_genotype_the_train_stage_accepts(tmp_path):
    args = ["--data.name=synthetic", "--data.synthetic_size=96", "--data.synthetic_shape=[3,8,8]",
            "--data.synthetic_classes=4", "--data.batch_size=8", "--data.crop_padding=1",
            "--model.init_channels=4", "--model.layers=3", "--model.nodes=2", "--run.progress=false",
            "--steps_per_epoch=2", "--run.tensorboard=false", "--epochs=1", "--strategy.name=robnet",
            "--robnet.samples=3", "--robnet.finetune_steps=1", "--robnet.eval_batches=1",
            "--robnet.train_steps=2", "--robnet.eval_steps=2", f"--run.out_dir={tmp_path}", "--run.name=r"]
    r = run_proc([sys.executable, "-m", "dsrna_dist.search", *args],
                 env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ranking = json.loads((tmp_path / "r" / "robnet_ranking.json").read_text())["ranking"]
    assert len(ranking) == 3
    saved = json.loads((tmp_path / "r" / "genotype.json").read_text())
    assert saved == ranking[0]["genotype"]
    from dsrna_dist.genotype import load

    load(str(tmp_path / "r" / "genotype.json"), nodes=2)
