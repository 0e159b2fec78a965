"""Tables and tests of the comparison grid (bench/grid.py) -> results/grid/report.md + grid.json.

    python bench/grid_report.py            # whatever has finished so far

Per search: convergence (mean max softmax(alpha), entropy, genotype changes, last change,
converged), grad_share and eps at the end (DSRNA), CPU time, the network it found (genotype
hash; the same hash for two methods with one seed = the same cell). Per retraining recipe
(natural, PGD-AT) and method: mean +- sample std over seeds (n) of clean and robust accuracies,
AutoAttack and the certified radii; then for each DSRNA variant against each baseline Welch's
t-test and the paired t-test (pairs = same seed: same data order and retrain seed) on clean,
PGD-20, AutoAttack and certified radius. Only finished cells enter; n says how many.
The nets retrained after the checkpoint loss give the retraining's own noise (same recipe, cell
and seed on another CPU), the yardstick for those differences.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dsrna_dist import genotype as G  # noqa: E402
from dsrna_dist import stats  # noqa: E402
from dsrna_dist.engine.io import atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402
from dsrna_dist.strategies.convergence import alpha_stats, record_alphas, run_convergence  # noqa: E402
from grid import METHODS, OUT, RECIPES, genotype_hash  # noqa: E402
import replication  # noqa: E402

DSRNA = [m for m in METHODS if m.startswith("dsrna")]
BASELINES = [m for m in METHODS if not m.startswith("dsrna")]
CERT_PREF = ("crown", "crown-ibp", "ibp")  # tightest first


def load(p: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def searches() -> List[Dict[str, Any]]:
    rows = []
    for method in METHODS:
        for d in sorted((OUT / "search").glob(f"{method}_s*")):
            seed = d.name[len(method) + 2:]
            if not seed.isdigit() or not (d / "genotype.json").exists():
                continue
            s = load(d / "summary.json") or {}
            # RobNet samples cells: it has no learned alpha, so the criterion does not apply
            c = {} if s.get("strategy") == "robnet" else (s.get("convergence") or {})
            le = s.get("last_epoch_means") or {}
            late_changes, late_diff = late_quarter(d / "alphas.jsonl")
            margin = final_margin(d) if c else None
            geno = load(d / "genotype.json") or {}
            cells = {k: geno[k] for k in G.FIELDS if k in geno}
            # a genotype file without cells has no count (None), not zero parameter-free ops
            free = list(G.from_dict(cells).param_free_ops()) if cells else None
            rows.append({"method": method, "seed": int(seed), "ghash": genotype_hash(d / "genotype.json"),
                         "param_free": free,
                         "late_changes": late_changes, "late_diff": late_diff, "margin": margin,
                         "max_softmax": c.get("max_softmax"), "entropy": c.get("entropy"),
                         "changes": c.get("genotype_changes"), "last_change": c.get("last_change_arch_step"),
                         "arch_steps": c.get("arch_steps"), "converged": c.get("converged"),
                         "grad_share": le.get("grad_share"), "eps": le.get("metric/eps"),
                         "grad_share_max": epoch_max(d, "grad_share"),
                         "gap": le.get("metric/bound_gap"), "cpu_s": s.get("search_cpu_s"),
                         "stopped": s.get("stopped")})
    return rows


def epoch_max(run: Path, key: str) -> Optional[float]:
    """The largest epoch mean of a search's logged ``key`` (None if never logged): from
    alphas.jsonl's ``means`` (committed; from the twenty-second session on), else the run's
    TensorBoard ``epoch/<key>`` (git-ignored, so only where the search ran). For grad_share: the
    last epoch's share alone hides a first arch epoch where the metric's gradient swamped the
    loss's (the paper's fixed gamma with DSRNA-CB, twenty-second session)."""
    try:
        rows = read_jsonl(run / "alphas.jsonl")  # [] when missing
    except ValueError:  # damaged history: as late_quarter, no figure from it
        rows = []
    vals = [r["means"][key] for r in rows if key in (r.get("means") or {})]
    if vals:
        return max(vals)
    if not (run / "tb").is_dir():
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0,
                                                           "histograms": 0}).Reload()
    tag = f"epoch/{key}"
    return max(e.value for e in acc.Scalars(tag)) if tag in acc.Tags().get("scalars", []) else None


def final_margin(run: Path) -> Optional[Dict[str, Any]]:
    """The final cell's smallest decision margin, as convergence() reports it, if recorded."""
    try:
        c = run_convergence(str(run))
    except (ValueError, KeyError, OSError):
        return None
    return {"margin": c["decision_margin"], "where": c["decision_margin_at"]} if "decision_margin" in c else None


def late_quarter(path: Path) -> tuple:
    """(genotype changes counted in the last quarter's epochs, genotype entries that differ
    between the end of the third quarter and the end): the second separates a cell that keeps
    moving from one near-tied entry flipping back and forth."""
    try:
        recs = read_jsonl(path)
    except ValueError:  # damaged history: no late-change figures rather than a wrong one
        return None, None
    recs = [r for r in recs if isinstance(r.get("genotype"), dict) and r.get("arch_steps") is not None]
    if not recs or not recs[-1]["arch_steps"]:
        return None, None
    total = recs[-1]["arch_steps"]
    cut = total - math.ceil(total / 4)
    before = [r for r in recs if r["arch_steps"] <= cut]
    late = sum(int(r.get("genotype_changes") or 0) for r in recs if r["arch_steps"] > cut)
    if not before:
        return late, None
    g0, g1 = before[-1]["genotype"], recs[-1]["genotype"]

    def nodes(edges: list) -> list:  # a node's two inputs are a set (as genotype_key compares them)
        return [sorted(map(tuple, edges[i:i + 2])) for i in range(0, len(edges), 2)]
    diff = sum(len(set(a) - set(b)) for k in ("normal", "reduce")
               for a, b in zip(nodes(g0.get(k, [])), nodes(g1.get(k, []))))
    return late, diff


def pgd_twin(aa_key: str) -> str:
    """The PGD-20 column run on an AutoAttack column's images ("AutoAttack @0.02 (200)" ->
    "PGD-20 @0.02 (200)")."""
    return "PGD-20" + aa_key[len("AutoAttack"):]


def net_results(recipe: str, ghash: str, seed: int, net: Optional[Path] = None) -> Dict[str, Any]:
    """Clean/robust accuracies, AutoAttack and certified radii of one retrained network (the
    grid's, or the one in ``net``)."""
    net = net or OUT / "net" / recipe / f"{ghash}_s{seed}"
    out: Dict[str, Any] = {}
    tr = load(net / "train" / "summary.json")
    if tr:
        out["params (k)"] = tr["params"] / 1000 if isinstance(tr.get("params"), (int, float)) else None
        out["val_top1"] = tr.get("best_top1")
        # the last epoch's model on all 10k test images (best.pt, chosen on val, is what eval attacks)
        out["test_top1 final (10k)"] = tr.get("test_top1")
    ev = load(net / "eval" / "summary.json")
    if ev:
        out["clean"] = ev.get("clean_acc")
        out.update({k: v for k, v in (ev.get("robust_acc") or {}).items()})
        for sw in ev.get("eps_sweep") or []:  # the small radii, where naturally trained nets differ
            if sw.get("norm") == "inf" and sw.get("eps") in (0.02, 0.05):
                out[f"{sw['attack']} @{sw['eps']:g}"] = sw.get("robust_acc")
        out["masking_flagged"] = list((ev.get("masking") or {}).get("flagged") or [])
        # certified accuracy at fixed eps (the certifiably trained recipe's eval: IBP / CROWN-IBP at 0.05)
        for meth, norms in (ev["certified"] if isinstance(ev.get("certified"), dict) else {}).items():
            for eps, acc in ((norms.get("inf") or {}).get("certified_acc") or {}).items():
                out[f"verified {meth} @{float(eps):g}"] = acc
    aa = load(net / "autoattack" / "summary.json")
    if aa:
        out.update({k: v for k, v in (aa.get("robust_acc") or {}).items()})
        for key, auto in list(out.items()):
            pgd = out.get(pgd_twin(key)) if key.startswith("AutoAttack") else None
            if isinstance(pgd, (int, float)) and isinstance(auto, (int, float)):
                # on the same images: what PGD-20 leaves that AutoAttack breaks (a large gap: masking)
                out[f"PGD-20 - {key}"] = pgd - auto
    for stage in ("certify", "crown"):  # IBP/CROWN-IBP on 200 examples; full CROWN on a few
        ce = load(net / stage / "summary.json")
        cert = (ce or {}).get("certified") or {}
        for meth in CERT_PREF:  # the tightest method of the stage
            if meth in cert:
                for norm, v in cert[meth].items():
                    out[f"radius {meth} l_{norm} (n={v.get('n')})"] = v.get("mean_radius")
                    if v.get("median_bracket"):  # the bound's radius lies within this factor above
                        out[f"radius {meth} l_{norm} bracket (median)"] = v["median_bracket"]
                    if v.get("median_margin_left_unbracketed") is not None:  # near 0: close; near 1: far
                        out[f"radius {meth} l_{norm} margin left (median, unbracketed)"] = \
                            v["median_margin_left_unbracketed"]
                    if v.get("mean_radius_target") is not None:
                        out[f"radius {meth} l_{norm} random target (n={v.get('n')})"] = v.get("mean_radius_target")
                break
    return out


def sweep_of(recipe: str, ghash: str, seed: int) -> Dict[float, float]:
    """PGD-20 l_inf robust accuracy per eps of the eval stage's sweep (eps 0 = clean)."""
    ev = load(OUT / "net" / recipe / f"{ghash}_s{seed}" / "eval" / "summary.json") or {}
    return {float(sw["eps"]): float(sw["robust_acc"]) for sw in ev.get("eps_sweep") or []
            if sw.get("norm") == "inf" and isinstance(sw.get("robust_acc"), (int, float))}


def band(cols: List[List[float]]) -> tuple:
    """Mean and sample std (0 for a single value) of each column: one point of a figure's line."""
    return [stats.mean(v) for v in cols], [stats.std(v) if len(v) > 1 else 0.0 for v in cols]


def sweep_series(recipe: str, rows: List[Dict[str, Any]]) -> Dict[str, tuple]:
    """Per method: (eps grid, mean, std) of PGD-20 robust accuracy over the seeds whose eval has a
    sweep, on the eps values every one of them has; the label carries n."""
    per: Dict[str, List[Dict[float, float]]] = {}
    for r in rows:
        sw = sweep_of(recipe, r["ghash"], r["seed"])
        if sw:
            per.setdefault(r["method"], []).append(sw)
    series = {}
    for method, sws in per.items():
        grid = sorted(set.intersection(*(set(s) for s in sws)))
        if grid:
            series[f"{method} (n={len(sws)})"] = (grid, *band([[s[e] for s in sws] for e in grid]))
    return series


def max_softmax_series(rows: List[Dict[str, Any]]) -> Dict[str, tuple]:
    """Per method: (epochs, mean, std over seeds) of the mean over edges (normal and reduction
    cells) of max softmax(alpha) at each search epoch's end: the convergence criterion's first
    clause over time (the value the search recorded, or recomputed from the record's alphas).
    Searches without alpha (RobNet) are left out."""
    per: Dict[str, List[List[float]]] = {}
    for r in rows:
        f = OUT / "search" / f"{r['method']}_s{r['seed']}" / "alphas.jsonl"
        if r["converged"] is None or not f.exists():
            continue
        curve = [float(rec["max_softmax"]) if "max_softmax" in rec else alpha_stats(record_alphas(rec))["max_softmax"]
                 for rec in read_jsonl(f)]
        per.setdefault(r["method"], []).append(curve)
    out = {}
    for method, curves in per.items():
        n = min(len(c) for c in curves)
        out[f"{method} (n={len(curves)})"] = (list(range(1, n + 1)), *band([[c[i] for c in curves] for i in range(n)]))
    return out


def is_mean_radius(col: str) -> bool:
    """An untargeted mean-radius column (not its random-target twin, bracket or margin left:
    those are resolution, not results)."""
    return col.startswith("radius") and "(n=" in col and "target" not in col


def radius_panels(per: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Dict[str, List[float]]]:
    """One recipe's per-net mean l_inf radii (untargeted), per bound column, then per method in
    the grid's method order; methods without that bound left out."""
    cols = [c for rs in per.values() for res in rs for c in res
            if is_mean_radius(c) and " l_inf (n=" in c]
    panels: Dict[str, Dict[str, List[float]]] = {}
    for c in dict.fromkeys(cols):
        col = {m: [float(res[c]) for res in per[m] if isinstance(res.get(c), (int, float))] for m in METHODS if m in per}
        panels[c[len("radius "):]] = {m: v for m, v in col.items() if v}
    return panels


def plots(rows: List[Dict[str, Any]], recipes: List[str]) -> Dict[str, str]:
    """The report's figures (file names under results/grid/), for whatever has finished."""
    from dsrna_dist.plots import eps_sweep, series_plot

    made = {}
    ms = max_softmax_series(rows)
    if ms:
        made["search"] = series_plot(ms, "convergence: mean over edges of max softmax(alpha)", "search epoch",
                                     "mean max softmax(alpha)", OUT / "max_softmax.png",
                                     hlines=((0.25, "criterion 0.25", "--"), (0.125, "uniform", ":"))).name
    for recipe in recipes:
        series = sweep_series(recipe, rows)
        if series:
            made[recipe] = eps_sweep(series, f"PGD-20 l_inf, {recipe} retraining, first 2000 test images",
                                     "eps", OUT / f"eps_sweep_{recipe}.png").name
    return made


def paper_tables(data: Dict[str, Dict[str, List[Dict[str, Any]]]], srows: List[Dict[str, Any]]) -> List[str]:
    """Tables 1/4, 2 and 5-6 of the paper in its form (rows or columns = methods, mean ± std with
    n), from the same numbers as the wide tables; Table 3 (ImageNet) has no counterpart here."""
    def col(method: str, recipe: str, key: str, sci_fmt: bool = False) -> str:
        xs = [float(r[key]) for r in data.get(recipe, {}).get(method, []) if isinstance(r.get(key), (int, float))]
        return (sci(xs) if sci_fmt else fmt(xs)) if xs else "-"

    methods = [m for m in METHODS if any(r["method"] == m for r in srows)]
    out = ["", "## The paper's tables in its form", "",
           "Same numbers as the tables above, arranged as the paper's Tables 1-2 and 4-6 (Table 3, ImageNet, "
           "has no counterpart at this scale). Accuracies on the first 2000 test images (test top-1 on all "
           "10k), attacks as configured in `configs/eval/fmnist_small_grid.yaml` (l_inf 0.1; C&W l_2), "
           "search cost in CPU minutes on one core instead of GPU days.", "",
           "**Table 2 form** (no attack, natural training; with precise BN where the `pbn` recipe ran: the same "
           "weights, BN statistics re-estimated):", ""]
    pbn = "pbn" in data  # the same weights as nat's: its test top-1 is a second column, not a second table
    out += ["| method | test top-1 (%) | " + ("test top-1, precise BN (%) | " if pbn else "") +
            "params (k) | search cost (CPU min) | search method |", "|---" * (6 if pbn else 5) + "|"]
    for m in methods:
        cost = [r["cpu_s"] / 60 for r in srows if r["method"] == m and r.get("cpu_s")]
        out.append(f"| {m} | {col(m, 'nat', 'test_top1 final (10k)')} | " +
                   (f"{col(m, 'pbn', 'test_top1 final (10k)')} | " if pbn else "") + f"{col(m, 'nat', 'params (k)')} | "
                   f"{fmt(cost, 1) if cost else '-'} | {'one shot' if m == 'robnet' else 'gradient'} |")
    for recipe, title in (("nat", "natural training"), ("pbn", "natural training, precise BN"),
                          ("adv", "PGD adversarial training")):
        if recipe not in data:
            continue
        # the recipe's AutoAttack column: its label names eps and images (configs/eval/*_aa*.yaml)
        aa = min((k for rs in data[recipe].values() for r in rs for k in r if k.startswith("AutoAttack")),
                 default="AutoAttack")
        rows = {m: [col(m, recipe, k) for k in ("clean", "PGD-100", "PGD-20", "FGSM", "C&W", aa)]
                for m in methods if m in data[recipe]}
        rows = {m: c for m, c in rows.items() if any(v != "-" for v in c)}  # trained but not attacked yet
        if rows:
            out += ["", f"**Tables 1 / 4 form** ({title}):", "",
                    f"| method | without attack | PGD (100) | PGD (20) | FGSM | C&W | {aa} |", "|---" * 7 + "|"]
            out += [f"| {m} | " + " | ".join(c) + " |" for m, c in rows.items()]
    bounds = []
    for recipe, per in data.items():
        bounds += [(recipe, k) for k in radius_keys(per)]
    if bounds:
        out += ["", "**Tables 5-6 form** (averaged certified lower bounds, untargeted; bound method and "
                "examples per network named in the row):", "",
                "| recipe | bound | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
        for recipe, k in bounds:
            out.append(f"| {recipe} | {k[len('radius '):]} | " + " | ".join(col(m, recipe, k, True) for m in methods) + " |")
    return out


def radius_keys(per: Dict[str, List[Dict[str, Any]]]) -> List[str]:
    """A recipe's untargeted mean-radius columns, sorted."""
    return sorted({k for rs in per.values() for r in rs for k in r if is_mean_radius(k)})


def counted(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The search rows whose genotype had cells to count (``param_free`` not None)."""
    return [r for r in rows if r["param_free"] is not None]


def cell_convs(srows: List[Dict[str, Any]]) -> Dict[tuple, tuple]:
    """(method, seed) -> (cell hash, convolutions among the cell's 12 ops)."""
    return {(r["method"], r["seed"]): (r["ghash"], 12 - sum(r["param_free"])) for r in counted(srows)}


def distinct_rows(per: Dict[str, List[Dict[str, Any]]], convs: Dict[tuple, tuple],
                  keys: Sequence[str]) -> List[tuple]:
    """(convolutions, [values of ``keys``], parameters in k or None) per distinct net of a recipe
    that has every key: a cell two methods found with one seed is one net, counted once."""
    nets: Dict[tuple, tuple] = {}
    for method, rs in per.items():
        for r in rs:
            ghash, c = convs.get((method, r["seed"]), (None, None))
            if ghash is not None and all(isinstance(r.get(k), (int, float)) for k in keys):
                nets[(ghash, r["seed"])] = (c, [float(r[k]) for k in keys], r.get("params (k)"))
    return list(nets.values())


def distinct_nets(per: Dict[str, List[Dict[str, Any]]], convs: Dict[tuple, tuple], key: str) -> List[tuple]:
    """(convolutions, value of ``key``, parameters in k or None) per distinct net of a recipe."""
    return [(c, vs[0], p) for c, vs, p in distinct_rows(per, convs, [key])]


#: the accuracy columns read against the cell's convolutions (with any AutoAttack column)
CONV_METRICS = ("test_top1 final (10k)", "clean", "PGD-20", "PGD-20 @0.02", "C&W")


def accuracy_keys(per: Dict[str, List[Dict[str, Any]]]) -> List[str]:
    """A recipe's accuracy columns of :data:`CONV_METRICS`, then its AutoAttack ones, sorted."""
    cols = {k for rs in per.values() for r in rs for k in r}
    return [k for k in CONV_METRICS if k in cols] + sorted(k for k in cols if k.startswith("AutoAttack"))


def metrics_vs_convs(data: Dict[str, Dict[str, List[Dict[str, Any]]]],
                     srows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per recipe and accuracy column: Spearman's r of a net's value against its cell's
    convolutions and against its parameters, over the distinct nets (a reading after the fact,
    beside :func:`radius_vs_convs`: whether what the searches change -- how many convolutions a
    cell has -- orders the nets' accuracy and robustness regardless of method). The two counts
    go together (more convolutions, more parameters), so neither is the cause on its own."""
    convs = cell_convs(srows)
    out = []
    for recipe, per in data.items():
        for k in accuracy_keys(per):
            nets = distinct_nets(per, convs, k)
            by_c = stats.spearman([c for c, _, _ in nets], [v for _, v, _ in nets])
            if by_c is None:
                continue
            sized = [(p, v) for _, v, p in nets if isinstance(p, (int, float))]
            by_p = stats.spearman([p for p, _ in sized], [v for _, v in sized]) if len(sized) == len(nets) else None
            out.append({"recipe": recipe, "metric": k, "n": len(nets), "r_convs": by_c.diff, "p_convs": by_c.p,
                        "r_params": by_p.diff if by_p else None, "p_params": by_p.p if by_p else None})
    return out


def metric_conv_lines(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return []
    lines = ["", "## Accuracy and robustness against the cell's convolutions (a reading after the fact)", "",
             "Spearman's r between a net's accuracy (%) and the convolutions among its cell's 12 ops, and "
             "against its parameters, over the distinct nets of every method (as the radius table above). "
             "Convolutions and parameters go together, so neither is the cause on its own. Not a planned "
             "test.", "",
             "| recipe | metric | nets | r (convolutions) | p | r (parameters) | p |", "|---" * 7 + "|"]
    for r in rows:
        rp = "- | -" if r["r_params"] is None else f"{r['r_params']:+.2f} | {r['p_params']:.2g}"
        lines.append(f"| {r['recipe']} | {r['metric']} | {r['n']} | {r['r_convs']:+.2f} | {r['p_convs']:.2g} | {rp} |")
    return lines


def radius_vs_convs(data: Dict[str, Dict[str, List[Dict[str, Any]]]],
                    srows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per recipe and untargeted mean-radius column: Spearman's r between a net's radius and the
    number of convolutions in its cell (12 - parameter-free ops), over the distinct nets (a cell
    two methods share with a seed counts once). A reading after the fact: whether the bound
    separates cells by how many convolutions it relaxes through rather than by method."""
    convs = cell_convs(srows)
    out = []
    for recipe, per in data.items():
        keys = radius_keys(per)
        for k in keys:
            pairs = sorted((c, v) for c, v, _ in distinct_nets(per, convs, k))
            rho = stats.spearman([c for c, _ in pairs], [v for _, v in pairs])
            if rho is None:
                continue
            by: Dict[int, List[float]] = {}
            for c, v in pairs:
                by.setdefault(c, []).append(v)
            out.append({"recipe": recipe, "radius": k, "n": len(pairs), "spearman_r": rho.diff, "p": rho.p,
                        "certifying_by_convs": {c: [sum(v > 0 for v in vs), len(vs)] for c, vs in by.items()}})
    return out


def radius_conv_lines(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return []
    lines = ["", "## Certified radius against the cell's convolutions (a reading after the fact)", "",
             "Spearman's rank correlation between a net's mean radius and the convolutions among its cell's 12 "
             "ops, over the distinct nets of every method (ties averaged; p from the t approximation, as "
             "scipy's). 'Certifying' = nets with a radius above 0 (the radius search's floor), per number of "
             "convolutions. Not a planned test: it asks whether the bound ranks cells by how many "
             "convolutions it relaxes through.", "",
             "| recipe | radius | nets | Spearman r | p | nets certifying, by convolutions in the cell |",
             "|---" * 6 + "|"]
    for r in rows:
        cert = ", ".join(f"{c}: {a}/{b}" for c, (a, b) in sorted(r["certifying_by_convs"].items()))
        lines.append(f"| {r['recipe']} | {r['radius'][len('radius '):]} | {r['n']} | {r['spearman_r']:+.2f} | "
                     f"{r['p']:.2g} | {cert} |")
    return lines


def radius_vs_robustness(data: Dict[str, Dict[str, List[Dict[str, Any]]]],
                         srows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per recipe, untargeted mean-radius column and accuracy column (those of
    :func:`metrics_vs_convs`): Spearman's r between a net's radius and its accuracy under attack
    (or clean), over the distinct nets with both. A reading after the fact that asks what claim
    (3) takes for granted: whether a larger certified radius goes with a net that attacks break
    less, at the eps the attacks use."""
    convs = cell_convs(srows)
    out = []
    for recipe, per in data.items():
        for radius in radius_keys(per):
            for k in accuracy_keys(per):
                nets = [vs for _, vs, _ in distinct_rows(per, convs, [radius, k])]
                rho = stats.spearman([a for a, _ in nets], [b for _, b in nets])
                if rho is not None:
                    out.append({"recipe": recipe, "radius": radius, "metric": k, "n": len(nets),
                                "spearman_r": rho.diff, "p": rho.p})
    return out


def radius_robustness_lines(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return []
    lines = ["", "## Certified radius against accuracy and robustness (a reading after the fact)", "",
             "Spearman's r between a net's mean certified radius and its accuracy (clean or under attack, %), "
             "over the distinct nets of every method that have both (as the tables above). Claim (3) reads a "
             "larger certified radius as a more robust net; this asks whether the radius ranks the nets as the "
             "attacks do. Not a planned test.", "",
             "| recipe | radius | metric | nets | Spearman r | p |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['radius'][len('radius '):]} | {r['metric']} | {r['n']} | "
                     f"{r['spearman_r']:+.2f} | {r['p']:.2g} |")
    return lines


def log_radius_tests(data: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    """Per recipe and untargeted mean-radius column, each DSRNA variant against each baseline on
    the log scale: Welch on log10 radius (the ratio of geometric means) and the exact Mann-Whitney
    p on the radii. A reading after the fact, outside the Holm families: radii that span decades
    let the largest net rule a raw-scale mean and sd. Only where every net of both methods
    certifies something (a radius of 0 has no logarithm)."""
    out = []
    for recipe, per in data.items():
        keys = radius_keys(per)
        for k in keys:
            for d in DSRNA:
                for b in BASELINES:
                    va = [float(r[k]) for r in per.get(d, []) if isinstance(r.get(k), (int, float))]
                    vb = [float(r[k]) for r in per.get(b, []) if isinstance(r.get(k), (int, float))]
                    if len(va) < 2 or len(vb) < 2 or min(va + vb) <= 0:
                        continue
                    w = stats.welch([math.log10(v) for v in va], [math.log10(v) for v in vb])
                    if w is None:
                        continue
                    out.append({"recipe": recipe, "radius": k, "dsrna": d, "baseline": b, "n": [len(va), len(vb)],
                                "ratio": 10 ** w.diff, "welch_p_log": w.p,
                                "mann_whitney_p": stats.mann_whitney_exact(va, vb)})
    add_holm(out, lambda r: (r["recipe"], r["radius"]), lambda r: r["welch_p_log"], "welch_p_log_holm")
    return out


def log_radius_lines(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return []
    lines = ["", "## Certified radius on the log scale (a reading after the fact)", "",
             "Each DSRNA variant against each baseline where every net of both certifies something: the ratio "
             "of geometric-mean radii, Welch's test on log10 radius and the exact two-sided Mann-Whitney p "
             "(3 against 3 cannot go below 0.1). Not the planned test (Welch on the radius, in the families "
             "above): radii spanning decades make the raw-scale test the largest net's. 'Holm' adjusts the log "
             "p within one recipe's one radius, over the pairs where every net certifies (fewer than the "
             "planned family's where some do not).",
             "", "| recipe | radius | DSRNA | baseline | geometric-mean ratio | Welch p (log10) | Holm (log10) | "
             "Mann-Whitney p | n |", "|---" * 9 + "|"]
    for r in rows:
        mw = "-" if r["mann_whitney_p"] is None else f"{r['mann_whitney_p']:.2g}"
        lines.append(f"| {r['recipe']} | {r['radius'][len('radius '):]} | {r['dsrna']} | {r['baseline']} | "
                     f"{r['ratio']:.3g}x | {r['welch_p_log']:.2g} | {r['welch_p_log_holm']:.2g} | {mw} | "
                     f"{r['n'][0]} vs {r['n'][1]} |")
    return lines


def fmt(xs: List[float], digits: int = 2) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (n=1)"
    return f"{stats.mean(xs):.{digits}f} ± {stats.std(xs):.{digits}f} (n={len(xs)})"


def sci(xs: List[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.3g} (n=1)"
    return f"{stats.mean(xs):.3g} ± {stats.std(xs):.2g} (n={len(xs)})"


def pair_test(recipe: str, d: str, b: str, metric: str, a: Dict[int, float],
              bb: Dict[int, float]) -> Optional[Dict[str, Any]]:
    """Welch's t-test over all seeds and the paired t-test over the seeds both have (None if
    neither is defined: fewer than 2 values a side)."""
    w = stats.welch(list(a.values()), list(bb.values()))
    common = sorted(set(a) & set(bb))
    pt = stats.paired([a[s] for s in common], [bb[s] for s in common]) if len(common) >= 2 else None
    if not (w or pt):
        return None
    return {"recipe": recipe, "dsrna": d, "baseline": b, "metric": metric, "diff": (w or pt).diff,
            "welch_p": w.p if w else None, "paired_p": pt.p if pt else None,
            "no_spread": bool((w and math.isinf(w.t)) or (pt and math.isinf(pt.t))), "n": [len(a), len(bb)],
            "pairs": len(common), "sd": [stats.std(list(a.values())), stats.std(list(bb.values()))]}


def welch_tested(t: Dict[str, Any]) -> bool:
    """A Welch p exists (not None, not NaN): the test counts in its Holm family."""
    return t["welch_p"] is not None and not math.isnan(t["welch_p"])


def add_holm(rows: List[Dict[str, Any]], family: Callable[[Dict[str, Any]], tuple],
             p_of: Callable[[Dict[str, Any]], Optional[float]], out: str) -> None:
    """Set ``row[out]``: the p of ``p_of`` Holm-adjusted among the rows of one ``family`` key
    (a None p stays None and is not counted)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(family(r), []).append(r)
    for group in groups.values():
        for r, h in zip(group, stats.holm([p_of(r) for r in group])):
            r[out] = h


def holm_by_family(tests: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add ``welch_p_holm``: Welch's p adjusted (Holm) within its family, one recipe's one metric
    (every DSRNA variant against every baseline), the comparisons one claim rests on."""
    add_holm(tests, lambda t: (t["recipe"], t["metric"]), lambda t: t["welch_p"] if welch_tested(t) else None,
             "welch_p_holm")
    return tests


def seeds_for_80(tests: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Add ``seeds_80``: the seeds per method at which Welch's test would have 80% power at
    0.05 / m (m tests in the Holm family: where Holm's procedure starts) if the observed
    difference and sds were the truth; None past 30 or where no Welch test ran. Plans the next run."""
    family: Dict[tuple, int] = {}
    for t in tests:
        family[(t["recipe"], t["metric"])] = family.get((t["recipe"], t["metric"]), 0) + welch_tested(t)
    for t in tests:
        t["seeds_80"] = stats.seeds_for_power(t["diff"], *t["sd"], alpha=0.05 / family[(t["recipe"], t["metric"])]) \
            if welch_tested(t) else None
    return tests


def test_row(t: Dict[str, Any]) -> str:
    """One row of the tests table. 'n' is each side's count (Welch's test uses them all); where
    fewer seeds are common to both, the paired test's pairs follow in brackets."""
    def p(v: Optional[float]) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return "0*" if v == 0 and t.get("no_spread") else f"{v:.3g}"

    if t.get("seeds_80") is not None:
        seeds = str(t["seeds_80"])
    else:
        seeds = ">30" if welch_tested(t) and t["diff"] != 0 else "-"
    n = f"{t['n'][0]} vs {t['n'][1]}"
    if t.get("pairs") is not None and t["pairs"] < min(t["n"]):
        n += f" ({t['pairs']} paired)"
    return (f"| {t['recipe']} | {t['dsrna']} | {t['baseline']} | {t['metric']} | {t['diff']:+.3g} | "
            f"{p(t['welch_p'])} | {p(t['welch_p_holm'])} | {p(t['paired_p'])} | {n} | {seeds} |")


def methods_by_net(srows: List[Dict[str, Any]]) -> Dict[tuple, List[str]]:
    """(genotype hash, seed) -> the methods whose search found that cell with that seed."""
    methods: Dict[tuple, List[str]] = {}
    for r in srows:
        methods.setdefault((r["ghash"], r["seed"]), []).append(r["method"])
    return methods


def rebuild_noise(srows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Nets retrained after the checkpoint loss and adopted (``train/rebuilt.json``, not
    bit-identical): same recipe, cell, seed, data order and config as the lost net, only another
    CPU's float rounding. Their test top-1 before and after is the retraining's own noise, the
    yardstick for a difference between methods' nets."""
    methods = methods_by_net(srows)
    rows = []
    for f in sorted((OUT / "net").glob("*/*/train/rebuilt.json")):
        rec, summ = load(f), load(f.parent / "summary.json")
        old = ((rec or {}).get("superseded") or {}).get("test_top1")
        new = (summ or {}).get("test_top1")
        if rec and rec.get("identical") is False and isinstance(old, (int, float)) and isinstance(new, (int, float)):
            net = f.parent.parent
            ghash, _, seed = net.name.rpartition("_s")
            rows.append({"recipe": net.parent.name, "net": net.name,
                         "methods": methods.get((ghash, int(seed)), []),
                         "lost": float(old), "rebuilt": float(new), "diff": float(new) - float(old)})
    return rows


def noise_lines(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return []
    lines = ["", "## Retraining noise: lost nets retrained (same recipe, cell, seed and data order; another CPU)", "",
             "Test top-1 (%, 10k) of the lost net and of its rebuild (`train/rebuilt.json`); the two differ only "
             "by float rounding.", "",
             "| recipe | net | methods | lost | rebuilt | rebuilt - lost |", "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | `{r['net']}` | {', '.join(r['methods']) or '-'} | {r['lost']:.2f} | "
                     f"{r['rebuilt']:.2f} | {r['diff']:+.2f} |")
    # all pairs, then each recipe alone: the recipes' noise differs (natural training's BN running
    # statistics move its test top-1 by points, PGD-AT's by tenths), so a pooled yardstick misleads
    groups = [("", rows)] + [(f"recipe {rec}", [r for r in rows if r["recipe"] == rec])
                             for rec in sorted({r["recipe"] for r in rows})]
    if len(groups) == 2:  # one recipe: its line is the pooled one
        groups = groups[:1]
    for label, grp in groups:
        d = [r["diff"] for r in grp]
        if len(d) < 2:
            continue
        sd = stats.std(d)
        lines += ["", f"{label + ', ' if label else ''}n = {len(d)} pairs: mean difference {stats.mean(d):+.2f}, "
                  f"mean |difference| {stats.mean([abs(x) for x in d]):.2f}, sd of the differences {sd:.2f}, so "
                  f"one retraining's test top-1 has sd ~{sd / math.sqrt(2):.2f} points from rounding alone "
                  f"(sd / sqrt 2)."]
    return lines


def precise_bn_pairs(srows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each net trained by both the nat and the pbn recipe (the same config plus precise BN: the
    same weights when trained by the same code on the same CPU, which the identical training
    curves show). Their test top-1 differ only by the BN statistics."""
    methods = methods_by_net(srows)
    rows = []
    for f in sorted((OUT / "net" / "pbn").glob("*/train/summary.json")):
        nat = OUT / "net" / "nat" / f.parent.parent.name / "train"
        a, b = load(nat / "summary.json"), load(f)
        if not (a and b and isinstance(a.get("test_top1"), (int, float)) and isinstance(b.get("test_top1"), (int, float))):
            continue
        ma = read_jsonl(nat / "metrics.jsonl") if (nat / "metrics.jsonl").exists() else []
        mb = read_jsonl(f.parent / "metrics.jsonl") if (f.parent / "metrics.jsonl").exists() else []
        curve = [(r.get("train_loss"), r.get("train_top1")) for r in ma]
        ghash, _, seed = f.parent.parent.name.rpartition("_s")
        rows.append({"net": f.parent.parent.name, "methods": methods.get((ghash, int(seed)), []),
                     "same_curve": bool(curve) and curve == [(r.get("train_loss"), r.get("train_top1")) for r in mb],
                     "nat": float(a["test_top1"]), "pbn": float(b["test_top1"]),
                     "diff": float(b["test_top1"]) - float(a["test_top1"]),
                     "val_ema": mb[-1].get("val_top1_ema") if mb else None, "val": mb[-1].get("val_top1") if mb else None})
    return rows


def precise_bn_lines(rows: List[Dict[str, Any]]) -> List[str]:
    if not rows:
        return []
    lines = ["", "## Precise BN: the natural nets' weights, BN statistics re-estimated (recipe pbn against nat)", "",
             "Test top-1 (%, 10k) of each net trained by `nat` (BN statistics: the EMA of training) and by `pbn` "
             "(the same config plus `precise_bn_batches: 100`). 'Same curve': every epoch's training loss and "
             "top-1 are equal, i.e. the same weights were trained (same code, same CPU); where they are not, "
             "the two runs also differ by float rounding. Validation (%, 5000 held-out images, last epoch) of "
             "the pbn run with the EMA statistics and with the re-estimated ones.", "",
             "| net | methods | same curve | nat test | pbn test | pbn - nat | pbn val, EMA BN | pbn val, precise BN |",
             "|---" * 8 + "|"]
    for r in rows:
        v = [f"{x:.2f}" if isinstance(x, (int, float)) else "-" for x in (r["val_ema"], r["val"])]
        lines.append(f"| `{r['net']}` | {', '.join(r['methods']) or '-'} | {'yes' if r['same_curve'] else 'no'} | "
                     f"{r['nat']:.2f} | {r['pbn']:.2f} | {r['diff']:+.2f} | {v[0]} | {v[1]} |")
    if len(rows) >= 2:
        nat, pbn = [r["nat"] for r in rows], [r["pbn"] for r in rows]
        t = stats.paired(pbn, nat)
        lines += ["", f"n = {len(rows)} nets ({sum(r['same_curve'] for r in rows)} with the same curve): test top-1 "
                  f"across nets {stats.mean(nat):.2f} ± {stats.std(nat):.2f} (nat) and {stats.mean(pbn):.2f} ± "
                  f"{stats.std(pbn):.2f} (pbn); pbn - nat {stats.mean([r['diff'] for r in rows]):+.2f} (range "
                  f"{min(r['diff'] for r in rows):+.2f} to {max(r['diff'] for r in rows):+.2f})"
                  + (f", paired t-test p = {t.p:.3g}." if t and not math.isinf(t.t) else ".")]
    return lines


def margin_text(m: Optional[Dict[str, Any]]) -> str:
    if not m or m.get("where") is None:
        return "-"
    return f"{m['margin']:.2g} ({m['where'].replace('normal', 'N').replace('reduce', 'R')})"


def param_free_series(rows: List[Dict[str, Any]]) -> Dict[str, Dict[int, float]]:
    """method -> seed -> parameter-free ops in the found cell (of 12): the search-level metric."""
    out: Dict[str, Dict[int, float]] = {}
    for r in counted(rows):
        out.setdefault(r["method"], {})[r["seed"]] = float(sum(r["param_free"]))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT / "report.md"))
    args = ap.parse_args(argv)
    try:  # a malformed plan stops the report before anything is written
        plan = replication.load_plan(OUT / "replication_plan.json")
    except replication.PlanError as e:
        print(f"grid_report: {e}", file=sys.stderr)
        return 2
    allrows = searches()
    # the replication's seeds are kept out of every table and test but the search list and the
    # replication's own section: its leads are tested on fresh seeds, not pooled with the ones that
    # suggested them
    fresh = set(plan["seeds"]) if plan else set()
    srows = [r for r in allrows if r["seed"] not in fresh]
    lines = ["# Comparison grid (issue #15): fmnist_small", "",
             "Generated by `python bench/grid_report.py` from `results/grid/` (runner: `bench/grid.py`). "
             "Every number is over the finished cells only; n says how many seeds." +
             (f" Seeds {', '.join(map(str, sorted(fresh)))} are the replication's (`replication_plan.json`): "
              "they are listed with the searches and read in the section 'Replication on fresh seeds' only, "
              "never pooled into the other tables and tests." if fresh else ""), ""]
    # ---- convergence per search
    lines += ["## Searches: convergence", "",
              "Converged = mean max softmax(alpha) >= 0.25 and no genotype change in the last quarter of the arch "
              "steps (issue 11). 'Late' = genotype changes / genotype entries (of 12) that differ, from the last "
              "epoch boundary at or before the start of the last quarter to the end (epoch resolution, so it "
              "can include a few steps before the quarter). 'Smallest decision margin' = the final cell's "
              "closest call, in derivation weights (softmax(alpha), times edge betas for PC-DARTS): a node's "
              "second edge against its third, or a selected edge's op against its runner-up (N/R = normal/"
              "reduction cell); noise below half of it cannot change the cell. grad_share = the robustness term's share "
              "of the architecture gradient's norm (DSRNA), in the last epoch and its largest epoch mean.", "",
              "| method | seed | converged | mean max softmax | entropy | genotype changes | last change / arch steps "
              "| late | smallest decision margin | grad_share | max grad_share | eps (CB) | gap (CB) | CPU min | cell |",
              "|---" * 15 + "|"]
    f = (lambda v, d=3: "-" if v is None else f"{v:.{d}f}")
    g = (lambda v: "-" if v is None else f"{v:.2g}")
    n = (lambda v: "-" if v is None else str(v))  # a one-shot search (RobNet) has no alpha history
    for r in allrows:
        lines.append(f"| {r['method']} | {r['seed']} | {'n/a' if r['converged'] is None else 'yes' if r['converged'] else 'NO'} | {f(r['max_softmax'])} | "
                     f"{f(r['entropy'])} | {n(r['changes'])} | {n(r['last_change'])} / {n(r['arch_steps'])} | "
                     f"{n(r['late_changes'])} / {n(r['late_diff'])} | {margin_text(r['margin'])} | "
                     f"{f(r['grad_share'], 2)} | {g(r['grad_share_max'])} | {g(r['eps'])} | "
                     f"{f(r['gap'], 2)} | {f((r['cpu_s'] or 0) / 60, 1)} | `{r['ghash']}` |")
    figs = plots(srows, list(RECIPES))
    if "search" in figs:
        lines += ["", f"![mean max softmax(alpha) per epoch]({figs['search']})"]
    free: Dict[str, List[List[int]]] = {}
    for r in counted(srows):
        free.setdefault(r["method"], []).append(r["param_free"])
    lines += ["", "Parameter-free ops (pools, skip) in the found cells, normal / reduction cell (of 6 each), "
              "mean ± std over seeds: " + "; ".join(
                  f"{m} {fmt([float(v[0]) for v in vs], 1)} / {fmt([float(v[1]) for v in vs], 1)}"
                  for m, vs in free.items()) + "."]
    rates: Dict[str, List[bool]] = {}
    for r in srows:
        if r["converged"] is not None:
            rates.setdefault(r["method"], []).append(bool(r["converged"]))
    if rates:
        lines += ["", "Converged per method: " + "; ".join(
            f"{m} {sum(v)} of {len(v)}" for m, v in rates.items()) + "."]
    same = [(a["method"], b["method"], a["seed"]) for a in srows for b in srows
            if a["seed"] == b["seed"] and a["ghash"] == b["ghash"] and a["method"] < b["method"]]
    if same:
        lines += ["", "Same cell found by two methods with the same seed: " +
                  "; ".join(f"{a} = {b} (seed {s})" for a, b, s in same) + "."]
    # ---- per recipe tables
    data: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    fresh_data: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for recipe in RECIPES:
        for r in allrows:
            res = net_results(recipe, r["ghash"], r["seed"])
            if res:
                (fresh_data if r["seed"] in fresh else data).setdefault(recipe, {}).setdefault(r["method"], []).append(
                    {"seed": r["seed"], "converged": r["converged"], **res})
    names = {"nat": "natural training", "adv": "PGD adversarial training (l_inf 0.1)",
             "ibp": "certified (IBP) training (l_inf 0.05; last.pt, first 1000 test images)",
             "pbn": "natural training and precise BN (BN statistics averaged over 100 training batches)"}
    tests: List[Dict[str, Any]] = []
    search_metric = param_free_series(srows)
    for d in DSRNA:
        for b in BASELINES:
            if search_metric.get(d) and search_metric.get(b):
                tests.append(pair_test("search", d, b, "param-free ops (of 12)", search_metric[d], search_metric[b]))
    for recipe, per in data.items():
        cols: List[str] = []
        for rs in per.values():
            for res in rs:
                cols += [k for k in res if k not in cols and k not in ("seed", "converged", "masking_flagged")]
        lines += ["", f"## Retrained with {names[recipe]}: accuracy (%) / mean certified radius", "",
                  "| method | " + " | ".join(cols) + " | masking flags (eval-stage checks) |", "|---" * (len(cols) + 2) + "|"]
        for method in METHODS:
            rs = per.get(method)
            if not rs:
                continue
            cells = []
            for c in cols:
                xs = [float(res[c]) for res in rs if isinstance(res.get(c), (int, float))]
                cells.append(sci(xs) if c.startswith("radius") else fmt(xs))
            flags = sum(len(res.get("masking_flagged") or []) for res in rs)
            nc = sum(1 for res in rs if res["converged"] is False)
            lines.append(f"| {method}{f' ({nc} not converged)' if nc else ''} | " + " | ".join(cells) + f" | {flags} |")
        if recipe in figs:
            lines += ["", f"![PGD-20 eps sweep, {names[recipe]}]({figs[recipe]})"]
        panels = radius_panels(per)
        if any(v > 0 for p in panels.values() for vs in p.values() for v in vs):
            from dsrna_dist.plots import radius_strip

            fig = radius_strip(panels, f"certified l_inf radius per net, {recipe} retraining", OUT / f"radius_{recipe}.png")
            lines += ["", f"![certified radius per net, {names[recipe]}]({fig.name})"]
        # every mean radius (not its random-target twin, bracket or margin left: resolution, not results)
        # each AutoAttack column after the PGD-20 run on its images, then their gap
        aa = [k for c in cols if c.startswith("AutoAttack") for k in (pgd_twin(c), c, f"PGD-20 - {c}")]
        keys = [k for k in dict.fromkeys(["test_top1 final (10k)", "clean", "PGD-20", "PGD-20 @0.02", "FGSM", "C&W",
                                          *aa, "verified ibp @0.05"]) if k in cols] + \
            [c for c in cols if is_mean_radius(c)]
        for d in DSRNA:
            for b in BASELINES:
                if d not in per or b not in per:
                    continue
                for k in keys:
                    a = {res["seed"]: float(res[k]) for res in per[d] if isinstance(res.get(k), (int, float))}
                    bb = {res["seed"]: float(res[k]) for res in per[b] if isinstance(res.get(k), (int, float))}
                    tests.append(pair_test(recipe, d, b, k, a, bb))
    tests = seeds_for_80(holm_by_family([t for t in tests if t is not None]))
    if tests:
        lines += ["", "## DSRNA against each baseline", "",
                  "Difference of means (DSRNA - baseline); Welch's t-test and the paired t-test over seeds "
                  "(pairs share the seed: data order and retrain seed). Two-sided p; with n = 3 a difference "
                  "needs to be large and consistent to reach p < 0.05. 'Holm' is Welch's p adjusted for the "
                  "family of one recipe and one metric (every DSRNA variant against every baseline; Holm's "
                  "step-down, family-wise error): read an unadjusted p < 0.05 as 'worth a look' and only a Holm "
                  "p < 0.05 as a finding. 0* = every difference the same (zero spread, t infinite): a p-value of "
                  "0 by convention, not evidence of anything beyond those n values. 'seeds for 80%' plans the next "
                  "run: the seeds per method at which Welch's test reaches 80% power at 0.05 / m (m = the "
                  "family's tests; Holm's first threshold) if the observed difference and sds were the truth "
                  "(simulated, `stats.seeds_for_power`); '>30' past 30. The observed values are themselves "
                  "uncertain at n = 3, so read it as an order of magnitude. 'n': each side's seeds (Welch uses "
                  "all); '(k paired)' where only k seeds are common to both (the paired test's).", "",
                  "| recipe | DSRNA | baseline | metric | diff | Welch p | Holm | paired p | n | seeds for 80% |",
                  "|---" * 10 + "|"]
        lines += [test_row(t) for t in tests]
    lines += paper_tables(data, srows)
    rconv = radius_vs_convs(data, srows)
    lines += radius_conv_lines(rconv)
    mconv = metrics_vs_convs(data, srows)
    lines += metric_conv_lines(mconv)
    rrob = radius_vs_robustness(data, srows)
    lines += radius_robustness_lines(rrob)
    logr = log_radius_tests(data)
    lines += log_radius_lines(logr)
    rep_rows: List[Dict[str, Any]] = []
    if plan:
        series: Dict[tuple, Dict[str, Dict[int, float]]] = {("search", "param-free ops (of 12)"):
                                                           param_free_series(allrows)}
        for part in (data, fresh_data):
            for recipe, per in part.items():
                for method, rs in per.items():
                    for res in rs:
                        for k, v in res.items():
                            if k != "seed" and isinstance(v, (int, float)) and not isinstance(v, bool):
                                series.setdefault((recipe, k), {}).setdefault(method, {})[res["seed"]] = float(v)
        rep_rows = replication.score(plan, series)
        lines += replication.lines(plan, rep_rows, [r for r in allrows if r["seed"] in fresh])
    # ---- capacity controls (grid.py --stages control): a found cell retrained narrower
    controls = sorted(d for d in (OUT / "control").glob("*_c*") if (d / "train" / "summary.json").exists()) \
        if (OUT / "control").exists() else []
    if controls:
        rows = [(d.name, net_results("nat", "", 0, net=d)) for d in controls]
        cols = [k for k in next(iter(r for _, r in rows)) if k != "masking_flagged"]
        for _, r in rows[1:]:
            cols += [k for k in r if k not in cols and k != "masking_flagged"]
        lines += ["", "## Capacity controls (`bench/grid.py --stages control`)", "",
                  "A found cell retrained at a narrower width (`<search run>_c<init channels>_<recipe>`; no "
                  "suffix: `nat`, natural training with EMA BN statistics), same recipe, seed and evaluation "
                  "as the grid's networks of that recipe; one run each.", "",
                  "| control | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, r in rows:
            lines.append(f"| {name} | " + " | ".join(
                "-" if not isinstance(r.get(c), (int, float)) else f"{r[c]:.2f}" for c in cols) + " |")
    noise = rebuild_noise(srows)
    lines += noise_lines(noise)
    pbn = precise_bn_pairs(srows)
    lines += precise_bn_lines(pbn)
    # ---- cost per stage
    log = OUT / "grid_log.jsonl"
    if log.exists():
        recs = read_jsonl(log)
        by: Dict[str, List[Dict[str, Any]]] = {}
        for r in recs:
            if r.get("rc") == 0:
                by.setdefault(r["stage"] + (f" ({r['recipe']})" if r.get("recipe") else ""), []).append(r)
        lines += ["", "## Cost per task (minutes; one worker per core, OMP_NUM_THREADS=1)", "",
                  "CPU: the task's processes. Wall: with two workers on the two cores, which is what a session's "
                  "plan needs. A task killed and resumed logged only its last part until the twenty-fifth "
                  "session (records without `parts` in grid_log.jsonl), so those read low; since then wall is "
                  "the sum over its parts (`resumed` counts such tasks); CPU is summed over the parts since the "
                  "twenty-sixth session (before, a resumed task's CPU is its last part's).", "",
                  "| stage | tasks | resumed (logged since s25) | CPU mean | CPU total | wall mean | wall total |",
                  "|---|---|---|---|---|---|---|"]
        for k, rs in by.items():
            cpu, wall = [r["cpu_s"] / 60 for r in rs], [r["wall_s"] / 60 for r in rs]
            lines.append(f"| {k} | {len(rs)} | {sum(r.get('parts', 1) > 1 for r in rs)} | {stats.mean(cpu):.1f} | "
                         f"{sum(cpu):.1f} | {stats.mean(wall):.1f} | {sum(wall):.1f} |")
        codes = sorted({r.get("code", "?") for r in recs})
        lines += ["", f"Code versions the tasks ran at: {', '.join(codes)} (per task in grid_log.jsonl)."]
    # atomically (a report cut off mid-write never replaces the last whole one); --out's folder is made
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    atomic_write_json(str(OUT / "grid.json"), {"searches": allrows, "nets": data, "tests": tests, "rebuild_noise": noise,
                                              "precise_bn": pbn, "replication": rep_rows,
                                              "radius_vs_convs": rconv, "metrics_vs_convs": mconv, "log_radius": logr,
                                              "radius_vs_robustness": rrob,
                                              "replication_nets": fresh_data})
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
