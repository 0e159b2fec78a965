"""The attack interface: batched, on a model in eval mode, inputs and radii in [0, 1] pixels.

Why one interface: evaluate.py runs every attack the same way (one call per batch, one
prediction per example), and the invariants every result must satisfy (inside the box
[0, 1], inside the eps ball, model left in the mode it was in) are enforced here once instead
of in each attack. Randomness (PGD random starts) is drawn *per example* from a generator
seeded with (seed, example index), so a result does not depend on which other examples share
the batch or the rank: 1-rank and N-rank evaluations agree example by example.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttackConfig
from ..registry import Registry

ATTACKS: Registry = Registry("attack")


class AttackError(ValueError):
    """Bad attack input or configuration; the message names the problem."""


def attack_label(cfg: AttackConfig) -> str:
    """Column name in attacks.jsonl / reports: cfg.label, else derived like the paper ("PGD-20")."""
    if cfg.label:
        return cfg.label
    l2 = " (l2)" if cfg.norm == "2" else ""
    return {
        "clean": "clean",
        "fgsm": "FGSM" + l2,
        "pgd": f"PGD-{cfg.steps}{l2}",
        "cw": "C&W",
        "autoattack": "AutoAttack" + l2,
        "square": f"Square-{cfg.steps}{l2}",
    }.get(cfg.name, f"{cfg.name}{l2}")


def example_seed(seed: int, index: int, salt: int = 0) -> int:
    """A per-example seed (splitmix-style mixing) so noise is independent of batching."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & (2**63 - 1)
    z ^= z >> 31
    return z & (2**63 - 1)


def per_example_rand(shape: Sequence[int], seed: int, indices: Sequence[int], salt: int,
                     device: torch.device, normal: bool = False) -> torch.Tensor:
    """[len(indices), *shape] uniform [0,1) (or standard normal) noise, row i seeded by indices[i]."""
    g = torch.Generator()
    rows = []
    for i in indices:
        g.manual_seed(example_seed(seed, int(i), salt))
        rows.append(torch.randn(tuple(shape), generator=g) if normal else torch.rand(tuple(shape), generator=g))
    return torch.stack(rows).to(device)


def flat_norm(v: torch.Tensor, p: str) -> torch.Tensor:
    """Per-example l_inf or l_2 norm of a batch, shape [B]."""
    f = v.flatten(1)
    return f.abs().amax(1) if p == "inf" else f.norm(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project onto the eps ball around x (eps: a float or one per example), then clip to [0, 1].

    Clipping after projecting keeps the point in the ball: for x in [0, 1], clipping x + d to
    [0, 1] never moves any coordinate further from x.
    """
    d = x_adv - x
    shape = (-1,) + (1,) * (d.dim() - 1)
    if norm == "inf":
        if isinstance(eps, torch.Tensor):
            e = eps.to(d.dtype).view(shape)
            d = torch.maximum(torch.minimum(d, e), -e)
        else:
            d = d.clamp(-eps, eps)
    else:
        n = flat_norm(d, "2").clamp_min(1e-12)
        e = eps.to(d.dtype) if isinstance(eps, torch.Tensor) else eps
        d = d * (e / n).clamp(max=1.0).view(shape)
    return (x + d).clamp(0.0, 1.0)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per example; the other classes are masked with -inf, not 0.

    Masking with 0 (as torchattacks' C&W does) picks a wrong "best other class" when every
    logit is negative.
    """
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return z_y - other


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               loss: "str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]" = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d x, logits) with the loss summed over the batch (so per-example gradients
    do not depend on the batch size); parameter gradients are never touched. ``loss`` may be a
    callable ``(logits, y) -> summed objective`` (TRADES' KL term in training)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        if callable(loss):
            obj = loss(logits, y)
        elif loss == "ce":
            obj = F.cross_entropy(logits, y, reduction="sum")
        elif loss == "margin":
            obj = -margin(logits, y).sum()
        else:
            raise AttackError(f"unknown attack loss {loss!r}; valid: ce, margin")
        (g,) = torch.autograd.grad(obj, x)
    return g, logits.detach()


class Attack:
    """Base class: subclasses implement :meth:`perturb`; :meth:`__call__` checks and enforces.

    ``attack(model, x, y, indices)`` returns adversarial inputs with the shape of ``x``. Only
    examples the model classifies correctly are attacked (the others are already counted as
    errors; they come back unchanged).
    """

    #: whether results must lie in the eps ball (C&W with eps == 0 is unbounded)
    bounded: bool = True
    #: score-based (reads logits only): the control of the "black-box beats white-box" masking check
    blackbox: bool = False
    #: randomness drawn per example from (seed, index): results do not depend on batching or ranks
    per_example_seeded: bool = True

    def __init__(self, cfg: AttackConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.label = attack_label(cfg)
        self.validate()

    @property
    def norm(self) -> str:
        return self.cfg.norm

    @property
    def eps(self) -> float:
        return float(self.cfg.eps)

    def validate(self) -> None:
        """Raise AttackError for settings that make no sense for this attack."""

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise AttackError(f"{self.label}: inputs must be in [0, 1] (normalization belongs inside "
                              f"the model); got range [{x.min().item():.3g}, {x.max().item():.3g}]")
        if indices is None:
            indices = range(len(x))
        indices = [int(i) for i in indices]
        if len(indices) != len(x):
            raise AttackError(f"{self.label}: {len(indices)} indices for {len(x)} examples")
        was_training = model.training
        model.eval()
        try:
            x_adv = x.clone()
            if len(x):
                ok = model(x).argmax(1) == y
                sel = ok.nonzero().flatten()
                if len(sel):
                    idx = [indices[i] for i in sel.tolist()]
                    x_adv[sel] = self.perturb(model, x[sel], y[sel], idx).detach().to(x.dtype)
        finally:
            model.train(was_training)
        x_adv = x_adv.clamp(0.0, 1.0)
        if self.bounded and self.eps > 0:
            x_adv = project(x_adv, x, self.eps, self.norm)
        return x_adv


def check_finite_eps(cfg: AttackConfig, label: str) -> None:
    if not math.isfinite(cfg.eps) or cfg.eps <= 0:
        raise AttackError(f"{label}: eps must be a positive radius, got {cfg.eps}")
