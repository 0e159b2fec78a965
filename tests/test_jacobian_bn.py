"""Formula (15) on a supernet WITH BatchNorm, against per-example autograd Jacobians.

Eval mode (running statistics): the metric equals a per-example ``torch.autograd.functional.
jacobian`` loop exactly. Train mode (batch statistics, as in search): the metric equals the
per-example Jacobians of the supernet normalised with that batch's statistics held fixed
(reference: a copy whose BNs run in eval mode with the batch statistics as running ones), and
differs from the exact diagonal blocks d f(x_i)/d x_i of the batched function by example i's
own O(1/B) pull on the statistics: measured here, and shrinking as B grows. The one-vector VJP
the metric used before (same e_k for every example) is shown to vanish on this network.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.autograd.functional import jacobian

from dsrna_dist.config import RobustnessConfig, SupernetConfig
from dsrna_dist.robustness import build_metric, metric_config
from dsrna_dist.robustness.jacobian import jacobian_rows
from dsrna_dist.space.supernet import Supernet

torch.set_num_threads(1)


def supernet(pc: int = 2) -> Supernet:
    info = SimpleNamespace(name="t", in_channels=1, image_size=6, num_classes=4, mean=(0.5,), std=(0.25,))
    scfg = SupernetConfig(init_channels=4, layers=2, nodes=2, stem_multiplier=2,
                          primitives=("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
                                      "sep_conv_3x3", "dil_conv_3x3"),
                          partial_channels=pc, edge_normalization=pc > 1)
    torch.manual_seed(0)
    net = Supernet(scfg, info).double()
    for p in net.arch_parameters():
        p.data.normal_(0, 1)
    return net


def cfg(**kw) -> RobustnessConfig:
    return metric_config(**dict(dict(name="jacobian", norm="inf", delta=0.1), **kw))


def per_example(net, x: torch.Tensor) -> torch.Tensor:
    """[B, K, D] by torch.autograd.functional.jacobian, one example (batch of 1) at a time."""
    return torch.stack([jacobian(lambda xi: net(xi[None])[0], xi).flatten(1) for xi in x])


def formula15(jac: torch.Tensor, q: float, delta: float) -> torch.Tensor:
    return -delta * jac.norm(p=q, dim=2).mean(1).mean(0)


def frozen_copy(net, x: torch.Tensor):
    """Independent reference: a copy whose train-mode BNs run in eval mode with the batch
    statistics of ``x`` (torch.var_mean, biased) as running statistics."""
    ref = copy.deepcopy(net)
    stats = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: stats.__setitem__(m, torch.var_mean(
        a[0], dim=[0] + list(range(2, a[0].dim())), unbiased=False)))
        for m in ref.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()
    for m, (var, mean) in stats.items():
        m.running_mean, m.running_var = mean.clone(), var.clone()
        m.momentum = 0.0
    return ref.eval()


@pytest.mark.parametrize("norm,q", [("inf", 1.0), ("2", 2.0)])
@pytest.mark.parametrize("vjp", ["loop", "batched"])
def test_eval_mode_supernet_matches_per_example_jacobians(norm, q, vjp):
    net = supernet()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 1, 6, 6, dtype=torch.float64))  # non-trivial running statistics
    net.eval()
    x, y = torch.rand(5, 1, 6, 6, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    r, logs = build_metric(cfg(norm=norm, vjp=vjp))(net, x, y)
    torch.testing.assert_close(r, formula15(per_example(net, x), q, 0.1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vjp", ["loop", "batched"])
def test_train_mode_supernet_is_per_example_at_the_batch_statistics(vjp):
    net = supernet().train()
    x, y = torch.rand(6, 1, 6, 6, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    run_before = [b.clone() for b in net.buffers()]
    metric = build_metric(cfg(vjp=vjp))
    r, _ = metric(net, x, y)
    assert all(torch.equal(a, b) for a, b in zip(run_before, net.buffers()))  # running stats untouched
    ref_jac = per_example(frozen_copy(net, x), x)
    torch.testing.assert_close(r, formula15(ref_jac, 1.0, 0.1), rtol=1e-10, atol=1e-12)
    assert float(-r.detach() / 0.1) > 1e-2                                       # not a vanishing value

    # bn_stats=objective: the statistics of the caller's forward of the WHOLE batch, the metric on half
    half = build_metric(cfg(vjp=vjp, batch_fraction=0.5))
    with half.forward_context(net):
        net(x)
    r_half, logs = half(net, x, y)
    assert logs["examples"] == 3
    torch.testing.assert_close(r_half, formula15(ref_jac[:3], 1.0, 0.1), rtol=1e-10, atol=1e-12)


def test_coupling_through_batch_statistics_is_order_one_over_b_and_same_vector_vjp_vanishes():
    """Exact diagonal blocks of the full batch Jacobian vs the metric's rows: the difference is
    example i's own effect on the batch mean/variance; it shrinks as the batch grows."""
    net = supernet().train()
    rel = {}
    for b in (4, 16):
        g = torch.Generator().manual_seed(b)
        x = torch.rand(b, 1, 6, 6, dtype=torch.float64, generator=g)
        full = jacobian(net, x)                                         # [B, K, B, 1, 6, 6]
        diag = torch.stack([full[i, :, i].flatten(1) for i in range(b)])  # [B, K, D]
        xr = x.clone().requires_grad_(True)
        from dsrna_dist.robustness.bn import batch_stat_bns, capture_stats, frozen_stats
        with capture_stats(batch_stat_bns(net)) as stats:
            net(x)
        with frozen_stats(stats):
            f = net(xr)
        rows = jacobian_rows(f, xr, batched=False, create_graph=False).flatten(2).transpose(0, 1)
        rel[b] = float((rows - diag).norm() / diag.norm())
        if b == 4:  # the same e_k for every example: d(sum_i f_ik)/dx = 0 with batch statistics
            xo = x.clone().requires_grad_(True)
            old = jacobian_rows(net(xo), xo, batched=False, create_graph=False)
            assert float(old.abs().sum(dim=(2, 3, 4)).mean()) < 1e-9 * float(diag.abs().sum(2).mean())
    assert 0 < rel[16] < rel[4] < 0.6, rel
    assert rel[16] < 0.35 * rel[4], rel             # ~1/B (measured 0.43 at B=4, 0.094 at B=16)


def test_gradient_through_the_statistics_matches_finite_differences():
    """dR/dalpha includes how alpha changes the batch statistics (they stay on the graph)."""
    net = supernet().train()
    x, y = torch.rand(5, 1, 6, 6, dtype=torch.float64), torch.zeros(5, dtype=torch.long)
    metric = build_metric(cfg(norm="2"))
    alpha = net.arch_parameters()[0]
    (g,) = torch.autograd.grad(metric(net, x, y)[0], alpha)
    h = 1e-6
    for idx in [(0, 4), (1, 5), (2, 3)]:
        vals = []
        for s in (1, -1):
            with torch.no_grad():
                alpha[idx] += s * h
            vals.append(float(metric(net, x, y)[0].detach()))
            with torch.no_grad():
                alpha[idx] -= s * h
        assert float(g[idx]) == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-5, abs=1e-10)
    # the path through the statistics matters: detaching them changes the gradient
    from dsrna_dist.robustness.bn import batch_stat_bns, capture_stats, frozen_stats
    with torch.no_grad(), capture_stats(batch_stat_bns(net)) as stats:
        net(x)
    xr = x.clone().requires_grad_(True)
    with frozen_stats(stats):
        f = net(xr)
    rows = jacobian_rows(f, xr, batched=False, create_graph=True)
    r_det = -0.1 * rows.flatten(2).norm(dim=2).mean()
    (g_det,) = torch.autograd.grad(r_det, alpha)
    assert (g - g_det).norm() > 1e-3 * g.norm()
