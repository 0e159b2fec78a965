"""SDARTS perturbations of the mixing weights softmax(alpha) (Chen & Hsieh 2020).

Only the op weights (``normal``, ``reduce``) are perturbed; PC-DARTS edge weights pass
through unchanged. Perturbed rows are put back on the simplex the way the reference does
(``clip``): clamp to [0, 1], a row that became all zero gets a one at its former argmax, then
divide by the row sum.

SDARTS-ADV's attack runs the supernet in eval mode by default, as the reference
(``Linf_PGD_alpha`` calls ``model.eval()`` and restores train mode afterwards): BatchNorm uses
its running statistics and the ``adv_steps + 2`` attack forwards do not update them.
``sdarts.adv_bn=train`` keeps the former behaviour (batch statistics; running stats updated
by every attack forward) for comparison.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.seeding import derive_seed
from ..engine.sync import all_reduce_mean_
from ..space.supernet import ArchWeights

OP_KEYS = ("normal", "reduce")


def clip_to_simplex(w: torch.Tensor) -> torch.Tensor:
    """Reference SDARTS ``clip``: clamp rows to [0,1], renormalize (all-zero rows -> argmax)."""
    z = w.clamp(0.0, 1.0)
    onehot = F.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype)
    z = torch.where(z.sum(-1, keepdim=True) == 0, onehot, z)
    return z / z.sum(-1, keepdim=True)


def ramp_eps(eps0: float, eps1: float, epoch: int, epochs: int) -> float:
    """Linear ramp eps0 -> eps1 as the reference: eps0 + (eps1 - eps0) * epoch / epochs."""
    return eps0 + (eps1 - eps0) * epoch / max(1, epochs)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Same stream on every rank for a given (seed, global step): ranks perturb identically."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, 0x5DA7, step))
    return g


def detached(w: ArchWeights) -> ArchWeights:
    return {k: v.detach() for k, v in w.items()}


def uniform_noise(base: ArchWeights, eps: float, gen: torch.Generator) -> ArchWeights:
    """SDARTS-RS: base + U(-eps, eps) on the op weights, projected back to the simplex."""
    out = dict(base)
    for k in OP_KEYS:
        b = base[k]
        noise = torch.rand(b.shape, generator=gen, device=b.device, dtype=b.dtype) * (2 * eps) - eps
        out[k] = clip_to_simplex(b + noise)
    return out


@contextlib.contextmanager
def attack_mode(module: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Run the block with ``module`` in eval mode (``mode="eval"``) and put every submodule's
    own train/eval flag back afterwards; ``mode="train"`` leaves the module as it is."""
    if mode == "train":
        yield module
        return
    if mode != "eval":
        raise ValueError(f"attack mode must be 'eval' or 'train', got {mode!r}")
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, was in flags:
            m.training = was


def linf_pgd(loss_fn: Callable[[ArchWeights], torch.Tensor], base: ArchWeights, eps: float,
             steps: int, gen: torch.Generator, random_start: bool = True) -> ArchWeights:
    """SDARTS-ADV: maximize the train loss over ||w - base||_inf <= eps on the simplex.

    Sign-gradient ascent with step 2*eps/steps; gradients and the final keep/discard decision
    are averaged over ranks so every rank uses the same perturbation. As the reference, the
    clean weights are kept if the perturbation did not raise the loss.
    """
    step_size = 2 * eps / steps
    cur = dict(base)
    if random_start:
        cur = uniform_noise(base, eps, gen)
    for _ in range(steps):
        leaves = {k: cur[k].detach().requires_grad_(True) for k in OP_KEYS}
        loss = loss_fn({**cur, **leaves})
        grads = list(torch.autograd.grad(loss, [leaves[k] for k in OP_KEYS]))
        all_reduce_mean_(grads)
        nxt = dict(cur)
        with torch.no_grad():
            for k, g in zip(OP_KEYS, grads):
                moved = leaves[k] + step_size * g.sign()
                nxt[k] = clip_to_simplex(base[k] + (moved - base[k]).clamp(-eps, eps))
        cur = nxt
    with torch.no_grad():
        losses = torch.stack([loss_fn(base).detach(), loss_fn(cur).detach()])
    all_reduce_mean_([losses])
    return base if losses[0] > losses[1] else cur
