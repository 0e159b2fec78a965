"""The rest of issue #15's grid, in the planned order (RESULTS.md, "What remains"), as one command.

Each step is one ``bench/grid.py --no-wait`` invocation; a worker leaves a step when every task
of it left is done or held by another live worker, and takes the next step's tasks instead of
idling; after the last step it walks the queue again from the first (a step's tasks appear as
their inputs land, and a held task may fail or its worker die), until a pass finds nothing held
by others and nothing to run. So two workers started 30 s apart walk the queue together, the
queue's order is the order of work, and a killed worker resumes where the tasks stopped. Done
tasks are skipped, so the queue is idempotent: rerun it after any stop.

    OMP_NUM_THREADS=1 nohup python bench/grid_queue.py > w1.log 2>&1 &   # one per core
    python bench/grid_queue.py --list                                      # the steps, run nothing
    python bench/grid_queue.py --from group2-autoattack                    # start at a named step
    nohup bash bench/grid_commit.sh 600 > commit.log 2>&1 &               # commit stages as they land

The capacity controls (``grid.py --stages control``: the widths of ``grid.CONTROLS`` are chosen
by hand to match the DSRNA-CB cell's parameter count) are the step after the searches.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grid  # noqa: E402

CORE = ["darts", "pcdarts", "dsrna_jacobian", "dsrna_cb"]
GROUP2 = ["sdarts_adv", "pcdarts_adv", "dsrna_jacobian_gamma", "dsrna_cb_gamma"]
GROUP3 = ["pdarts", "robnet", "dsrna_cb_gamma_reset"]
GROUP4 = ["dartsplus", "darts_2nd", "sdarts_rs"]
ALL_STAGES = ["search", "train", "eval", "certify", "autoattack"]

#: (name, grid.py arguments): the order of RESULTS.md's "What remains" table
STEPS: Tuple[Tuple[str, List[str]], ...] = (
    ("replication", ["--methods", "darts", "dsrna_cb", "--seeds", *"3456789", "--recipes", "pbn",
                     "--stages", *ALL_STAGES]),
    ("group2-autoattack", ["--methods", *GROUP2, "--stages", "autoattack"]),
    # every method searched before the hours-long stages: searches are minutes each (~6 worker-h
    # for both groups), and each gives the convergence table a method it lacks
    ("group3-search", ["--methods", *GROUP3, "--stages", "search"]),
    ("group4-search", ["--methods", *GROUP4, "--stages", "search"]),
    # claim (2)'s accuracy deficit of DSRNA-CB's seed-0 / seed-1 cells: the cell, or the width?
    ("capacity-control", ["--methods", "darts", "--seeds", "0", "1", "--stages", grid.CONTROL]),
    ("core-pbn-crown", ["--methods", *CORE, "--recipes", "pbn", "--stages", "crown"]),
    ("core-adv-rebuild", ["--methods", *CORE, "--recipes", "adv", "--rebuild", "adopt",
                          "--stages", "eval", "certify", "autoattack"]),
    ("group3", ["--methods", *GROUP3, "--stages", *ALL_STAGES]),
    # claim (3) is the paper's claim about naturally trained nets: their full-CROWN radii first
    # (the pbn family's 30 tests), the PGD-AT nets' after
    ("crown-rest-pbn", ["--methods", *GROUP2, *GROUP3, "--recipes", "pbn", "--stages", "crown"]),
    ("crown-rest-adv", ["--methods", *CORE, *GROUP2, *GROUP3, "--recipes", "adv", "--stages", "crown"]),
)


def select(start: Optional[str]) -> List[Tuple[str, List[str]]]:
    """The steps from ``start`` on (all when None); an unknown name is an error naming it."""
    names = [n for n, _ in STEPS]
    if start is not None and start not in names:
        raise SystemExit(f"grid_queue.py: --from: no step '{start}' (steps: {', '.join(names)})")
    return list(STEPS[names.index(start):] if start else STEPS)


def main(argv: Optional[Sequence[str]] = None, poll_s: float = 60.0) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="start", default=None, help="start at this step (see --list)")
    ap.add_argument("--list", action="store_true", help="print the steps and their grid.py arguments")
    args = ap.parse_args(argv)
    steps = select(args.start)
    if args.list:
        for name, a in steps:
            print(f"{name}: python bench/grid.py {' '.join(a)}")
        return 0
    failed, idle = 0, False
    while True:
        ran = waiting = 0
        for name, a in steps:
            if not idle:  # a worker polling on other workers' tasks logs only what it runs
                print(f"[queue] {name}: grid.py {' '.join(a)}", flush=True)
            out = grid.work([*a, "--no-wait", *(["--quiet"] if idle else [])])
            failed += out.failed  # a failed task is marked in .failed/ and skipped; go on
            ran, waiting = ran + out.ran, waiting + out.waiting
        if not waiting:
            return 1 if failed else 0
        if not ran:  # everything left is held by other workers: look again in a while
            if not idle:
                print(f"[queue] {waiting} tasks left, all held by other workers: polling every {poll_s:g} s", flush=True)
            time.sleep(poll_s)
        idle = not ran


if __name__ == "__main__":
    sys.exit(main())
