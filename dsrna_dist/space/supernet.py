"""The DARTS / PC-DARTS search network (supernet) and genotype derivation.

Architecture parameters live in the submodule ``arch`` (``alphas_normal``, ``alphas_reduce``
and, with edge normalization, ``betas_normal``, ``betas_reduce``; also readable as
``supernet.alphas_normal``) so they are checkpointed with the
weights, but they are kept in their own parameter group: ``arch_parameters()`` vs
``weight_parameters()``. ``forward(x, arch_weights=None)`` computes the mixing weights from
them once per call; a caller may pass an override (a mapping like :meth:`arch_weights`
returns) to run the network at perturbed weights (SDARTS) without touching alpha.

Per-edge op lists (P-DARTS search-space approximation): ``Supernet(cfg, info, op_mask=...)``
with ``op_mask = {"normal": bool[edges, ops], "reduce": bool[edges, ops]}``. Chosen layout: the
alpha matrices keep the full op axis (``len(primitives)`` columns on every edge) and a mask
marks the ops still in the space; masked entries get -inf before the softmax, so their weight
is exactly 0, their alpha gradient exactly 0, and their ops are not built. Every consumer
(genotype parsing, SDARTS perturbations, heatmaps, the bound engine, the alpha history) keeps
one layout; a derived genotype can never pick a pruned op (weight 0 < any kept op's weight).
The masks are non-persistent buffers (``arch.mask_normal``...); the strategy that pruned them
stores them in its checkpoint state and rebuilds the supernet from them before loading weights.

Tracing: ``torch.fx.symbolic_trace(supernet)`` gives the graph of the plain forward (the
override branch is chosen by ``isinstance(..., Mapping)``, which a tracing proxy is not).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SupernetConfig
from ..genotype import Genotype, validate
from .cells import SearchCell
from .layers import Normalize
from .ops import OPS

ArchWeights = Dict[str, torch.Tensor]


def reduction_layers(layers: int) -> Tuple[int, ...]:
    """Indices of the reduction cells: 1/3 and 2/3 of the depth (DARTS)."""
    return tuple(sorted({layers // 3, 2 * layers // 3})) if layers >= 3 else ()


def num_edges(nodes: int) -> int:
    return sum(2 + i for i in range(nodes))


def normalize_edges(betas: torch.Tensor, nodes: int) -> torch.Tensor:
    """PC-DARTS edge normalization: softmax of the betas over each node's incoming edges."""
    parts, start = [], 0
    for i in range(nodes):
        parts.append(F.softmax(betas[start:start + 2 + i], dim=-1))
        start += 2 + i
    return torch.cat(parts)


class ArchParameters(nn.Module):
    """Holds alpha (and PC-DARTS beta) as ``arch.<name>``.

    Why a submodule: DDP builds its ignore check for a root-module parameter as
    ``".alphas_normal"`` in one place and ``"alphas_normal"`` in another (torch 2.14), so
    root-level parameters cannot be excluded from DDP reliably; one level down they can.
    """

    def __init__(self, edges: int, ops: int, edge_norm: bool,
                 op_mask: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        super().__init__()
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(edges, ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(edges, ops))
        self.names: Tuple[str, ...] = ("alphas_normal", "alphas_reduce")
        if edge_norm:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(edges))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(edges))
            self.names += ("betas_normal", "betas_reduce")
        self.masked = op_mask is not None
        self.mask_names: Tuple[str, ...] = ()
        if op_mask is not None:
            for kind in ("normal", "reduce"):
                m = torch.as_tensor(op_mask[kind], dtype=torch.bool)
                if tuple(m.shape) != (edges, ops):
                    raise ValueError(f"op mask {kind!r} has shape {tuple(m.shape)}, expected {(edges, ops)}")
                self.register_buffer(f"mask_{kind}", m.clone(), persistent=False)
            self.mask_names = ("mask_normal", "mask_reduce")


class Supernet(nn.Module):
    """Stem -> ``layers`` search cells (reductions at 1/3, 2/3) -> global pool -> linear."""

    def __init__(self, cfg: SupernetConfig, info,
                 op_mask: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        super().__init__()
        for p in cfg.primitives:
            if p not in OPS:
                OPS.get(p, key="model.primitives")  # raises, listing valid ops
        if all(p == "none" for p in cfg.primitives):
            raise ValueError("model.primitives: needs at least one op other than 'none'")
        self.cfg = cfg
        self.primitives: Tuple[str, ...] = tuple(cfg.primitives)
        self.nodes = cfg.nodes
        self.edge_norm = bool(cfg.edge_normalization)
        size = int(info.image_size)
        reductions = reduction_layers(cfg.layers)
        if size % (2 ** len(reductions)):
            raise ValueError(f"image size {size} cannot be halved {len(reductions)} times "
                             f"(model.layers={cfg.layers})")
        c = cfg.init_channels
        c_curr = cfg.stem_multiplier * c
        self.normalize = Normalize(info.mean, info.std)
        self.stem = nn.Sequential(nn.Conv2d(info.in_channels, c_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, c
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(cfg.layers):
            reduction = i in reductions
            if reduction:
                c_curr *= 2
            kind = "reduce" if reduction else "normal"
            rows = None if op_mask is None else torch.as_tensor(op_mask[kind], dtype=torch.bool).tolist()
            self.cells.append(SearchCell(cfg.nodes, c_pp, c_p, c_curr, reduction, reduction_prev,
                                         self.primitives, cfg.partial_channels, rows))
            reduction_prev = reduction
            c_pp, c_p = c_p, cfg.nodes * c_curr
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_p, info.num_classes)

        self.arch = ArchParameters(num_edges(cfg.nodes), len(self.primitives), self.edge_norm, op_mask)

    # ------------------------------------------------------------------ parameter groups
    @property
    def alphas_normal(self) -> nn.Parameter:
        return self.arch.alphas_normal

    @property
    def alphas_reduce(self) -> nn.Parameter:
        return self.arch.alphas_reduce

    @property
    def betas_normal(self) -> nn.Parameter:
        return self.arch.betas_normal

    @property
    def betas_reduce(self) -> nn.Parameter:
        return self.arch.betas_reduce

    def arch_parameter_names(self) -> List[str]:
        """Fully qualified names (``arch.alphas_normal``, ...), e.g. for DDP's ignore list."""
        return [f"arch.{n}" for n in self.arch.names]

    def arch_buffer_names(self) -> List[str]:
        """The op-mask buffers (``arch.mask_normal``, ...): constant, never synced by DDP."""
        return [f"arch.{n}" for n in self.arch.mask_names]

    def op_mask(self) -> Optional[Dict[str, torch.Tensor]]:
        """The per-edge op lists as bool [edges, ops] masks, or None when every edge has all ops."""
        if not self.arch.masked:
            return None
        return {k: getattr(self.arch, f"mask_{k}").detach().cpu().clone() for k in ("normal", "reduce")}

    def set_skip_dropout(self, p: float) -> None:
        """P-DARTS op-level dropout on every skip-connect branch (0 turns it off)."""
        from .cells import MixedOp

        for m in self.modules():
            if isinstance(m, MixedOp):
                m.skip_p = float(p)

    def arch_parameters(self) -> List[nn.Parameter]:
        return [getattr(self.arch, n) for n in self.arch.names]

    def weight_parameters(self) -> List[nn.Parameter]:
        arch = set(self.arch_parameter_names())
        return [p for n, p in self.named_parameters() if n not in arch]

    # ------------------------------------------------------------------ arch weights
    def arch_weights(self) -> ArchWeights:
        """The mixing weights forward uses: softmax(alpha) per edge, beta-softmax per node."""
        if self.arch.masked:  # pruned ops: weight exactly 0, gradient exactly 0
            a_n = self.alphas_normal.masked_fill(~self.arch.mask_normal, float("-inf"))
            a_r = self.alphas_reduce.masked_fill(~self.arch.mask_reduce, float("-inf"))
        else:
            a_n, a_r = self.alphas_normal, self.alphas_reduce
        w = {"normal": F.softmax(a_n, dim=-1), "reduce": F.softmax(a_r, dim=-1)}
        if self.edge_norm:
            w["normal_edge"] = normalize_edges(self.betas_normal, self.nodes)
            w["reduce_edge"] = normalize_edges(self.betas_reduce, self.nodes)
        return w

    def forward(self, x: torch.Tensor, arch_weights: Optional[ArchWeights] = None) -> torch.Tensor:
        w = arch_weights if isinstance(arch_weights, Mapping) else self.arch_weights()
        x = self.normalize(x)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            kind = "reduce" if cell.reduction else "normal"
            s0, s1 = s1, cell(s0, s1, w[kind], w[kind + "_edge"] if self.edge_norm else None)
        return self.classifier(self.flatten(self.pool(s1)))

    # ------------------------------------------------------------------ genotype
    @torch.no_grad()
    def genotype_weights(self) -> Dict[str, torch.Tensor]:
        """Per-edge op strengths used by :meth:`derive` (softmax(alpha) * beta for PC-DARTS)."""
        w = self.arch_weights()
        out = {}
        for kind in ("normal", "reduce"):
            m = w[kind].detach().float().cpu()
            if self.edge_norm:
                m = m * w[kind + "_edge"].detach().float().cpu()[:, None]
            out[kind] = m
        return out

    def derive(self, max_skip: int = -1) -> Genotype:
        """DARTS parsing: per node the 2 strongest edges (best non-none op), then that op.

        ``max_skip >= 0`` caps skip_connect in the normal cell: while there are too many,
        the weakest chosen skip edge has its skip weight removed and the cell is re-parsed.
        """
        w = self.genotype_weights()
        return derive_genotype(w["normal"], w["reduce"], self.primitives, self.nodes, max_skip)


def parse_cell(weights: torch.Tensor, primitives: Sequence[str], nodes: int) -> List[Tuple[str, int]]:
    """Top-2 incoming edges by strongest non-none op, then that edge's best non-none op.

    Ties go to the lower index (stable sort / first maximum), as the reference code.
    """
    w = weights.tolist()
    none = primitives.index("none") if "none" in primitives else -1
    cand = [k for k in range(len(primitives)) if k != none]
    gene: List[Tuple[str, int]] = []
    start = 0
    for i in range(nodes):
        rows = w[start:start + 2 + i]
        strength = [max(r[k] for k in cand) for r in rows]
        edges = sorted(range(2 + i), key=lambda j: -strength[j])[:2]
        for j in edges:
            best = max(cand, key=lambda k: (rows[j][k], -k))
            gene.append((primitives[best], j))
        start += 2 + i
    return gene


def derive_genotype(normal: torch.Tensor, reduce: torch.Tensor, primitives: Sequence[str],
                    nodes: int, max_skip: int = -1) -> Genotype:
    normal = normal.clone()
    gene_normal = parse_cell(normal, primitives, nodes)
    if max_skip >= 0 and "skip_connect" in primitives:
        k_skip = primitives.index("skip_connect")
        while sum(op == "skip_connect" for op, _ in gene_normal) > max_skip:
            # the chosen skip edge with the smallest skip weight loses its skip candidate
            starts = [sum(2 + n for n in range(i)) for i in range(nodes)]
            chosen = [(normal[starts[idx // 2] + src, k_skip].item(), starts[idx // 2] + src)
                      for idx, (op, src) in enumerate(gene_normal) if op == "skip_connect"]
            value, row = min(chosen)
            if value == float("-inf"):
                raise ValueError(f"cannot cap skip_connect at {max_skip}: no other op left")
            normal[row, k_skip] = float("-inf")
            gene_normal = parse_cell(normal, primitives, nodes)
    concat = tuple(range(2, nodes + 2))
    g = Genotype(tuple(gene_normal), concat, tuple(parse_cell(reduce, primitives, nodes)), concat)
    return validate(g, "derived genotype")
