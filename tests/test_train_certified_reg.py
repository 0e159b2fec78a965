"""Bound-balance regulariser of certified training (Shi et al. 2021; issue #16.3).

Reference: a small conv net bounded by hand (interval arithmetic written out layer by layer,
BatchNorm on the clean batch's statistics, autograd through all of it) and the paper's two
terms computed directly with boolean indexing. The regime's loss with the regulariser minus the
same regime's loss without it must equal coefficient * (reference terms), in value and in the
gradient of every weight. The 2-rank bit-identity / exact-resume tests run with it on
(tests/test_train_certified.py).
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrna_dist.config import ConfigError, RegimeConfig, TrainConfig
from dsrna_dist.space.layers import Normalize
from dsrna_dist.training import build_regime
from dsrna_dist.training import bound_balance as bb

torch.set_num_threads(1)
MEAN, STD = 0.3, 0.4


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((MEAN,), (STD,))
        self.c1, self.b1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 4)
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()

    def forward(self, x, drop_prob: float = 0.0):
        h = self.r1(self.b1(self.c1(self.normalize(x))))
        h = self.r2(self.b2(self.c2(h)))
        return self.fc(h.flatten(1))


def _tcfg(**regime) -> TrainConfig:
    t = TrainConfig()
    return replace(t, model=replace(t.model, auxiliary=False, drop_path=0.0), regime=RegimeConfig(**regime))


def _bn_box(bn, clean, lo, up):
    """BN in train mode on the clean batch's statistics: a per-channel affine map."""
    mean = clean.mean((0, 2, 3))
    var = clean.var((0, 2, 3), unbiased=False)
    scale = bn.weight / torch.sqrt(var + bn.eps)
    shift = (bn.bias - mean * scale)[None, :, None, None]
    scale = scale[None, :, None, None]
    c, r = (up + lo) / 2, (up - lo) / 2
    c2, r2 = c * scale + shift, r * scale.abs()
    return c2 - r2, c2 + r2, F.batch_norm(clean, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def _conv_box(conv, clean, lo, up):
    c, r = (up + lo) / 2, (up - lo) / 2
    cc = F.conv2d(c, conv.weight, conv.bias, conv.stride, conv.padding)
    rr = F.conv2d(r, conv.weight.abs(), None, conv.stride, conv.padding)
    return cc - rr, cc + rr, conv(clean)


def reference_terms(net: SmallNet, x, eps, tol):
    """(tightness, relu) of the two ReLU input boxes, straight from the paper's formulas."""
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    tau0 = ((up - lo) / 2 / STD).mean()
    lo, up, clean = (lo - MEAN) / STD, (up - MEAN) / STD, (x - MEAN) / STD
    boxes = []
    for conv, bn in ((net.c1, net.b1), (net.c2, net.b2)):
        lo, up, clean = _conv_box(conv, clean, lo, up)
        lo, up, clean = _bn_box(bn, clean, lo, up)
        boxes.append((lo, up))
        lo, up, clean = lo.clamp(min=0), up.clamp(min=0), clean.clamp(min=0)
    tights, relus = [], []
    for lo, up in boxes:
        c, r = (lo + up) / 2, (up - lo) / 2
        tights.append(F.relu(tol - tau0 / r.mean()) / tol)
        act, inact = lo > 0, up < 0
        assert act.any() and inact.any()  # both ratios exist: the relu term is exercised
        rho_m = c[act].sum() / -c[inact].sum()
        d = (c - c.mean()) ** 2
        rho_v = d[act].sum() / d[inact].sum()
        rho_m, rho_v = min(rho_m, 1 / rho_m), min(rho_v, 1 / rho_v)
        relus.append((F.relu(tol - rho_m) + F.relu(tol - rho_v)) / tol)
    return sum(tights) / 2, sum(relus) / 2


def _loss_and_grads(net, reg, x, y):
    net.zero_grad(set_to_none=True)
    out = reg.loss(net, net, x, y, drop_prob=0.0, epoch=0, step=4, steps_per_epoch=10, crit=nn.CrossEntropyLoss())
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("name", ["ibp", "crown_ibp"])
def test_regulariser_matches_direct_computation(name):
    torch.manual_seed(0)
    net = SmallNet().train()
    with torch.no_grad():  # unbalanced layers: more inactive neurons in the first, more active in the second
        net.b1.bias.fill_(-0.6)
        net.b2.bias.fill_(0.5)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    eps_max, tol, lam = 0.2, 0.9, 0.7
    cfg = dict(name=name, eps=eps_max, warmup_epochs=2, kappa_end=0.5, bound_reg_tol=tol)
    eps = eps_max * 5 / 20  # epoch 0, step 4 of 10
    coef = lam * (1 - eps / eps_max)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    base, g0 = _loss_and_grads(net, build_regime(_tcfg(**cfg)), x, y)
    net.load_state_dict(state)  # the same BN running statistics for the second pass
    out, g1 = _loss_and_grads(net, build_regime(_tcfg(**cfg, bound_reg=lam)), x, y)
    net.load_state_dict(state)
    net.zero_grad(set_to_none=True)
    t, r = reference_terms(net, x, eps, tol)
    assert t.item() > 0.01 and r.item() > 0.01  # both terms active at this setting
    (coef * (t + r)).backward()
    assert out.logs["bound_reg_coef"] == pytest.approx(coef)
    assert out.logs["bound_reg_tightness"] == pytest.approx(t.item(), rel=1e-5)
    assert out.logs["bound_reg_relu"] == pytest.approx(r.item(), rel=1e-5)
    assert (out.loss - base.loss).item() == pytest.approx(coef * (t + r).item(), rel=1e-4)
    for k, p in net.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(g1[k])
        torch.testing.assert_close(g1[k] - g0[k], ref, rtol=1e-4, atol=1e-6, msg=k)


def test_regulariser_terms_selection_and_schedule():
    torch.manual_seed(1)
    net = SmallNet().train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    kw = dict(name="ibp", eps=0.2, warmup_epochs=2, bound_reg_tol=0.9, bound_reg=0.5)
    outs = {}
    for terms in (("tightness",), ("relu",), ("tightness", "relu")):
        net.load_state_dict(state)
        reg = build_regime(_tcfg(**kw, bound_reg_terms=terms))
        outs[terms] = reg.loss(net, net, x, y, drop_prob=0.0, epoch=0, step=4, steps_per_epoch=10,
                               crit=nn.CrossEntropyLoss())
    a, b, both = outs[("tightness",)], outs[("relu",)], outs[("tightness", "relu")]
    coef = 0.5 * 0.75
    assert (both.loss - a.loss).item() == pytest.approx(coef * both.logs["bound_reg_relu"], rel=1e-4)
    assert (both.loss - b.loss).item() == pytest.approx(coef * both.logs["bound_reg_tightness"], rel=1e-4)
    # coefficient: off in the natural phase and at full eps; decays with eps, or not
    assert bb.coefficient(0.5, 0.0, 0.2, True) == 0 == bb.coefficient(0.5, 0.2, 0.2, True)
    assert bb.coefficient(0.5, 0.05, 0.2, True) == pytest.approx(0.375)
    assert bb.coefficient(0.5, 0.05, 0.2, False) == 0.5 and bb.coefficient(0.0, 0.05, 0.2, True) == 0
    net.load_state_dict(state)
    full = build_regime(_tcfg(**kw)).loss(net, net, x, y, drop_prob=0.0, epoch=5, step=0, steps_per_epoch=10,
                                          crit=nn.CrossEntropyLoss())
    assert full.logs["bound_reg_coef"] == 0 and "bound_reg_relu" not in full.logs
    with pytest.raises(ConfigError, match="regime.bound_reg_terms"):
        build_regime(_tcfg(**kw, bound_reg_terms=("tightness", "stability")))


def test_layer_without_active_or_inactive_neurons_is_finite():
    lo = torch.tensor([-1.0, -0.5, 0.2, -2.0], requires_grad=True)
    up = torch.tensor([1.0, 0.5, 0.9, 1.0], requires_grad=True)  # one active, none inactive
    t, r = bb.layer_terms(lo, up, torch.tensor(0.1), 0.5)
    assert r.item() == 0.0 and t.item() > 0
    (t + r).backward()
    assert torch.isfinite(lo.grad).all() and torch.isfinite(up.grad).all()
    lo2 = torch.tensor([-1.0, 0.3, 0.2, -2.0], requires_grad=True)
    up2 = torch.tensor([-0.5, 0.5, 0.9, 1.0], requires_grad=True)  # mean ratio (0.95 / 0.75) folds to < 1
    t, r = bb.layer_terms(lo2, up2, torch.tensor(0.1), 0.9)
    c = (lo2 + up2) / 2
    rho_m = (c[1] + c[2]) / -c[0]
    assert r.item() > 0 and torch.isfinite(torch.autograd.grad(r, lo2)[0]).all()
    assert min(rho_m.item(), 1 / rho_m.item()) < 0.9
