"""The paper's comparison at a CPU-sized budget: every method x seed, searched, retrained with
one recipe, evaluated with one attack/certification suite, then the paper-style report.

Resumable: each (method, seed, stage) is skipped when its output exists, and a stage that was
killed resumes from its own checkpoint when run again. Run it in parts with --methods/--seeds.

    python bench/compare.py                                  # all methods, seeds 0 1 2
    python bench/compare.py --methods dsrna_cb --seeds 0     # one cell of the grid
    python bench/compare.py --report-only

Results go to results/compare/<method>_s<seed>/{search,train,eval}; the light files (configs,
genotypes, alphas, metrics, summaries, certify.jsonl, the report) are committed so a later
session continues the grid; checkpoints, TensorBoard events and attacks.jsonl are ignored.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("darts", "pcdarts", "sdarts_adv", "pcdarts_adv", "dsrna_jacobian", "dsrna_cb")


def stage_commands(method: str, seed: int, out: Path, nproc: int, budget: str) -> list[tuple[str, Path, list[str]]]:
    """(stage, output that marks it done, argv) for one method and seed."""
    py = sys.executable
    run = out / f"{method}_s{seed}"
    if nproc > 1:
        launch = [str(Path(py).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m"]
    else:
        launch = [py, "-m"]
    common = [f"--run.out_dir={run}", f"--run.seed={seed}", "--run.progress=false"]
    return [
        ("search", run / "search" / "genotype.json",
         launch + ["dsrna_dist.search", f"--config=configs/search/{budget}_{method}.yaml",
                   "--run.name=search", *common]),
        ("train", run / "train" / "checkpoints" / "best.pt",
         launch + ["dsrna_dist.train", f"--config=configs/train/{budget}.yaml", "--run.name=train",
                   f"--model.genotype={run / 'search' / 'genotype.json'}", *common]),
        ("eval", run / "eval" / "summary.json",
         launch + ["dsrna_dist.evaluate", f"--config=configs/eval/{budget}.yaml", "--run.name=eval",
                   f"--checkpoint={run / 'train' / 'checkpoints' / 'best.pt'}", *common]),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="results/compare",
                    help="results tree (its light files are committed; checkpoints, tb/ and attacks.jsonl are not)")
    ap.add_argument("--budget", default="fmnist_tiny", help="config prefix: configs/*/<budget>*.yaml")
    ap.add_argument("--nproc", type=int, default=1, help="ranks per stage (torchrun when > 1)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    os.chdir(ROOT)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "compare_log.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if not args.report_only:
        for method in args.methods:
            for seed in args.seeds:
                stages = stage_commands(method, seed, out, args.nproc, args.budget)
                if stages[-1][1].exists():  # evaluated: nothing left (checkpoints need not be kept)
                    print(f"[skip] {method} seed {seed}: {stages[-1][1]} exists", flush=True)
                    continue
                for stage, done, argv in stages:
                    if done.exists():
                        print(f"[skip] {method} seed {seed} {stage}: {done} exists", flush=True)
                        continue
                    print(f"[run ] {method} seed {seed} {stage}: {' '.join(argv)}", flush=True)
                    t0 = time.time()
                    rc = subprocess.call(argv, env=env)
                    rec = {"method": method, "seed": seed, "stage": stage, "rc": rc,
                           "wall_s": round(time.time() - t0, 1)}
                    with open(log, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if rc != 0:
                        print(f"error: {method} seed {seed} {stage} exited {rc}; rerun to resume", file=sys.stderr)
                        return rc
    report = out / "report" / "report.md"
    rc = subprocess.call([sys.executable, "-m", "dsrna_dist.report", f"--runs={out}", f"--out={report}"], env=env)
    if rc == 0:
        print(f"report: {report}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
