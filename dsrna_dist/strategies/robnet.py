"""RobNet baseline (Guo et al. 2020, "When NAS Meets Robustness"), in the DARTS cell space.

1. One-shot robust supernet: every step samples one sub-architecture uniformly and trains the
   shared weights on PGD adversarial examples (``robnet.eps``, ``robnet.train_steps``) crafted
   against that sub-architecture. No architecture parameters are learned (alpha is unused).
2. After the last epoch (``on_search_end``): ``robnet.samples`` architectures are sampled, each
   fine-tuned for ``robnet.finetune_steps`` PGD-AT steps from the supernet weights (restored
   exactly before the next one) and ranked by PGD accuracy on ``robnet.eval_batches`` batches
   per rank of the held-out search-val half; the best becomes ``genotype.json``, which goes
   through the same retrain / evaluate / report path as every searched cell.

The space (a documented mapping of RobNet's onto ours): RobNet's cells let every edge be one of
{3x3 sep conv, identity, zero}; here a sampled cell is a DARTS genotype (the form the rest of
the toolkit consumes): every node picks 2 distinct inputs uniformly among its 2+i predecessors
and, for each, one op uniformly among the non-``none`` primitives (``model.primitives``; a
RobNet-like run sets them to sep_conv_3x3 and skip_connect). Normal and reduce cells are drawn
independently. A sub-architecture runs as one-hot mixing weights on the supernet (edges not
chosen get weight 0), so it is exactly the derived cell's function with shared weights.

Reuse: the project's one PGD (``attacks/pgd.py``, ``perturb`` with per-example seeded random
starts) and the base weight step (sub-architecture as its ``perturbation``: DDP all-reduces
the weight gradients). Sampling uses generators seeded by (seed, step) or (seed, sample index),
so every rank draws the same architecture without communication. BatchNorm is in train mode
(batch statistics) for attack, training and ranking: running statistics of a one-shot
supernet describe no single sub-architecture.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..attacks.base import project
from ..attacks.pgd import PGD
from ..config import AttackConfig, ConfigError, SearchConfig
from ..engine.seeding import derive_seed
from ..engine.sync import all_reduce_mean_
from ..genotype import Genotype, validate
from ..space.supernet import ArchWeights, num_edges
from .base import STRATEGIES, SearchStrategy

Cell = Tuple[Tuple[str, int], ...]


def sample_cell(primitives: Sequence[str], nodes: int, gen: torch.Generator) -> Cell:
    """A DARTS cell drawn uniformly: per node 2 distinct inputs, per input one non-none op."""
    ops = [p for p in primitives if p != "none"]
    gene: List[Tuple[str, int]] = []
    for i in range(nodes):
        inputs = torch.randperm(2 + i, generator=gen)[:2].tolist()
        for j in sorted(inputs):
            gene.append((ops[int(torch.randint(len(ops), (1,), generator=gen))], j))
    return tuple(gene)


def sample_genotype(primitives: Sequence[str], nodes: int, gen: torch.Generator) -> Genotype:
    concat = tuple(range(2, nodes + 2))
    g = Genotype(sample_cell(primitives, nodes, gen), concat, sample_cell(primitives, nodes, gen), concat)
    return validate(g, "sampled genotype")


def cell_weights(cell: Cell, primitives: Sequence[str], nodes: int) -> torch.Tensor:
    """One-hot mixing weights [edges, ops] that make the supernet compute exactly ``cell``."""
    w = torch.zeros(num_edges(nodes), len(primitives))
    for idx, (op, src) in enumerate(cell):
        node = idx // 2
        w[sum(2 + n for n in range(node)) + src, list(primitives).index(op)] = 1.0
    return w


def genotype_weights(g: Genotype, primitives: Sequence[str], nodes: int, device: torch.device) -> ArchWeights:
    return {"normal": cell_weights(g.normal, primitives, nodes).to(device),
            "reduce": cell_weights(g.reduce, primitives, nodes).to(device)}


class FixedArch(torch.nn.Module):
    """The supernet restricted to one sub-architecture: ``forward(x)`` for the attack API."""

    def __init__(self, model: torch.nn.Module, weights: ArchWeights) -> None:
        super().__init__()
        self.model = model
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.weights)


@STRATEGIES.register("robnet")
class RobNet(SearchStrategy):
    name = "robnet"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        r = self.cfg.robnet
        acfg = AttackConfig(name="pgd", eps=r.eps, norm="inf", steps=r.train_steps, step_size=r.step_size,
                            restarts=1, random_start=True, loss="ce")
        self.train_attack = PGD(acfg, seed=self.cfg.run.seed)
        self.eval_attack = PGD(dataclasses.replace(acfg, steps=r.eval_steps),
                               seed=derive_seed(self.cfg.run.seed, 0xE7A1) % 2**31)
        self._arch: Optional[ArchWeights] = None
        self.ranking: List[Dict[str, Any]] = []

    @classmethod
    def check_config(cls, cfg: SearchConfig) -> None:
        super().check_config(cfg)
        if cfg.model.edge_normalization:
            raise ConfigError("key 'model.edge_normalization': robnet samples whole cells and has no "
                              "edge weights; set it false")
        if cfg.robustness.name != "none":
            raise ConfigError(f"key 'robustness.name': robnet is robust by PGD adversarial training, "
                              f"not by a metric on alpha; set it to none (got {cfg.robustness.name!r})")

    # ------------------------------------------------------------------ sampling
    def sample(self, *keys: int) -> Genotype:
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, 0x0B, *keys))
        return sample_genotype(self.model.primitives, self.model.nodes, gen)

    def weights_of(self, g: Genotype) -> ArchWeights:
        return genotype_weights(g, self.model.primitives, self.model.nodes, self.model.alphas_normal.device)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor, attack: PGD, key: int) -> torch.Tensor:
        """PGD examples against the current sub-architecture (train-mode BN, weights untouched)."""
        fixed = FixedArch(self.model, self._arch)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        base = (key * 64 + rank) * len(x)  # distinct random starts per step and rank
        with torch.enable_grad():
            x_adv = attack.perturb(fixed, x, y, list(range(base, base + len(x))))
        return project(x_adv.detach().clamp(0.0, 1.0), x, attack.eps, "inf")

    # ------------------------------------------------------------------ steps
    def arch_active(self, epoch: int) -> bool:
        return False

    def perturbation(self, x, y, epoch: int, step: int) -> Optional[ArchWeights]:
        return self._arch  # the weight step runs on the sampled sub-architecture

    def step(self, xt, yt, xv, yv, *, epoch: int, step: int, lr: float) -> Dict[str, float]:
        self._arch = self.weights_of(self.sample(1, step))
        try:
            x_adv = self.adversarial(xt, yt, self.train_attack, step)
            return self.weight_step(x_adv, yt, epoch=epoch, step=step)
        finally:
            self._arch = None

    # ------------------------------------------------------------------ ranking
    @torch.no_grad()
    def adversarial_accuracy(self, g: Genotype, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                             key: int) -> Tuple[float, float]:
        """(clean, PGD) accuracy of sub-architecture ``g`` over ``batches`` and all ranks."""
        self._arch = self.weights_of(g)
        try:
            fixed = FixedArch(self.model, self._arch)
            counts = torch.zeros(3, dtype=torch.float64, device=self._arch["normal"].device)
            for b, (x, y) in enumerate(batches):
                x_adv = self.adversarial(x, y, self.eval_attack, 1_000_003 * (key + 1) + b)
                counts[0] += (fixed(x).argmax(1) == y).sum()
                counts[1] += (fixed(x_adv).argmax(1) == y).sum()
                counts[2] += len(y)
        finally:
            self._arch = None
        all_reduce_mean_([counts])  # same ratio as a sum; every rank gets the same numbers
        return float(counts[0] / counts[2]), float(counts[1] / counts[2])

    def finetune(self, g: Genotype, batches: Sequence[Tuple[torch.Tensor, torch.Tensor]], key: int) -> None:
        self._arch = self.weights_of(g)
        try:
            for i, (x, y) in enumerate(batches):
                x_adv = self.adversarial(x, y, self.train_attack, 2_000_003 * (key + 1) + i)
                self.weight_step(x_adv, y, epoch=self.cfg.epochs, step=-1)
        finally:
            self._arch = None

    def rank(self, candidates: Sequence[Genotype], train_batches: Sequence[Any],
             val_batches: Sequence[Any]) -> List[Dict[str, Any]]:
        """Fine-tune each candidate from the same supernet weights, then PGD accuracy; best first."""
        model = self.model
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt_backup = copy.deepcopy(self.ctx.w_optim.state_dict())
        was_training = model.training
        model.train()
        rows = []
        try:
            for i, g in enumerate(candidates):
                if train_batches:
                    self.finetune(g, train_batches, i)
                clean, adv = self.adversarial_accuracy(g, val_batches, i)
                rows.append({"index": i, "adv_acc": adv, "clean_acc": clean, "genotype": g.to_dict()})
                model.load_state_dict(backup)  # exact restore for the next candidate
                self.ctx.w_optim.load_state_dict(copy.deepcopy(opt_backup))  # load aliases the tensors
        finally:
            model.load_state_dict(backup)
            self.ctx.w_optim.load_state_dict(copy.deepcopy(opt_backup))  # load aliases the tensors
            model.train(was_training)
        # best adversarial accuracy first; ties: better clean accuracy, then the earlier sample
        return sorted(rows, key=lambda r: (-r["adv_acc"], -r["clean_acc"], r["index"]))

    def on_search_end(self) -> Optional[Genotype]:
        r = self.cfg.robnet
        if self.ctx.val_loader is None:
            return None
        candidates = [self.sample(2, i) for i in range(r.samples)]
        train_batches = take(self.ctx.train_loader, r.finetune_steps)
        val_batches = take(self.ctx.val_loader, r.eval_batches)
        self.ranking = self.rank(candidates, train_batches, val_batches)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            from ..engine.io import atomic_write_json

            out = Path(self.cfg.run.out_dir) / self.cfg.run.name / "robnet_ranking.json"
            atomic_write_json(str(out), {"eps": r.eps, "eval_steps": r.eval_steps,
                                         "finetune_steps": r.finetune_steps, "ranking": self.ranking})
        best = self.ranking[0]
        from ..genotype import from_dict

        return from_dict(best["genotype"], "robnet best")


def take(loader: Any, n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of a loader (fewer if it is shorter), as a fixed list."""
    out: List[Tuple[torch.Tensor, torch.Tensor]] = []
    if loader is None or n <= 0:
        return out
    for x, y in loader:
        out.append((x, y))
        if len(out) >= n:
            break
    return out
