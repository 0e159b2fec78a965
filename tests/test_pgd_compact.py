"""PGD steps only the examples it has not broken yet: the result must be what the plain loop
(every example stepped every step) gives, on a network with BatchNorm in eval mode."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dsrna_dist.attacks import build_attack
from dsrna_dist.attacks.base import input_grad, project
from dsrna_dist.config import AttackConfig


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2),
                      nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 4))
    with torch.no_grad():  # non-trivial running statistics
        m.train()
        m(torch.rand(64, 1, 12, 12))
    return m.eval()


def plain_pgd(atk, model, x, y, indices):
    """Transcription of the loop before compaction (restarts included)."""
    best, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for r in range(atk.cfg.restarts):
        todo = (~fooled).nonzero().flatten()
        if not len(todo):
            break
        xs, ys = x[todo], y[todo]
        idx = [indices[i] for i in todo.tolist()]
        x_adv = atk.random_start(xs, idx, r)
        hit, found = torch.zeros(len(xs), dtype=torch.bool), xs.clone()
        for _ in range(atk.cfg.steps):
            g, logits = input_grad(model, x_adv, ys, atk.cfg.loss)
            new = (logits.argmax(1) != ys) & ~hit
            found[new] = x_adv[new]
            hit |= new
            x_adv = project(atk.step(x_adv, g), xs, atk.eps, atk.norm)
        new = (model(x_adv).argmax(1) != ys) & ~hit
        found[new] = x_adv[new]
        hit |= new
        found[~hit] = x_adv[~hit]
        best[todo], fooled[todo] = found, hit
    return best


@pytest.mark.parametrize("norm,eps,step,restarts,loss", [("inf", 0.08, 0.02, 1, "ce"), ("inf", 0.05, 0.01, 3, "margin"),
                                                          ("2", 0.6, 0.15, 2, "ce")])
def test_compacted_pgd_equals_the_plain_loop(norm, eps, step, restarts, loss):
    model = net()
    torch.manual_seed(1)
    x = torch.rand(40, 1, 12, 12)
    y = model(x).argmax(1)  # every example correct at eps 0: all are attacked
    atk = build_attack(AttackConfig(name="pgd", norm=norm, eps=eps, step_size=step, steps=12, restarts=restarts,
                                    loss=loss), seed=3)
    idx = list(range(100, 140))
    with torch.no_grad():
        got = atk.perturb(model, x, y, idx)
    want = plain_pgd(atk, model, x, y, idx)
    fooled_got, fooled_want = model(got).argmax(1) != y, model(want).argmax(1) != y
    # the test is only meaningful when some examples break early and some never do
    assert 0 < int(fooled_want.sum()) < len(x)
    assert torch.equal(fooled_got, fooled_want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
