"""What a search leaves behind besides checkpoints: genotypes per epoch, the alpha history,
and TensorBoard views of the architecture (softmax(alpha) heatmaps, genotype text)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from .. import genotype as G
from ..engine.io import atomic_write_text
from ..space.supernet import Supernet


def alpha_record(model: Supernet, epoch: int) -> Dict[str, Any]:
    """Raw arch parameters (exact float32 values as JSON floats) and the mixing weights."""
    rec: Dict[str, Any] = {"epoch": epoch, "primitives": list(model.primitives)}
    for name, p in zip(model.arch.names, model.arch_parameters()):
        rec[name] = p.detach().float().cpu().tolist()
    for kind, w in model.genotype_weights().items():
        rec[f"weights_{kind}"] = w.tolist()
    return rec


def write_alpha_history(path: Path, records: List[Dict[str, Any]]) -> None:
    atomic_write_text(str(path), "".join(json.dumps(r) + "\n" for r in records))


def read_alpha_history(path: Path, before_epoch: int) -> List[Dict[str, Any]]:
    """Records of epochs < ``before_epoch`` (a resumed run rewrites later ones)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("epoch", 1 << 30) < before_epoch:
                out.append(rec)
    return out


def save_genotypes(run_dir: Path, g: G.Genotype, epoch: int) -> None:
    G.save(g, str(run_dir / "genotypes" / f"epoch_{epoch:03d}.json"))


def edge_labels(nodes: int) -> List[str]:
    return [f"n{i + 2}<-{j}" for i in range(nodes) for j in range(2 + i)]


def heatmap_figure(model: Supernet, epoch: int):
    """Two panels (normal, reduce): per-edge mixing weights over the candidate ops."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    w = model.genotype_weights()
    e, o = w["normal"].shape
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.1 * o, 1 + 0.35 * e), constrained_layout=True)
    for ax, kind in zip(axes, ("normal", "reduce")):
        im = ax.imshow(w[kind].numpy(), cmap="viridis", aspect="auto")
        ax.set_title(f"{kind} cell, epoch {epoch}")
        ax.set_xticks(range(o), list(model.primitives), rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(e), edge_labels(model.nodes), fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    return fig


def genotype_markdown(g: G.Genotype) -> str:
    rows = ["| cell | node | op | input |", "|---|---|---|---|"]
    for cell, edges in (("normal", g.normal), ("reduce", g.reduce)):
        rows += [f"| {cell} | {i // 2 + 2} | {op} | {src} |" for i, (op, src) in enumerate(edges)]
    return "\n".join(rows)
