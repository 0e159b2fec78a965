"""Does a method's pull on the found cell replicate? (issues 11 and 15)

The grid found that DSRNA-CB's cells hold more parameter-free ops (pools, skip, none) than
PC-DARTS's with the same seeds. Searches at this scale are chaotic (a re-run on another CPU
finds another cell), so a difference seen once could be noise. This script counts the
parameter-free ops of every cell in several sets of the same searches (e.g. the grid's record,
a re-run under the same schedule on another machine, a re-run under another schedule) and tests
each DSRNA variant against a baseline within each set (Welch over seeds, paired by seed) and
pooled over the sets (pairs: same set and seed).

    python bench/cell_replication.py grid=results/grid/search cosine=runs/sched/cosine \\
        cosine2=runs/sched/cosine2 [--baseline pcdarts] [--methods dsrna_cb dsrna_jacobian]

Each set directory holds ``<method>_s<seed>/genotype.json``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrna_dist import genotype as G  # noqa: E402
from dsrna_dist import stats  # noqa: E402

Counts = Dict[str, Dict[int, Tuple[int, int]]]  # method -> seed -> (normal, reduce)


def counts(run_set: Path) -> Counts:
    """Parameter-free ops (normal, reduce) of every finished search in ``run_set``."""
    out: Counts = {}
    for g in sorted(run_set.glob("*_s*/genotype.json")):
        m = re.fullmatch(r"(.+)_s(\d+)", g.parent.name)
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = G.load(str(g)).param_free_ops()
    return out


def fmt(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    return f"{stats.mean(xs):.1f} ± {stats.std(xs):.1f} (n={len(xs)})" if len(xs) > 1 else f"{xs[0]:.0f} (n=1)"


def test(a: Dict[object, float], b: Dict[object, float]) -> str:
    """Difference of means, Welch's p over all searches, paired p over the keys both have."""
    w = stats.welch(list(a.values()), list(b.values()))
    common = sorted(set(a) & set(b), key=str)
    p = stats.paired([a[k] for k in common], [b[k] for k in common]) if len(common) >= 2 else None
    if not (w or p):
        return "-"
    diff = (w or p).diff
    wp = f"{w.p:.3g}" if w else "-"
    pp = f"{p.p:.3g} ({len(common)} pairs)" if p else "-"
    return f"{diff:+.2f}, Welch p = {wp}, paired p = {pp}"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+", help="label=directory of <method>_s<seed> search runs")
    ap.add_argument("--baseline", default="pcdarts")
    ap.add_argument("--methods", nargs="+", default=["dsrna_cb", "dsrna_jacobian"])
    args = ap.parse_args(argv)
    sets: List[Tuple[str, Counts]] = []
    for s in args.sets:
        label, sep, path = s.partition("=")
        if not sep or not Path(path).is_dir():
            ap.error(f"set {s!r}: expected label=directory")
        sets.append((label, counts(Path(path))))
    methods = sorted({m for _, c in sets for m in c})
    print("Parameter-free ops of 12 (normal + reduction cell), mean ± std over seeds:\n")
    print("| method | " + " | ".join(lbl for lbl, _ in sets) + " |\n|" + "---|" * (len(sets) + 1))
    for m in methods:
        cells = [fmt([float(sum(v)) for v in c.get(m, {}).values()]) for _, c in sets]
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(f"\nEach method against {args.baseline} (difference of means in ops of 12):\n")
    print("| method | " + " | ".join(lbl for lbl, _ in sets) + " | pooled |\n|" + "---|" * (len(sets) + 2))
    for m in args.methods:
        cells, pa, pb = [], {}, {}
        for lbl, c in sets:
            a = {s: float(sum(v)) for s, v in c.get(m, {}).items()}
            b = {s: float(sum(v)) for s, v in c.get(args.baseline, {}).items()}
            cells.append(test(a, b))
            if not (a and b):
                continue  # pooled: only sets that ran both
            pa.update({(lbl, s): v for s, v in a.items()})
            pb.update({(lbl, s): v for s, v in b.items()})
        print(f"| {m} | " + " | ".join(cells) + f" | {test(pa, pb)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
