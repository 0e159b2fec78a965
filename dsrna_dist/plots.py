"""PNG figures for the report, drawn with matplotlib only (Agg backend, no graphviz).

Each function takes plain data (lists, dicts, Genotype) and a path, writes one PNG and
returns the path, so report.py stays about finding and aggregating numbers.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .genotype import Genotype, edge_names, node_name


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def softmax_rows(a: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(a, dtype=np.float64)
    m = np.exp(m - m.max(axis=-1, keepdims=True))
    return m / m.sum(axis=-1, keepdims=True)


def edge_labels(nodes: int) -> List[str]:
    """Row labels of the alpha heatmaps (``c_{k-2}->0``, ``c_{k-1}->0``, ``0->1``, ...): the
    naming of :func:`dsrna_dist.genotype.node_name`, shared with the cell diagram and logs."""
    return edge_names(nodes)


def nodes_of(edges: int) -> Optional[int]:
    """Intermediate nodes n with sum_{i<n} (2 + i) = edges, or None if there is no such n."""
    n = int((math.isqrt(8 * edges + 9) - 3) // 2)
    return n if n * (n + 3) // 2 == edges else None


def softmax_per_node(betas: Sequence[float], nodes: int) -> np.ndarray:
    """PC-DARTS edge normalization: softmax of the betas over each node's incoming edges."""
    b = np.asarray(betas, dtype=np.float64)
    parts, start = [], 0
    for i in range(nodes):
        parts.append(softmax_rows(b[start:start + 2 + i]))
        start += 2 + i
    return np.concatenate(parts)


def arch_panels(rec: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]], str]:
    """What to draw from an ``alphas.jsonl`` record: softmax(alpha) per cell, the normalized
    PC-DARTS edge weights per cell (None without betas), and a label of what the first is.
    Records without raw alphas (older files) fall back to the stored mixing weights."""
    ops: Dict[str, np.ndarray] = {}
    what = "softmax(alpha)"
    for kind in ("normal", "reduce"):
        if isinstance(rec.get(f"alphas_{kind}"), list):
            ops[kind] = softmax_rows(rec[f"alphas_{kind}"])
    if not ops:
        for kind in ("normal", "reduce"):
            if isinstance(rec.get(f"weights_{kind}"), list):
                ops[kind] = np.asarray(rec[f"weights_{kind}"], dtype=np.float64)
        what = "mixing weights"
    betas: Optional[Dict[str, np.ndarray]] = None
    if ops and all(isinstance(rec.get(f"betas_{k}"), list) for k in ops):
        nodes = nodes_of(len(next(iter(ops.values()))))
        if nodes is not None:
            betas = {k: softmax_per_node(rec[f"betas_{k}"], nodes) for k in ops}
    return ops, betas, what


def _annotate(ax, m: np.ndarray) -> None:
    for (r, c), v in np.ndenumerate(m):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5,
                color="white" if v < 0.5 else "black")


def alpha_heatmap_figure(weights: Mapping[str, Any], primitives: Sequence[str], title: str,
                         betas: Optional[Mapping[str, Any]] = None, what: str = "softmax(alpha)"):
    """The one alpha heatmap (report and TensorBoard): per cell, rows = edges, columns = ops,
    colour = softmax(alpha) on a fixed 0..1 scale (so a search that did not move looks
    uniform at 1/|ops|), values written in the cells; PC-DARTS edge weights (softmax of the
    betas over each node's inputs) in a separate panel, never multiplied in."""
    plt = _plt()
    kinds = [k for k in ("normal", "reduce") if k in weights]
    e, o = np.asarray(weights[kinds[0]]).shape
    nodes = nodes_of(e)
    labels = edge_labels(nodes) if nodes is not None else [str(i) for i in range(e)]
    ncols = len(kinds) + (1 if betas else 0)
    ratios = [o] * len(kinds) + ([len(betas) + 1] if betas else [])
    fig, axes = plt.subplots(1, ncols, figsize=(2.5 + 0.5 * sum(ratios), 1.6 + 0.3 * e),
                             constrained_layout=True, squeeze=False, gridspec_kw={"width_ratios": ratios})
    im = None
    for ax, kind in zip(axes[0], kinds):
        w = np.asarray(weights[kind], dtype=np.float64)
        im = ax.imshow(w, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
        _annotate(ax, w)
        ax.set_title(f"{title}: {kind} cell, {what}", fontsize=8)
        ax.set_xticks(range(o), list(primitives)[:o], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(e), labels, fontsize=7)
    if betas:
        ax = axes[0][-1]
        b = np.stack([np.asarray(betas[k], dtype=np.float64) for k in kinds], axis=1)
        ax.imshow(b, cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
        _annotate(ax, b)
        ax.set_title("edge weights\n(softmax(beta) per node)", fontsize=8)
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(e), labels, fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03)
    return fig


def alpha_heatmap(weights: Mapping[str, np.ndarray], primitives: Sequence[str], title: str, path: Path,
                  betas: Optional[Mapping[str, np.ndarray]] = None, what: str = "softmax(alpha)") -> Path:
    """:func:`alpha_heatmap_figure` written to ``path``."""
    return _save(alpha_heatmap_figure(weights, primitives, title, betas, what), path)


def alpha_heatmap_of_record(rec: Mapping[str, Any], primitives: Sequence[str], title: str,
                            path: Path) -> Optional[Path]:
    """The heatmap of one ``alphas.jsonl`` record (None if it holds no alphas)."""
    ops, betas, what = arch_panels(rec)
    if not ops:
        return None
    return alpha_heatmap(ops, primitives, title, path, betas, what)


_OP_COLORS = {"skip_connect": "tab:gray", "max_pool_3x3": "tab:red", "avg_pool_3x3": "tab:orange",
              "sep_conv_3x3": "tab:blue", "sep_conv_5x5": "tab:cyan", "dil_conv_3x3": "tab:green",
              "dil_conv_5x5": "tab:olive"}


def cell_diagram(g: Genotype, cell: str, title: str, path: Path) -> Path:
    """The cell as a DAG: inputs c_{k-2}, c_{k-1} on the left, intermediate nodes, output c_k."""
    plt = _plt()
    edges = g.normal if cell == "normal" else g.reduce
    concat = g.normal_concat if cell == "normal" else g.reduce_concat
    n = len(edges) // 2
    pos: Dict[int, Tuple[float, float]] = {0: (0.0, 1.0), 1: (0.0, -1.0)}
    for i in range(n):
        pos[i + 2] = (1.5 + 1.4 * i, 1.2 * (1 if i % 2 == 0 else -1) * (0.4 + 0.25 * (i // 2)))
    out = 1.5 + 1.4 * n + 0.4
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * n, 3.6), constrained_layout=True)
    names = {i: node_name(i) for i in range(n + 2)}

    def box(xy, text, color):
        ax.text(*xy, text, ha="center", va="center", fontsize=9, zorder=3,
                bbox=dict(boxstyle="round,pad=0.35", fc=color, ec="black", lw=0.8))

    def bezier(p0, c, p2, t):
        return ((1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * c[0] + t ** 2 * p2[0],
                (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * c[1] + t ** 2 * p2[1])

    for k, (op, src) in enumerate(edges):
        dst = k // 2 + 2
        p0, p2 = pos[src], pos[dst]
        rad = 0.22 if k % 2 else -0.22
        ctrl = ((p0[0] + p2[0]) / 2 + rad * (p2[1] - p0[1]), (p0[1] + p2[1]) / 2 - rad * (p2[0] - p0[0]))
        color = _OP_COLORS.get(op, "black")
        gap = 0.3 / max(math.hypot(p2[0] - p0[0], p2[1] - p0[1]), 0.6)  # stop short of the boxes
        ts = np.linspace(gap, 1 - gap - 0.02, 40)
        pts = [bezier(p0, ctrl, p2, t) for t in ts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1.4, zorder=1)
        ax.annotate("", xy=bezier(p0, ctrl, p2, 1 - gap), xytext=pts[-1], zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=1.4, shrinkA=0, shrinkB=0))
        ax.text(*bezier(p0, ctrl, p2, 0.5), op, fontsize=7, ha="center", va="center", color=color, zorder=2,
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
    for c in concat:
        ax.annotate("", xy=(out, 0.0), xytext=pos[c], zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color="lightgray", lw=1.0, shrinkA=14, shrinkB=14))
    for i, xy in pos.items():
        box(xy, names[i], "lightgreen" if i < 2 else "lightblue")
    box((out, 0.0), "c_{k}", "khaki")
    ax.set_xlim(-0.6, out + 0.6)
    ax.set_ylim(-2.0, 2.0)
    ax.axis("off")
    ax.set_title(f"{title}: {cell} cell", fontsize=10)
    return _save(fig, path)


def series_plot(series: Mapping[str, Tuple[Sequence[float], Sequence[float], Sequence[float]]],
                title: str, xlabel: str, ylabel: str, path: Path,
                ylim: Optional[Tuple[float, float]] = None,
                hlines: Sequence[Tuple[float, str, str]] = ()) -> Path:
    """One line per series (x, mean, error bar = std over seeds); ``hlines``: (y, label, style)
    reference lines, e.g. a criterion's threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for name, (x, mean, std) in series.items():
        ax.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, label=name)
    for y, label, style in hlines:
        ax.axhline(y, color="gray", ls=style, lw=0.8, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def eps_sweep(series: Mapping[str, Tuple[Sequence[float], Sequence[float], Sequence[float]]],
              title: str, xlabel: str, path: Path) -> Path:
    """Robust accuracy vs eps: one line (mean, error bar = std over seeds) per method."""
    return series_plot(series, title, xlabel, "robust accuracy (%)", path, ylim=(0, 100))


def radius_bins(data: Mapping[str, Sequence[float]], bins: int = 20) -> np.ndarray:
    """Log-spaced bin edges over the positive radii of every method (radii of different bound
    methods span decades: a linear axis from 0 puts them all in the first bar)."""
    pos = np.asarray([v for vs in data.values() for v in vs if v > 0], dtype=float)
    if not len(pos):
        raise ValueError("no positive radius: say 'no example certified' instead of drawing a histogram")
    lo, hi = pos.min(), pos.max()
    if hi <= lo * 1.0001:
        lo, hi = lo / 1.5, hi * 1.5
    return np.geomspace(lo, hi, bins + 1)


def radius_histogram(data: Mapping[str, Sequence[float]], title: str, xlabel: str, path: Path,
                     bins: int = 20) -> Path:
    """Certified radii per example on a log axis fitted to the positive radii, one translucent
    histogram per method; examples with radius 0 (not certified at any eps) are counted in the
    legend rather than drawn (log scale has no 0)."""
    plt = _plt()
    edges = radius_bins(data, bins)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for name, vs in data.items():
        v = np.asarray(vs, dtype=float)
        zeros = int((v <= 0).sum())
        lab = f"{name} (mean {v.mean():.3g}" + (f", {zeros}/{len(v)} at 0" if zeros else "") + ")" if len(v) else name
        ax.hist(v[v > 0], bins=edges, alpha=0.5, label=lab)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def radius_strip(panels: Mapping[str, Mapping[str, Sequence[float]]], title: str, path: Path) -> Path:
    """Per-net mean certified radii, one panel per bound, one column of points per method, log
    axis: the radii of one comparison span decades, and a mean ± std bar would hide that one net
    can carry a method's mean. Nets that certify nothing (radius 0) sit on a marked floor line a
    decade below the panel's smallest positive radius, so they are seen, not dropped."""
    if not any(v > 0 for p in panels.values() for vs in p.values() for v in vs):
        raise ValueError("no positive radius: say 'nothing certified' instead of drawing a strip plot")
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.8, 3.2 * len(panels) + 1.2), 3.8), constrained_layout=True,
                             squeeze=False)
    for ax, (bound, per) in zip(axes[0], panels.items()):
        pos = [v for vs in per.values() for v in vs if v > 0]
        floor = (min(pos) if pos else 1e-6) / 10
        for i, vs in enumerate(per.values()):
            v = np.asarray(vs, dtype=float)
            x = i + np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.full(len(v), float(i))
            ax.scatter(x, np.where(v > 0, v, floor), marker="o", s=22,
                       facecolors=["C0" if r > 0 else "none" for r in v], edgecolors="C0")
        ax.axhline(floor, color="gray", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(per)), list(per), rotation=35, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(per) - 0.4)
        ax.set_title(bound, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("mean certified radius of the net")
    fig.suptitle(f"{title}\n(open circles: radius 0, drawn on the dotted floor)", fontsize=9)
    return _save(fig, path)
