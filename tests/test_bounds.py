"""Bound engine: soundness (attacks + sampling), exactness on linear graphs (autograd Jacobian),
tightness against enumeration and an LP, gradients against finite differences, registry
coverage of the search space, certified radius vs PGD."""
from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrna_dist.bounds import (BOUND_OPS, BoundedModel, BoundError, certified_radius, has_module_bound,
                               margin_lower_bound)
from dsrna_dist.bounds.graph import _Tracer
from dsrna_dist.space.layers import Normalize, SubsampledConv2d
from dsrna_dist.space.ops import OPS, FactorizedReduce, Zero, build_op

torch.set_num_threads(1)
METHODS = ("ibp", "crown-ibp", "crown")
NORMS = ("inf", "2")
DT = torch.float64


# ----------------------------------------------------------------------------- helpers
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights, random BN running stats and affine params (so eval BN is non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def project(xa, x, eps, norm, lo=0.0, hi=1.0):
    d = xa - x
    if norm == "inf":
        d = d.clamp(-eps, eps)
    else:
        n = d.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (x.dim() - 1))
        d = d * torch.clamp(eps / n, max=1.0)
    # clipping to the range keeps a point of the ball inside the ball (x itself is in range)
    return (x + d).clamp(lo, hi)


def sample_points(x, eps, norm, n, gen):
    """n points per example in the (clipped) ball, incl. corners (inf) / sphere points (2)."""
    B = x.shape[0]
    xs = x.unsqueeze(1).expand(B, n, *x.shape[1:])
    if norm == "inf":
        u = torch.rand(xs.shape, generator=gen, dtype=x.dtype) * 2 - 1
        corners = torch.randint(0, 2, xs.shape, generator=gen).to(x.dtype) * 2 - 1
        d = torch.where(torch.arange(n).view(1, n, *[1] * (x.dim() - 1)) % 2 == 0, u, corners) * eps
    else:
        d = torch.randn(xs.shape, generator=gen, dtype=x.dtype)
        d = d / d.flatten(2).norm(dim=2).view(B, n, *[1] * (x.dim() - 1))
        r = torch.rand((B, n), generator=gen, dtype=x.dtype).pow(0.2)
        r[:, ::2] = 1.0
        d = d * (eps * r).view(B, n, *[1] * (x.dim() - 1))
    pts = (xs + d).reshape(B * n, *x.shape[1:])
    return project(pts, xs.reshape(B * n, *x.shape[1:]), eps, norm)


def pgd_extremes(f, x, eps, norm, steps=25, restarts=2, gen=None):
    """Per example and output k: the max and min of f_k found by PGD (maximize/minimize each)."""
    with torch.no_grad():
        K = f(x).flatten(1).shape[1]
    B = x.shape[0]
    best_hi = torch.full((B, K), -math.inf, dtype=x.dtype)
    best_lo = torch.full((B, K), math.inf, dtype=x.dtype)
    alpha = 2.5 * eps / steps
    for _ in range(restarts):
        for sign in (1.0, -1.0):
            xr = x.repeat_interleave(K, 0)
            w = torch.eye(K, dtype=x.dtype).repeat(B, 1) * sign
            xa = project(xr + (torch.rand(xr.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps, xr, eps, norm)
            for _ in range(steps):
                xa.requires_grad_(True)
                obj = (f(xa).flatten(1) * w).sum()
                (g,) = torch.autograd.grad(obj, xa)
                with torch.no_grad():
                    if norm == "inf":
                        step = g.sign()
                    else:
                        step = g / g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (x.dim() - 1))
                    xa = project(xa + alpha * step, xr, eps, norm)
            with torch.no_grad():
                vals = f(xa).flatten(1).view(B, K, K).diagonal(dim1=1, dim2=2)
            best_hi = torch.maximum(best_hi, vals)
            best_lo = torch.minimum(best_lo, vals)
    return best_lo, best_hi


def assert_sound(model, x, eps, norm, methods=METHODS, n_samples=64, pgd_steps=20, seed=0, tol=1e-6,
                 bm=None, restarts=2):
    """No sampled or PGD point may leave [lb, ub] of any method; returns the bounds."""
    gen = torch.Generator().manual_seed(seed)
    bm = bm or BoundedModel(model)
    f = lambda z: model(z).flatten(1)  # noqa: E731
    with torch.no_grad():
        out = {m: bm.bounds(x, eps, norm, m) for m in methods}
        pts = sample_points(x, eps, norm, n_samples, gen)
        vals = f(pts).view(x.shape[0], n_samples, -1)
        vals = torch.cat([vals, f(x).unsqueeze(1)], 1)
    lo, hi = pgd_extremes(f, x, eps, norm, steps=pgd_steps, restarts=restarts, gen=gen)
    emp_lo = torch.minimum(vals.min(1).values, lo)
    emp_hi = torch.maximum(vals.max(1).values, hi)
    for m, (lb, ub) in out.items():
        assert (lb <= emp_lo + tol).all(), f"{m}/{norm}: lower bound above an attained value " \
                                           f"by {(lb - emp_lo).max().item():.3g}"
        assert (ub >= emp_hi - tol).all(), f"{m}/{norm}: upper bound below an attained value " \
                                           f"by {(emp_hi - ub).max().item():.3g}"
    return out


class Wrap(nn.Module):
    """x -> op(x) (flattened): bounds of every output element of a single op."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x).flatten(1)


class OpsNet(nn.Module):
    """A small DAG with every OPS primitive as alpha-weighted branches (search- or derived-mode),
    stride 1 and 2 edges, FactorizedReduce, Normalize, PC-DARTS style partial channels +
    channel shuffle, and a global-pool + linear head."""

    def __init__(self, c_in=1, c=4, affine=False, classes=3, mean=(0.4,), std=(0.3,)):
        super().__init__()
        prims = OPS.names()
        self.norm = Normalize(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c, affine=affine))
        self.edge1 = nn.ModuleList(build_op(p, c, 1, affine) for p in prims)
        self.edge2 = nn.ModuleList(build_op(p, c, 2, affine) for p in prims)
        self.partial = nn.ModuleList(build_op(p, c // 2, 1, affine) for p in prims)
        self.fr = FactorizedReduce(c, c, affine)
        self.bypass = nn.MaxPool2d(2, 2)
        self.alpha = nn.Parameter(torch.randn(3, len(prims)))
        self.beta = nn.Parameter(torch.randn(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3 * c, classes)
        self.c = c

    def forward(self, x):
        w = F.softmax(self.alpha, dim=-1)
        b = F.softmax(self.beta, dim=-1)
        s = self.stem(self.norm(x))
        n1 = sum(w[0, k] * op(s) for k, op in enumerate(self.edge1))
        h = self.c // 2
        part = sum(w[1, k] * op(n1[:, :h]) for k, op in enumerate(self.partial))
        n2 = torch.cat([part, n1[:, h:]], dim=1).unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)
        red = sum(w[2, k] * op(n2) for k, op in enumerate(self.edge2))
        red = b[0] * red + b[1] * self.fr(n1)
        other = self.bypass(n2)
        out = torch.cat([red, other, red - other], dim=1)
        return self.head(self.pool(out).flatten(1))


def ops_net(seed, affine=False, c_in=1, dtype=DT):
    torch.manual_seed(seed)
    mean, std = (0.4,) * c_in, (0.3,) * c_in
    return randomize(OpsNet(c_in=c_in, affine=affine, mean=mean, std=std), seed).to(dtype).eval()


def linear_jacobian_box(f, x, eps, norm):
    """Exact extremes of an affine f over the clipped ball: autograd Jacobian + box/ball value."""
    J = torch.autograd.functional.jacobian(lambda z: f(z).sum(0), x).flatten(2)  # [K, B, n]
    J = J.permute(1, 0, 2)
    f0 = f(x).flatten(1)
    lo_box = (x - eps).clamp(0, 1).flatten(1)
    hi_box = (x + eps).clamp(0, 1).flatten(1)
    mid, rad = (lo_box + hi_box) / 2, (hi_box - lo_box) / 2
    x0 = x.flatten(1)
    centre = f0 + torch.einsum("bkn,bn->bk", J, mid - x0)
    spread = torch.einsum("bkn,bn->bk", J.abs(), rad)
    return centre - spread, centre + spread, J


# ----------------------------------------------------------------------------- registry
def _leaf_modules(m: nn.Module):
    tracer = _Tracer()
    graph = tracer.trace(m)
    return [m.get_submodule(n.target) for n in graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("name", OPS.names())
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_registered_op_has_bounds(name, affine, stride):
    op = build_op(name, 4, stride, affine)
    for sub in op.modules():
        # every module is either bounded directly or a container traced through
        traced_through = type(sub) in (nn.Sequential, FactorizedReduce) or type(sub).__module__ == "dsrna_dist.space.ops"
        assert has_module_bound(type(sub)) or traced_through, f"{name}: {type(sub).__name__} has no bound class"
    for leaf in _leaf_modules(Wrap(op)):
        assert has_module_bound(type(leaf)), f"{name}: leaf {type(leaf).__name__} has no bound class"
    BoundedModel(Wrap(op))  # raises if any node of the traced graph has no bound class


def test_unbounded_module_is_refused_with_its_name():
    with pytest.raises(BoundError, match="Sigmoid"):
        BoundedModel(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten()))
    with pytest.raises(BoundError, match="product/quotient|not supported|mul"):
        class Sq(nn.Module):
            def forward(self, x):
                return (x * x).flatten(1)
        BoundedModel(Sq()).bounds(torch.rand(1, 1, 2, 2), 0.1)


def test_bad_arguments_are_refused():
    bm = BoundedModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(BoundError, match="norm"):
        bm.bounds(x, 0.1, norm="1")
    with pytest.raises(BoundError, match="method"):
        bm.bounds(x, 0.1, method="lp")
    with pytest.raises(BoundError, match="range"):
        bm.bounds(x + 2, 0.1)
    with pytest.raises(BoundError, match="eps"):
        bm.bounds(x, torch.ones(3))


# ----------------------------------------------------------------------------- per-op checks
def _op_cases():
    for name in OPS.names():
        for affine in (False, True):
            for stride in (1, 2):
                yield pytest.param(name, affine, stride, id=f"{name}-{'aff' if affine else 'noaff'}-s{stride}")


def assert_exact_at_zero_and_sound(model, x, eps_inf, eps_2, **sound_kw):
    """Every method equals the forward pass at eps = 0 and is sound at eps (l_inf and l_2)."""
    bm = BoundedModel(model)
    y = model(x)
    for m in METHODS:
        lb, ub = bm.bounds(x, 0.0, "inf", m)
        torch.testing.assert_close(lb, y, atol=1e-9, rtol=0)
        torch.testing.assert_close(ub, y, atol=1e-9, rtol=0)
    for norm in NORMS:
        assert_sound(model, x, eps_inf if norm == "inf" else eps_2, norm, bm=bm, **sound_kw)


@pytest.mark.parametrize("name,affine,stride", list(_op_cases()))
def test_each_op_exact_at_zero_and_sound(name, affine, stride):
    """Odd 7x7 maps exercise the border (avg-pool divisor, stride-2 padding, strided zero)."""
    torch.manual_seed(0)
    model = randomize(Wrap(build_op(name, 2, stride, affine)), 1).to(DT).eval()
    size = 8 if (name, stride) == ("skip_connect", 2) else 7  # FactorizedReduce needs even maps
    x = torch.rand(2, 2, size, size, dtype=DT)
    assert_exact_at_zero_and_sound(model, x, 0.05, 0.2, n_samples=32, pgd_steps=10)


TRAPS = {
    "depthwise_dilated_strided": lambda: nn.Conv2d(3, 3, 3, stride=2, padding=2, dilation=2, groups=3),
    "subsampled_dilated_strided": lambda: SubsampledConv2d(3, 3, 3, stride=2, padding=2, dilation=2, groups=3),
    "subsampled_5x5_bias": lambda: SubsampledConv2d(3, 3, 5, stride=2, padding=4, dilation=2, groups=3),
    "subsampled_1x1": lambda: SubsampledConv2d(3, 2, 1, stride=2, bias=True),
    "grouped_conv_bias": lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), groups=2),
    "dilated_5x5_pad4": lambda: nn.Conv2d(3, 3, 5, padding=4, dilation=2, groups=3, bias=False),
    "avgpool_no_pad_count": lambda: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
    "avgpool_no_pad_count_s2": lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
    "avgpool_pad_count": lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=True),
    "bn_affine_free": lambda: nn.BatchNorm2d(3, affine=False),
    "zero_strided": lambda: Zero(2),
    "factorized_reduce": lambda: FactorizedReduce(3, 4, affine=False),
    "global_pool_linear": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
    "adaptive_pool_2": lambda: nn.AdaptiveAvgPool2d(2),
}


class Shuffle(nn.Module):
    def forward(self, x):
        y = torch.cat([x[:, :1, 1:, :], x[:, 1:, :-1, :]], dim=1)
        return y.unflatten(1, (1, -1)).transpose(1, 2).flatten(1, 2).permute(0, 1, 3, 2) * 2.0 - 0.5


TRAPS["slice_cat_shuffle_permute"] = Shuffle


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_linear_traps_are_exact(trap, norm):
    """An affine graph's CROWN bound must equal the exact extremes (autograd Jacobian)."""
    torch.manual_seed(0)
    model = randomize(Wrap(TRAPS[trap]()), 2).to(DT).eval()
    size = 8 if trap == "factorized_reduce" else 7  # odd maps elsewhere: border windows differ
    x = torch.rand(2, 3 if "grouped" not in trap else 4, size, size, dtype=DT)
    eps = 0.1 if norm == "inf" else 0.5
    f = lambda z: model(z)  # noqa: E731
    lo, hi, J = linear_jacobian_box(f, x, eps, norm)
    bm = BoundedModel(model)
    for m in ("crown-ibp", "crown"):
        lb, ub = bm.bounds(x, eps, norm, m)
        if norm == "inf":
            torch.testing.assert_close(lb, lo, atol=1e-9, rtol=0)
            torch.testing.assert_close(ub, hi, atol=1e-9, rtol=0)
        else:  # sound and at least as tight as either the ball or the box alone
            ball = eps * J.norm(dim=2)
            f0 = f(x)
            torch.testing.assert_close(lb, torch.maximum(lo, f0 - ball), atol=1e-9, rtol=0)
            torch.testing.assert_close(ub, torch.minimum(hi, f0 + ball), atol=1e-9, rtol=0)
    lb, ub = bm.bounds(x, eps, norm, "ibp")
    if norm == "2":  # IBP intersects with the ball at the affine prefix: sound against ball ∩ box
        ball = eps * J.norm(dim=2)
        lo, hi = torch.maximum(lo, f(x) - ball), torch.minimum(hi, f(x) + ball)
    assert (lb <= lo + 1e-9).all() and (ub >= hi - 1e-9).all()


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, 1), nn.MaxPool2d(3, 1, 1, dilation=2),
                                  nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 2, 0, ceil_mode=True)],
                         ids=["k3s2p1", "k2s1", "k3s1d2", "k2s2", "k3s2ceil"])
def test_maxpool_stride_ne_kernel_sound(pool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), pool, nn.Flatten()).to(DT)
    randomize(model, 3)
    x = torch.rand(2, 2, 7, 7, dtype=DT)
    assert_exact_at_zero_and_sound(model, x, 0.1, 0.4)


# ----------------------------------------------------------------------------- whole networks
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_random_dag_networks_sound_and_crown_no_looser_than_ibp(seed, affine):
    model = ops_net(seed, affine)
    x = torch.rand(3, 1, 6, 6, dtype=DT)
    x[0, 0, 0, :3] = 0.0  # pixels at the range border: the clipping matters
    x[1, 0, 1, :3] = 1.0
    bm = BoundedModel(model)
    for norm, eps in (("inf", 0.03), ("2", 0.15)):
        out = assert_sound(model, x, eps, norm, bm=bm, seed=seed)
        # CROWN intersects with IBP (intermediate and output): never looser, on every example
        assert (out["crown"][0] >= out["ibp"][0] - 1e-9).all()
        assert (out["crown"][1] <= out["ibp"][1] + 1e-9).all()
        y = model(x).argmax(1)
        mi = bm.margin_lower_bound(x, y, eps, norm, "ibp")
        mc = bm.margin_lower_bound(x, y, eps, norm, "crown")
        assert (mc >= mi - 1e-9).all()
        assert (mc.gather(1, y[:, None]) == 0).all()


def test_margin_lower_bound_matches_attacks_and_target():
    model = ops_net(5, True)
    x = torch.rand(4, 1, 6, 6, dtype=DT)
    y = torch.tensor([0, 1, 2, 0])
    bm = BoundedModel(model)
    C = torch.eye(3, dtype=DT)[y].unsqueeze(1) - torch.eye(3, dtype=DT).unsqueeze(0)  # [B, K, K]
    for m in METHODS:
        mlb = bm.margin_lower_bound(x, y, 0.02, "inf", m)
        for j in range(3):
            tgt = torch.full_like(y, j)
            mask = tgt != y
            if mask.any():
                t = bm.margin_lower_bound(x[mask], y[mask], 0.02, "inf", m, target=tgt[mask])
                torch.testing.assert_close(t, mlb[mask, j], atol=1e-9, rtol=0)
        # the margin bound as a general spec: rows e_y - e_j
        lb, _ = bm.bounds(x, 0.02, "inf", m, C=C)
        if m != "crown":  # crown intersects with IBP per row, same numbers as well
            torch.testing.assert_close(lb, mlb, atol=1e-9, rtol=0)
        with torch.no_grad():
            pts = sample_points(x, 0.02, "inf", 64, torch.Generator().manual_seed(0))
            logits = model(pts).view(4, 64, 3)
            margins = logits.gather(2, y.view(4, 1, 1).expand(4, 64, 1)) - logits
        assert (margins.min(1).values >= mlb - 1e-9).all()


def test_train_mode_batchnorm_uses_clean_batch_statistics():
    model = ops_net(3, False).train()
    x = torch.rand(4, 1, 6, 6, dtype=DT)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    bm = BoundedModel(model)
    y = model(x)  # train-mode forward (batch stats); this updates running stats: restore after
    model.load_state_dict({**model.state_dict(), **stats})
    for m in METHODS:
        lb, ub = bm.bounds(x, 0.0, "inf", m)
        torch.testing.assert_close(lb, y, atol=1e-8, rtol=0)
        torch.testing.assert_close(ub, y, atol=1e-8, rtol=0)
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), f"bounds changed {k}"
    # soundness against the frozen-statistics function: an eval copy whose running stats are
    # the clean batch's statistics (captured by hooks on a train-mode forward)
    ref = ops_net(3, False)
    ref.load_state_dict(model.state_dict())
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(
        name, (inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=False))))
        for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    model.load_state_dict({**model.state_dict(), **stats})
    for name, (mu, var) in captured.items():
        bn = ref.get_submodule(name)
        bn.running_mean.copy_(mu)
        bn.running_var.copy_(var)
    ref.eval()
    torch.testing.assert_close(ref(x), y, atol=1e-8, rtol=0)
    for norm, eps in (("inf", 0.03), ("2", 0.1)):
        out = {m: bm.bounds(x, eps, norm, m) for m in METHODS}
        ref_out = assert_sound(ref, x, eps, norm, pgd_steps=10, restarts=1)
        for m in METHODS:
            torch.testing.assert_close(out[m][0], ref_out[m][0], atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- tightness
def _mlp(seed, sizes, dtype=DT):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(nn.Flatten(), *layers[:-1]).to(dtype)


def _grid_extremes(model, x, eps, n=401):
    """Exact (to grid resolution) extremes over a 2-D box by enumeration."""
    lo = (x - eps).clamp(0, 1)[0]
    hi = (x + eps).clamp(0, 1)[0]
    g0 = torch.linspace(0, 1, n, dtype=DT)
    pts = torch.stack(torch.meshgrid(lo[0] + g0 * (hi[0] - lo[0]), lo[1] + g0 * (hi[1] - lo[1]),
                                     indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        v = model(pts)
    return v.min(0).values, v.max(0).values


@pytest.mark.parametrize("seed", range(4))
def test_tightness_against_enumeration_2d(seed):
    model = _mlp(seed, [2, 12, 12, 3])
    x = torch.rand(1, 2, dtype=DT) * 0.6 + 0.2
    eps = 0.15
    emin, emax = _grid_extremes(model, x, eps)
    bm = BoundedModel(model)
    res = {m: bm.bounds(x, eps, "inf", m) for m in METHODS}
    for m, (lb, ub) in res.items():
        assert (lb[0] <= emin + 1e-9).all() and (ub[0] >= emax - 1e-9).all(), m
    gap = {m: (ub - lb).sum().item() for m, (lb, ub) in res.items()}
    true_gap = (emax - emin).sum().item()
    assert gap["crown"] <= gap["ibp"] + 1e-9
    # tightness: CROWN's slack over the true range is a fraction of IBP's
    assert gap["crown"] - true_gap <= 0.75 * (gap["ibp"] - true_gap) + 1e-9, (gap, true_gap)


def test_tightness_1d_exact_for_monotone_region():
    """1-D input: a net that is affine on the ball (no unstable ReLU) must be bounded exactly."""
    model = _mlp(0, [1, 8, 2])
    with torch.no_grad():
        model[1].bias.copy_(torch.linspace(2, 3, 8, dtype=DT))
        model[1].weight.copy_(torch.linspace(-1, 1, 8, dtype=DT).view(8, 1))
    x = torch.tensor([[0.5]], dtype=DT)
    ts = torch.linspace(0.4, 0.6, 2001, dtype=DT).view(-1, 1)
    with torch.no_grad():
        v = model(ts)
    lb, ub = BoundedModel(model).bounds(x, 0.1, "inf", "crown")
    torch.testing.assert_close(lb[0], v.min(0).values, atol=1e-9, rtol=0)
    torch.testing.assert_close(ub[0], v.max(0).values, atol=1e-9, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_crown_below_triangle_lp_below_true_minimum(seed):
    """One hidden layer: exact pre-activation bounds; the triangle-relaxation LP optimum lies
    between CROWN's lower bound and the true minimum (enumerated)."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    model = _mlp(seed + 10, [2, 10, 3])
    x = torch.rand(1, 2, dtype=DT) * 0.6 + 0.2
    eps = 0.2
    W1, b1 = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    W2, b2 = model[3].weight.detach().numpy(), model[3].bias.detach().numpy()
    xl = (x - eps).clamp(0, 1)[0].numpy()
    xu = (x + eps).clamp(0, 1)[0].numpy()
    zc, zr = W1 @ ((xl + xu) / 2) + b1, abs(W1) @ ((xu - xl) / 2)
    l, u = zc - zr, zc + zr
    h = W1.shape[0]
    emin, _ = _grid_extremes(model, x, eps)
    lb = BoundedModel(model).bounds(x, eps, "inf", "crown")[0][0].detach().numpy()
    import numpy as np
    for k in range(3):
        # variables: x (2), a (h);  z = W1 x + b1 substituted
        c = np.concatenate([np.zeros(2), W2[k]])
        A_ub, b_ub, bounds = [], [], [(xl[0], xu[0]), (xl[1], xu[1])]
        for i in range(h):
            row = np.zeros(2 + h)
            if u[i] <= 0:
                bounds.append((0, 0))
                continue
            if l[i] >= 0:  # a = z
                bounds.append((None, None))
                row[:2], row[2 + i] = W1[i], -1
                A_ub += [row, -row]
                b_ub += [-b1[i], b1[i]]
                continue
            bounds.append((0, None))
            r1 = np.zeros(2 + h)
            r1[:2], r1[2 + i] = W1[i], -1  # z - a <= 0  ->  W1 x + b1 - a <= 0
            A_ub.append(r1)
            b_ub.append(-b1[i])
            s = u[i] / (u[i] - l[i])  # a <= s (z - l)
            r2 = np.zeros(2 + h)
            r2[:2], r2[2 + i] = -s * W1[i], 1
            A_ub.append(r2)
            b_ub.append(s * (b1[i] - l[i]))
        res = linprog(c, A_ub=np.array(A_ub) if A_ub else None, b_ub=np.array(b_ub) if b_ub else None,
                      bounds=bounds, method="highs")
        assert res.status == 0
        lp = res.fun + b2[k]
        assert lb[k] <= lp + 1e-7, (k, lb[k], lp)
        assert lp <= emin[k].item() + 1e-7, (k, lp, emin[k].item())


@pytest.mark.parametrize("seed", range(6))
def test_crown_ibp_no_looser_than_ibp_where_theory_says(seed):
    """Linear-ReLU-Linear with zero lower slopes: every backward term concretizes as IBP's does,
    and the joint minimum over the ball is >= the sum of per-term minima: CROWN-IBP >= IBP."""
    model = _mlp(seed, [16, 20, 5])
    x = torch.rand(8, 16, dtype=DT)
    y = torch.randint(0, 5, (8,))
    bm = BoundedModel(model, relu_lower="zero")
    for norm, eps in (("inf", 0.05), ("2", 0.3)):
        mi = bm.margin_lower_bound(x, y, eps, norm, "ibp")
        mc = bm.margin_lower_bound(x, y, eps, norm, "crown-ibp")
        assert (mc >= mi - 1e-9).all()


# ----------------------------------------------------------------------------- gradients
class TinyMixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = Normalize((0.5,), (0.25,))
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.ops = nn.ModuleList([build_op("sep_conv_3x3", 2, 1, False), build_op("avg_pool_3x3", 2, 1, False),
                                  build_op("max_pool_3x3", 2, 1, False), build_op("skip_connect", 2, 1, False)])
        self.alpha = nn.Parameter(torch.randn(4))
        self.fc = nn.Linear(2 * 16, 3)

    def forward(self, x):
        w = F.softmax(self.alpha, -1)
        h = F.relu(self.conv(self.norm(x)))
        return self.fc(sum(w[k] * op(h) for k, op in enumerate(self.ops)).flatten(1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", NORMS)
def test_gradients_match_finite_differences(method, norm):
    torch.manual_seed(1)
    model = randomize(TinyMixed(), 4).to(DT).eval()
    x = torch.rand(2, 1, 4, 4, dtype=DT)
    y = torch.tensor([0, 2])
    eps = 0.02 if norm == "inf" else 0.06
    bm = BoundedModel(model)

    def value():
        return bm.margin_lower_bound(x, y, eps, norm, method).sum()

    params = [model.alpha, model.conv.weight, model.fc.weight, model.ops[0][0][1].weight]
    grads = torch.autograd.grad(value(), params)
    h = 1e-6
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, gp in zip(params, grads):
            idx = range(p.numel()) if p.numel() <= 4 else torch.randperm(p.numel(), generator=g)[:4].tolist()
            for i in idx:
                flat = p.view(-1)
                old = flat[i].item()
                flat[i] = old + h
                up = value().item()
                flat[i] = old - h
                dn = value().item()
                flat[i] = old
                fd = (up - dn) / (2 * h)
                assert abs(fd - gp.view(-1)[i].item()) <= 1e-5 * max(1.0, abs(fd)), (p.shape, i, fd, gp.view(-1)[i])
    assert grads[0].abs().sum() > 0  # alpha really enters the bound


# ----------------------------------------------------------------------------- certified radius
def _pgd_success(model, x, y, eps, norm, steps=20, restarts=2, gen=None):
    """Per example: does PGD (margin loss) find a misclassified point at radius eps?"""
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    for _ in range(restarts):
        xa = project(x + (torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1) * eps, x, eps, norm)
        for _ in range(steps):
            xa.requires_grad_(True)
            out = model(xa)
            other = out.scatter(1, y[:, None], -math.inf).max(1).values
            loss = (other - out.gather(1, y[:, None])[:, 0]).sum()
            (gr,) = torch.autograd.grad(loss, xa)
            with torch.no_grad():
                step = gr.sign() if norm == "inf" else gr / gr.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
                xa = project(xa + 2.5 * eps / steps * step, x, eps, norm)
        with torch.no_grad():
            found |= model(xa).argmax(1) != y
    return found


def _small_cnn(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), build_op("dil_conv_3x3", 4, 1, True),
                        nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Flatten(), nn.Linear(36, 3))
    randomize(net, seed)
    with torch.no_grad():  # no dominant class: decisions change inside [0, 1]
        net[-1].bias.zero_()
        net[1].bias.zero_()
    return net.to(DT).eval()


@pytest.mark.parametrize("norm", NORMS)
def test_certified_radius_below_pgd_radius(norm):
    model = _small_cnn(10)
    x = torch.rand(6, 1, 6, 6, dtype=DT)
    y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one misclassified example: radius 0
    bm = BoundedModel(model)
    gen = torch.Generator().manual_seed(0)
    radii = {m: certified_radius(bm, x, y, norm, m, steps=8, eps_init=0.02) for m in METHODS}
    for m, r in radii.items():
        assert r[0] == 0
        assert (r[1:] > 0).all(), (m, r)
        # the bound at the returned radius certifies
        mlb = bm.margin_lower_bound(x[1:], y[1:], r[1:], norm, m).scatter(1, y[1:, None], math.inf)
        assert (mlb.min(1).values > 0).all()
    # PGD bisection for the smallest radius it can attack: certified radii must stay below it
    top = 1.0 if norm == "inf" else 6.0
    hit = _pgd_success(model, x, y, torch.full((6, 1, 1, 1), top, dtype=DT), norm, gen=gen)
    assert hit[1:].sum() >= 3, "too few attackable examples for a meaningful check"
    lo = torch.zeros(6, dtype=DT)
    hi = torch.full((6,), top, dtype=DT)
    for _ in range(8):
        mid = (lo + hi) / 2
        ok = _pgd_success(model, x, y, mid.view(-1, 1, 1, 1), norm, gen=gen)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    hi = torch.where(hit, hi, torch.full_like(hi, math.inf))
    for m, r in radii.items():
        assert (r <= hi).all(), (m, r, hi)
    # CROWN's margin bound is at least IBP's at every eps, so its radius is not smaller
    # (up to the bisection's resolution, which both runs share on the certified side)
    assert (radii["crown"] >= radii["ibp"] * math.exp(-1.0 / 2 ** 6)).all()


def test_certified_radius_targeted_and_batched():
    model = _small_cnn(10)
    x = torch.rand(4, 1, 6, 6, dtype=DT)
    y = model(x).argmax(1)
    target = (y + 1) % 3
    r_all = certified_radius(model, x, y, "inf", "crown-ibp", steps=10, eps_init=0.01)
    r_t = certified_radius(model, x, y, "inf", "crown-ibp", steps=10, eps_init=0.01, target=target)
    assert (r_t > 0).all()
    mt = margin_lower_bound(model, x, y, r_t, "inf", "crown-ibp", target=target)
    assert (mt > 0).all()
    # per example, the batched result equals a single-example run (no cross-talk in eval mode)
    for i in range(4):
        ri = certified_radius(model, x[i:i + 1], y[i:i + 1], "inf", "crown-ibp", steps=10, eps_init=0.01)
        torch.testing.assert_close(ri, r_all[i:i + 1])


# ----------------------------------------------------------------------------- real networks
def _info(size, ch, classes=10):
    return types.SimpleNamespace(name="synthetic", image_size=size, in_channels=ch, num_classes=classes,
                                 mean=(0.5,) * ch, std=(0.25,) * ch)


def _supernet(size, ch, partial=1, edge_norm=False, layers=3, classes=10):
    from dsrna_dist.config import SupernetConfig
    from dsrna_dist.space.supernet import Supernet
    torch.manual_seed(0)
    cfg = SupernetConfig(init_channels=4, layers=layers, nodes=3, partial_channels=partial,
                         edge_normalization=edge_norm)
    net = Supernet(cfg, _info(size, ch, classes))
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(torch.randn(a.shape))
    return net


def _network(size, ch, layers=3, classes=10):
    from dsrna_dist.config import NetworkConfig
    from dsrna_dist.space.network import build_network
    torch.manual_seed(0)
    cfg = NetworkConfig(genotype="DARTS_V2", init_channels=4, layers=layers, auxiliary=False)
    return build_network(cfg, "DARTS_V2", _info(size, ch, classes))


# the supernets at 32x32x3 are `make test-all` (~45 s): 28x28x1 (the offline default's shape) runs
# every supernet op here, and the derived network covers 3-channel 32x32 input
@pytest.mark.parametrize("kind,size,ch", [("supernet", 28, 1), ("pcdarts", 28, 1), ("network", 28, 1),
                                          ("network", 32, 3), pytest.param("supernet", 32, 3, marks=pytest.mark.slow),
                                          pytest.param("pcdarts", 32, 3, marks=pytest.mark.slow)])
def test_real_networks_exact_at_zero_and_differentiable(kind, size, ch):
    net = {"supernet": lambda: _supernet(size, ch), "pcdarts": lambda: _supernet(size, ch, 2, True),
           "network": lambda: _network(size, ch)}[kind]()
    x = torch.rand(2, ch, size, size)
    y = torch.tensor([1, 3])
    for mode in ("train", "eval"):
        net.train(mode == "train")
        state = {k: v.clone() for k, v in net.state_dict().items()}
        bm = BoundedModel(net)
        ref = net(x)
        net.load_state_dict(state)
        for m in ("ibp", "crown-ibp"):
            with torch.no_grad():
                lb, ub = bm.bounds(x, 0.0, "inf", m)
            torch.testing.assert_close(lb, ref, atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(ub, ref, atol=2e-4, rtol=1e-4)
    net.eval()
    bm = BoundedModel(net)
    lbm = bm.margin_lower_bound(x, y, 1e-3, "inf", "crown-ibp")
    params = (net.arch_parameters() if kind != "network" else []) + [net.classifier.weight]
    grads = torch.autograd.grad(lbm.sum(), params)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["supernet", pytest.param("pcdarts", marks=pytest.mark.slow), "network"])
def test_real_networks_sound_small(kind):
    """IBP / CROWN-IBP on 3-cell nets (8x8); full CROWN (quadratic cost) on 1-cell 4x4 nets."""
    build = {"supernet": lambda s, l: _supernet(s, 1, layers=l, classes=3),
             "pcdarts": lambda s, l: _supernet(s, 1, 2, True, layers=l, classes=3),
             "network": lambda s, l: _network(s, 1, layers=l, classes=3)}[kind]
    for size, layers, methods in ((8, 3, ("ibp", "crown-ibp")), (4, 1, METHODS)):
        net = randomize(build(size, layers), 11).to(DT).eval()
        x = torch.rand(2, 1, size, size, dtype=DT)
        bm = BoundedModel(net)
        for norm, eps in (("inf", 0.01), ("2", 0.04)):
            out = assert_sound(net, x, eps, norm, methods=methods, bm=bm, n_samples=16, pgd_steps=8,
                               restarts=1)
            if "crown" in out:
                assert (out["crown"][0] >= out["ibp"][0] - 1e-9).all()


@pytest.mark.slow
@pytest.mark.parametrize("size,ch", [(28, 1), (32, 3)])
def test_real_networks_sound_full_size(size, ch):
    for net in (_supernet(size, ch), _supernet(size, ch, 2, True), _network(size, ch)):
        net = randomize(net, 12).to(DT).eval()
        x = torch.rand(2, ch, size, size, dtype=DT)
        assert_sound(net, x, 2 / 255, "inf", methods=("ibp", "crown-ibp"), n_samples=16, pgd_steps=10)


def test_chunked_crown_equals_unchunked():
    model = ops_net(9, False)
    x = torch.rand(3, 1, 6, 6, dtype=DT)
    big = BoundedModel(model, max_memory_mb=1024)
    small = BoundedModel(model, max_memory_mb=0.1)  # a few rows and one example per chunk
    calls = []
    chunks = small._chunks
    small._chunks = lambda *a, **k: calls.append(chunks(*a, **k)) or calls[-1]
    for m in ("crown-ibp", "crown"):
        a = big.bounds(x, 0.02, "inf", m)
        b = small.bounds(x, 0.02, "inf", m)
        torch.testing.assert_close(a[0], b[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(a[1], b[1], atol=1e-10, rtol=0)
    assert any(ex < 3 for ex, _ in calls)  # the small budget really split the passes into chunks


def test_registry_names_are_listed():
    assert any(k.startswith("module:") and "Conv2d" in k for k in BOUND_OPS.names())
    assert "method:transpose" in BOUND_OPS and "function:cat" in BOUND_OPS


# ----------------------------------------------------------------------------- value-free runs
def _bounds_and_grads(bm, net, x, eps, norm, method, **kw):
    lb, ub = bm.bounds(x, eps, norm, method, **kw)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lb.sum(), params, allow_unused=True, retain_graph=True)
    return lb.detach(), ub.detach(), [g for g in grads if g is not None]


@pytest.mark.parametrize("shape", [(16, 3, 5, 5), (7, 4), (2, 1, 3, 3), (64, 8, 4, 4)])
def test_batch_stats_match_batchnorm_and_their_gradients_var_mean(shape):
    """The two-pass statistics normalise exactly as BN's train mode does, and equal
    torch.var_mean (biased) in value and gradient."""
    from dsrna_dist.bounds.ops_linear import batch_stats

    torch.manual_seed(0)
    x = (3.0 + 2.0 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    mean, var = batch_stats(x)
    view = (-1,) + (1,) * (x.dim() - 2)
    ours = (x - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5)
    ref = F.batch_norm(x, None, None, training=True, eps=1e-5)
    assert torch.allclose(ours, ref, atol=1e-10)
    dims = [0] + list(range(2, x.dim()))
    rv, rm = torch.var_mean(x, dim=dims, unbiased=False)
    assert torch.allclose(mean, rm, atol=1e-12) and torch.allclose(var, rv, rtol=1e-12)
    w = torch.randn_like(var)
    g_ours = torch.autograd.grad((mean * w).sum() + (var * w).sum(), x)[0]
    g_ref = torch.autograd.grad((rm * w).sum() + (rv * w).sum(), x)[0]
    assert torch.allclose(g_ours, g_ref, atol=1e-10)


@pytest.mark.parametrize("kind", [pytest.param("pcdarts", marks=pytest.mark.slow), "network", "ops"])
def test_value_free_propagation_equals_the_clean_pass(kind):
    """Skipping the clean pass (eval mode, or train mode with BN statistics captured from the
    caller's forward of the same batch) changes neither the bounds nor their gradients."""
    from dsrna_dist.bounds import capture_bn_stats
    build = {"pcdarts": lambda: _supernet(8, 1, 2, True, layers=3, classes=4),
             "network": lambda: _network(8, 1, layers=3, classes=4),
             "ops": lambda: ops_net(5, True, dtype=torch.float32)}[kind]
    net = randomize(build(), 3).to(DT)
    size = 8 if kind != "ops" else 6
    x = torch.rand(3, 1, size, size, dtype=DT)
    methods = ("ibp", "crown-ibp", "crown") if kind == "ops" else ("ibp", "crown-ibp")
    for train in (False, True):
        net.train(train)
        auto, always = BoundedModel(net), BoundedModel(net, clean_values="always")
        stats = None
        if train:
            with capture_bn_stats(net) as stats:
                net(x)
            assert stats and all(v is not None for v in stats.values())
            assert not auto.value_free_ok(None) and auto.value_free_ok(stats)
        else:
            assert auto.value_free_ok(None)
        for method in methods:
            for norm, eps in (("inf", 0.01), ("2", 0.05)):
                got = _bounds_and_grads(auto, net, x, eps, norm, method, bn_stats=stats)
                want = _bounds_and_grads(always, net, x, eps, norm, method)
                torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)
                assert len(got[2]) == len(want[2]) > 0
                for g, w in zip(got[2], want[2]):
                    torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_bn_stats_of_a_module_called_twice_are_not_used():
    from dsrna_dist.bounds import capture_bn_stats

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2, affine=False)
            self.fc = nn.Linear(2 * 16, 3)

        def forward(self, x):
            return self.fc(self.bn(F.relu(self.bn(self.conv(x)))).flatten(1))

    net = Twice().train()
    x = torch.rand(4, 1, 4, 4)
    with capture_bn_stats(net) as stats:
        net(x)
    assert stats == {net.bn: None}
    bm = BoundedModel(net)
    assert not bm.value_free_ok(stats)
    lb, _ = bm.bounds(x, 0.0, "inf", "ibp", bn_stats=stats)    # falls back to the clean pass
    torch.testing.assert_close(lb, net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_stacked_upper_bound_equals_side_by_side(norm):
    """ub(C) = -lb(-C): one pass over [C; -C] gives what lA/uA side by side give."""
    net = randomize(_supernet(8, 1, 2, True, layers=3, classes=4), 5).to(DT).eval()
    x = torch.rand(3, 1, 8, 8, dtype=DT)
    C = torch.randn(3, 1, 4, dtype=DT)
    bm = BoundedModel(net)
    assert bm.stack_rows >= 1
    stacked = bm.bounds(x, 0.02, norm, "crown-ibp", C=C)
    bm.stack_rows = 0
    side = bm.bounds(x, 0.02, norm, "crown-ibp", C=C)
    for a, b in zip(stacked, side):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (stacked[0] < stacked[1]).all()


class WeightedSumNet(nn.Module):
    """weighted_sum over perturbed branches and one constant branch, with signed weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.w = nn.Parameter(torch.tensor([0.7, -1.3, 0.4, 2.0]))
        self.register_buffer("const", torch.randn(1, 2, 5, 5))

    def forward(self, x):
        from dsrna_dist.space.cells import weighted_sum
        branches = [self.conv(x), F.relu(self.conv2(x)), self.const, F.relu(-self.conv(x))]
        return weighted_sum(self.w, (0, 1, 2, 3), branches).flatten(1)


def test_weighted_sum_bound_exact_sound_and_differentiable():
    """The alpha-weighted sum's own bound class: one traced node, exact at eps = 0, sound for
    signed weights and a constant branch (its value enters as a bias), gradient w.r.t. the
    weights equal to finite differences."""
    torch.manual_seed(2)
    net = WeightedSumNet().to(DT)
    bm = BoundedModel(net)
    assert sum(type(op).__name__ == "BoundWeightedSum" for op in bm.ops.values()) == 1
    x = torch.rand(3, 1, 5, 5, dtype=DT)
    assert_exact_at_zero_and_sound(net, x, 0.05, 0.2)
    lb = bm.bounds(x, 0.05, "inf", "crown-ibp")[0].sum()
    (g,) = torch.autograd.grad(lb, [net.w])
    h = 1e-6
    for i in range(4):
        with torch.no_grad():
            net.w[i] += h
            up = bm.bounds(x, 0.05, "inf", "crown-ibp")[0].sum()
            net.w[i] -= 2 * h
            down = bm.bounds(x, 0.05, "inf", "crown-ibp")[0].sum()
            net.w[i] += h
        assert float(g[i]) == pytest.approx(float((up - down) / (2 * h)), rel=1e-4, abs=1e-6)
