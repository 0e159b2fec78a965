"""Report: fake-but-realistic search/train/eval run trees -> paper-style tables and PNGs whose
numbers match a mean/std computed here, independently, from the per-example records."""
import json
import os
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from dsrna_dist import genotype as G
from dsrna_dist.config import EvalConfig, ReportConfig, SearchConfig, TrainConfig, load_config, to_dict
from dsrna_dist.evaluate import build_attacks, summarize
from dsrna_dist.report import discover, method_name, write_report
from _proc import run as run_proc  # noqa: E402  (tests/: forked CLI runs)

ROOT = Path(__file__).resolve().parents[1]
PRIMS = list(SearchConfig().model.primitives)
EDGES = 14  # 4 intermediate nodes: 2 + 3 + 4 + 5


# ----------------------------------------------------------------------------- writers
def write_search(root: Path, name: str, strategy: str, metric: str, seed: int, *, order: int = 1,
                 hours: float = 1.0, genotype: str = "DARTS_V2") -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = load_config(SearchConfig, None, {"strategy.name": strategy, "strategy.order": order,
                                           "robustness.name": metric, "run.seed": seed, "run.name": name,
                                           "data.name": "synthetic"})
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    G.save(G.load(genotype), str(d / "genotype.json"))
    lines = []
    for epoch in range(3):
        a = [[(i * 7 + j * 3 + epoch) % 5 * 0.1 for j in range(len(PRIMS))] for i in range(EDGES)]
        lines.append(json.dumps({"epoch": epoch, "primitives": PRIMS, "alphas_normal": a, "alphas_reduce": a}))
    (d / "alphas.jsonl").write_text("\n".join(lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"search_time_s": hours * 3600, "world_size": 2, "device": "cpu"}))
    return d


def write_train(root: Path, name: str, search_dir: Path, seed: int, top1: float) -> Path:
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    cfg = load_config(TrainConfig, None, {"model.genotype": str(search_dir / "genotype.json"), "run.seed": seed,
                                          "run.name": name, "data.name": "synthetic"})
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_top1": top1 - 5}) + "\n"
                                     + json.dumps({"epoch": 1, "test_top1": top1}) + "\n")
    return d


def write_eval(root: Path, name: str, train_dir: Path, rng, n: int = 40, p_clean: float = 0.9,
               p_adv: float = 0.5, params: int = 123456, methods=("crown-ibp",), radius=None, overrides=None):
    """An eval run dir as evaluate.py leaves it: config.yaml, attacks.jsonl, certify.jsonl and
    summary.json made by evaluate.summarize from those records."""
    d = root / name
    d.mkdir(parents=True)
    cfg = load_config(EvalConfig, None, {"data.name": "synthetic", "run.name": name, "eps_sweep": [0.01, 0.03],
                                         "checkpoint": str(train_dir / "checkpoints" / "best.pt"),
                                         **(overrides or {})})
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    attacks, sweep_label = build_attacks(cfg)
    recs, cert = [], []
    for i in range(n):
        y = i % 4
        clean_ok = rng.random() < p_clean
        for lab, _, meta in attacks:
            adv_ok = clean_ok and (lab == "clean" or rng.random() < p_adv)
            recs.append({"index": i, "label": y, "clean_pred": y if clean_ok else (y + 1) % 4, "attack": lab,
                         "eps": meta["eps"], "norm": meta["norm"], "adv_pred": y if adv_ok else (y + 2) % 4,
                         "correct": adv_ok})
        if clean_ok and len({c["index"] for c in cert}) < 10:
            for meth in methods:
                for norm in ("inf", "2"):
                    r = radius(meth, norm) if radius else rng.random() * (0.01 if norm == "inf" else 0.1)
                    cert.append({"index": i, "label": y, "method": meth, "norm": norm, "radius": r,
                                 "radius_target": 1.5 * r, "target": (y + 1) % 4})
    (d / "attacks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "certify.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cert))
    s = summarize(recs, cert, attacks, sweep_label)
    s.update(attacks=[{"label": lab, **meta} for lab, _, meta in attacks])   # as evaluate.run_eval writes it
    s.update(kind="eval", dataset="synthetic", checkpoint=cfg.checkpoint,
             train_run_dir=str(train_dir.resolve()), params=params, genotype=G.load("DARTS_V2").to_dict())
    (d / "summary.json").write_text(json.dumps(s))
    return d, recs, cert


@pytest.fixture()
def tree(tmp_path):
    import random

    rng = random.Random(0)
    root = tmp_path / "runs"
    expect = {}
    specs = [("DSRNA-CB", "pcdarts", "certified", 2.0, 0.6), ("PC-DARTS", "pcdarts", "none", 0.5, 0.3),
             ("DARTS (2nd)", "darts", "none", 1.0, 0.2)]
    for method, strat, metric, hours, p_adv in specs:
        for seed in range(3 if method != "DARTS (2nd)" else 1):
            tag = f"{strat}_{metric}_s{seed}"
            s = write_search(root, f"search_{tag}", strat, metric, seed, order=2 if method == "DARTS (2nd)" else 1,
                             hours=hours * (1 + seed))
            t = write_train(root, f"train_{tag}", s, seed, top1=90 + seed)
            _, recs, cert = write_eval(root, f"eval_{tag}", t, rng, p_adv=p_adv, params=1_000_000 + seed)
            e = expect.setdefault(method, {"pgd": [], "clean": [], "cert_inf": [], "cost": []})
            pg = [r["correct"] for r in recs if r["attack"] == "PGD-10"]
            e["pgd"].append(100 * sum(pg) / len(pg))
            cl = [r["correct"] for r in recs if r["attack"] == "clean"]
            e["clean"].append(100 * sum(cl) / len(cl))
            ci = [r["radius"] for r in cert if r["norm"] == "inf"]
            e["cert_inf"].append(sum(ci) / len(ci))
            e["cost"].append(hours * (1 + seed) * 2)  # 2 CPU processes
    write_search(root, "search_unfinished", "sdarts_adv", "none", 0, genotype="PC_DARTS_CIFAR")  # never trained
    return root, expect


def _cell(md: str, table_title: str, row_key: str, col: str) -> str:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if table_title in line)
    header = [c.strip() for c in lines[start + 2].strip("|").split("|")]
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if row_key in cells[:2]:
            # headers carry the threat model after the label: "PGD-10 (l_inf eps=..., 10 steps ...)"
            return cells[next(i for i, h in enumerate(header) if h == col or h.startswith(col + " ("))]
    raise AssertionError(f"row {row_key} not in {table_title}")


# ----------------------------------------------------------------------------- tests
def test_method_names():
    assert method_name({"strategy": {"name": "darts", "order": 1}, "robustness": {"name": "none"}}) == "DARTS (1st)"
    assert method_name({"strategy": {"name": "pcdarts"}, "robustness": {"name": "jacobian"}}) == "DSRNA-Jacobian"
    assert method_name({"strategy": {"name": "pcdarts_adv"}, "robustness": {"name": "none"}}) == "PC-DARTS-ADV"
    assert method_name({"strategy": {"name": "sdarts_adv"}, "robustness": {"name": "none"}}) == "SDARTS-ADV"


def test_tables_aggregate_over_seeds(tree, tmp_path):
    root, expect = tree
    out = tmp_path / "rep" / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out), plots=False))
    md = out.read_text()
    for method, e in expect.items():
        m = statistics.mean(e["pgd"])
        txt = _cell(md, "under attack on synthetic", method, "PGD-10")
        if len(e["pgd"]) > 1:
            assert txt == f"{m:.2f} ± {statistics.stdev(e['pgd']):.2f}"
        else:
            assert txt == f"{m:.2f}"
        cm = statistics.mean(e["clean"])
        assert _cell(md, "without attack, parameters", method, "Test Acc. (%)").startswith(f"{cm:.2f}")
        cost = _cell(md, "without attack, parameters", method, "Search cost")
        assert cost.startswith(f"{statistics.mean(e['cost']):.3g}") and cost.endswith("CPU-h")
        cert = _cell(md, "l_inf-norm certified lower bounds", method, "mean radius (untargeted)")
        m, sd = statistics.mean(e["cert_inf"]), (statistics.stdev(e["cert_inf"]) if len(e["cert_inf"]) > 1 else None)
        assert cert == (f"{m:.3g}" if sd is None else f"{m:.3g} ± {sd:.3g}")
        assert _cell(md, "l_inf-norm certified lower bounds", method, "runs") == str(len(e["cert_inf"]))
    data = json.loads(out.with_suffix(".json").read_text())
    got = data["datasets"]["synthetic"]["methods"]["DSRNA-CB"]["robust"]["PGD-10"]
    assert sorted(got) == pytest.approx(sorted(expect["DSRNA-CB"]["pgd"]))
    for col in ("FGSM", "PGD-20", "C&W", "Without attack"):
        assert col in md
    assert "PGD-20@0.01" not in md.split("## Plots")[0], "eps-sweep points go to the plot, not Table 1"


def test_plots_exist_and_are_linked(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out)))
    md = out.read_text()
    pngs = sorted((tmp_path / "report_plots").glob("*.png"))
    names = " ".join(p.name for p in pngs)
    assert "eps_sweep_synthetic" in names and "radius_hist_synthetic_crown-ibp_inf" in names
    assert "alphas_search_unfinished" in names and "alphas_search_pcdarts_certified_s2" in names
    assert "cell_search_darts_none_s0_normal" in names and "cell_search_darts_none_s0_reduce" in names
    assert "cell_search_unfinished_reduce" in names
    assert len([p for p in pngs if p.name.startswith("cell_")]) == 4, "one diagram per distinct genotype"
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
        assert f"](report_plots/{p.name})" in md


def test_plots_of_runs_with_the_same_leaf_name_do_not_collide(tmp_path):
    """The compare tree names every search dir ``search`` (``<method>_s<seed>/search``): each
    run still gets its own alpha heatmap and cell diagrams, labelled by its relative path."""
    root = tmp_path / "runs"
    write_search(root / "darts_s0", "search", "darts", "none", 0)
    write_search(root / "pcdarts_s0", "search", "pcdarts", "none", 0, genotype="PC_DARTS_CIFAR")
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out)))
    md = out.read_text()
    names = sorted(p.name for p in (tmp_path / "report_plots").glob("alphas_*.png"))
    assert names == ["alphas_darts_s0_search.png", "alphas_pcdarts_s0_search.png"]
    assert "[darts_s0/search]" in md and "[pcdarts_s0/search]" in md
    cells = sorted(p.name for p in (tmp_path / "report_plots").glob("cell_*.png"))
    assert len(cells) == 4 and len({c.rsplit("_", 1)[0] for c in cells}) == 2


def test_discover_links_runs(tree):
    root, _ = tree
    runs = discover(root)
    assert len(runs.search) == 8 and len(runs.train) == 7 and len(runs.evals) == 7
    assert all(t.search is not None for t in runs.train)


def test_cli(tree, tmp_path):
    root, _ = tree
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run_proc([sys.executable, "-m", "dsrna_dist.report", "--runs", str(root), "--out",
                 str(tmp_path / "r.md"), "--plots=false"], cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.md").is_file()
    r = run_proc([sys.executable, "-m", "dsrna_dist.report", "--runs", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "r2.md")], cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "missing" in r.stderr and not (tmp_path / "r2.md").exists()
    r = run_proc([sys.executable, "-m", "dsrna_dist.report", "--help"], cwd=ROOT, env=env,
                 timeout=120)
    assert r.returncode == 0 and "--std_ddof" in r.stdout


# ----------------------------------------------------------------------------- what a reviewer needs to see
def _one_method_tree(tmp_path, seeds=2, **kw):
    import random

    rng = random.Random(1)
    root = tmp_path / "runs"
    evals = []
    for seed in range(seeds):
        s = write_search(root, f"search_s{seed}", "pcdarts", "certified", seed)
        t = write_train(root, f"train_s{seed}", s, seed, top1=90)
        evals.append(write_eval(root, f"eval_s{seed}", t, rng, **kw))
    return root, evals


def test_headers_carry_the_threat_model(tmp_path):
    root, _ = _one_method_tree(tmp_path, seeds=1)
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out), plots=False))
    md = out.read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method | runs | Without attack"))
    d = EvalConfig()   # write_eval evaluates with the default attacks: read the threat model from there
    fgsm, pgd10, cw = d.attacks[0], d.attacks[1], d.attacks[3]
    assert f"FGSM (l_inf eps={fgsm.eps:.4g})" in header
    assert f"PGD-10 (l_inf eps={pgd10.eps:.4g}, 10 steps of {pgd10.step_size:.3g})" in header
    assert f"C&W (l_2, unbounded, c={cw.c:g}, {cw.steps} steps)" in header
    # one run: no std anywhere in the tables, and the number of runs is in every table
    tables = md.split("## Plots")[0].split("## Runs")[0]
    assert "±" not in tables.split("## Table 1")[1]
    for block in tables.split("## Table ")[1:]:
        assert "| runs |" in block or "| runs" in block.splitlines()[2], block[:200]


def test_no_std_for_a_single_run_whatever_ddof():
    from dsrna_dist.report import fmt

    for ddof in (0, 1):
        assert fmt([12.3456], 2, ddof) == "12.35"
    assert fmt([1.0, 3.0], 2, 0) == "2.00 ± 1.00" and fmt([1.0, 3.0], 2, 1) == "2.00 ± 1.41"


def test_masking_warnings_are_in_the_report(tmp_path):
    root, evals = _one_method_tree(tmp_path)
    flagged = {"check": "huge_eps", "status": "flagged", "message": "PGD at l_inf eps 1 leaves 37.00% robust"}
    for k, (d, _, _) in enumerate(evals):
        s = json.loads((d / "summary.json").read_text())
        ok = [{"check": c, "status": "ok", "message": "fine"} for c in ("eps_monotone", "huge_eps", "effort", "blackbox")]
        s["masking"] = {"checks": [flagged] + ok[2:] if k == 0 else ok}
        (d / "summary.json").write_text(json.dumps(s))
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out), plots=False))
    md = out.read_text()
    warn = [line for line in md.splitlines() if line.startswith("> **WARNING**")]
    assert len(warn) == 1 and "train_s0" in warn[0] and flagged["message"] in warn[0]
    assert md.index("WARNING") < md.index("## Table 1"), "warnings come before the numbers they qualify"
    assert "1 of 7 checks flagged" in md
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["masking"]["train_s0"][0]["status"] == "flagged"
    # all passing: one line that says so
    for d, _, _ in evals:
        s = json.loads((d / "summary.json").read_text())
        s["masking"] = {"checks": [{"check": "effort", "status": "ok", "message": "fine"}]}
        (d / "summary.json").write_text(json.dumps(s))
    write_report(ReportConfig(runs=str(root), out=str(out), plots=False))
    md = out.read_text()
    assert "WARNING" not in md and "All 2 checks passed on 2 evaluated network(s)" in md


def test_certified_tables_crown_first_with_certified_accuracy(tmp_path):
    scale = {"crown": 0.02, "crown-ibp": 0.004, "ibp": 0.0}
    import random

    rr = random.Random(5)
    root, evals = _one_method_tree(tmp_path, methods=("ibp", "crown-ibp", "crown"),
                                   radius=lambda m, nm: scale[m] * rr.random() * (10 if nm == "2" else 1))
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out), plots=False))
    md = out.read_text()
    caps = [line for line in md.splitlines() if "certified lower bounds" in line]
    assert [c.split("bound method: ")[1].split(" ")[0] for c in caps] == ["CROWN", "CROWN-IBP", "IBP"] * 2
    assert "l_inf" in caps[0] and "tightest" in caps[0]
    # certified accuracy at the l_inf attack eps, recomputed here from the records
    eps = EvalConfig().attacks[0].eps   # FGSM's 2/255
    vals = []
    for d, recs, cert in evals:
        correct = [r["index"] for r in recs if r["attack"] == "clean" and r["correct"]]
        certified = {c["index"] for c in cert}
        uncert = [i for i in correct if i not in certified]
        prefix = min(uncert) if uncert else 40
        hit = {c["index"] for c in cert if c["method"] == "crown" and c["norm"] == "inf" and c["radius"] >= eps
               and c["index"] < prefix}
        vals.append(100 * len(hit) / prefix)
    cell = _cell(md, caps[0], "DSRNA-CB", f"certified acc. (%) at eps={eps:.4g}")
    assert cell == f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
    assert 0 < statistics.mean(vals) < 100


def test_radius_histograms_fit_the_radii_or_say_nothing_certified(tmp_path):
    from dsrna_dist.plots import radius_bins

    root, _ = _one_method_tree(tmp_path, seeds=1, methods=("ibp", "crown"),
                               radius=lambda m, nm: 0.0 if m == "ibp" else (1e-4 if nm == "inf" else 3e-2))
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out)))
    md = out.read_text()
    names = sorted(p.name for p in (tmp_path / "report_plots").glob("radius_hist_*"))
    assert names == ["radius_hist_synthetic_crown_2.png", "radius_hist_synthetic_crown_inf.png"]
    assert "synthetic, IBP l_inf: no example certified (all 10 radii are 0; no histogram)." in md
    edges = radius_bins({"a": [0.0, 1e-5, 3e-3], "b": [2e-4]})
    assert edges[0] == pytest.approx(1e-5) and edges[-1] == pytest.approx(3e-3)
    ratios = edges[1:] / edges[:-1]
    assert ratios == pytest.approx([ratios[0]] * len(ratios)), "log-spaced"
    with pytest.raises(ValueError, match="no example certified"):
        radius_bins({"a": [0.0, 0.0]})


def test_eps_sweep_starts_at_the_clean_point(tmp_path):
    root, evals = _one_method_tree(tmp_path)
    # an older summary without the eps = 0 point: the report adds the clean accuracy there
    d = evals[0][0]
    s = json.loads((d / "summary.json").read_text())
    s["eps_sweep"] = [p for p in s["eps_sweep"] if p["eps"] > 0]
    (d / "summary.json").write_text(json.dumps(s))
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out)))
    data = json.loads(out.with_suffix(".json").read_text())
    (lab, series), = data["eps_sweeps"]["synthetic"].items()
    eps, mean = series["DSRNA-CB"]["eps"], series["DSRNA-CB"]["mean"]
    assert eps == [0.0, 0.01, 0.03]
    cleans = [json.loads((e[0] / "summary.json").read_text())["clean_acc"] for e in evals]
    assert mean[0] == pytest.approx(statistics.mean(cleans))


def test_autoattack_is_the_headline_column(tmp_path):
    attacks = [{"name": "fgsm", "eps": 0.1}, {"name": "pgd", "eps": 0.1, "steps": 20, "step_size": 0.01},
               {"name": "autoattack", "eps": 0.1}, {"name": "autoattack", "norm": "2", "eps": 1.0}]
    root, _ = _one_method_tree(tmp_path, seeds=1, overrides={"attacks": attacks})
    out = tmp_path / "report.md"
    write_report(ReportConfig(runs=str(root), out=str(out), plots=False))
    md = out.read_text()
    header = [c.strip() for c in next(line for line in md.splitlines()
                                      if line.startswith("| Method | runs")).strip("|").split("|")]
    assert header[3:] == ["AutoAttack (l_inf eps=0.1, standard)", "AutoAttack (l2) (l_2 eps=1, standard)",
                          "FGSM (l_inf eps=0.1)", "PGD-20 (l_inf eps=0.1, 20 steps of 0.01)"]
    assert "Headline robust accuracy: AutoAttack (l_inf eps=0.1, standard); AutoAttack (l2) (l_2 eps=1" in md
