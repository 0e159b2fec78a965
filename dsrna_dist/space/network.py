"""Derived (retraining) networks: a genotype's cell stacked N times, CIFAR- or ImageNet-style.

Follows the DARTS evaluation networks (Liu et al. 2019): stem, N cells with reduction cells
at 1/3 and 2/3 depth, an optional auxiliary head after the second reduction, drop-path on
every non-identity op. Differences from the reference code, on purpose:

* inputs are [0, 1] pixels; the first module is :class:`~dsrna_dist.space.layers.Normalize`;
* the drop-path probability is an argument, ``forward(x, drop_prob=p)``, never module state,
  so a checkpointed module has no schedule hidden in it and DDP/DeepSpeed wrappers pass it on;
* no data-dependent control flow: the network is ``torch.fx.symbolic_trace``-able in eval
  mode (and in train mode, where a traced ``drop_prob`` is not a number, giving the
  deterministic graph), so the bound engine can walk it module by module;
* feature-map sizes are checked at build time (an odd map cannot be factor-reduced).
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import genotype as G
from ..config import ConfigError, NetworkConfig, TrainConfig, from_dict
from ..data.base import DatasetInfo
from .layers import Normalize
from .ops import FactorizedReduce, ReLUConvBN, build_op


class NetworkError(ConfigError):
    """The genotype, config and dataset do not fit together; the message says how (a user error)."""


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole examples of a branch with prob ``drop_prob``, rescaling the rest (DARTS/NASNet)."""
    keep = 1.0 - drop_prob
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class Cell(nn.Module):
    """One derived cell: two preprocessed inputs, ``nodes`` sums of two ops, concat of outputs."""

    def __init__(self, genotype: G.Genotype, c_prev_prev: int, c_prev: int, c: int,
                 reduction: bool, reduction_prev: bool) -> None:
        super().__init__()
        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, c) if reduction_prev
                            else ReLUConvBN(c_prev_prev, c, 1, 1, 0))
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        self.ops = nn.ModuleList(
            build_op(op, c, 2 if reduction and src < 2 else 1, True) for op, src in edges)
        self.indices: Tuple[int, ...] = tuple(src for _, src in edges)
        # Drop-path never touches identity ops (a dropped skip would just zero the residual).
        self.droppable: Tuple[bool, ...] = tuple(not isinstance(op, nn.Identity) for op in self.ops)
        self.concat: Tuple[int, ...] = tuple(concat)
        self.nodes = len(edges) // 2
        self.multiplier = len(concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states: List[torch.Tensor] = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(self.nodes):
            outs = []
            for j in (2 * node, 2 * node + 1):
                h = self.ops[j](states[self.indices[j]])
                if drop_prob > 0.0 and self.droppable[j]:
                    h = drop_path(h, drop_prob)
                outs.append(h)
            states.append(outs[0] + outs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Sequential):
    """Classifier on the 2/3-depth features, pooled to 2x2 (DARTS: 8x8 CIFAR / 7x7 ImageNet maps).

    For a 6..8 pixel map the pool is the reference ``AvgPool2d(5, stride=size-5)`` (stride 3 on
    CIFAR's 8x8, 2 on ImageNet's 7x7); other sizes use an adaptive 2x2 average.
    """

    def __init__(self, c: int, num_classes: int, size: int, bn_after: bool) -> None:
        if size < 2:
            raise NetworkError(f"auxiliary head needs a feature map of at least 2x2, got {size}x{size}; "
                               "set model.auxiliary=false")
        pool = (nn.AvgPool2d(5, stride=size - 5, padding=0, count_include_pad=False)
                if 6 <= size <= 8 else nn.AdaptiveAvgPool2d(2))
        layers: List[nn.Module] = [
            nn.ReLU(inplace=False), pool,
            nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False)]
        if bn_after:  # the DARTS ImageNet head has no BN here (a typo kept for its published numbers)
            layers.append(nn.BatchNorm2d(768))
        layers += [nn.ReLU(inplace=False), nn.Flatten(), nn.Linear(768, num_classes)]
        super().__init__(*layers)


def _down(size: int) -> int:
    """Output size of a stride-2, kernel-3, padding-1 conv/pool (= ceil(size / 2))."""
    return (size + 1) // 2


class Network(nn.Module):
    """Derived network; ``forward(x, drop_prob=0.)`` -> logits, or (logits, aux) when training with aux."""

    def __init__(self, genotype: G.Genotype, *, style: str, in_channels: int, num_classes: int,
                 image_size: int, mean: Sequence[float], std: Sequence[float], init_channels: int,
                 layers: int, auxiliary: bool, stem_multiplier: int = 3) -> None:
        super().__init__()
        if style not in ("cifar", "imagenet"):
            raise NetworkError(f"model.style: unknown style {style!r} (cifar, imagenet)")
        if len(mean) != in_channels or len(std) != in_channels:
            raise NetworkError(f"dataset mean/std have {len(mean)}/{len(std)} entries for {in_channels} channels")
        self.style = style
        self.genotype = genotype
        self.layers = layers
        self.normalize = Normalize(mean, std)
        c = init_channels
        size = image_size
        if style == "cifar":
            c_curr = stem_multiplier * c
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c_curr))
            self.stem0 = self.stem1 = None
            c_pp, c_p, reduction_prev = c_curr, c_curr, False
            sizes = (size, size)  # (s0, s1) spatial sizes
        else:
            self.stem = None
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, c // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c // 2), nn.ReLU(inplace=False),
                nn.Conv2d(c // 2, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c))
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False), nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c))
            s0 = _down(_down(size))
            sizes = (s0, _down(s0))
            c_pp, c_p, reduction_prev = c, c, True
        reductions = {layers // 3, 2 * layers // 3} if layers >= 3 else set()
        self.aux_pos = 2 * layers // 3 if layers >= 3 else -1
        c_curr = c
        c_aux, size_aux = 0, 0
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            s0, s1 = sizes
            if reduction_prev and s0 % 2:
                raise NetworkError(f"cell {i}: input feature map of {s0}x{s0} is odd and cannot be "
                                   f"factor-reduced (image size {image_size}); change data/model.layers")
            if reduction and s1 % 2:
                raise NetworkError(f"cell {i}: reduction cell gets an odd {s1}x{s1} map (image size "
                                   f"{image_size}); change data/model.layers")
            cell = Cell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            out = s1 // 2 if reduction else s1
            sizes = (s1, out)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == self.aux_pos:
                c_aux, size_aux = c_p, out
        self.feature_size = sizes[1]
        self.aux_head: Optional[nn.Module] = None
        if auxiliary:
            if self.aux_pos < 0:
                raise NetworkError(f"model.auxiliary needs at least 3 cells, got model.layers={layers}")
            self.aux_head = AuxiliaryHead(c_aux, num_classes, size_aux, bn_after=(style == "cifar"))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: torch.Tensor, drop_prob: float = 0.0) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        # A traced (fx Proxy) or eval-mode drop_prob means "no drop-path": a Python-level decision,
        # never a branch on tensor data.
        p = float(drop_prob) if self.training and isinstance(drop_prob, (int, float)) else 0.0
        x = self.normalize(x)
        if self.stem is not None:
            s0 = s1 = self.stem(x)
        else:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        aux: Optional[torch.Tensor] = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, p)
            if i == self.aux_pos and self.aux_head is not None and self.training:
                aux = self.aux_head(s1)
        logits = self.classifier(self.flatten(self.pool(s1)))
        if aux is not None:
            return logits, aux
        return logits


def resolve_style(cfg: NetworkConfig, info: Any) -> str:
    if cfg.style != "auto":
        return cfg.style
    return "imagenet" if str(info.name).lower().startswith("imagenet") else "cifar"


def resolve_genotype(cfg: NetworkConfig, genotype: Union[G.Genotype, str, None] = None) -> G.Genotype:
    """A Genotype from an object, a path/name, or ``cfg.genotype``; node count checked against cfg."""
    nodes = cfg.nodes or None
    if isinstance(genotype, G.Genotype):
        return G.validate(genotype, "genotype", nodes=nodes)
    src = genotype if genotype else cfg.genotype
    if not src:
        raise NetworkError("model.genotype is empty: give a genotype JSON path or a published name "
                           f"({', '.join(G.PUBLISHED)})")
    return G.load(src, nodes=nodes)


def build_network(cfg: NetworkConfig, genotype: Union[G.Genotype, str, None], info: Any) -> Network:
    """The contract entry: a derived network for dataset ``info`` (a DatasetInfo)."""
    g = resolve_genotype(cfg, genotype)
    return Network(g, style=resolve_style(cfg, info), in_channels=info.in_channels,
                   num_classes=info.num_classes, image_size=info.image_size, mean=info.mean,
                   std=info.std, init_channels=cfg.init_channels, layers=cfg.layers,
                   auxiliary=cfg.auxiliary, stem_multiplier=cfg.stem_multiplier)


def count_parameters(model: nn.Module, include_aux: bool = True) -> int:
    """Number of parameters; ``include_aux=False`` matches the DARTS papers' reported sizes."""
    return sum(p.numel() for n, p in model.named_parameters()
               if include_aux or not n.startswith("aux_head."))


def drop_prob_at(final: float, epoch: int, epochs: int) -> float:
    """The DARTS linear ramp: ``final * epoch / epochs`` (0 in the first epoch)."""
    return final * epoch / max(1, epochs)


def info_dict(info: Any) -> dict:
    return {f.name: (list(getattr(info, f.name)) if f.name in ("mean", "std") else getattr(info, f.name))
            for f in dataclasses.fields(DatasetInfo)}


def load_trained(path: str, device: Union[str, torch.device] = "cpu") -> Tuple[Network, TrainConfig, G.Genotype]:
    """Rebuild a trained network from a train checkpoint -> (model in eval mode, config, genotype).

    Reads with ``weights_only=True``; the genotype and config come from the checkpoint itself
    (validated), so the file alone is enough.
    """
    from ..engine.checkpoint import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)  # weights_only=True; missing/corrupt -> CheckpointError naming it
    if not {"model", "config", "genotype"} <= set(ckpt):
        raise CheckpointError(f"checkpoint {path}: not a train checkpoint (needs model, config, genotype)")
    cfg = from_dict(TrainConfig, ckpt["config"])
    g = G.from_dict(ckpt["genotype"], where=f"checkpoint {path} genotype")
    if "dataset_info" in ckpt:
        d = dict(ckpt["dataset_info"])
        info: Any = DatasetInfo(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})
    else:
        from ..data import dataset_info
        info = dataset_info(ckpt.get("dataset", cfg.data.name))
    model = build_network(cfg.model, g, info)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the network its config builds: "
                              f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, g
