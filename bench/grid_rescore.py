"""Re-score finished grid searches at the current code without changing what they found.

A search's convergence bookkeeping (genotype changes, last change, converged) is computed while it
runs, so a fix to that bookkeeping (2026-11-30: genotypes compared as architectures, a node's two
inputs being a set) reaches old searches only by running them again. Searches are deterministic
(same config, seed and data order give bit-identical alphas), so this re-runs each named search
into a scratch directory with the grid's own command, and adopts the re-run's records into
``results/grid/search/<name>/`` only if its alphas, betas and genotype are bit-identical to the
first run's (else it reports the difference and touches nothing). The first run's verdict and the
new one go to ``rescored.json`` next to them; the retrained networks stay valid (same cell).

    OMP_NUM_THREADS=1 python bench/grid_rescore.py pcdarts_s0 darts_s1 [--scratch /tmp/rescore]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402
from dsrna_dist.engine.io import read_jsonl  # noqa: E402

ALPHA_KEYS = ("alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce")
VERDICT = ("genotype_changes", "last_change_arch_step", "converged")


def identical(first: Path, second: Path) -> bool:
    """Same alphas/betas in every epoch record and the same genotype file, bit for bit."""
    a, b = read_jsonl(first / "alphas.jsonl"), read_jsonl(second / "alphas.jsonl")
    return (len(a) == len(b) and all(x.get(k) == y.get(k) for x, y in zip(a, b) for k in ALPHA_KEYS)
            and (first / "genotype.json").read_text() == (second / "genotype.json").read_text())


def rescore(name: str, scratch: Path) -> Optional[dict]:
    """Re-run search ``<method>_s<seed>`` into ``scratch`` and adopt it if bit-identical."""
    method, _, seed = name.rpartition("_s")
    if method not in grid.METHODS or not seed.isdigit():
        raise SystemExit(f"grid_rescore: {name!r} is not <method>_s<seed> with a grid method")
    run = grid.OUT / "search" / name
    if not (run / "genotype.json").exists():
        raise SystemExit(f"grid_rescore: {run} has no finished search to re-score")
    cfg, extra = grid.METHODS[method]
    fresh = scratch / name
    if not (fresh / "genotype.json").exists():
        subprocess.check_call(grid.launcher(1) + [
            "dsrna_dist.search", f"--config=configs/search/{cfg}", *extra, f"--run.out_dir={scratch}",
            f"--run.name={name}", f"--run.seed={seed}", "--run.progress=false"], cwd=grid.ROOT)
    if not identical(run, fresh):
        print(f"{name}: the re-run differs from the first run (alphas or genotype): not adopted")
        return None
    old = json.loads((run / "summary.json").read_text())["convergence"]
    for f in ("alphas.jsonl", "summary.json", "search.log"):
        shutil.copy2(fresh / f, run / f)
    for d in ("genotypes", "tb", "checkpoints"):
        if (fresh / d).exists():
            shutil.rmtree(run / d, ignore_errors=True)
            shutil.copytree(fresh / d, run / d)
    new = json.loads((run / "summary.json").read_text())["convergence"]
    note = {"rescored": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": grid.code_version(),
            "why": "genotype changes recounted as architectures (a node's two inputs are a set); the search "
                   "was re-run with the same config and seed and its alphas, betas and genotype are "
                   "bit-identical to the first run",
            "before": {k: old.get(k) for k in VERDICT}, "after": {k: new.get(k) for k in VERDICT}}
    (run / "rescored.json").write_text(json.dumps(note, indent=1) + "\n")
    print(f"{name}: {note['before']} -> {note['after']}")
    return note


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="grid searches, e.g. pcdarts_s0")
    ap.add_argument("--scratch", default="/tmp/grid_rescore", help="where the re-runs go")
    args = ap.parse_args(argv)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    return 0 if all(rescore(n, scratch) is not None for n in args.names) else 1


if __name__ == "__main__":
    sys.exit(main())
