"""``--help`` cost of every stage: CPU seconds (user+sys of the child) and wall, median of N runs.

    python bench/bench_help.py                      # this checkout
    python bench/bench_help.py --compare /path/to/other/checkout   # side by side (e.g. an older main)

Why CPU time: wall time on a shared machine measures the neighbours. Each run is a fresh
interpreter (``python -m dsrna_dist.<stage> --help``) with the tree on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("search", "train", "evaluate", "report")


def measure(tree: Path, stage: str, reps: int) -> tuple:
    cpu, wall = [], []
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    for _ in range(reps):
        t0, w0 = os.times(), time.perf_counter()
        r = subprocess.run([sys.executable, "-m", f"dsrna_dist.{stage}", "--help"], env=env, cwd=str(tree),
                           capture_output=True, text=True)
        w1, t1 = time.perf_counter(), os.times()
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-500:]
        cpu.append((t1.children_user - t0.children_user) + (t1.children_system - t0.children_system))
        wall.append(w1 - w0)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compare", default="", help="another checkout to measure side by side")
    a = ap.parse_args()
    trees = [("this", Path(__file__).resolve().parents[1])]
    if a.compare:
        trees.insert(0, ("compare", Path(a.compare).resolve()))
    print(f"median of {a.reps} runs; CPU = user+sys seconds of the child; wall in seconds")
    print("stage      " + "  ".join(f"{n:>8} CPU {n:>8} wall" for n, _ in trees))
    for stage in STAGES:
        cells = []
        for _, tree in trees:
            c, w = measure(tree, stage, a.reps)
            cells.append(f"{c:12.2f} {w:13.2f}")
        print(f"{stage:10} " + "  ".join(cells))


if __name__ == "__main__":
    main()
