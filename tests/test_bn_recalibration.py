"""bench/bn_recalibration.py: BN statistics re-estimated as the plain average over the batches
seen (not the EMA), weights untouched, model left in eval mode."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bn_recalibration  # noqa: E402


def test_recalibrate_averages_the_batch_statistics_and_keeps_the_weights():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (20, 2, 5, 5), dtype=torch.uint8)
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():
        bn.weight.fill_(1.7)
        bn.bias.fill_(-0.3)
        bn.running_mean.fill_(9.0)   # stale statistics, far from the data's
        bn.running_var.fill_(0.01)
    model = nn.Sequential(bn)
    assert bn_recalibration.recalibrate(model, images, batches=3, batch_size=4, seed=5) == 1
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(5))
    xs = [images[perm[k * 4:(k + 1) * 4]].float() / 255 for k in range(3)]
    want_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    want_var = torch.stack([x.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for x in xs]).mean(0)
    assert torch.allclose(bn.running_mean, want_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, want_var, atol=1e-6)
    assert not model.training
    assert torch.equal(bn.weight, torch.full((2,), 1.7)) and torch.equal(bn.bias, torch.full((2,), -0.3))


def test_top1_counts_correct_predictions():
    images = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 0, 0])

    class Const(nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2)

    assert bn_recalibration.top1(Const(), images, labels, bs=4) == 100.0 * 4 / 6
