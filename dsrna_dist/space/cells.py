"""Search cells: every edge holds all candidate ops, mixed by architecture weights.

Why this shape:

* The arch weights are *inputs* of ``forward`` (computed once per network forward by the
  supernet), never read from module state here, so a caller can substitute perturbed weights
  (SDARTS) and the same code serves plain DARTS and PC-DARTS.
* The ``none`` op is never built or run: its output is zero, so it contributes nothing to the
  weighted sum; its weight still takes part in the softmax (that is the DARTS semantics).
* Per-edge op lists: ``allowed`` (a row of the supernet's op mask) lists which candidates of
  the global ``primitives`` an edge still holds (P-DARTS prunes them between stages). Pruned
  ops are not built; ``index`` keeps positions in the full weight vector, so the alpha rows
  keep one layout (the full op axis) for every edge and every consumer.
* Skip-connect dropout (P-DARTS) is a plain float ``skip_p`` applied to the skip branch only
  when it is > 0 and the module is training; strategies set it around the weight step only,
  so the architecture step and the robustness bounds always see the deterministic network.
* No data-dependent Python control flow, and the PC-DARTS channel shuffle is written with
  ``unflatten/transpose/flatten`` on static sizes, so ``torch.fx.symbolic_trace`` works.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import FactorizedReduce, ReLUConvBN, build_op


def weighted_sum(weights: torch.Tensor, index: Sequence[int], branches: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i weights[index[i]] * branches[i]``, accumulated left to right.

    The alpha/beta-weighted sum of DARTS. It is one traced call (``torch.fx.wrap`` below), so
    the bound engine sees one operator per edge instead of a product and a sum per branch
    (``dsrna_dist/bounds/ops_mix.py``); the arithmetic is the plain loop, unchanged.
    """
    out = None
    for k, y in zip(index, branches):
        y = weights[k] * y
        out = y if out is None else out + y
    if out is None:  # static: only when every candidate is `none`
        raise RuntimeError("weighted_sum of no branches (a MixedOp without a non-none candidate op)")
    return out


torch.fx.wrap("weighted_sum")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle with static sizes: (B, g*c, H, W) -> interleaved groups."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class MixedOp(nn.Module):
    """sum_k w_k * op_k(x) over the candidate ops, ``none`` skipped (it adds exactly zero)."""

    def __init__(self, c: int, stride: int, primitives: Sequence[str],
                 allowed: Optional[Sequence[bool]] = None) -> None:
        super().__init__()
        if allowed is not None and len(allowed) != len(primitives):
            raise ValueError(f"op mask row has {len(allowed)} entries for {len(primitives)} primitives")
        self.ops = nn.ModuleList()
        index: List[int] = []
        for k, name in enumerate(primitives):
            if name == "none" or (allowed is not None and not allowed[k]):
                continue
            self.ops.append(build_op(name, c, stride, affine=False))
            index.append(k)
        if not index:
            raise ValueError("an edge keeps no op other than 'none' (op mask row "
                             f"{list(allowed) if allowed is not None else None})")
        self.index = tuple(index)  # position of each built op in the weight vector
        names = [primitives[k] for k in index]
        self.skip_pos = names.index("skip_connect") if "skip_connect" in names else -1
        self.skip_p = 0.0  # P-DARTS op-level dropout on the skip branch (see module docstring)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ys = [op(x) for op in self.ops]
        if self.skip_p > 0.0 and self.training and self.skip_pos >= 0:
            ys[self.skip_pos] = F.dropout(ys[self.skip_pos], self.skip_p, training=True)
        return weighted_sum(weights, self.index, ys)


class PartialMixedOp(nn.Module):
    """PC-DARTS edge: the first C/K channels go through a MixedOp, the rest bypass.

    The bypassed channels are max-pooled on reduction edges (stride 2) so the shapes match,
    then the two parts are concatenated and channel-shuffled with K groups.
    """

    def __init__(self, c: int, stride: int, primitives: Sequence[str], k: int,
                 allowed: Optional[Sequence[bool]] = None) -> None:
        super().__init__()
        if c % k:
            raise ValueError(f"partial channels: C={c} is not divisible by K={k} "
                             "(model.init_channels must be a multiple of model.partial_channels)")
        self.k = k
        self.c_part = c // k
        self.mixed = MixedOp(self.c_part, stride, primitives, allowed)
        self.bypass = nn.MaxPool2d(2, 2) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        x_ops = x[:, : self.c_part]
        x_rest = x[:, self.c_part:]
        out = torch.cat([self.mixed(x_ops, weights), self.bypass(x_rest)], dim=1)
        return channel_shuffle(out, self.k)


class SearchCell(nn.Module):
    """A DARTS search cell: 2 input nodes, ``nodes`` intermediate nodes, concat output.

    Node ``i`` sums one mixed edge from each earlier state (2 + i of them); edges are ordered
    node by node, inputs in order, which is the row order of the alpha matrices.
    """

    def __init__(self, nodes: int, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str], partial_channels: int = 1,
                 op_mask: Optional[Sequence[Sequence[bool]]] = None) -> None:
        """``op_mask``: [edges][len(primitives)] booleans, the ops each edge keeps (None: all)."""
        super().__init__()
        self.reduction = reduction
        self.nodes = nodes
        self.preprocess0 = (FactorizedReduce(c_prev_prev, c, affine=False) if reduction_prev
                            else ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        e = 0
        for i in range(nodes):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                row = None if op_mask is None else op_mask[e]
                self.edges.append(MixedOp(c, stride, primitives, row) if partial_channels == 1
                                  else PartialMixedOp(c, stride, primitives, partial_channels, row))
                e += 1

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``weights``: [edges, ops]; ``edge_weights``: [edges] (PC-DARTS betas) or None."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        e = 0
        for i in range(self.nodes):
            ys = [self.edges[e + j](states[j], weights[e + j]) for j in range(2 + i)]
            if edge_weights is not None:  # PC-DARTS edge normalization: beta-weighted
                acc = weighted_sum(edge_weights, tuple(range(e, e + 2 + i)), ys)
            else:
                acc = ys[0]
                for y in ys[1:]:
                    acc = acc + y
            e += 2 + i
            states.append(acc)
        return torch.cat(states[2:], dim=1)
