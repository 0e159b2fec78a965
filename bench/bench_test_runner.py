"""Wall time of one tiny CLI search: forked from the tests' preloaded forkserver (tests/_proc.py)
against a fresh interpreter, alternated so both see the same neighbours; median of N each.

    python bench/bench_test_runner.py --reps 5

Wall, not CPU: the forked run is the forkserver's child, so ``os.times`` cannot see it. Both
runs must write the same genotype (the fork shares imports, nothing that changes a result).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _proc import run as run_proc  # noqa: E402
from _tiny import tiny_search_args  # noqa: E402

ARGS = [*tiny_search_args(layers=3), "--epochs=1", "--run.name=bench"]


def once(forked: bool) -> tuple:
    with tempfile.TemporaryDirectory() as out:
        os.environ["DSRNA_TEST_SUBPROCESS"] = "0" if forked else "1"  # _proc reads it here
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        r = run_proc([sys.executable, "-m", "dsrna_dist.search", *ARGS, f"--run.out_dir={out}"],
                     env=env, cwd=str(ROOT), timeout=600)
        wall = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr[-2000:]
        return wall, json.loads((Path(out) / "bench" / "genotype.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    reps = ap.parse_args().reps
    once(True)  # start the forkserver (its imports are paid once per test process)
    fork, sub, genos = [], [], set()
    for _ in range(reps):
        for forked, acc in ((True, fork), (False, sub)):
            wall, g = once(forked)
            acc.append(wall)
            genos.add(json.dumps(g, sort_keys=True))
    f, s = statistics.median(fork), statistics.median(sub)
    print(f"tiny search, median of {reps}: forked {f:.2f} s, fresh interpreter {s:.2f} s, "
          f"ratio {s / f:.1f}x; same genotype: {len(genos) == 1}")


if __name__ == "__main__":
    main()
