"""Has the search converged? Alpha entropy, max softmax(alpha) and genotype stability.

A DARTS-family search that "does not search" leaves softmax(alpha) near uniform (1/|ops| per
op) and its derived genotype is whatever the random initialisation ranks first; one that does
concentrates softmax(alpha) and keeps the same genotype once the ranking has settled. The
criterion used for the ``fmnist_small`` budget (issue #11):

* moved: mean over the edges of both cells of max_o softmax(alpha)_o >= ``min_max_softmax``
  (0.25 by default; uniform over 8 ops is 0.125), on softmax(alpha) itself (PC-DARTS edge
  betas are not folded in: they rank edges, not ops);
* stable: the derived genotype did not change during the last ``stable_fraction`` (a quarter)
  of the arch steps, i.e. its last change happened at arch step <= T - ceil(T / 4). Genotypes
  are compared as architectures (:func:`genotype_key`): the two inputs of a node are a set.

:class:`GenotypeTracker` counts changes after every arch step (so a flip and a flip back
inside one epoch are seen); :func:`convergence` reads a per-epoch ``alphas.jsonl`` history and
falls back to comparing the genotypes of consecutive records when the per-step counts are
absent (an older history): then a change is dated at the end of the epoch it happened in.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from ..plots import nodes_of, softmax_rows

KINDS = ("normal", "reduce")


def alpha_stats(alphas: Mapping[str, Any]) -> Dict[str, float]:
    """Entropy (nats) and max of softmax(alpha) per edge, averaged over the edges of each cell
    and over all edges of both cells; ``alphas``: ``{"normal": [[...]], "reduce": [[...]]}``."""
    out: Dict[str, float] = {}
    ent_all, max_all = [], []
    for kind in KINDS:
        if kind not in alphas:
            continue
        p = softmax_rows(alphas[kind])
        ent = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=-1)
        mx = p.max(axis=-1)
        out[f"entropy_{kind}"] = float(ent.mean())
        out[f"max_softmax_{kind}"] = float(mx.mean())
        ent_all.append(ent)
        max_all.append(mx)
    if not ent_all:
        raise ValueError("alpha_stats: no 'normal' or 'reduce' alphas given")
    out["entropy"] = float(np.concatenate(ent_all).mean())
    out["max_softmax"] = float(np.concatenate(max_all).mean())
    out["uniform_entropy"] = math.log(np.asarray(next(iter(alphas.values()))).shape[-1])
    return out


def record_alphas(rec: Mapping[str, Any]) -> Dict[str, Any]:
    """The raw alphas of an ``alphas.jsonl`` record (``alphas_normal`` / ``alphas_reduce``)."""
    out = {k: rec[f"alphas_{k}"] for k in KINDS if isinstance(rec.get(f"alphas_{k}"), list)}
    if not out:
        raise ValueError(f"alphas record of epoch {rec.get('epoch')!r} has no raw alphas "
                         "(alphas_normal / alphas_reduce)")
    return out


def record_genotype(rec: Mapping[str, Any]) -> Any:
    """The genotype of a record: as stored, else parsed from its genotype weights (older files)."""
    if rec.get("genotype") is not None:
        return rec["genotype"]
    if isinstance(rec.get("weights_normal"), list) and isinstance(rec.get("weights_reduce"), list):
        import torch

        from ..space.supernet import derive_genotype

        wn = torch.tensor(rec["weights_normal"], dtype=torch.float64)
        prims = rec.get("primitives")
        nodes = nodes_of(int(wn.shape[0]))
        if prims and nodes is not None:
            return derive_genotype(wn, torch.tensor(rec["weights_reduce"], dtype=torch.float64),
                                   prims, nodes)
    raise ValueError(f"alphas record of epoch {rec.get('epoch')!r} has neither per-step genotype "
                     "counts nor a genotype (or genotype weights and primitives) to compare")


def genotype_key(g: Any) -> str:
    """Canonical string of a genotype (a Genotype or its dict) for equality tests: two genotypes
    get the same key iff they are the same architecture. A node sums its two incoming ops, so
    the order in which the derivation lists them (by strength) is not part of the cell: a swap
    of a node's two inputs whose strengths cross is not a genotype change."""
    d = dict(g.to_dict() if hasattr(g, "to_dict") else g)
    for kind in KINDS:
        edges = d.get(kind)
        if isinstance(edges, (list, tuple)) and len(edges) % 2 == 0:
            pairs = [sorted([list(edges[i]), list(edges[i + 1])], key=lambda e: (e[1], str(e[0])))
                     for i in range(0, len(edges), 2)]
            d[kind] = [e for pair in pairs for e in pair]
    return json.dumps(d, sort_keys=True)


def decision_margin(weights: Mapping[str, Any], primitives: Sequence[str]) -> Dict[str, Any]:
    """How close the derived cell is to another one: the smallest gap, in the derivation's own
    weights (softmax(alpha), times the normalised edge betas for PC-DARTS), between a choice the
    derivation made and the best choice it rejected, over every decision of both cells: for each
    node, its second-strongest incoming edge against its third; for each selected edge, its best
    non-none op against the runner-up. A genotype that flips late in a search flips on its
    smallest margins; adding noise below half the margin to every weight cannot change the cell.
    ``weights``: ``{"normal": [[...]], "reduce": [[...]]}`` (rows in the supernet's edge order)."""
    none = primitives.index("none") if "none" in primitives else -1
    cand = [k for k in range(len(primitives)) if k != none]
    best: Dict[str, Any] = {"margin": math.inf, "where": None}
    for kind in KINDS:
        if kind not in weights:
            continue
        w = np.asarray(weights[kind], dtype=np.float64)
        nodes = nodes_of(int(w.shape[0]))
        if nodes is None:
            raise ValueError(f"decision_margin: {w.shape[0]} {kind} edges is no DARTS cell")
        start = 0
        for i in range(nodes):
            rows = w[start:start + 2 + i][:, cand]
            strength = rows.max(axis=1)
            order = np.argsort(-strength, kind="stable")
            gaps = []
            if len(order) > 2:
                gaps.append((strength[order[1]] - strength[order[2]], f"{kind} node {i}: edges"))
            for j in order[:2]:
                ops = np.sort(rows[j])[::-1]
                gaps.append((ops[0] - ops[1], f"{kind} node {i}: ops of input {int(j)}"))
            for g, where in gaps:
                if g < best["margin"]:
                    best = {"margin": float(g), "where": where}
            start += 2 + i
    return best


class GenotypeTracker:
    """Counts derived-genotype changes per arch step; its state goes into the checkpoint so a
    resumed search continues the count exactly."""

    def __init__(self) -> None:
        self.arch_steps = 0
        self.changes = 0
        self.last_change = 0  # arch step after which the genotype last changed (0 = never)
        self.current: Optional[str] = None

    def start(self, genotype: Any) -> None:
        """The genotype before any arch step (the initialisation's), if not known yet."""
        if self.current is None:
            self.current = genotype_key(genotype)

    def observe(self, genotype: Any) -> bool:
        """Call after every arch step with the genotype derived then; True if it changed."""
        self.arch_steps += 1
        key = genotype_key(genotype)
        changed = self.current is not None and key != self.current
        if changed:
            self.changes += 1
            self.last_change = self.arch_steps
        self.current = key
        return changed

    def state_dict(self) -> Dict[str, Any]:
        return {"arch_steps": self.arch_steps, "changes": self.changes,
                "last_change": self.last_change, "current": self.current}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.arch_steps = int(state.get("arch_steps", 0))
        self.changes = int(state.get("changes", 0))
        self.last_change = int(state.get("last_change", 0))
        self.current = state.get("current")


def stable_window(arch_steps: int, stable_fraction: float = 0.25) -> int:
    """Number of final arch steps over which the genotype must not change."""
    return int(math.ceil(stable_fraction * arch_steps))


def convergence(history: Sequence[Mapping[str, Any]], *, min_max_softmax: float = 0.25,
                stable_fraction: float = 0.25) -> Dict[str, Any]:
    """Convergence diagnostics of a search from its per-epoch alpha records (oldest first).

    Each record needs raw ``alphas_normal``/``alphas_reduce``; with ``arch_steps`` (cumulative),
    ``genotype_changes`` (in that epoch) and ``last_change_arch_step`` as written by the search
    the stability test is per arch step; otherwise consecutive records' ``genotype`` entries are
    compared and each record counts as one arch step unless it carries ``arch_steps``.
    """
    if not 0.0 < stable_fraction <= 1.0:
        raise ValueError(f"stable_fraction must be in (0, 1], got {stable_fraction}")
    out: Dict[str, Any] = {"min_max_softmax": min_max_softmax, "stable_fraction": stable_fraction}
    if not history:
        out.update(arch_steps=0, genotype_changes=0, last_change_arch_step=0, moved=False,
                   stable=False, converged=False)
        return out
    last = history[-1]
    stats = alpha_stats(record_alphas(last))
    out.update(stats)
    per_step = all("genotype_changes" in r and "arch_steps" in r for r in history)
    if per_step:
        total = int(last["arch_steps"])
        changes = int(sum(int(r["genotype_changes"]) for r in history))
        last_change = int(last.get("last_change_arch_step", 0))
        out["resolution"] = "arch step"
    else:
        total, changes, last_change, prev = 0, 0, 0, None
        for i, r in enumerate(history):
            total = int(r.get("arch_steps", i + 1))
            key = genotype_key(record_genotype(r))
            if prev is not None and key != prev:
                changes += 1
                last_change = total
            prev = key
        out["resolution"] = "epoch"
    window = stable_window(total, stable_fraction)
    moved = stats["max_softmax"] >= min_max_softmax
    stable = total > 0 and last_change <= total - window
    out.update(arch_steps=total, genotype_changes=changes, last_change_arch_step=last_change,
               stable_window=window, moved=bool(moved), stable=bool(stable),
               converged=bool(moved and stable))
    weights = {k: last[f"weights_{k}"] for k in KINDS if isinstance(last.get(f"weights_{k}"), list)}
    if weights and last.get("primitives"):
        m = decision_margin(weights, last["primitives"])
        out.update(decision_margin=m["margin"], decision_margin_at=m["where"])
    return out


def run_convergence(run_dir: str, **kw: Any) -> Dict[str, Any]:
    """:func:`convergence` of a search run directory's ``alphas.jsonl``."""
    from pathlib import Path

    path = Path(run_dir) / "alphas.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no alpha history (is {run_dir} a search run directory?)")
    from ..engine.io import read_jsonl

    hist = read_jsonl(path)
    return convergence(hist, **kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dsrna_dist.strategies.convergence RUN_DIR...``: one line per search run
    (criterion, entropy, mean max softmax(alpha), genotype changes, the final cell's smallest
    decision margin); exit 1 if any run did
    not converge, 2 if a directory has no alpha history."""
    import sys

    dirs = list(sys.argv[1:] if argv is None else argv)
    if not dirs:
        print("usage: python -m dsrna_dist.strategies.convergence RUN_DIR...", file=sys.stderr)
        return 2
    bad = 0
    for d in dirs:
        try:
            c = run_convergence(d)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        bad += not c["converged"]
        print(f"{d}: converged={c['converged']} (moved={c['moved']}, stable={c['stable']}) "
              f"entropy={c.get('entropy', float('nan')):.4f} max_softmax={c.get('max_softmax', float('nan')):.4f} "
              f"genotype_changes={c['genotype_changes']} last_change={c['last_change_arch_step']}/"
              f"{c['arch_steps']} arch steps" + (f" smallest_decision_margin={c['decision_margin']:.3g} "
                                                 f"({c['decision_margin_at']})" if "decision_margin" in c else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
