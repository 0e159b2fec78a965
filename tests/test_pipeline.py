"""The README's main job end to end: search -> retrain -> attacks + certification -> report,
2 real ranks each, exactly as `make demo` runs it (launch/demo.sh)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsrna_dist import genotype as G

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dist
@pytest.mark.slow  # ~3.5 min: `make test-all`; every stage's 2-rank run is in the default suite
@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="dataset-fashion-mnist apt package not installed")
def test_demo_pipeline_two_ranks(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OUT=str(out), PY=sys.executable, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "world_size=2" in run.stdout + run.stderr
    g = G.load(str(out / "search" / "genotype.json"), nodes=3)  # the DSRNA setting: 3 nodes
    search = json.loads((out / "search" / "summary.json").read_text())
    assert search["world_size"] == 2 and search["search_time_s"] > 0
    assert (out / "train" / "checkpoints" / "best.pt").is_file()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["genotype"] == g.to_dict()
    records = [json.loads(line) for line in (out / "eval" / "attacks.jsonl").read_text().splitlines()]
    n = summary["n"]
    per_attack = {}
    for r in records:
        per_attack.setdefault(r["attack"], set()).add(r["index"])
    # exact gather: every attack covers its examples once (the masking checks' attacks, labelled
    # mask/..., run on the first masking.num_examples only)
    import yaml

    m = yaml.safe_load((out / "eval" / "config.yaml").read_text())["masking"]["num_examples"]
    m = min(n, m or n)
    assert per_attack and all(idx == set(range(n)) for a, idx in per_attack.items() if not a.startswith("mask/"))
    masked = {a: idx for a, idx in per_attack.items() if a.startswith("mask/")}
    assert masked, "the demo runs the gradient-masking checks"
    assert all(idx == set(range(len(idx))) for idx in masked.values())  # a prefix, no gaps or duplicates
    assert all(len(idx) == m for idx in masked.values())
    report = (out / "report" / "report.md").read_text()
    assert "DSRNA-Jacobian" in report and "Table 1" in report
    pngs = list((out / "report").rglob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_demo_script_parses_names_loadable_configs_and_rejects_a_bad_method(tmp_path):
    """The default suite's cheap check of `make demo` (the full run is the slow test above):
    the script parses, every config it launches loads for every METHOD, a bad METHOD exits 2
    before anything is written."""
    import re

    from dsrna_dist.config import EvalConfig, SearchConfig, TrainConfig, load_config

    script = ROOT / "launch" / "demo.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    stages = {"search": SearchConfig, "train": TrainConfig, "evaluate": EvalConfig}
    launched = re.findall(r"-m dsrna_dist\.(\w+) --config \"?([^\s\"]+)\"?", text)
    assert sorted(s for s, _ in launched) == sorted(stages)
    for method in ("jacobian", "cb"):
        for stage, path in launched:
            cfg = load_config(stages[stage], str(ROOT / path.replace("${METHOD}", method)))
            if stage == "search":
                assert cfg.robustness.name == {"jacobian": "jacobian", "cb": "certified"}[method]
    out = tmp_path / "demo"
    env = dict(os.environ, OUT=str(out), PY=sys.executable, METHOD="bogus")
    run = subprocess.run(["bash", str(script)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "METHOD must be jacobian or cb" in run.stderr
    assert not out.exists()
