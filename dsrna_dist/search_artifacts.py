"""What a search leaves behind besides checkpoints: genotypes per epoch, the alpha history,
and TensorBoard views of the architecture (softmax(alpha) heatmaps, genotype text)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import genotype as G
from .engine.io import atomic_write_text, read_jsonl
from .space.supernet import Supernet
from .strategies.convergence import GenotypeTracker, alpha_stats, record_alphas


def alpha_record(model: Supernet, epoch: int, genotype: Optional[G.Genotype] = None,
                 tracker: Optional[GenotypeTracker] = None, changes_before: int = 0) -> Dict[str, Any]:
    """Raw arch parameters (exact float32 values as JSON floats), the genotype weights
    (softmax(alpha) x beta for PC-DARTS), the edge names, and, given the genotype and the
    tracker, the convergence fields: ``arch_steps`` (cumulative), ``genotype_changes`` (this
    epoch: the tracker's count minus ``changes_before``), ``last_change_arch_step``, entropy
    and mean max of softmax(alpha)."""
    rec: Dict[str, Any] = {"epoch": epoch, "primitives": list(model.primitives),
                           "edges": G.edge_names(model.nodes)}
    for name, p in zip(model.arch.names, model.arch_parameters()):
        rec[name] = p.detach().float().cpu().tolist()
    for kind, w in model.genotype_weights().items():
        rec[f"weights_{kind}"] = w.tolist()
    if genotype is not None:
        rec["genotype"] = genotype.to_dict()
    if tracker is not None:
        rec.update(arch_steps=tracker.arch_steps, genotype_changes=tracker.changes - changes_before,
                   last_change_arch_step=tracker.last_change)
    rec.update({k: v for k, v in alpha_stats(record_alphas(rec)).items() if k != "uniform_entropy"})
    return rec


def write_alpha_history(path: Path, records: List[Dict[str, Any]]) -> None:
    atomic_write_text(str(path), "".join(json.dumps(r) + "\n" for r in records))


def read_alpha_history(path: Path, before_epoch: int) -> List[Dict[str, Any]]:
    """Records of epochs < ``before_epoch`` (a resumed run rewrites later ones)."""
    return [r for r in read_jsonl(path) if r.get("epoch", 1 << 30) < before_epoch]


def save_genotypes(run_dir: Path, g: G.Genotype, epoch: int) -> None:
    G.save(g, str(run_dir / "genotypes" / f"epoch_{epoch:03d}.json"))


def heatmap_figure(model: Supernet, epoch: int):
    """TensorBoard's alpha heatmap: the report's figure (:func:`dsrna_dist.plots.alpha_heatmap_figure`),
    softmax(alpha) per cell and, for PC-DARTS, the normalized edge betas in their own panel."""
    from .plots import alpha_heatmap_figure

    w = model.arch_weights()
    ops = {k: w[k].detach().float().cpu().numpy() for k in ("normal", "reduce")}
    betas = ({k: w[f"{k}_edge"].detach().float().cpu().numpy() for k in ("normal", "reduce")}
             if model.edge_norm else None)
    return alpha_heatmap_figure(ops, model.primitives, f"epoch {epoch}", betas)


def genotype_markdown(g: G.Genotype) -> str:
    """The genotype as a table, edges named as in the heatmaps and cell diagrams."""
    rows = ["| cell | edge | op |", "|---|---|---|"]
    for cell, edges in (("normal", g.normal), ("reduce", g.reduce)):
        rows += [f"| {cell} | {G.edge_name(src, i // 2)} | {op} |" for i, (op, src) in enumerate(edges)]
    return "\n".join(rows)
