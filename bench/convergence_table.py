"""Markdown table of search runs' convergence and cost (README "Convergence at CPU scale").

    python bench/convergence_table.py runs/fmnist_small/darts_s0 runs/fmnist_small/pcdarts_s0 ...

Per run: process CPU time and wall time from ``<run>.log`` when the search ran under
``/usr/bin/time -v`` (or its lines kept in ``<run>/time_v.txt``; user + sys of the whole process, startup and data loading included),
else the epochs' CPU time from ``summary.json`` (``search_cpu_s``); the final entropy and mean
max of softmax(alpha), genotype changes, the arch step of the last change, the criterion
(:func:`dsrna_dist.strategies.convergence.convergence`) and the genotype.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, Optional

from dsrna_dist import genotype as G
from dsrna_dist.strategies.convergence import run_convergence


def time_v(log: Path) -> Dict[str, Optional[float]]:
    """user+sys CPU seconds and wall seconds from ``/usr/bin/time -v`` output, if present."""
    out: Dict[str, Optional[float]] = {"cpu": None, "wall": None}
    if not log.is_file():
        return out
    text = log.read_text(errors="replace")
    u = re.search(r"User time \(seconds\): ([\d.]+)", text)
    s = re.search(r"System time \(seconds\): ([\d.]+)", text)
    w = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if u and s:
        out["cpu"] = float(u.group(1)) + float(s.group(1))
    if w:
        parts = [float(p) for p in w.group(1).split(":")]
        out["wall"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return out


def row(run: Path) -> str:
    c = run_convergence(str(run))
    summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    t = time_v(run / "time_v.txt") if (run / "time_v.txt").is_file() else time_v(run.parent / f"{run.name}.log")
    cpu = t["cpu"] if t["cpu"] is not None else summ.get("search_cpu_s")
    wall = t["wall"] if t["wall"] is not None else summ.get("search_time_s")
    geno = G.load(str(run / "genotype.json")) if (run / "genotype.json").is_file() else None
    fmt = lambda v: "n/a" if v is None else f"{v / 60:.1f}"  # noqa: E731
    return (f"| {run.name} | {fmt(cpu)} | {fmt(wall)} | {c['max_softmax']:.3f} | {c['entropy']:.3f} | "
            f"{c['genotype_changes']} | {c['last_change_arch_step']} / {c['arch_steps']} | "
            f"{'yes' if c['converged'] else 'no'} | {geno if geno is not None else 'unfinished'} |")


def main() -> None:
    print("| run | CPU min | wall min | mean max softmax(alpha) | entropy (uniform 2.079) | "
          "genotype changes | last change / arch steps | converged | genotype |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sys.argv[1:]:
        print(row(Path(d)))


if __name__ == "__main__":
    main()
