"""Report stage: ``python -m dsrna_dist.report --runs runs/ --out report.md``.

Finds every search, train and eval run under ``--runs`` (by the keys of its ``config.yaml``),
links them (eval -> the train run its checkpoint came from -> the search run whose
genotype.json that train run used), groups trained networks by method (from the search config:
strategy + robustness metric, e.g. "DSRNA-CB") and dataset, and writes markdown tables laid
out like the paper's Tables 1-6 (mean ± std over the trained networks of a method = seeds),
plus PNG plots linked from the markdown and a ``report.json`` with every aggregated number.

What is read (nothing else is needed; missing pieces show as "n/a"):
  search run: config.yaml (strategy.name, strategy.order, robustness.name, data.name, run.seed),
              genotype.json, alphas.jsonl (last line: primitives, alphas_normal/alphas_reduce raw
              or weights_normal/weights_reduce), search cost from summary.json
              {search_time_s, world_size, device}, else the sum of epoch_time_s in metrics.jsonl,
              else the mtime span config.yaml -> genotype.json (marked "~").
  train run:  config.yaml (model.genotype, data.name, run.seed), metrics.jsonl (last test_top1),
              checkpoints/best.pt only when no eval run gives the parameter count.
  eval run:   summary.json written by dsrna_dist.evaluate; certify.jsonl for radius histograms.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .config import ReportConfig, parse_cli
from .engine.io import JSONLError, read_jsonl

PROG = "python -m dsrna_dist.report"
DOC = __doc__.split("\n\n")[1] if __doc__ else ""


class ReportError(ValueError):
    """The runs directory is missing or holds nothing to report."""


# --------------------------------------------------------------------------- reading
def _read_yaml(p: Path) -> Dict[str, Any]:
    try:
        d = yaml.safe_load(p.read_text()) or {}
        return d if isinstance(d, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_json(p: Path) -> Optional[Dict[str, Any]]:
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _last_jsonl(p: Path) -> Optional[Dict[str, Any]]:
    recs = read_jsonl(p)
    return recs[-1] if recs else None


def method_name(search_cfg: Dict[str, Any]) -> str:
    """Paper-style method name from a search config (strategy + robustness metric)."""
    st = search_cfg.get("strategy") or {}
    name, order = st.get("name", "darts"), int(st.get("order", 1) or 1)
    base = {"darts": f"DARTS ({'2nd' if order == 2 else '1st'})", "pcdarts": "PC-DARTS",
            "sdarts_rs": "SDARTS-RS", "sdarts_adv": "SDARTS-ADV", "pcdarts_adv": "PC-DARTS-ADV",
            "pcdarts_rs": "PC-DARTS-RS", "pdarts": "P-DARTS", "robnet": "RobNet"}.get(name, name)
    if (search_cfg.get("stopping") or {}).get("name") == "dartsplus":  # DARTS+ early stopping
        base = "DARTS+" if name == "darts" and order == 1 else f"{base} + DARTS+ stopping"
    metric = (search_cfg.get("robustness") or {}).get("name", "none")
    if metric in (None, "", "none"):
        return base
    dsrna = {"jacobian": "DSRNA-Jacobian", "certified": "DSRNA-CB"}.get(metric, f"DSRNA-{metric}")
    return dsrna if name == "pcdarts" else f"{dsrna} ({base})"


@dataclass
class SearchRun:
    path: Path
    cfg: Dict[str, Any]
    method: str
    dataset: str
    seed: Any
    genotype: Optional[Any]
    alphas: Optional[Dict[str, Any]]
    cost_s: Optional[float]
    cost_exact: bool
    device: str
    world_size: int


@dataclass
class TrainRun:
    path: Path
    cfg: Dict[str, Any]
    dataset: str
    seed: Any
    genotype_source: str
    test_top1: Optional[float]
    search: Optional[SearchRun] = None


@dataclass
class EvalRun:
    path: Path
    summary: Dict[str, Any]
    mtime: float


def _search_cost(d: Path) -> Tuple[Optional[float], bool, str, int]:
    s = _read_json(d / "summary.json") or {}
    dev, world = str(s.get("device", "cpu")), int(s.get("world_size", 1) or 1)
    if isinstance(s.get("search_time_s"), (int, float)):
        return float(s["search_time_s"]), True, dev, world
    recs = read_jsonl(d / "metrics.jsonl")
    times = [r["epoch_time_s"] for r in recs if isinstance(r.get("epoch_time_s"), (int, float))]
    if times:
        world = int(recs[-1].get("world_size", world) or world)
        return float(sum(times)), True, dev, world
    try:
        span = (d / "genotype.json").stat().st_mtime - (d / "config.yaml").stat().st_mtime
        return (span, False, dev, world) if span > 0 else (None, False, dev, world)
    except OSError:
        return None, False, dev, world


def _load_search(d: Path, cfg: Dict[str, Any]) -> SearchRun:
    from . import genotype as G

    try:
        g = G.load(str(d / "genotype.json"))
    except Exception:  # noqa: BLE001 - an unfinished search still has alphas worth plotting
        g = None
    cost, exact, dev, world = _search_cost(d)
    alphas = _last_jsonl(d / "alphas.jsonl")
    if alphas is None and (d / "alphas").is_dir():
        files = sorted((d / "alphas").glob("*.json"))
        alphas = _read_json(files[-1]) if files else None
    return SearchRun(d, cfg, method_name(cfg), (cfg.get("data") or {}).get("name", "?"),
                     (cfg.get("run") or {}).get("seed"), g, alphas, cost, exact, dev, world)


def _load_train(d: Path, cfg: Dict[str, Any]) -> TrainRun:
    recs = read_jsonl(d / "metrics.jsonl")
    top1 = next((r["test_top1"] for r in reversed(recs) if isinstance(r.get("test_top1"), (int, float))), None)
    return TrainRun(d, cfg, (cfg.get("data") or {}).get("name", "?"), (cfg.get("run") or {}).get("seed"),
                    str((cfg.get("model") or {}).get("genotype", "")), top1)


@dataclass
class Runs:
    search: List[SearchRun] = field(default_factory=list)
    train: List[TrainRun] = field(default_factory=list)
    evals: List[EvalRun] = field(default_factory=list)


def discover(root: Path) -> Runs:
    """Classify every directory with a config.yaml by its keys (search/train/eval)."""
    runs = Runs()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if n not in ("tb", "checkpoints", "genotypes", "alphas"))
        d = Path(dirpath)
        if "config.yaml" not in filenames:
            continue
        cfg = _read_yaml(d / "config.yaml")
        if "attacks" in cfg and "checkpoint" in cfg:
            s = _read_json(d / "summary.json")
            if s is not None:
                runs.evals.append(EvalRun(d, s, (d / "summary.json").stat().st_mtime))
        elif "strategy" in cfg:
            runs.search.append(_load_search(d, cfg))
        elif isinstance(cfg.get("model"), dict) and "genotype" in cfg["model"]:
            runs.train.append(_load_train(d, cfg))
    _link(runs, root)
    return runs


def _resolve(p: str, bases: Sequence[Path]) -> List[Path]:
    path = Path(p)
    cands = [path] if path.is_absolute() else [b / path for b in bases]
    return [c.resolve() for c in cands]


def _link(runs: Runs, root: Path) -> None:
    """Attach to each train run the search run its genotype file lives in."""
    by_dir = {s.path.resolve(): s for s in runs.search}
    bases = [Path.cwd(), root.resolve(), root.resolve().parent]
    for t in runs.train:
        src = t.genotype_source
        if not src:
            continue
        for c in _resolve(src, bases):
            for parent in (c.parent, c.parent.parent):   # genotype.json or genotypes/epoch_X.json
                if parent in by_dir:
                    t.search = by_dir[parent]
                    break
            if t.search:
                break
        if t.search is None:  # moved trees: match the search run by directory name
            parts = Path(src).parts
            for s in runs.search:
                if len(parts) >= 2 and s.path.name in parts[:-1]:
                    t.search = s
                    break


# --------------------------------------------------------------------------- aggregation
@dataclass
class Unit:
    """One trained network (= one seed of a method) with everything measured on it."""

    name: str
    dataset: str
    method: str
    seed: Any
    search: Optional[SearchRun]
    train: Optional[TrainRun]
    evals: List[EvalRun]
    clean: Optional[float] = None
    robust: Dict[str, float] = field(default_factory=dict)
    attack_order: List[str] = field(default_factory=list)
    certified: Dict[str, Dict[str, float]] = field(default_factory=dict)  # "method/norm" -> means
    sweep: Dict[str, Dict[float, float]] = field(default_factory=dict)    # sweep label -> eps -> acc
    params_m: Optional[float] = None
    radii: Dict[str, List[float]] = field(default_factory=dict)
    attack_meta: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # label -> threat model
    masking: List[Dict[str, Any]] = field(default_factory=list)            # checks of the latest eval
    rank_dependent: List[str] = field(default_factory=list)


def _method_of(t: Optional[TrainRun], s: Optional[Dict[str, Any]]) -> str:
    if t is not None and t.search is not None:
        return t.search.method
    src = (t.genotype_source if t is not None else "") or str((s or {}).get("genotype_source", ""))
    from .genotype import PUBLISHED

    if src in PUBLISHED:
        return f"{src} (published)"
    return f"genotype {Path(src).name}" if src else "unknown"


def _params_from_checkpoint(t: TrainRun) -> Optional[float]:
    p = t.path / "checkpoints" / "best.pt"
    if not p.is_file():
        p = t.path / "checkpoints" / "last.pt"
    if not p.is_file():
        return None
    try:
        import torch

        ck = torch.load(p, map_location="cpu", weights_only=True)
        n = ck.get("num_params_no_aux", ck.get("num_params"))
        return float(n) / 1e6 if n is not None else None
    except Exception:  # noqa: BLE001 - a report must not die on one bad file
        return None


def build_units(runs: Runs) -> List[Unit]:
    train_by_dir = {t.path.resolve(): t for t in runs.train}
    names = [t.path.name for t in runs.train]
    by_name = {t.path.name: t.path.resolve() for t in runs.train if names.count(t.path.name) == 1}
    groups: Dict[Any, List[EvalRun]] = {}
    for e in sorted(runs.evals, key=lambda e: e.mtime):
        td = e.summary.get("train_run_dir")
        key = Path(td).resolve() if td else e.path.resolve()
        if td and key not in train_by_dir and Path(td).name in by_name:  # the tree was moved
            key = by_name[Path(td).name]
        groups.setdefault(key, []).append(e)
    units: List[Unit] = []
    for t in runs.train:
        key = t.path.resolve()
        units.append(_unit(t, groups.pop(key, [])))
    for key, evals in groups.items():  # evaluated checkpoints whose train run is not under root
        units.append(_unit(train_by_dir.get(key), evals))
    return units


def _unit(t: Optional[TrainRun], evals: List[EvalRun]) -> Unit:
    s0 = evals[-1].summary if evals else {}
    dataset = str(s0.get("dataset") or (t.dataset if t else "?"))
    seed = (t.search.seed if t and t.search else None, t.seed if t else s0.get("train_seed"))
    name = t.path.name if t else evals[-1].path.name
    u = Unit(name, dataset, _method_of(t, s0), seed, t.search if t else None, t, evals)
    for e in evals:  # later evaluations of the same network override earlier ones per column
        s = e.summary
        if isinstance(s.get("clean_acc"), (int, float)):
            u.clean = float(s["clean_acc"])
        for lab, v in (s.get("robust_acc") or {}).items():
            if lab not in u.attack_order:
                u.attack_order.append(lab)
            u.robust[lab] = float(v)
        for meth, per_norm in (s.get("certified") or {}).items():
            for norm, vals in per_norm.items():
                u.certified[f"{meth}/{norm}"] = dict(vals)
        for pt in s.get("eps_sweep") or []:
            u.sweep.setdefault(str(pt.get("attack", "PGD")), {})[float(pt["eps"])] = float(pt["robust_acc"])
        for m in s.get("attacks") or []:
            if isinstance(m, dict) and "label" in m:
                u.attack_meta[str(m["label"])] = m
        if isinstance(s.get("masking"), dict):
            u.masking = [c for c in s["masking"].get("checks") or [] if isinstance(c, dict)]
        u.rank_dependent = [str(x) for x in s.get("rank_dependent_attacks") or []]
        if isinstance(s.get("params"), (int, float)):
            u.params_m = float(s["params"]) / 1e6
        for r in read_jsonl(e.path / "certify.jsonl"):
            if isinstance(r.get("radius"), (int, float)):
                u.radii.setdefault(f"{r.get('method')}/{r.get('norm')}", []).append(float(r["radius"]))
    if u.clean is None and t is not None and t.test_top1 is not None:
        u.clean = float(t.test_top1)
    if u.clean is not None:  # the eps sweep starts at the clean point (older summaries lack it)
        for pts in u.sweep.values():
            pts.setdefault(0.0, u.clean)
    if u.params_m is None and t is not None:
        u.params_m = _params_from_checkpoint(t)
    return u


def mean_std(values: Sequence[float], ddof: int = 1) -> Tuple[float, Optional[float]]:
    """Mean and standard deviation (None for a single value, whatever ddof: one run has no spread to show)."""
    n = len(values)
    m = sum(values) / n
    if n < 2 or n - ddof <= 0:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - ddof))


def fmt(values: Sequence[Optional[float]], decimals: int, ddof: int, sig: bool = False) -> str:
    """'mean ± std' with fixed decimals (accuracies) or significant digits (radii, params)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    m, s = mean_std(vals, ddof)
    f = (lambda v: f"{v:.{decimals}g}") if sig else (lambda v: f"{v:.{decimals}f}")
    return f(m) if s is None else f"{f(m)} ± {f(s)}"


def threat_model(label: str, meta: Optional[Dict[str, Any]]) -> str:
    """Column header that says what was run: ``PGD-20 (l_inf eps=0.3, 20 steps of 0.01)``."""
    if not meta:
        return label
    name, norm = meta.get("name"), "l_inf" if str(meta.get("norm", "inf")) == "inf" else "l_2"
    eps = meta.get("eps")
    e = f"{norm} eps={eps:.4g}" if isinstance(eps, (int, float)) and eps > 0 else f"{norm}, unbounded"
    steps, rs = meta.get("steps"), meta.get("restarts") or 1
    if name == "pgd" and steps:
        st = meta.get("step_size")
        parts = [f"{steps} steps" + (f" of {st:.3g}" if isinstance(st, (int, float)) and st > 0 else "")]
        if rs > 1:
            parts.append(f"{rs} restarts")
        return f"{label} ({e}, {', '.join(parts)})"
    if name == "cw":
        c = meta.get("c")
        return f"{label} ({e}" + (f", c={c:g}" if isinstance(c, (int, float)) else "") + (
            f", {steps} steps" if steps else "") + ")"
    if name == "autoattack":
        return f"{label} ({e}, standard)"
    if name == "square":
        return f"{label} ({e}, {steps} queries)"
    return f"{label} ({e})"


def _grouped(units: Sequence[Unit]) -> Dict[str, Dict[str, List[Unit]]]:
    out: Dict[str, Dict[str, List[Unit]]] = {}
    for u in units:
        out.setdefault(u.dataset, {}).setdefault(u.method, []).append(u)
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# --------------------------------------------------------------------------- report
def _search_cost_h(runs: Sequence[SearchRun]) -> Tuple[str, Optional[float], Optional[float]]:
    costs = [(s.cost_s * s.world_size / 3600.0, s) for s in runs if s.cost_s is not None]
    if not costs:
        return "n/a", None, None
    dev = "GPU" if any(s.device.startswith("cuda") or s.device == "gpu" for _, s in costs) else "CPU"
    m, sd = mean_std([c for c, _ in costs], 1)
    approx = "" if all(s.cost_exact for _, s in costs) else "~"
    txt = f"{approx}{m:.3g}" + (f" ± {sd:.2g}" if sd is not None else "") + f" {dev}-h"
    return txt, m, sd


def write_report(cfg: ReportConfig) -> Path:
    root = Path(cfg.runs)
    if not root.is_dir():
        raise ReportError(f"runs directory {root}: not found")
    runs = discover(root)
    units = build_units(runs)
    if not units and not runs.search:
        raise ReportError(f"runs directory {root}: no search, train or eval runs found (each run dir "
                          "needs a config.yaml)")
    out = Path(cfg.out)
    plots = Path(cfg.plots_dir) if cfg.plots_dir else out.parent / f"{out.stem}_plots"
    dec, ddof = cfg.decimals, cfg.std_ddof
    md: List[str] = ["# DSRNA report", "",
                     f"Runs under `{root}`: {len(runs.search)} search, {len(runs.train)} train, "
                     f"{len(runs.evals)} eval. Values are the mean over the trained networks of a method "
                     f"(seeds; the `runs` column says how many), ± std (ddof={ddof}) only where there are >= 2 "
                     "runs; accuracies in %, radii in [0,1] pixel units. Column headers give the threat model "
                     "(norm, eps, steps, c).", ""]
    data: Dict[str, Any] = {"datasets": {}, "search_runs": []}
    grouped = _grouped(units)
    md += _masking_section(units, data)
    n_table = 0
    # ---- Tables 1/3/4: accuracy under attack, per dataset
    for ds, methods in sorted(grouped.items()):
        labels: List[str] = []
        for us in methods.values():
            for u in us:
                labels += [lab for lab in u.attack_order if lab not in labels and lab != "clean"]
        n_table += 1
        md += [f"## Table {n_table}. Accuracy (%) under attack on {ds}", ""]
        rows, dsd = [], data["datasets"].setdefault(ds, {"methods": {}})
        for meth, us in sorted(methods.items()):
            row = [meth, str(len(us)), fmt([u.clean for u in us], dec, ddof)]
            rec = {"n": len(us), "clean": [u.clean for u in us], "robust": {}, "seeds": [u.seed for u in us],
                   "units": [u.name for u in us]}
            for lab in labels:
                vals = [u.robust.get(lab) for u in us]
                row.append(fmt(vals, dec, ddof))
                rec["robust"][lab] = vals
            rows.append(row)
            dsd["methods"][meth] = rec
        meta = {}
        for us in methods.values():
            for u in us:
                for lab, m in u.attack_meta.items():
                    meta.setdefault(lab, m)
        # AutoAttack is the headline robust number: its columns come first
        labels = [lab for lab in labels if (meta.get(lab) or {}).get("name") == "autoattack"] + \
                 [lab for lab in labels if (meta.get(lab) or {}).get("name") != "autoattack"]
        md += _table(["Method", "runs", "Without attack"] + [threat_model(lab, meta.get(lab)) for lab in labels],
                     rows) + [""]
        dsd["threat_models"] = {lab: threat_model(lab, meta.get(lab)) for lab in labels}
        head = [threat_model(lab, meta.get(lab)) for lab in labels if (meta.get(lab) or {}).get("name") == "autoattack"]
        if head:
            md += ["Headline robust accuracy: " + "; ".join(head) + " (each robust accuracy is an upper bound on the true one; "
                   "AutoAttack's is the tightest standard one).", ""]
    # ---- Table 2 style: clean accuracy, params, search cost
    n_table += 1
    md += [f"## Table {n_table}. Accuracy (%) without attack, parameters and search cost", ""]
    rows = []
    for ds, methods in sorted(grouped.items()):
        for meth, us in sorted(methods.items()):
            searches = list({id(u.search): u.search for u in us if u.search is not None}.values())
            cost_txt, cost_m, cost_sd = _search_cost_h(searches)
            params = [u.params_m for u in us if u.params_m is not None]
            rows.append([ds, meth, fmt([u.clean for u in us], dec, ddof),
                         fmt(params, 3, ddof, sig=True).split(" ±")[0] if params else "n/a", cost_txt,
                         "gradient" if searches else "-", str(len(us))])
            rec = data["datasets"][ds]["methods"][meth]
            rec.update(params_m=params, search_cost_h=cost_m, search_cost_h_std=cost_sd)
    md += _table(["Dataset", "Method", "Test Acc. (%)", "Params (M)", "Search cost", "Search method",
                  "runs"], rows) + [""]
    # ---- Tables 5/6: certified lower bounds, tightest bound method first (CROWN when present)
    cert_keys = {k for u in units for k in u.certified}
    for norm, nname in (("inf", "l_inf"), ("2", "l_2")):
        bms = [b for b in BOUND_ORDER if f"{b}/{norm}" in cert_keys]
        bms += sorted(k.split("/")[0] for k in cert_keys if k.endswith("/" + norm) and k.split("/")[0] not in bms)
        for rank, bmethod in enumerate(bms):
            k = f"{bmethod}/{norm}"
            n_table += 1
            eps_cols = sorted({float(e) for u in units for e in (u.certified.get(k, {}).get("certified_acc") or {})})
            which = "tightest bound method evaluated" if rank == 0 else "looser bound method"
            md += [f"## Table {n_table}. Averaged {nname}-norm certified lower bounds, bound method: "
                   f"{BOUND_NAMES.get(bmethod, bmethod)} ({which}); untargeted and random target (CNN-Cert style)", ""]
            rows = []
            for ds, methods in sorted(grouped.items()):
                for meth, us in sorted(methods.items()):
                    have = [u for u in us if k in u.certified]
                    if not have:
                        continue
                    unt = [u.certified[k].get("mean_radius") for u in have]
                    tgt = [u.certified[k].get("mean_radius_target") for u in have]
                    nex = [u.certified[k].get("n") for u in have]
                    cacc = {e: [(u.certified[k].get("certified_acc") or {}).get(f"{e:g}") for u in have]
                            for e in eps_cols}
                    rows.append([ds, meth, str(len(have)), fmt(unt, 3, ddof, sig=True), fmt(tgt, 3, ddof, sig=True)]
                                + [fmt(cacc[e], dec, ddof) for e in eps_cols]
                                + ["/".join(str(x) for x in sorted(set(n for n in nex if n is not None))) or "n/a"])
                    data["datasets"][ds]["methods"][meth].setdefault("certified", {})[k] = {
                        "mean_radius": unt, "mean_radius_target": tgt, "runs": len(have),
                        "certified_acc": {f"{e:g}": v for e, v in cacc.items()}}
            md += _table(["Dataset", "Method", "runs", "mean radius (untargeted)", "mean radius (random target)"]
                         + [f"certified acc. (%) at eps={e:.4g}" for e in eps_cols] + ["examples"], rows) + [""]
    # ---- plots
    if cfg.plots:
        md += _plots(runs, grouped, plots, out.parent, data)
    md += ["## Runs", ""]
    md += _table(["dataset", "method", "train run", "search run", "seeds (search, train)", "eval runs"],
                 [[u.dataset, u.method, str(u.train.path) if u.train else "-",
                   str(u.search.path) if u.search else "-", str(u.seed),
                   ", ".join(str(e.path) for e in u.evals) or "-"] for u in units]) + [""]
    for s in runs.search:
        data["search_runs"].append({"path": str(s.path), "method": s.method, "dataset": s.dataset,
                                    "seed": s.seed, "cost_s": s.cost_s, "world_size": s.world_size,
                                    "device": s.device, "genotype": s.genotype.to_dict() if s.genotype else None})
    from .engine.io import atomic_write_json, atomic_write_text

    atomic_write_text(str(out), "\n".join(md) + "\n")
    atomic_write_json(str(out.with_suffix(".json")), data)
    return out


BOUND_ORDER = ("crown", "crown-ibp", "ibp")
BOUND_NAMES = {"crown": "CROWN", "crown-ibp": "CROWN-IBP", "ibp": "IBP"}


def _masking_section(units: Sequence[Unit], data: Dict[str, Any]) -> List[str]:
    """Gradient-masking warnings (evaluate's checks) at the top, where a reader cannot miss them."""
    checked = [u for u in units if u.masking]
    if not checked:
        return []
    md = ["## Gradient-masking checks", ""]
    data["masking"] = {}
    flagged = 0
    for u in checked:
        data["masking"][u.name] = u.masking
        for c in u.masking:
            if c.get("status") == "flagged":
                flagged += 1
                md.append(f"> **WARNING** ({u.dataset}, {u.method}, `{u.name}`): {c.get('check')}: {c.get('message')}")
                md.append("")
    ran = sum(1 for u in checked for c in u.masking if c.get("status") in ("ok", "flagged"))
    if not flagged:
        md += [f"All {ran} checks passed on {len(checked)} evaluated network(s) (accuracy non-increasing in eps, "
               "PGD at a huge eps reaches 0%, more steps/restarts never help, black-box never beats white-box).", ""]
    else:
        md += [f"{flagged} of {ran} checks flagged: the robust accuracies of the networks named above are likely "
               "overestimates.", ""]
    skipped = sorted({c.get("check") for u in checked for c in u.masking if c.get("status") == "skipped"})
    if skipped:
        md += ["Not run (nothing to compare): " + ", ".join(skipped) + ".", ""]
    dep = sorted({a for u in units for a in u.rank_dependent})
    if dep:
        md += [f"Note: {', '.join(dep)} draw their randomness per call, not per example (the authors' package): "
               "their per-example results can change with the batch size and the number of ranks.", ""]
    return md


def _rel(p: Path, base: Path) -> str:
    return os.path.relpath(p, base)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def run_labels(paths: List[Path]) -> Dict[Path, str]:
    """A distinct short label per run dir: its path below the runs' common parent
    (``darts_s0/search``), so runs whose leaf dirs share a name get distinct plot files."""
    if len(paths) <= 1:
        return {p: p.name for p in paths}
    resolved = {p: p.resolve() for p in paths}
    common = Path(os.path.commonpath([str(r) for r in resolved.values()]))
    return {p: (str(r.relative_to(common)) if r != common else p.name) for p, r in resolved.items()}


def _plots(runs: Runs, grouped: Dict[str, Dict[str, List[Unit]]], pdir: Path, base: Path,
           data: Dict[str, Any]) -> List[str]:
    from . import plots as P

    md: List[str] = ["## Plots", ""]
    data["plots"] = []

    def link(title: str, path: Path) -> None:
        md.append(f"![{title}]({_rel(path, base)})")
        md.append("")
        data["plots"].append(str(path))

    for ds, methods in sorted(grouped.items()):
        for lab in sorted({lab for us in methods.values() for u in us for lab in u.sweep}):
            series = {}
            for meth, us in sorted(methods.items()):
                eps = sorted({e for u in us for e in u.sweep.get(lab, {})})
                if not eps:
                    continue
                stats = [mean_std([u.sweep[lab][e] for u in us if e in u.sweep.get(lab, {})]) for e in eps]
                series[meth] = (eps, [m for m, _ in stats], [s or 0.0 for _, s in stats])
            if series:
                data.setdefault("eps_sweeps", {}).setdefault(ds, {})[lab] = {
                    m: {"eps": e, "mean": mu, "std": sd} for m, (e, mu, sd) in series.items()}
                link(f"{ds}: robust accuracy vs eps ({lab})",
                     P.eps_sweep(series, f"{ds}: {lab}", "eps (pixels)", pdir / f"eps_sweep_{_safe(ds)}_{_safe(lab)}.png"))
        for key in sorted({k for us in methods.values() for u in us for k in u.radii}):
            hist = {meth: [r for u in us for r in u.radii.get(key, [])] for meth, us in sorted(methods.items())}
            hist = {m: v for m, v in hist.items() if v}
            bm, norm = key.split("/")
            if not any(r > 0 for v in hist.values() for r in v):
                n = sum(len(v) for v in hist.values())
                md += [f"{ds}, {BOUND_NAMES.get(bm, bm)} l_{norm}: no example certified (all {n} radii are 0; "
                       "no histogram).", ""]
                continue
            link(f"{ds}: certified radii ({bm}, l_{norm})",
                 P.radius_histogram(hist, f"{ds}: certified radius ({BOUND_NAMES.get(bm, bm)}, l_{norm}, untargeted)",
                                    "radius (pixels, log scale)",
                                    pdir / f"radius_hist_{_safe(ds)}_{_safe(bm)}_{norm}.png"))
    label = run_labels([s.path for s in runs.search])
    for s in runs.search:
        tag = f"{s.method} [{label[s.path]}]"
        if s.alphas:
            prims = s.alphas.get("primitives") or (s.cfg.get("model") or {}).get("primitives") or []
            png = P.alpha_heatmap_of_record(s.alphas, prims, tag, pdir / f"alphas_{_safe(label[s.path])}.png")
            if png is not None:
                link(f"softmax(alpha): {tag}", png)
    cells: Dict[str, List[SearchRun]] = {}  # one diagram per distinct genotype
    for s in runs.search:
        if s.genotype is not None:
            cells.setdefault(s.genotype.to_json(), []).append(s)
    for same in cells.values():
        s = same[0]
        tag = ", ".join(sorted({x.method for x in same})) + f" [{label[s.path]}" + (
            f" +{len(same) - 1} more]" if len(same) > 1 else "]")
        for cell in ("normal", "reduce"):
            link(f"{cell} cell: {tag}", P.cell_diagram(s.genotype, cell, tag,
                                                      pdir / f"cell_{_safe(label[s.path])}_{cell}.png"))
        if len(same) > 1:
            md.append("Same cell found by: " + ", ".join(f"`{label[x.path]}`" for x in same))
            md.append("")
    return md


# --------------------------------------------------------------------------- CLI
def from_args(config: str = "", **overrides: Any) -> None:
    """fire target: ``--config PATH`` plus dotted ``--section.key=value`` overrides."""
    cfg = parse_cli(ReportConfig, PROG, DOC, config, overrides)
    from .engine.errors import is_unwritable_location, user_message

    try:
        preflight(cfg)
        from .engine.io import remove_stale_temps

        out = Path(cfg.out)  # temps a killed earlier report left next to its outputs
        remove_stale_temps(out.parent, targets=[out.name, out.with_suffix(".json").name])
        out = write_report(cfg)
    except (ReportError, JSONLError) as e:  # JSONLError: a damaged (not just torn) results file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # an unwritable --out / plots dir found while writing: bad input too
        if not is_unwritable_location(e):
            raise
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    print(f"report -> {out}")


def _writable_target(path: Path, what: str) -> None:
    """``path`` (a file or dir to create or replace) can be written: itself or its nearest
    existing ancestor is a writable directory."""
    p = path if path.exists() else path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if path.exists() and path.is_dir() and what == "--out":
        raise ReportError(f"--out {path} is a directory; give a markdown file path")
    d = p if p.is_dir() else p.parent
    if not p.is_dir() and p != path:
        raise ReportError(f"{what} {path}: {p} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK) or (path.is_file() and not os.access(path, os.W_OK)):
        raise ReportError(f"{what} {path}: {d if not path.is_file() else path} is not writable")


def preflight(cfg: ReportConfig) -> None:
    """Bad input refused before any plot or report file is written."""
    root = Path(cfg.runs)
    if not root.is_dir():
        raise ReportError(f"runs directory {root}: not found")
    out = Path(cfg.out)
    _writable_target(out, "--out")
    _writable_target(out.with_suffix(".json"), "--out")
    if cfg.plots:
        _writable_target(Path(cfg.plots_dir) if cfg.plots_dir else out.parent / f"{out.stem}_plots", "--plots_dir")


def main(argv: Optional[list] = None) -> None:
    """Run the stage on ``argv`` (default ``sys.argv[1:]``): ``["--runs", "runs/", "--out", "r.md"]``."""
    from .entry import run_main

    run_main("report", DOC, from_args, argv)


def cli() -> None:
    """Console entry (``dsrna-report``, ``python -m dsrna_dist.report``)."""
    main()


if __name__ == "__main__":
    cli()
